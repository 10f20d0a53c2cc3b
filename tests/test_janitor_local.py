"""The janitor against the real local backend: two live endpoints (router + model server processes
serving the tiny Phi3), one called and one not; one sweep deletes exactly the idle one. The ledger and
the audit log are the in-memory fakes: the test is about the janitor and the local backend."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.domain.janitor_rules import JanitorPolicy, Rule
from shared.domain.naming import OWNER_TAG
from shared.domain.resources import DeploymentSpec, ModelRef, ProvisioningState
from shared.domain.runs import RunState, new_record
from shared.usecases.janitor import sweep_idle_endpoints
from tests.fakes import InMemoryAuditLog, InMemoryLedger
from tests.scoring_support import score_endpoint
from tests.support import wait_for

INSTANCE = "tg-janitor-local"
IDLE = timedelta(seconds=8)


@pytest.fixture
def local_backend(tmp_path: Path) -> Iterator[Any]:
    """A LocalBackend in a temporary workspace; every router and server it starts is stopped after."""
    from tunegrid.local import LocalBackend
    from tunegrid.local.base_models import prepare_tiny_phi3

    backend = LocalBackend(tmp_path / "ws", webhook_url=None, instance=INSTANCE)
    tiny = prepare_tiny_phi3()
    # A registered model needs a finished fine-tune; the tiny base model's folder stands in for it.
    backend.endpoints.resolve_model = lambda name, version: tiny
    yield backend
    backend.stop_processes()


def _deploy(backend: Any, name: str) -> None:
    backend.begin_create_endpoint(name, tags={OWNER_TAG: INSTANCE})
    model = ModelRef(name="tiny", version="1", id="models:/tiny/1")
    backend.begin_create_deployment(
        DeploymentSpec(endpoint=name, name="blue", model=model, instance_type="local", liveness_initial_delay_s=120)
    )


def _wait_ready(backend: Any, names: list[str], *, timeout_s: float = 180.0) -> None:
    def ready() -> bool:
        infos = [backend.get_endpoint(n) for n in names]
        failed = [i for i in infos if i and any(d.error for d in i.deployments)]
        assert not failed, [d.error for i in failed for d in i.deployments]
        states = [(i.provisioning_state, *(d.provisioning_state for d in i.deployments)) for i in infos if i]
        return len(states) == len(names) and all(s == ProvisioningState.SUCCEEDED for st in states for s in st)

    wait_for(ready, timeout_s=timeout_s, what=f"endpoints {names} to be ready", interval_s=0.5)


@pytest.mark.slow
def test_idle_local_endpoint_deleted_called_one_kept(local_backend: Any) -> None:
    """With a short idle window, the endpoint nobody calls is deleted on the next sweep; the called one stays."""
    backend = local_backend
    for name in ("called-ep", "idle-ep"):
        _deploy(backend, name)
    _wait_ready(backend, ["called-ep", "idle-ep"])
    for name in ("called-ep", "idle-ep"):
        backend.begin_set_traffic(name, {"blue": 100})

    ledger = InMemoryLedger()
    for run_id, endpoint in (("rcalled", "called-ep"), ("ridle", "idle-ep")):
        record = new_record(
            run_id=run_id, container="training-data", blob=f"{run_id}.jsonl", blob_version="v", backend="local"
        )
        ledger.create(replace(record, state=RunState.LIVE, endpoint=endpoint, deployment="blue"))
    audit = InMemoryAuditLog()

    # both endpoints must be older than the idle window before the sweep can call one of them idle
    old_enough = max(backend.get_endpoint(n).created_at for n in ("called-ep", "idle-ep")) + IDLE
    wait_for(lambda: datetime.now(UTC) > old_enough, timeout_s=60, what="the idle window to pass")
    body = {"input_data": {"input_string": [[{"role": "user", "content": "hi"}]], "parameters": {"max_new_tokens": 2}}}
    assert score_endpoint(backend, "called-ep", body).status == 200

    report = sweep_idle_endpoints(
        backend=backend,
        ledger=ledger,
        audit=audit,
        last_proxy_use=lambda endpoint: None,  # nothing went through the scoring proxy
        policy=JanitorPolicy(instance=INSTANCE, idle=IDLE, grace=timedelta(0)),
    )

    by_target = {d.target: d for d in report.decisions}
    assert (by_target["idle-ep"].action, by_target["idle-ep"].rule) == ("delete", Rule.IDLE)
    assert (by_target["called-ep"].action, by_target["called-ep"].rule) == ("keep", Rule.IN_USE)
    assert by_target["called-ep"].last_use is not None
    assert backend.get_endpoint("idle-ep") is None
    assert backend.get_endpoint("called-ep").provisioning_state == ProvisioningState.SUCCEEDED
    assert score_endpoint(backend, "called-ep", body).status == 200
    states = {r.run_id: r.state for r in ledger.list()}
    assert states == {"ridle": RunState.RETIRED, "rcalled": RunState.LIVE}
    rows = {r["target"]: r for r in audit.rows()}
    assert rows["idle-ep"]["rule"] == "idle" and rows["called-ep"]["rule"] == "in-use"
