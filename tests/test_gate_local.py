"""The evaluation gate end to end on the local backend: real deployments (router + model server processes
serving the tiny Phi3) answer the gate's rows greedily over HTTP, through the same endpoint caller the app
builds (`EndpointCaller`: the aiohttp client and the credential cache). One endpoint, `blue` live; a new
deployment held to a sidecar threshold it cannot reach is rolled back (blue keeps its traffic, the new one is
deleted); the next one, with no threshold and answers as good as blue's, is promoted and goes live."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shared.domain.naming import OWNER_TAG
from shared.domain.resources import DeploymentSpec, ModelRef, ProvisioningState
from shared.domain.runs import RunState, new_record
from shared.settings import PREPARED_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run
from tests.fakes import InMemoryBlobs, InMemoryLedger
from tests.support import wait_for

INSTANCE = "tg-gate-local"
ENDPOINT = "gate-ep"
SAMPLES = Path(__file__).resolve().parent.parent / "samples"

pytestmark = pytest.mark.slow


@pytest.fixture
def local_backend(tmp_path: Path) -> Iterator[Any]:
    """A LocalBackend in a temporary workspace serving the tiny Phi3; every process it starts is stopped after."""
    from tunegrid.local import LocalBackend
    from tunegrid.local.base_models import prepare_tiny_phi3

    backend = LocalBackend(tmp_path / "ws", webhook_url=None, instance=INSTANCE)
    tiny = prepare_tiny_phi3()
    # A registered model needs a finished fine-tune; the tiny base model's folder stands in for it.
    backend.endpoints.resolve_model = lambda name, version: tiny
    yield backend
    backend.stop_processes()


@pytest.fixture
def upstream(local_backend: Any) -> Iterator[Any]:
    """The app's endpoint caller (as `AppContext.upstream` builds it), closed after the test."""
    from shared.adapters.endpoint_credentials import CredentialCache, EndpointCaller
    from shared.adapters.http_client import HttpClient

    caller = EndpointCaller(HttpClient(), CredentialCache(local_backend.get_credentials, ttl_s=600))
    yield caller
    caller.close_blocking()


def _deploy(backend: Any, name: str) -> None:
    model = ModelRef(name="tiny", version="1", id="models:/tiny/1")
    backend.begin_create_deployment(
        DeploymentSpec(endpoint=ENDPOINT, name=name, model=model, instance_type="local", liveness_initial_delay_s=120)
    )

    def ready() -> bool:
        dep = backend.get_deployment(ENDPOINT, name)
        assert dep is None or not dep.error, dep.error
        return dep is not None and dep.provisioning_state == ProvisioningState.SUCCEEDED

    wait_for(ready, timeout_s=180, what=f"deployment {name}", interval_s=0.5)


def _run(run_id: str, deployment: str, state: RunState, *, gate: dict[str, float] | None = None) -> Any:
    record = new_record(
        run_id=run_id, container="training-data", blob="family.jsonl", blob_version=run_id, backend="local"
    )
    return replace(
        record,
        state=state,
        endpoint=ENDPOINT,
        deployment=deployment,
        previous_deployment="blue" if deployment != "blue" else "",
        model_name="tiny",
        model_version="1",
        extra={"test": {"container": PREPARED_CONTAINER, "blob": "gate/test.jsonl"}, "sidecar": {"gate": gate or {}}},
    )


def test_the_gate_scores_real_local_deployments_and_decides(local_backend: Any, upstream: Any) -> None:
    """Blue live; `green` must reach ROUGE-L 0.99 (sidecar): rolled back, blue keeps 100 %; `teal`, no threshold,
    answers as well as blue (the same model, greedy): promoted, 100 % on teal, blue deleted, its run retired."""
    backend = local_backend
    backend.begin_create_endpoint(ENDPOINT, tags={OWNER_TAG: INSTANCE})
    _deploy(backend, "blue")
    backend.begin_set_traffic(ENDPOINT, {"blue": 100})
    blobs = InMemoryBlobs()
    rows = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()[:3]
    blobs.upload(PREPARED_CONTAINER, "gate/test.jsonl", b"\n".join(rows) + b"\n")
    ledger = InMemoryLedger(
        [_run("rblue", "blue", RunState.LIVE), _run("rgreen", "green", RunState.EVALUATING, gate={"min_rouge_l": 0.99})]
    )
    settings = Settings.from_env({"TUNEGRID_INSTANCE": INSTANCE, "GATE_ROWS": "2", "GATE_MAX_NEW_TOKENS": "8"})
    rollout = Rollout(ledger=ledger, backend=backend, blobs=blobs, settings=settings, upstream=upstream)

    _deploy(backend, "green")
    green = advance_run("rgreen", rollout)
    assert green.state == RunState.ROLLED_BACK, green.error
    assert green.error.startswith("gate: ROUGE-L ") and "below the sidecar's min_rouge_l 0.99" in green.error
    gate = green.gate
    assert gate["rows"] == 2 and gate["live"]["deployment"] == "blue"
    assert gate["new"]["rouge_l"] == gate["live"]["rouge_l"]  # the same model answers the same, greedy
    assert [s["new"] for s in gate["samples"]] == [s["live"] for s in gate["samples"]]
    wait_for(lambda: backend.get_deployment(ENDPOINT, "green") is None, timeout_s=60, what="green deleted")
    assert backend.get_endpoint(ENDPOINT).traffic.get("blue") == 100

    _deploy(backend, "teal")
    ledger.create(_run("rteal", "teal", RunState.EVALUATING))
    teal = advance_run("rteal", rollout)
    for _ in range(40):
        if teal.state == RunState.LIVE:
            break
        wait_for(lambda: not backend.get_endpoint(ENDPOINT).provisioning_state.in_progress, timeout_s=30, what="update")
        teal = advance_run("rteal", rollout)
    assert teal.state == RunState.LIVE, (teal.state, teal.error)
    assert teal.gate["verdict"] == "promoted" and teal.gate["new"]["rouge_l"] == teal.gate["live"]["rouge_l"]
    assert [s for s, _ in teal.timeline][-2:] == ["shifting-traffic", "live"]
    assert backend.get_endpoint(ENDPOINT).traffic.get("teal") == 100
    assert ledger.get("rblue").state == RunState.RETIRED
    assert json.loads(json.dumps(teal.gate)) == teal.gate  # plain JSON, as the ledger stores it
