"""`tunegrid submit PATH --backend azureml --dry-run [--config SIDECAR.json]`.

Validates the local JSONL, then prints the pipeline job Tunegrid would submit for it, as the YAML
that `az ml job create --file` accepts. Nothing is sent anywhere: registry assets appear as
`azureml://registries/...` label ids and the GPU count comes from settings. The YAML is built by
the same `build_job_spec` as the real submission, so reviewing it reviews what would be spent.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path

from shared.adapters.azureml.job_spec import FineTuneJobSpec, build_job_spec, compute_plan, registry_asset_id, to_yaml
from shared.domain.resources import DataRef, FineTuneRequest
from shared.domain.sidecar import Sidecar, parse_sidecar
from shared.errors import InvalidInput, UsageError
from shared.settings import PREPARED_CONTAINER, TRAINING_CONTAINER, Settings

SIDECAR_SUFFIX = ".config.json"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="show the Azure ML pipeline job a dataset would start (--dry-run)",
        description=(
            "Validate a local chat JSONL and print the pipeline job Tunegrid would submit for it, as YAML for "
            "`az ml job create --file`. Only --dry-run is supported here: a real submission starts when the "
            "file is uploaded to the training-data container."
        ),
    )
    parser.add_argument("path", type=Path, help="local chat JSONL (one conversation per line)")
    parser.add_argument(
        "--backend", choices=["azureml"], default="azureml", help="backend to show the job for (azureml)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the job; send nothing")
    parser.add_argument("--config", type=Path, help="sidecar NAME.config.json (default: the one next to PATH, if any)")
    parser.set_defaults(func=run_submit)


def blob_base_url(connection: Mapping[str, str]) -> str:
    """The data account's blob endpoint from the `DataStorage` connection, without a network call."""
    if connection.get("blobServiceUri"):
        return connection["blobServiceUri"].rstrip("/")
    parts = dict(p.split("=", 1) for p in (connection.get("") or "").split(";") if "=" in p)
    if parts.get("BlobEndpoint"):
        return parts["BlobEndpoint"].rstrip("/")
    if parts.get("UseDevelopmentStorage", "").lower() == "true":
        return "http://127.0.0.1:10000/devstoreaccount1"
    if parts.get("AccountName"):
        return f"https://{parts['AccountName']}.blob.{parts.get('EndpointSuffix', 'core.windows.net')}"
    return "https://<storage-account>.blob.core.windows.net"


def _sidecar(path: Path, config: Path | None) -> Sidecar:
    candidate = config or path.with_name(path.name.removesuffix(".jsonl") + SIDECAR_SUFFIX)
    if config is not None and not config.is_file():
        raise UsageError(f"sidecar {config} does not exist")
    if not candidate.is_file():
        return parse_sidecar(None)
    return parse_sidecar(candidate.read_bytes())


def _validate(path: Path, settings: Settings) -> str | None:
    """None when valid (or when the validator is not installed), else a short summary."""
    try:
        from shared.domain.validation import ValidationOptions
        from tunegrid.tokenizer import TransformersTokenCounter
        from tunegrid.validate_files import validate_path
    except ImportError:  # pragma: no cover - the validator ships with the app
        print("tunegrid: note: shared.validation is not available; the file was not validated", file=sys.stderr)
        return None
    tokenizer = settings.validation_tokenizer
    options = ValidationOptions(
        max_line_bytes=settings.validation_max_line_bytes,
        max_seq_length=settings.validation_max_seq_length,
        token_counter=TransformersTokenCounter(tokenizer) if tokenizer else None,
    )
    report = validate_path(path, options)
    if report.valid:
        return None
    counts = ", ".join(f"{code}×{n}" for code, n in sorted(report.error_counts.items()))
    lines = [f"invalid dataset {path}: {sum(report.error_counts.values())} errors ({counts}) in {report.rows} rows"]
    lines += [
        f"  line {i.line}: {i.code}: {i.message}" if i.line else f"  {i.code}: {i.message}" for i in report.errors[:10]
    ]
    return "\n".join(lines)


def dry_run_spec(path: Path, sidecar: Sidecar, settings: Settings) -> FineTuneJobSpec:
    """The job spec for a local file, with the run id, job name and blob paths ingest would use."""
    from shared.domain.naming import job_name_for
    from shared.domain.runs import run_id_for

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    run_id = run_id_for(TRAINING_CONTAINER, path.name, digest)
    base = blob_base_url(settings.storage_connection)

    def ref(split: str) -> DataRef:
        blob = f"{run_id}/{split}.jsonl"
        return DataRef(PREPARED_CONTAINER, blob, f"{base}/{PREPARED_CONTAINER}/{blob}")

    version = sidecar.model_version or (None if sidecar.model_label else settings.base_model_version) or None
    label = None if version else (sidecar.model_label or settings.base_model_label or "latest")
    model_name = sidecar.model or settings.base_model_name
    request = FineTuneRequest(
        run_id=run_id,
        job_name=job_name_for(run_id),
        dataset=path.name,
        train=ref("train"),
        test=ref("test"),
        base_model=model_name,
        base_model_label=label,
        base_model_version=version,
        params=dict(sidecar.finetune),
        compute=dict(sidecar.compute),
    )
    plan = compute_plan(settings, request.compute)
    registry = settings.registry_name
    component_version = settings.pipeline_component_version or None
    if plan.gpus_per_node:
        gpu_note = f"number_of_gpu_to_use_finetuning comes from {plan.gpus_source}."
    else:
        gpu_note = (
            "number_of_gpu_to_use_finetuning: GPUs per node are unknown without a network call, so 1 is shown; set "
            "AZUREML_GPUS_PER_NODE or the sidecar's compute.gpus_per_node (for a cluster, the real submission reads it "
            "from compute.list_sizes())."
        )
    notes = [
        "Dry run: nothing was sent to Azure; the file was validated locally.",
        "Registry assets are shown by label; the real submission pins the versions they resolve to.",
        "The base model's model_specific_defaults tag is not read in a dry run. At submission it overrides the app's "
        "defaults (the notebook's), and the values in your sidecar override both.",
        gpu_note,
        "Compute checks (cluster exists, allow lists, K80 sizes) run at submission, not here.",
        f"name and the {PREPARED_CONTAINER}/ paths derive from the file's SHA-256 here; ingest uses the blob's ETag.",
    ]
    return build_job_spec(
        settings,
        request,
        model_name=model_name,
        model_path=registry_asset_id(registry, "models", model_name, version=version, label=label),
        component=registry_asset_id(
            registry,
            "components",
            settings.pipeline_component,
            version=component_version,
            label=settings.pipeline_component_label,
        ),
        compute=plan,
        notes=notes,
    )


def run_submit(args: argparse.Namespace) -> int:
    if not args.dry_run:
        raise UsageError(
            "submit only runs as --dry-run; to start a fine-tune, upload the file to the training-data container "
            "(the ingest function validates and submits it)"
        )
    path: Path = args.path
    if not path.is_file():
        raise UsageError(f"{path} is not a file")
    try:
        sidecar = _sidecar(path, args.config)
    except InvalidInput as exc:
        print(f"tunegrid: error: sidecar: {exc}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    problem = _validate(path, settings)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    try:
        spec = dry_run_spec(path, sidecar, settings)
    except InvalidInput as exc:
        print(f"tunegrid: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_yaml(spec))
    return 0
