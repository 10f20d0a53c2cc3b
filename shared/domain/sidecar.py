"""Per-dataset settings: the `NAME.config.json` sidecar, validated with clear errors.

One sidecar drives both backends: fine-tune parameter names are the `chat_completion_pipeline`
component's input names. Precedence (lowest to highest): the component's own defaults, the app's
defaults (`NOTEBOOK_DEFAULTS`, as in the seed notebook), the base model's `model_specific_defaults`
tag, then the values the user wrote in the sidecar.

Only names, types and ranges are checked here. The allowed values of a choice parameter (`optim`,
`lr_scheduler_type`, ...) change between component versions (`optim` lost `adamw_hf` by 0.0.82), so
they are checked at submission against the enum of the component version actually fetched (the
Azure ML adapter), or against what the local trainer supports (the local backend).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from shared.errors import InvalidInput

_BOOL_STR = ("true", "false")

# name -> (kind, constraint). kind: int | float | bool | str | choice. Booleans are sent as the
# strings "true"/"false", as the component expects. A `choice` is a string (a number is accepted and
# sent as its text, e.g. deepspeed_stage 3 -> "3"); its allowed values come from the component.
FINETUNE_PARAMS: Mapping[str, tuple[str, Any]] = {
    "num_train_epochs": ("int", (1, 1000)),
    "max_steps": ("int", (-1, 10_000_000)),
    "per_device_train_batch_size": ("int", (1, 4096)),
    "per_device_eval_batch_size": ("int", (1, 4096)),
    "auto_find_batch_size": ("bool", None),
    "optim": ("choice", None),
    "learning_rate": ("float", (0.0, 1.0)),
    "warmup_steps": ("int", (0, 10_000_000)),
    "weight_decay": ("float", (0.0, 1.0)),
    "adam_beta1": ("float", (0.0, 1.0)),
    "adam_beta2": ("float", (0.0, 1.0)),
    "adam_epsilon": ("float", (0.0, 1.0)),
    "gradient_accumulation_steps": ("int", (1, 4096)),
    "eval_accumulation_steps": ("int", (-1, 4096)),
    "lr_scheduler_type": ("choice", None),
    "precision": ("choice", None),
    "seed": ("int", (0, 2**31 - 1)),
    "enable_full_determinism": ("bool", None),
    "dataloader_num_workers": ("int", (0, 64)),
    "ignore_mismatched_sizes": ("bool", None),
    "max_grad_norm": ("float", (0.0, 1e6)),
    "evaluation_strategy": ("choice", None),
    "eval_steps": ("int", (1, 10_000_000)),
    "logging_strategy": ("choice", None),
    "logging_steps": ("int", (1, 10_000_000)),
    "metric_for_best_model": ("choice", None),
    "resume_from_checkpoint": ("bool", None),
    "save_total_limit": ("int", (-1, 1000)),
    "apply_early_stopping": ("bool", None),
    "early_stopping_patience": ("int", (1, 1000)),
    "early_stopping_threshold": ("float", (0.0, 1e6)),
    "apply_lora": ("bool", None),
    "merge_lora_weights": ("bool", None),
    "lora_alpha": ("int", (1, 4096)),
    "lora_r": ("int", (1, 4096)),
    "lora_dropout": ("float", (0.0, 1.0)),
    "apply_deepspeed": ("bool", None),
    "deepspeed_stage": ("choice", None),
    "apply_ort": ("bool", None),
    "max_seq_length": ("int", (-1, 1_000_000)),
    "pad_to_max_length": ("bool", None),
    "batch_size": ("int", (1, 1_000_000)),
}

NOTEBOOK_DEFAULTS: Mapping[str, Any] = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "learning_rate": 5e-6,
    "lr_scheduler_type": "cosine",
    "apply_lora": "true",
    "apply_deepspeed": "true",
    "deepspeed_stage": "2",
}
"""The seed notebook's fine-tune parameters: the app's defaults for the Azure ML backend."""

COMPUTE_KEYS: Mapping[str, str] = {
    "cluster": "str",
    "instance_type_model_import": "str",
    "instance_type_preprocess": "str",
    "instance_type_finetune": "str",
    "instance_type_model_evaluation": "str",
    "num_nodes_finetune": "int",
    "gpus_per_node": "int",
}
DEPLOYMENT_KEYS: Mapping[str, str] = {
    "instance_type": "str",
    "instance_count": "int",
    "request_timeout_ms": "int",
    "liveness_initial_delay_s": "int",
    "max_concurrent_requests_per_instance": "int",
    "mirror_traffic_percent": "int",
}
GATE_KEYS: Mapping[str, tuple[float, float, str]] = {
    "min_rouge_l": (0.0, 1.0, "the least ROUGE-L (F1, 0-1) the new model must reach on the gate's rows"),
    "max_eval_loss": (
        0.0,
        1e6,
        "the highest final eval_loss of the job that may go live (when the backend reports it)",
    ),
    "max_regression": (
        0.0,
        1.0,
        "how far below the live model's ROUGE-L the new one may be; can only tighten GATE_MAX_REGRESSION",
    ),
}
"""The evaluation gate's thresholds a sidecar may set (`"gate": {...}`): name -> (low, high, meaning)."""
DEPLOYMENT_RANGES: Mapping[str, tuple[int, int]] = {
    "instance_count": (1, 1000),
    "request_timeout_ms": (1, 180_000),
    "liveness_initial_delay_s": (0, 3600),
    "max_concurrent_requests_per_instance": (1, 1000),
    "mirror_traffic_percent": (0, 50),
}
"""What a managed online deployment accepts, checked at ingest so that a bad value fails the run there (with
the reason in the report) instead of failing every deployment attempt later: at least one instance and one
concurrent request per instance, a request timeout up to 180 s, at most 50 % mirrored traffic."""
COMPUTE_RANGES: Mapping[str, tuple[int, int]] = {"num_nodes_finetune": (1, 1000), "gpus_per_node": (1, 64)}

LOCAL_BUILTIN_MODELS = ("smollm2", "tiny-phi3")
"""The local backend's built-in base models (`tunegrid.local.base_models`)."""
TOP_KEYS = (
    "model",
    "model_label",
    "model_version",
    "local_model",
    "compute",
    "finetune",
    "deployment",
    "test_split_percent",
    "gate",
    "max_cost_usd",
)


@dataclass(frozen=True)
class Sidecar:
    """The parsed sidecar. Absent keys stay absent so the precedence rules can apply later."""

    model: str | None = None
    model_label: str | None = None
    model_version: str | None = None
    local_model: str | None = None
    compute: Mapping[str, Any] = field(default_factory=dict)
    finetune: Mapping[str, Any] = field(default_factory=dict)
    deployment: Mapping[str, Any] = field(default_factory=dict)
    test_split_percent: int | None = None
    gate: Mapping[str, float] = field(default_factory=dict)
    """Absolute thresholds of the evaluation gate (`GATE_KEYS`); none by default."""
    max_cost_usd: float | None = None
    """This dataset's cost cap; it can only lower MAX_RUN_COST_USD."""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, ())}


def _coerce(path: str, kind: str, constraint: Any, value: Any) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str) and value.lower() in _BOOL_STR:
            return value.lower()
        raise InvalidInput(f"{path}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{path}: expected an integer, got {value!r}")
        lo, hi = constraint
        if not lo <= value <= hi:
            raise InvalidInput(f"{path}: {value} is outside [{lo}, {hi}]")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"{path}: expected a number, got {value!r}")
        lo, hi = constraint
        if not lo <= float(value) <= hi:
            raise InvalidInput(f"{path}: {value} is outside [{lo}, {hi}]")
        return float(value)
    if kind == "choice":
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
            raise InvalidInput(f"{path}: expected a string (one of the component's choices), got {value!r}")
        return str(value).strip()
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{path}: expected a non-empty string, got {value!r}")
    return value


def validate_finetune_params(params: Mapping[str, Any], *, where: str = "finetune") -> dict[str, Any]:
    """Check names and types of fine-tune parameters; returns them normalised (bools as strings)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        spec = FINETUNE_PARAMS.get(name)
        if spec is None:
            known = ", ".join(sorted(FINETUNE_PARAMS))
            raise InvalidInput(f"{where}.{name}: unknown fine-tune parameter (known: {known})")
        out[name] = _coerce(f"{where}.{name}", spec[0], spec[1], value)
    return out


def _section(
    doc: Mapping[str, Any], key: str, kinds: Mapping[str, str], ranges: Mapping[str, tuple[int, int]]
) -> dict[str, Any]:
    raw = doc.get(key, {})
    if not isinstance(raw, dict):
        raise InvalidInput(f"{key}: expected an object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in kinds:
            raise InvalidInput(f"{key}.{name}: unknown key (known: {', '.join(sorted(kinds))})")
        out[name] = _coerce(f"{key}.{name}", kinds[name], ranges.get(name, (0, 10_000_000)), value)
    return out


def _number(path: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidInput(f"{path}: expected a number, got {value!r}")
    number = float(value)
    if number < low or number > high or (low_open and number == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise InvalidInput(f"{path}: {value} is outside {bound}")
    return number


def _gate_section(doc: Mapping[str, Any]) -> dict[str, float]:
    raw = doc.get("gate", {})
    if not isinstance(raw, dict):
        raise InvalidInput(f"gate: expected an object, got {type(raw).__name__}")
    out: dict[str, float] = {}
    for name, value in raw.items():
        spec = GATE_KEYS.get(name)
        if spec is None:
            known = "; ".join(f"{k} ({meaning})" for k, (_, _, meaning) in GATE_KEYS.items())
            raise InvalidInput(f"gate.{name}: unknown key (known: {known})")
        low, high, _ = spec
        out[name] = _number(f"gate.{name}", value, low, high, low_open=name == "max_eval_loss")
    return out


def local_model_problem(value: str, roots: Sequence[str]) -> str | None:
    """Why `local_model` may not be used, or None. Only a built-in name, or a folder strictly under one of
    `roots` (LOCAL_MODEL_ROOTS, absolute paths), is allowed: anyone who can write to the training container
    must not make the app load and serve an arbitrary folder it can read. Checked on the text here (no `..`,
    absolute, under a root); the local backend checks the resolved folder again before a trainer starts."""
    if value.strip().lower() in LOCAL_BUILTIN_MODELS:
        return None
    allowed = f"a built-in model ({', '.join(LOCAL_BUILTIN_MODELS)}) or a folder under LOCAL_MODEL_ROOTS"
    where = ", ".join(roots) if roots else "none set"
    path = PurePath(value)
    if ".." in value.replace("\\", "/").split("/") or not path.is_absolute():
        return f"local_model: {value!r} is not allowed: use {allowed} ({where})"
    if any(path != PurePath(root) and path.is_relative_to(root) for root in roots):
        return None
    return f"local_model: {value!r} is not allowed: use {allowed} ({where})"


def parse_sidecar(text: str | bytes | None) -> Sidecar:
    """Parse and validate a sidecar document; `None` (no sidecar) gives all defaults."""
    if text is None:
        return Sidecar()
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"sidecar is not valid JSON: {exc}") from exc
    except RecursionError:
        raise InvalidInput("sidecar is nested too deeply to be a settings document") from None
    if not isinstance(doc, dict):
        raise InvalidInput("sidecar must be a JSON object")
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise InvalidInput(f"sidecar: unknown keys {', '.join(unknown)} (known: {', '.join(TOP_KEYS)})")
    for key in ("model", "model_label", "model_version", "local_model"):
        if key in doc and doc[key] is not None and (not isinstance(doc[key], str) or not doc[key].strip()):
            raise InvalidInput(f"{key}: expected a non-empty string, got {doc[key]!r}")
    split = doc.get("test_split_percent")
    if split is not None and (isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= 50):
        raise InvalidInput(f"test_split_percent: expected an integer in [1, 50], got {split!r}")
    finetune = doc.get("finetune", {})
    if not isinstance(finetune, dict):
        raise InvalidInput(f"finetune: expected an object, got {type(finetune).__name__}")
    deployment = _section(doc, "deployment", DEPLOYMENT_KEYS, DEPLOYMENT_RANGES)
    gate = _gate_section(doc)
    cap = doc.get("max_cost_usd")
    max_cost = None if cap is None else _number("max_cost_usd", cap, 0.0, 1e9, low_open=True)
    return Sidecar(
        model=doc.get("model"),
        model_label=doc.get("model_label"),
        model_version=doc.get("model_version"),
        local_model=doc.get("local_model"),
        compute=_section(doc, "compute", COMPUTE_KEYS, COMPUTE_RANGES),
        finetune=validate_finetune_params(finetune),
        deployment=deployment,
        test_split_percent=split,
        gate=gate,
        max_cost_usd=max_cost,
    )


def merge_finetune_params(
    *,
    user: Mapping[str, Any],
    model_defaults: Mapping[str, Any] | None = None,
    app_defaults: Mapping[str, Any] = NOTEBOOK_DEFAULTS,
) -> dict[str, Any]:
    """app defaults < model_specific_defaults < the user's explicit sidecar values."""
    merged: dict[str, Any] = dict(app_defaults)
    for name, value in (model_defaults or {}).items():
        merged[name] = value
    merged.update(user)
    return merged
