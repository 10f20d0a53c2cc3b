"""The evaluation gate (state `evaluating`, between the smoke test and the traffic shift): the new deployment
takes the live one's traffic only if it answers the run's test rows at least about as well.

The same `GATE_ROWS` rows of the run's test split go, with greedy decoding, to the new deployment and to the
live one, each by deployment name through the shared endpoint caller; both answers are scored against the
row's reference assistant turn with ROUGE-L F1 (`rouge-score`, Porter stemming). The job's final `eval_loss`
is reported next to them when the backend logged it. The rule is `shared.domain.gate.decide`. A limit of the
metric: rouge-score's tokenizer keeps ASCII letters and digits only, so answers in other scripts score 0 for both
models and the comparison says nothing (such data is better gated on the sidecar's `max_eval_loss`).

Promoted: on to `shifting-traffic`. Not promoted: `rolled-back`, reason `gate: ...`; the live deployment
keeps its traffic (mirrored traffic to the new one is removed first) and the new deployment is deleted.
A call that fails (the live deployment unreachable, throttled, erroring) is retried on the next tick, up to
`ATTEMPTS` evaluations; then the run is rolled back with a reason naming the deployment and the error.

Like every endpoint step, the gate runs under the run lease and the endpoint lease (`leases.Held`), renewed
before each row and before each side effect; the deletion of a rolled-back deployment follows the won move to
`rolled-back`. A run canceled or superseded while it is evaluating ends at once, and its 0 % deployment is
removed by the undo (`ending.py`), as in the other roll-out states.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from shared.domain.clock import utcnow
from shared.domain.gate import GateThresholds, Scores, decide
from shared.domain.runs import RunRecord, RunState
from shared.errors import TransientError, TunegridError, UpstreamError
from shared.usecases.rollout.ending import end_held
from shared.usecases.rollout.leases import Held, authorise, hold_endpoint, move, release, release_endpoint, write
from shared.usecases.rollout.model import GATE_CALL_TRIES, GATE_MAX_RETRY_AFTER_S, Rollout

log = logging.getLogger(__name__)

ATTEMPTS = 5
"""Evaluations tried (one per tick or event) before a deployment that cannot be scored ends the run."""
CALL_TRIES = GATE_CALL_TRIES
"""Tries of one call within an evaluation when it is throttled (429, 503) or fails transiently (the lease TTL
covers them: `shared.usecases.rollout.model.lease_ttl_for`)."""
MAX_RETRY_AFTER_S = GATE_MAX_RETRY_AFTER_S
SAMPLES_SHOWN = 3
SAMPLE_CHARS = 300
METRIC = "ROUGE-L F1 (rouge-score, Porter stemming) of the answer against the row's reference assistant turn"


@dataclass(frozen=True)
class GateRow:
    conversation: list[dict[str, Any]]
    reference: str


def gate_rows(record: RunRecord, rollout: Rollout, limit: int) -> list[GateRow]:
    """The first `limit` rows of the run's test split that end in an assistant turn: the conversation up to
    that turn (the prompt) and the turn itself (the reference)."""
    from shared.domain.validation import iter_lines

    test = record.extra.get("test") or {}
    out: list[GateRow] = []
    if not test or limit <= 0:
        return out
    chunks = rollout.blobs.chunks(test["container"], test["blob"])
    for _, line in iter_lines(chunks, max_line_bytes=rollout.settings.validation_max_line_bytes):
        if line is None or not line.strip():
            continue
        messages = [m for m in orjson.loads(line).get("messages") or [] if isinstance(m, dict)]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
        reference = str(messages[last].get("content") or "") if last > 0 else ""
        if reference.strip():
            out.append(GateRow([{"role": m["role"], "content": m["content"]} for m in messages[:last]], reference))
        if len(out) >= limit:
            break
    return out


def _ask(record: RunRecord, rollout: Rollout, deployment: str, conversation: list[dict[str, Any]], row: int) -> str:
    """One greedy answer of `deployment`; any failure raises (`UpstreamError` / `TransientError`)."""
    from shared.usecases.scoring import normalise_output

    body = {
        "input_data": {
            "input_string": [conversation],
            "parameters": {
                "do_sample": False,
                "temperature": 0.0,
                "max_new_tokens": rollout.settings.gate_max_new_tokens,
            },
        },
        "params": {},
    }
    for attempt in range(CALL_TRIES):
        try:
            reply = rollout.upstream.post_json_blocking(
                record.endpoint,
                deployment,
                orjson.dumps(body),
                request_id=f"gate-{record.run_id}-{row}-{deployment}"[:120],
                timeout_s=rollout.settings.smoke_timeout_s,
            )
        except TransientError:
            if attempt + 1 == CALL_TRIES:
                raise
            continue
        if reply.status in (429, 503) and attempt + 1 < CALL_TRIES:
            time.sleep(min(reply.retry_after or 0.0, MAX_RETRY_AFTER_S))  # the deployment asked to wait
            continue
        break
    if reply.status >= 400:
        snippet = reply.body[:200].decode("utf-8", "replace")
        raise UpstreamError(f"HTTP {reply.status}: {snippet}", status=reply.status)
    try:
        texts = normalise_output(orjson.loads(reply.body)).texts
    except orjson.JSONDecodeError:
        raise UpstreamError("answered with invalid JSON") from None
    return texts[0] if texts else ""


def rouge_l(references: Sequence[str], answers: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each answer against its reference (0 for an empty answer)."""
    from rouge_score import rouge_scorer  # imported here: nltk takes about a second to import

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(scorer.score(ref, ans)["rougeL"].fmeasure) if ans.strip() else 0.0
        for ref, ans in zip(references, answers, strict=True)
    ]


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


class _Unscored(Exception):
    """A deployment could not be asked (unreachable, throttled, erroring): the evaluation is retried. `held`:
    the lease as last renewed, for the step's next write."""

    def __init__(self, deployment: str, role: str, cause: Exception, held: Held) -> None:
        super().__init__(f"the {role} deployment {deployment} could not be scored: {cause}")
        self.deployment = deployment
        self.role = role
        self.held = held


def _answers(held: Held, rollout: Rollout, rows: list[GateRow], live: str) -> tuple[list[str], list[str], Held]:
    """The new and the live deployment's answers to every row (both asked at once, row after row), and the lease
    as renewed before each row: a row is the longest stretch the lease has to cover (`lease_ttl_for`). A lost
    lease raises `ConflictError` before the next row is asked."""
    record = held.record
    targets = [("new", record.deployment)] + ([("live", live)] if live else [])
    answers: dict[str, list[str]] = {role: [] for role, _ in targets}
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="tunegrid-gate") as pool:
        for i, row in enumerate(rows):
            held = authorise(held, rollout)
            futures = [
                (role, name, pool.submit(_ask, record, rollout, name, row.conversation, i)) for role, name in targets
            ]
            for role, name, future in futures:
                try:
                    answers[role].append(future.result())
                except (TunegridError, OSError) as exc:
                    for _, _, other in futures:
                        other.cancel()
                    raise _Unscored(name, role, exc, held) from exc
    return answers["new"], answers.get("live", []), held


def _live_run(record: RunRecord, rollout: Rollout, live: str) -> RunRecord | None:
    return next(
        (
            r
            for r in rollout.ledger.list()
            if r.endpoint == record.endpoint and r.deployment == live and r.run_id != record.run_id
        ),
        None,
    )


def _eval_loss(record: RunRecord | None) -> float | None:
    value = (record.metrics.get("eval_loss") if record is not None else None) or {}
    last = value.get("last") if isinstance(value, dict) else value
    return float(last) if isinstance(last, int | float) and not isinstance(last, bool) else None


def _short(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def step_evaluate(held: Held, rollout: Rollout) -> RunRecord | None:
    """The gate's step, under the run lease and the endpoint lease (like the other endpoint steps: the live
    deployment it compares with cannot change under it, and no other roll-out shifts the traffic meanwhile)."""
    record = held.record
    if not hold_endpoint(held, rollout):
        return release(held, rollout)
    gate = dict(record.gate or {})
    if gate.get("verdict") == "rolled-back":  # decided on an earlier tick; the removal is under way
        return _roll_back(held, rollout, gate)
    settings = rollout.settings
    sidecar = record.extra.get("sidecar") or {}
    thresholds = GateThresholds.of(setting_regression=settings.gate_max_regression, sidecar=sidecar.get("gate"))
    notes: list[str] = []
    live = record.previous_deployment if record.previous_deployment != record.deployment else ""
    if live and rollout.backend.get_deployment(record.endpoint, live) is None:
        notes.append(f"the live deployment {live} no longer exists: nothing to compare with")
        live = ""
    rows = gate_rows(record, rollout, settings.gate_rows)
    attempts = int(gate.get("attempts") or 0) + 1
    try:
        new_answers, live_answers, held = _answers(held, rollout, rows, live)
    except _Unscored as exc:
        held = exc.held
        if attempts < ATTEMPTS:
            # The count is written under the lease; the roll-out gives the lease back on the TransientError.
            write(held, rollout, gate={**gate, "attempts": attempts, "last_error": str(exc)})
            raise TransientError(f"gate: {exc} (attempt {attempts} of {ATTEMPTS}; the next tick retries)") from exc
        log.warning("run %s: gate gave up: %s", record.run_id, exc, extra={"run_id": record.run_id})
        reason = f"gate: {exc}, {attempts} attempts; the new deployment was removed, the live one keeps its traffic"
        doc = {
            "verdict": "rolled-back",
            "decided_at": utcnow().isoformat(),
            "attempts": attempts,
            "unreachable": {"deployment": exc.deployment, "role": exc.role},
            "reasons": [str(exc)],
            "reason": reason,
        }
        return _roll_back(held, rollout, doc)
    references = [r.reference for r in rows]
    new_scores = rouge_l(references, new_answers)
    live_scores = rouge_l(references, live_answers) if live else []
    live_record = _live_run(record, rollout, live) if live else None
    new = Scores(rouge_l=_mean(new_scores), eval_loss=_eval_loss(record))
    old = Scores(rouge_l=_mean(live_scores), eval_loss=_eval_loss(live_record)) if live else None
    verdict = decide(new, old, thresholds)
    doc = {
        "verdict": "promoted" if verdict.promote else "rolled-back",
        "decided_at": utcnow().isoformat(),
        "metric": METRIC,
        "rows": len(rows),
        "max_new_tokens": settings.gate_max_new_tokens,
        "attempts": attempts,
        "new": {"deployment": record.deployment, "rouge_l": new.rouge_l, "eval_loss": new.eval_loss},
        "live": None
        if old is None
        else {
            "deployment": live,
            "run_id": live_record.run_id if live_record else None,
            "rouge_l": old.rouge_l,
            "eval_loss": old.eval_loss,
        },
        "thresholds": thresholds.to_dict(),
        "reasons": list(verdict.reasons),
        "notes": [*notes, *verdict.notes],
        "samples": [
            {
                "row": i,
                "prompt": _short(str(rows[i].conversation[-1].get("content", ""))),
                "reference": _short(rows[i].reference),
                "new": _short(new_answers[i]),
                "new_rouge_l": round(new_scores[i], 4),
                **({"live": _short(live_answers[i]), "live_rouge_l": round(live_scores[i], 4)} if live else {}),
            }
            for i in range(min(SAMPLES_SHOWN, len(rows)))
        ],
    }
    log.info(
        "run %s: gate %s: new ROUGE-L %s, live %s over %d rows%s",
        record.run_id,
        doc["verdict"],
        new.rouge_l,
        old.rouge_l if old else "-",
        len(rows),
        f" ({verdict.sentence()})" if verdict.reasons else "",
        extra={"run_id": record.run_id},
    )
    if verdict.promote:
        return move(held, rollout, RunState.SHIFTING_TRAFFIC, gate=doc)
    doc["reason"] = f"gate: {verdict.sentence()}; the new deployment was removed, the live one keeps its traffic"
    return _roll_back(held, rollout, doc)


def _roll_back(held: Held, rollout: Rollout, doc: dict[str, Any]) -> RunRecord | None:
    """Take the new deployment out: its mirrored traffic first (a long operation: wait for it, the verdict kept
    on the record), then win the move to `rolled-back` and only then delete it (`end_held`: the undo)."""
    record = held.record
    backend = rollout.backend
    endpoint = backend.get_endpoint(record.endpoint)
    reason = str(doc.get("reason") or "gate: not promoted")
    if endpoint is not None:
        if endpoint.provisioning_state.in_progress:
            return release(held, rollout, gate=doc)
        if endpoint.traffic.get(record.deployment, 0) > 0:
            ended = move(
                held,
                rollout,
                RunState.ERROR,
                gate=doc,
                error=f"{reason}; but {record.deployment} takes live traffic now, so it was not removed",
            )
            release_endpoint(ended, rollout)
            return ended
        if endpoint.mirror_traffic.get(record.deployment, 0) > 0:
            mirror = {k: v for k, v in endpoint.mirror_traffic.items() if k != record.deployment}
            held = authorise(held, rollout)
            backend.begin_set_traffic(record.endpoint, dict(endpoint.traffic), mirror_traffic=mirror)
            log.info(
                "run %s: gate failed; removing the traffic mirrored to %s before deleting it",
                record.run_id,
                record.deployment,
                extra={"run_id": record.run_id},
            )
            return release(held, rollout, gate=doc)
    return end_held(held, rollout, RunState.ROLLED_BACK, reason, gate=doc)
