"""The evaluation gate over the in-memory ports: controlled answers behind the backend and upstream ports decide
whether a new model takes the live one's traffic. The rule itself is tested as a table; the gate against real
local deployments is in tests/test_gate_local.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.domain.gate import GateThresholds, Scores, decide
from shared.domain.resources import JobState, MetricPoint
from shared.domain.runs import RunState
from shared.settings import PREPARED_CONTAINER, RUN_REPORTS_CONTAINER, TRAINING_CONTAINER, Settings
from shared.usecases.rollout import Rollout, advance_run, run_report_markdown, tick
from shared.usecases.rollout.gate import ATTEMPTS, rouge_l
from tests.fakes import FakeBackend, FakeUpstream, InMemoryBlobs, InMemoryLedger
from tests.support import upload_and_ingest

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


class World:
    """The roll-out's ports in memory, one fake upstream whose answers the test controls."""

    def __init__(self, unique: str, **settings: str) -> None:
        self.settings = Settings.from_env(
            {"TUNEGRID_INSTANCE": f"t{unique}", "SMOKE_ROWS": "1", "GATE_ROWS": "4", **settings}
        )
        self.ledger = InMemoryLedger()
        self.blobs = InMemoryBlobs()
        self.backend = FakeBackend()
        self.upstream = FakeUpstream(self.backend)
        self.prefix = f"g{unique}/"

    def rollout(self) -> Rollout:
        return Rollout(
            ledger=self.ledger, backend=self.backend, blobs=self.blobs, settings=self.settings, upstream=self.upstream
        )

    def submit(
        self, *, offset: int, rows: int = 80, sidecar: dict[str, Any] | None = None, name: str = "family.jsonl"
    ) -> Any:
        lines = (SAMPLES / "ultrachat_small.jsonl").read_bytes().splitlines()
        blob = self.prefix + name
        if sidecar is not None:
            config = self.prefix + name.removesuffix(".jsonl") + ".config.json"
            self.blobs.upload(TRAINING_CONTAINER, config, json.dumps(sidecar).encode())
        outcome = upload_and_ingest(self, blob, b"\n".join(lines[offset : offset + rows]) + b"\n")
        assert outcome.action == "submitted", outcome
        record = self.ledger.get(outcome.run_id)
        self.backend.set_job(record.job_name, JobState.COMPLETED)
        return record

    def drive(self, run_id: str, *, ticks: int = 20) -> Any:
        rollout = self.rollout()
        for _ in range(ticks):
            tick(rollout)
            record = self.ledger.get(run_id)
            if record.state.terminal or record.state == RunState.LIVE:
                return record
        return self.ledger.get(run_id)

    def references(self, record: Any) -> dict[str, str]:
        """The test split's reference answers, by the conversation that leads to them."""
        raw = self.blobs.read_bytes(PREPARED_CONTAINER, record.extra["test"]["blob"], limit=10**8) or b""
        out = {}
        for line in raw.splitlines():
            messages = json.loads(line)["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out[_key(messages[:last])] = messages[last]["content"]
        return out


def _key(conversation: list[dict[str, Any]]) -> str:
    return json.dumps([[m["role"], m["content"]] for m in conversation])


def answers_like(references: dict[str, str], *, words: int | None = None) -> Callable[[str, list[Any]], str]:
    """A deployment that answers with the reference (its first `words` words): a model that learned the data."""

    def answer(deployment: str, conversation: list[Any]) -> str:
        text = references[_key(conversation)]
        return text if words is None else " ".join(text.split()[:words])

    return answer


def _serving(world: World, endpoint: str) -> dict[str, int]:
    """The deployments taking traffic now."""
    return {k: v for k, v in world.backend.get_endpoint(endpoint).traffic.items() if v}


def off_topic(deployment: str, conversation: list[Any]) -> str:
    return "I am sorry, I cannot help with that request today."


@pytest.fixture
def world(unique: str) -> World:
    return World(unique)


def _live_first(world: World, **answers: Any) -> Any:
    first = world.submit(offset=0)
    world.upstream.answerers[f"d-{first.run_id}"] = answers.get("first") or off_topic
    first = world.drive(first.run_id)
    assert first.state == RunState.LIVE, first.error
    return first


def test_a_better_model_is_promoted_with_both_scores_on_record(world: World) -> None:
    """The new model answers like the references, the live one off topic: promoted, both scores recorded."""
    first = _live_first(world)
    asked_before = len(world.upstream.to(first.deployment))
    second = world.submit(offset=300)
    world.upstream.answerers[f"d-{second.run_id}"] = answers_like(world.references(second))
    second = world.drive(second.run_id)
    assert second.state == RunState.LIVE, second.error
    gate = second.gate
    assert gate["verdict"] == "promoted" and gate["rows"] == 4
    assert gate["new"]["rouge_l"] == 1.0 and gate["live"]["rouge_l"] < 0.2
    assert gate["live"]["deployment"] == first.deployment and gate["live"]["run_id"] == first.run_id
    assert gate["new"]["eval_loss"] == 1.7 and gate["live"]["eval_loss"] == 1.7
    # the same rows went to both deployments, greedy, by deployment name
    to_new = [b for b in world.upstream.to(second.deployment) if b["input_data"]["parameters"]["max_new_tokens"] == 128]
    to_live = world.upstream.to(first.deployment)[asked_before:]
    assert len(to_new) == len(to_live) == 4
    assert [b["input_data"]["input_string"] for b in to_new] == [b["input_data"]["input_string"] for b in to_live]
    assert all(b["input_data"]["parameters"]["do_sample"] is False for b in to_new + to_live)
    assert len(gate["samples"]) == 3 and {"prompt", "reference", "new", "live"} <= set(gate["samples"][0])
    assert _serving(world, second.endpoint) == {second.deployment: 100}
    assert world.ledger.get(first.run_id).state == RunState.RETIRED


def test_a_worse_model_is_rolled_back_and_the_live_one_keeps_its_traffic(world: World) -> None:
    """The new model answers worse than the live one by more than GATE_MAX_REGRESSION: rolled back, reason gate."""
    first = world.submit(offset=0)
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(world.references(first))
    first = world.drive(first.run_id)
    second = world.submit(offset=300)
    references = {**world.references(first), **world.references(second)}
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(references)
    world.upstream.answerers[f"d-{second.run_id}"] = answers_like(references, words=3)
    second = world.drive(second.run_id)
    assert second.state == RunState.ROLLED_BACK
    assert second.error.startswith("gate: ROUGE-L ") and "below the live model's 1.0000" in second.error
    assert "the live one keeps its traffic" in second.error
    gate = second.gate
    assert gate["verdict"] == "rolled-back" and gate["live"]["rouge_l"] == 1.0 and gate["new"]["rouge_l"] < 0.5
    assert _serving(world, first.endpoint) == {first.deployment: 100}
    assert ("begin_delete_deployment", (second.endpoint, second.deployment)) in world.backend.log
    assert world.ledger.get(first.run_id).state == RunState.LIVE
    report = json.loads(world.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{second.run_id}/report.json"))
    assert report["gate"]["verdict"] == "rolled-back" and report["gate"]["new"]["rouge_l"] == gate["new"]["rouge_l"]
    markdown = (world.blobs.read_bytes(RUN_REPORTS_CONTAINER, f"{second.run_id}/report.md") or b"").decode()
    assert "## Evaluation gate" in markdown and "| row | prompt | reference | new | live |" in markdown


def test_a_small_regression_within_the_allowed_one_is_promoted(unique: str) -> None:
    """A new model a little worse than the live one, within GATE_MAX_REGRESSION, still goes live."""
    world = World(unique, GATE_MAX_REGRESSION="0.5")
    first = world.submit(offset=0)
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(world.references(first))
    first = world.drive(first.run_id)
    second = world.submit(offset=300)
    references = {**world.references(first), **world.references(second)}
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(references)
    world.upstream.answerers[f"d-{second.run_id}"] = answers_like(references, words=60)
    second = world.drive(second.run_id)
    assert second.state == RunState.LIVE, second.error
    assert 0.5 < second.gate["new"]["rouge_l"] < second.gate["live"]["rouge_l"] == 1.0


def test_the_first_model_without_thresholds_is_promoted(world: World) -> None:
    """Nothing to compare with and no threshold: even an off-topic first model goes live, with a note."""
    first = _live_first(world)
    assert first.gate["verdict"] == "promoted" and first.gate["live"] is None
    assert first.gate["new"]["rouge_l"] < 0.2
    assert any("first model on this endpoint" in n for n in first.gate["notes"])
    assert [s for s, _ in first.timeline][-4:] == ["smoke-testing", "evaluating", "shifting-traffic", "live"]


@pytest.mark.parametrize(
    ("gate", "good", "expected", "why"),
    [
        ({"min_rouge_l": 0.5}, False, RunState.ROLLED_BACK, "below the sidecar's min_rouge_l 0.5"),
        ({"min_rouge_l": 0.5}, True, RunState.LIVE, ""),
        ({"max_eval_loss": 1.0}, True, RunState.ROLLED_BACK, "final eval_loss 1.7000 is above the sidecar's"),
        ({"max_eval_loss": 2.0}, True, RunState.LIVE, ""),
    ],
)
def test_the_first_model_with_thresholds(
    world: World, gate: dict[str, float], good: bool, expected: RunState, why: str
) -> None:
    """The sidecar's absolute thresholds apply to the first model on an endpoint (ROUGE-L and eval_loss)."""
    record = world.submit(offset=0, sidecar={"gate": gate})
    world.upstream.answerers[f"d-{record.run_id}"] = answers_like(world.references(record)) if good else off_topic
    final = world.drive(record.run_id)
    assert final.state == expected, final.error
    assert final.gate["thresholds"] == {"max_regression": 0.02, "min_rouge_l": None, "max_eval_loss": None, **gate}
    if why:
        assert final.error.startswith("gate: ") and why in final.error
        assert ("begin_delete_deployment", (final.endpoint, final.deployment)) in world.backend.log


def test_an_unreachable_live_deployment_is_retried_then_ends_the_run_clearly(world: World) -> None:
    """The live deployment refuses connections: each tick retries (transient); after ATTEMPTS the run is rolled
    back with a reason naming it, and the live deployment keeps its traffic."""
    first = _live_first(world)
    second = world.submit(offset=300)
    world.upstream.unreachable.add(first.deployment)
    rollout = world.rollout()
    states = []
    for _ in range(ATTEMPTS + 8):
        tick(rollout)
        current = world.ledger.get(second.run_id)
        states.append(current.state)
        if current.state.terminal:
            break
    assert current.state == RunState.ROLLED_BACK
    evaluating = [s for s in states if s == RunState.EVALUATING]
    assert len(evaluating) == ATTEMPTS - 1  # one tick per failed try, the last one ends it
    assert current.error.startswith(f"gate: the live deployment {first.deployment} could not be scored: ")
    assert "Connection refused" in current.error and f"{ATTEMPTS} attempts" in current.error
    assert current.gate["unreachable"] == {"deployment": first.deployment, "role": "live"}
    assert _serving(world, first.endpoint) == {first.deployment: 100}
    assert ("begin_delete_deployment", (current.endpoint, current.deployment)) in world.backend.log
    assert world.ledger.get(first.run_id).state == RunState.LIVE


def test_a_live_deployment_that_comes_back_is_compared(world: World) -> None:
    """Unreachable on the first try, reachable on the next: the gate decides normally then."""
    first = _live_first(world)
    second = world.submit(offset=300)
    world.upstream.unreachable.add(first.deployment)
    rollout = world.rollout()
    while world.ledger.get(second.run_id).state != RunState.EVALUATING:
        tick(rollout)
    assert world.ledger.get(second.run_id).gate["attempts"] == 1
    world.upstream.unreachable.clear()
    final = world.drive(second.run_id)
    assert final.state == RunState.LIVE and final.gate["attempts"] == 2 and final.gate["live"]["rouge_l"] is not None


def test_a_rollback_removes_mirrored_traffic_before_deleting(unique: str) -> None:
    """With MIRROR_TRAFFIC_PERCENT, the failed new deployment loses its mirror first, then is deleted."""
    world = World(unique, MIRROR_TRAFFIC_PERCENT="10")
    first = world.submit(offset=0)
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(world.references(first))
    first = world.drive(first.run_id)
    second = world.submit(offset=300)
    world.upstream.answerers[f"d-{first.run_id}"] = answers_like(world.references(second))
    second = world.drive(second.run_id)
    assert second.state == RunState.ROLLED_BACK
    calls = [(m, a) for m, a in world.backend.log if m in ("begin_set_traffic", "begin_delete_deployment")]
    mirrors = [i for i, (m, a) in enumerate(calls) if m == "begin_set_traffic" and a[0] == second.endpoint]
    on = next(i for i in mirrors if calls[i][1][2] == {second.deployment: 10})
    off = next(i for i in mirrors if i > on and calls[i][1][2] == {})
    delete = calls.index(("begin_delete_deployment", (first.endpoint, second.deployment)))
    assert on < off < delete
    assert all(calls[i][1][1].get(first.deployment) == 100 for i in mirrors if i >= on)
    assert _serving(world, first.endpoint) == {first.deployment: 100}


def test_gate_rows_zero_compares_no_answers(unique: str) -> None:
    """GATE_ROWS=0: no answer is asked for; the run goes live with a note saying nothing was compared."""
    world = World(unique, GATE_ROWS="0")
    first = _live_first(world)
    second = world.submit(offset=300)
    calls = len(world.upstream.calls)
    second = world.drive(second.run_id)
    assert second.state == RunState.LIVE
    assert len(world.upstream.calls) - calls == 1  # the smoke row only
    assert second.gate["rows"] == 0 and any("not compared" in n for n in second.gate["notes"])
    assert first.run_id != second.run_id


def test_the_gate_never_runs_twice_for_a_decided_run(world: World) -> None:
    """A repeated event on a run past the gate asks no deployment again."""
    record = world.submit(offset=0)
    final = world.drive(record.run_id)
    calls = len(world.upstream.calls)
    advance_run(record.run_id, world.rollout())
    advance_run(record.run_id, world.rollout())
    assert world.ledger.get(record.run_id).state == final.state == RunState.LIVE
    assert len(world.upstream.calls) == calls


def test_report_and_status_show_both_scores_and_answers(world: World) -> None:
    """The run report's Markdown and `tunegrid status` show the verdict, both scores, rows and answers."""
    from shared.usecases.runs import run_status
    from tunegrid.commands.runs import render_status

    _live_first(world)
    second = world.submit(offset=300)
    world.upstream.answerers[f"d-{second.run_id}"] = answers_like(world.references(second))
    second = world.drive(second.run_id)
    markdown = run_report_markdown(second)
    assert "- verdict: **promoted**" in markdown
    assert f"- new `{second.deployment}`: ROUGE-L 1.0, eval_loss 1.7" in markdown
    assert "4 test rows, greedy" in markdown
    doc = run_status(world.ledger, world.backend, second.run_id)
    text = render_status(doc)
    assert re.search(
        r"\n  gate +promoted: new ROUGE-L 1.0 vs live 0\.\d+, eval_loss 1.7000 vs 1.7000 over 4 test rows", text
    )
    assert "gate answers" in text and "  new  (1.0): " in text and "  live (" in text and "reference: " in text


# ---- the gate under the roll-out's concurrency rules (issue 14) ------------------------------------------


def _until(world: World, run_id: str, state: RunState) -> Any:
    rollout = world.rollout()
    for _ in range(30):
        record = advance_run(run_id, rollout, max_steps=1)
        if record.state == state:
            return record
    raise AssertionError(f"run {run_id} never reached {state.value}")


def _traffic_calls(world: World) -> list[dict[str, int]]:
    return [a[1] for m, a in world.backend.log if m == "begin_set_traffic"]


def test_a_cancel_during_the_gate_stops_it_and_removes_the_new_deployment(world: World) -> None:
    """Cancel while the gate is asking its rows: the run ends canceled at once, the gate stops before its next
    row (its lease is gone), decides nothing, and the 0 % deployment is removed; the live one keeps its traffic."""
    from shared.usecases.runs import cancel_run

    first = _live_first(world)
    second = world.submit(offset=300)
    second = _until(world, second.run_id, RunState.EVALUATING)
    asked: list[int] = []

    def cancel_on_first_row(deployment: str, conversation: list[Any]) -> str:
        asked.append(1)
        if len(asked) == 1:
            cancel_run(world.ledger, world.backend, second.run_id, blobs=world.blobs, settings=world.settings)
        return "an answer"

    world.upstream.answerers[second.deployment] = cancel_on_first_row
    final = advance_run(second.run_id, world.rollout())
    assert final.state == RunState.CANCELED and final.error == "canceled by user"
    assert asked == [1], "the gate stopped before its next row"
    assert "verdict" not in final.gate
    assert ("begin_delete_deployment", (second.endpoint, second.deployment)) in world.backend.log
    assert all(t.get(second.deployment, 0) == 0 for t in _traffic_calls(world))
    assert _serving(world, first.endpoint) == {first.deployment: 100}
    assert world.ledger.get(first.run_id).state == RunState.LIVE


def test_a_newer_version_supersedes_a_run_in_the_gate(world: World) -> None:
    """A newer version of the dataset arrives while a run is being evaluated: the run ends superseded in the
    middle of the gate (its 0 % deployment removed, no verdict); the newer run is evaluated against the same
    live model and replaces it with one traffic shift."""
    first = _live_first(world)
    second = _until(world, world.submit(offset=300).run_id, RunState.EVALUATING)
    newer: list[Any] = []

    def newer_version_arrives(deployment: str, conversation: list[Any]) -> str:
        if not newer:
            newer.append(world.submit(offset=600))
        return "an answer"

    world.upstream.answerers[second.deployment] = newer_version_arrives
    stopped = advance_run(second.run_id, world.rollout())
    assert stopped.state == RunState.SUPERSEDED and newer[0].run_id in stopped.error
    assert "verdict" not in stopped.gate
    assert ("begin_delete_deployment", (second.endpoint, second.deployment)) in world.backend.log
    third = newer[0]
    world.upstream.answerers[f"d-{third.run_id}"] = answers_like(world.references(third))
    third = world.drive(third.run_id)
    assert third.state == RunState.LIVE and third.gate["live"]["run_id"] == first.run_id
    assert world.ledger.get(first.run_id).state == RunState.RETIRED
    full = [t for t in _traffic_calls(world) if 100 in t.values()]
    assert [next(d for d, p in t.items() if p == 100) for t in full] == [first.deployment, third.deployment]


def test_the_endpoint_lease_covers_the_gate(world: World) -> None:
    """Two dataset names of one model family share an endpoint. While the first run is in the gate (holding the
    endpoint lease), the second waits in deploying and creates nothing; then it deploys, is evaluated against
    the first (now live) and replaces it."""
    a = world.submit(offset=0, name="a/fam.jsonl")
    b = world.submit(offset=300, name="b/fam.jsonl")
    a = _until(world, a.run_id, RunState.EVALUATING)
    seen: list[Any] = []

    def other_worker_moves_b(deployment: str, conversation: list[Any]) -> str:
        if not seen:
            seen.append(advance_run(b.run_id, world.rollout()))
        return "an answer"

    world.upstream.answerers[a.deployment] = other_worker_moves_b
    a = world.drive(a.run_id)
    assert a.state == RunState.LIVE
    waiting = seen[0]
    assert waiting.state == RunState.DEPLOYING and waiting.endpoint == a.endpoint
    b = world.drive(b.run_id)
    assert b.state == RunState.LIVE and b.gate["live"]["run_id"] == a.run_id
    log = [(m, args) for m, args in world.backend.log if m in ("begin_create_deployment", "begin_set_traffic")]
    b_created = [i for i, (m, args) in enumerate(log) if m == "begin_create_deployment" and b.deployment in args]
    a_shifted = [i for i, (m, args) in enumerate(log) if m == "begin_set_traffic" and args[1].get(a.deployment) == 100]
    assert a_shifted and b_created and a_shifted[0] < b_created[0], "b created its deployment only after a's shift"
    assert world.ledger.get(a.run_id).state == RunState.RETIRED


def test_a_gate_that_lost_the_endpoint_lease_stops_before_its_next_row(world: World) -> None:
    """The endpoint lease is renewed before every row like the run lease: once another run that rolls out holds
    the endpoint (the row was written over by hand here), the gate asks nothing more and decides nothing."""
    from dataclasses import replace

    from shared.domain.clock import utcnow

    a = _until(world, world.submit(offset=0, name="a/fam.jsonl").run_id, RunState.EVALUATING)
    b = world.submit(offset=300, name="b/fam.jsonl")
    asked: list[int] = []

    def taken_over(deployment: str, conversation: list[Any]) -> str:
        asked.append(1)
        if len(asked) == 1:
            lease = world.ledger.get_endpoint_lease(a.endpoint)
            assert lease is not None and lease.holder == a.run_id
            other = replace(lease, holder=b.run_id, token="theirs", expires_at=utcnow() + timedelta(hours=1))
            world.ledger.put_endpoint_lease(other)
            rolling = world.ledger.get(b.run_id)
            world.ledger.update(rolling, state=RunState.DEPLOYING, endpoint=a.endpoint)
        return "an answer"

    world.upstream.answerers[a.deployment] = taken_over
    stopped = advance_run(a.run_id, world.rollout())
    assert stopped.state == RunState.EVALUATING and "verdict" not in stopped.gate
    assert asked == [1]
    assert not [m for m, _ in world.backend.log if m == "begin_set_traffic"]


@pytest.mark.parametrize(
    ("new", "live", "thresholds", "promote", "why"),
    [
        (Scores(0.30), Scores(0.31), GateThresholds(0.02), True, ""),
        (Scores(0.30), Scores(0.32), GateThresholds(0.02), True, ""),  # exactly the allowed regression
        (Scores(0.30), Scores(0.33), GateThresholds(0.02), False, "0.0300 below the live model's 0.3300"),
        (Scores(0.50), Scores(0.10), GateThresholds(0.02), True, ""),
        (Scores(0.30), None, GateThresholds(0.02), True, ""),
        (Scores(0.30), None, GateThresholds(0.02, min_rouge_l=0.4), False, "below the sidecar's min_rouge_l 0.4"),
        (Scores(0.30, 2.0), None, GateThresholds(0.02, max_eval_loss=1.5), False, "above the sidecar's max_eval_loss"),
        (Scores(0.30, None), None, GateThresholds(0.02, max_eval_loss=1.5), True, ""),  # not reported: a note
        (Scores(None), Scores(None), GateThresholds(0.02, min_rouge_l=0.1), False, "no answer was scored"),
    ],
)
def test_the_rule(new: Scores, live: Scores | None, thresholds: GateThresholds, promote: bool, why: str) -> None:
    """Promote when not worse than live by more than the allowed regression and above the absolute minimum."""
    verdict = decide(new, live, thresholds)
    assert verdict.promote is promote
    assert why in verdict.sentence() if why else not verdict.reasons


def test_the_sidecar_may_only_tighten_the_allowed_regression() -> None:
    """`gate.max_regression` lowers GATE_MAX_REGRESSION, never raises it."""
    assert GateThresholds.of(setting_regression=0.02, sidecar={"max_regression": 0.5}).max_regression == 0.02
    assert GateThresholds.of(setting_regression=0.02, sidecar={"max_regression": 0.01}).max_regression == 0.01


def test_rouge_l_scores() -> None:
    """Identical text scores 1, unrelated text near 0, an empty answer 0; stemming matches word forms."""
    ref = "Write clear subject lines and keep the message short."
    scores = rouge_l(
        [ref, ref, ref, ref], [ref, "Bananas are yellow.", "", "write clearer subject line, keep it short"]
    )
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[2] == 0.0 and 0.4 < scores[3] < 1.0


def test_eval_loss_of_the_job_is_the_last_point(world: World) -> None:
    """The gate reads the job's final eval_loss from the metrics the backend reported."""
    world.backend.metrics = {"eval_loss": [MetricPoint(1, 2.0), MetricPoint(9, 0.9)]}
    record = world.submit(offset=0, sidecar={"gate": {"max_eval_loss": 1.0}})
    final = world.drive(record.run_id)
    assert final.state == RunState.LIVE and final.gate["new"]["eval_loss"] == 0.9
