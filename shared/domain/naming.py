"""Names and tags: every name this app gives to a job, model, endpoint or deployment, derived
deterministically from the run, so that repeating a step finds what the first attempt created."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.domain.runs import RunRecord
    from shared.settings import Settings

OWNER_TAG = "tunegrid-owner"
"""Tag key on jobs, models and endpoints this app created. Its value is the app instance name."""
RUN_TAG = "tunegridrunid"
"""Dot-free job tag carrying our run id: Event Grid advanced filters cannot use keys with dots."""
DATASET_TAG = "tunegriddataset"
KEEP_TAG = "tunegrid-keep"


_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")


def azure_resource_name(*parts: str, max_len: int = 32, suffix: str = "") -> str:
    """A name valid for Azure ML endpoints/deployments: 3-32 chars, starts with a letter,
    letters, digits and hyphens, no trailing hyphen. Deterministic for the same input."""
    base = _NAME_BAD.sub("-", "-".join(p for p in parts if p)).strip("-").lower()
    base = re.sub(r"-{2,}", "-", base)
    if not base or not base[0].isalpha():
        base = "tg-" + base
    room = max_len - (len(suffix) + 1 if suffix else 0)
    base = base[:room].rstrip("-")
    name = f"{base}-{suffix}" if suffix else base
    if len(name) < 3:
        name = (name + "-tg")[:max_len]
    return name


_MODEL_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")


def azure_model_name(*parts: str, max_len: int = 255) -> str:
    """A registered model name: letters, digits, `-`, `_` and `.`, starting with a letter or digit."""
    base = _MODEL_BAD.sub("-", "-".join(p for p in parts if p)).strip("-_.")
    base = re.sub(r"-{2,}", "-", base)
    return (base or "tunegrid-model")[:max_len]


_REGISTRY_MODEL = re.compile(r"/models/([^/]+)(?:/(?:versions|labels)/[^/]+)?/?$")


def base_model_short_name(base_model: str) -> str:
    """`Phi-3-mini-4k-instruct` from a registry id (`azureml://registries/r/models/NAME/versions/15`),
    an `azureml:NAME:VERSION` reference, an HF id (`org/NAME`) or a local path."""
    match = _REGISTRY_MODEL.search(base_model)
    if match:
        return match.group(1)
    name = base_model.rstrip("/").rsplit("/", 1)[-1]
    if name.startswith("azureml:"):
        name = name.removeprefix("azureml:")
    return name.split(":")[0] or "model"


def dataset_stem_of(record: RunRecord) -> str:
    return record.blob.rsplit("/", 1)[-1].removesuffix(".jsonl")


def model_name_for(record: RunRecord) -> str:
    """The fine-tuned model family: base model + dataset (one endpoint per family)."""
    return azure_model_name(base_model_short_name(record.base_model or "model"), dataset_stem_of(record))


def model_version_for(record: RunRecord) -> str:
    """Derived from the run id, so registering twice is a no-op, not a duplicate."""
    return str(int(hashlib.sha256(record.run_id.encode()).hexdigest()[:7], 16) + 1)


def endpoint_name_for(record: RunRecord, model_name: str, settings: Settings) -> str:
    """One endpoint per fine-tuned model family; unique per app instance and workspace, deterministic.

    Endpoint names are 3-32 characters and unique per Azure region, so the readable part (dataset
    first, it is the distinctive one, then the base model) is cut to fit and a hash of the whole
    scope keeps it unique."""
    scope = f"{settings.instance}/{settings.subscription_id}/{settings.workspace_name}/{model_name}"
    readable = f"{dataset_stem_of(record)}-{base_model_short_name(record.base_model or 'model')}"
    return azure_resource_name(readable, suffix=hashlib.sha256(scope.encode()).hexdigest()[:6])


def deployment_name_for(record: RunRecord) -> str:
    return azure_resource_name("d", record.run_id)


def dataset_stem(name: str) -> str:
    return name[: -len(".jsonl")] if name.endswith(".jsonl") else name


MAX_BLOB_NAME = 1024
"""Azure's limit on a blob name, in characters."""
REPORT_SUFFIXES = (".report.json", ".report.md")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def report_base(name: str, run_id: str) -> str:
    """Where a dataset version's validation reports go: `NAME/RUN_ID` + `.report.json|.md`. When that would
    pass Azure's 1,024-character limit, NAME is cut and a hash of the whole name keeps it unique."""
    room = MAX_BLOB_NAME - len(run_id) - 1 - max(len(s) for s in REPORT_SUFFIXES)
    if len(name) <= room:
        return f"{name}/{run_id}"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{name[: room - len(digest) - 1]}~{digest}/{run_id}"


def blob_name_problem(name: str) -> str | None:
    """Why a dataset blob name cannot be ingested, or None. A `.` or `..` path segment is normalised away in
    the request URL (the storage API then reads or signs another name, and answers 403 or 404), and a control
    character breaks XML listings and report links: such a blob can be seen in a listing or an event but
    never read reliably by its name."""
    segments = name.split("/")
    if any(segment in (".", "..") for segment in segments):
        return "the blob name has a '.' or '..' path segment, which the storage API normalises away"
    if _CONTROL.search(name):
        return "the blob name holds a control character"
    if len(name) > MAX_BLOB_NAME:
        return f"the blob name is longer than {MAX_BLOB_NAME} characters"
    return None


def job_name_for(run_id: str) -> str:
    """Deterministic job name: a repeated submission finds the job instead of starting a second one."""
    return f"tunegrid-{run_id}"
