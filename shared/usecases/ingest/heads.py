"""Supersession and reuse, per dataset name (container + blob name):
- The newest version wins. When a version passes validation it takes the dataset's head
  (`shared.domain.leases.DatasetHead`, an ETag-conditional row with a sequence number), but only while its
  blob version is still the blob's current one (checked after reading the head, so two versions racing for
  the head are ordered by the blob itself). The runs of older versions that are not live yet end
  `superseded` (their jobs canceled, their 0 % deployments removed, see `shared.usecases.rollout.ending`),
  now or at their next roll-out step. A version overwritten while it is being validated ends `superseded`.
- Identical content is not trained twice: when the head's run is alive (in flight or live) and has the
  same fingerprint (dataset SHA-256, companion test file, effective sidecar and base model), the new version
  ends `duplicate`, pointing at that run, which is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging

from shared.domain.leases import DatasetHead, superseded_by
from shared.domain.runs import ALIVE, RunRecord, RunState
from shared.domain.sidecar import Sidecar
from shared.domain.validation import ValidationReport
from shared.errors import ConflictError, TransientError
from shared.usecases.rollout import Rollout
from shared.usecases.rollout.ending import end_if_alive

log = logging.getLogger(__name__)


def fingerprint_of(report: ValidationReport, test_report: ValidationReport | None, sidecar: Sidecar, base: str) -> str:
    """What makes two versions train the same model: the data, the test rows, the effective sidecar and the
    base model. Equal fingerprints mean the same job would be submitted again."""
    doc = {
        "data": report.stats.get("sha256", ""),
        "test": test_report.stats.get("sha256", "") if test_report is not None else "",
        "sidecar": sidecar.to_dict(),
        "base_model": base,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def take_head(record: RunRecord, rollout: Rollout, *, etag: str, fingerprint: str) -> DatasetHead | RunRecord | None:
    """Make this version the dataset's head: the new head (this run is the newest version), the alive run with
    the same fingerprint to reuse (this version is a duplicate), or None (the blob moved on: superseded)."""
    ledger = rollout.ledger
    for _ in range(16):
        head = ledger.get_dataset_head(record.container, record.blob) or DatasetHead(record.container, record.blob)
        if head.run_id == record.run_id:
            return head  # taken by an earlier delivery of this version (a takeover resumes here)
        props = rollout.blobs.properties(record.container, record.blob)  # read after the head: see the module doc
        if props is None or str(props["etag"]) != etag:
            return None
        if head.run_id:
            current = ledger.get(head.run_id)
            if current is not None and current.state in ALIVE and current.extra.get("fingerprint") == fingerprint:
                return current
        try:
            return ledger.put_dataset_head(head.advanced_to(record.run_id))
        except ConflictError:
            continue  # another version took it first: look again
    raise TransientError(f"dataset head of {record.container}/{record.blob} kept changing")


def supersede_older(record: RunRecord, head: DatasetHead, rollout: Rollout) -> None:
    """End the older versions' runs that are not live yet, now rather than at their next step (their jobs are
    canceled at once). Best effort: the roll-out ends any it misses (`superseded_by`)."""
    reason = f"superseded by run {record.run_id}, a newer version of {record.container}/{record.blob}"
    for other in rollout.ledger.find_by_dataset(record.container, record.blob):
        if superseded_by(other, head) is None:
            continue
        try:
            end_if_alive(other.run_id, rollout, RunState.SUPERSEDED, reason)
        except (ConflictError, TransientError, OSError) as exc:
            log.warning("run %s: not superseded now (%s); its next step will", other.run_id, exc)
