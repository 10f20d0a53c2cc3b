"""Fine-tune parameters: the Azure `chat_completion_pipeline` input names, read by the local trainer.

One sidecar drives both backends, so the local trainer takes the component's input names
(`shared/sidecar.py` FINETUNE_PARAMS). The request carries only the user's explicit values; the
local defaults below fill the rest. They differ from the component's where a CPU needs it (a LoRA
learning rate, a bounded sequence length), and are documented in docs/local-backend.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from shared.errors import InvalidInput

log = logging.getLogger(__name__)

LOCAL_DEFAULTS: Mapping[str, Any] = {
    "num_train_epochs": 1,
    "max_steps": -1,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 2,
    "per_device_eval_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 512,
    "apply_lora": "true",
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "merge_lora_weights": "true",
    "seed": 42,
    "logging_steps": 1,
    "max_grad_norm": 1.0,
    "optim": "adamw_torch",
    "precision": "32",
    "evaluation_strategy": "epoch",
}
"""What the local trainer uses for a parameter the sidecar does not set."""

AZURE_ONLY = frozenset(
    {
        "apply_deepspeed",
        "deepspeed_stage",
        "apply_ort",
        "auto_find_batch_size",
        "ignore_mismatched_sizes",
        "metric_for_best_model",
        "save_total_limit",
        "resume_from_checkpoint",
        "apply_early_stopping",
        "early_stopping_patience",
        "early_stopping_threshold",
        "batch_size",
        "pad_to_max_length",
        "enable_full_determinism",
        "eval_accumulation_steps",
        "dataloader_num_workers",
    }
)
"""Component inputs with no local meaning (distributed training, checkpointing, preprocessing batch)."""

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise InvalidInput(f"{name}: expected true or false, got {value!r}")


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name}: expected an integer, got {value!r}") from exc
    if number != int(number):
        raise InvalidInput(f"{name}: expected an integer, got {value!r}")
    return int(number)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{name}: expected a number, got {value!r}") from exc


@dataclass(frozen=True)
class TrainConfig:
    """The local trainer's settings, resolved from component-named parameters."""

    num_train_epochs: int
    max_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_steps: int
    weight_decay: float
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    apply_lora: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    merge_lora_weights: bool
    seed: int
    logging_steps: int
    max_grad_norm: float
    optim: str
    precision: str
    evaluation_strategy: str
    eval_steps: int | None
    ignored: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """Local defaults under the user's values; Azure-only names are collected in `ignored`."""
    unknown_or_ignored = sorted(k for k in params if k in AZURE_ONLY)
    merged: dict[str, Any] = {**LOCAL_DEFAULTS, **{k: v for k, v in params.items() if k not in AZURE_ONLY}}
    scheduler = str(merged["lr_scheduler_type"])
    if scheduler not in SCHEDULERS:
        raise InvalidInput(f"lr_scheduler_type: expected one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    optim = str(merged["optim"])
    if optim == "adamw_hf":  # removed from transformers; the component treats both as AdamW
        optim = "adamw_torch"
    if optim not in ("adamw_torch", "adafactor"):
        raise InvalidInput(f"optim: expected adamw_hf, adamw_torch or adafactor, got {optim!r}")
    precision = str(merged["precision"])
    if precision not in ("32", "16"):
        raise InvalidInput(f"precision: expected 32 or 16, got {precision!r}")
    eval_steps = params.get("eval_steps")
    strategy = str(merged["evaluation_strategy"])
    if strategy not in ("epoch", "steps"):
        raise InvalidInput(f"evaluation_strategy: expected epoch or steps, got {strategy!r}")
    if eval_steps is not None and "evaluation_strategy" not in params:
        strategy = "steps"  # asking for eval_steps means evaluating every eval_steps
    config = TrainConfig(
        num_train_epochs=_int("num_train_epochs", merged["num_train_epochs"]),
        max_steps=_int("max_steps", merged["max_steps"]),
        learning_rate=_float("learning_rate", merged["learning_rate"]),
        lr_scheduler_type=scheduler,
        warmup_steps=_int("warmup_steps", merged["warmup_steps"]),
        weight_decay=_float("weight_decay", merged["weight_decay"]),
        per_device_train_batch_size=_int("per_device_train_batch_size", merged["per_device_train_batch_size"]),
        per_device_eval_batch_size=_int("per_device_eval_batch_size", merged["per_device_eval_batch_size"]),
        gradient_accumulation_steps=_int("gradient_accumulation_steps", merged["gradient_accumulation_steps"]),
        max_seq_length=_int("max_seq_length", merged["max_seq_length"]),
        apply_lora=_bool("apply_lora", merged["apply_lora"]),
        lora_r=_int("lora_r", merged["lora_r"]),
        lora_alpha=_int("lora_alpha", merged["lora_alpha"]),
        lora_dropout=_float("lora_dropout", merged["lora_dropout"]),
        merge_lora_weights=_bool("merge_lora_weights", merged["merge_lora_weights"]),
        seed=_int("seed", merged["seed"]),
        logging_steps=_int("logging_steps", merged["logging_steps"]),
        max_grad_norm=_float("max_grad_norm", merged["max_grad_norm"]),
        optim=optim,
        precision=precision,
        evaluation_strategy=strategy,
        eval_steps=None if eval_steps is None else _int("eval_steps", eval_steps),
        ignored=tuple(unknown_or_ignored),
    )
    for name in (
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "lora_r",
        "lora_alpha",
        "logging_steps",
    ):
        if getattr(config, name) < 1:
            raise InvalidInput(f"{name}: must be at least 1, got {getattr(config, name)}")
    if config.max_steps == 0 or config.max_steps < -1:
        raise InvalidInput(f"max_steps: must be -1 (use epochs) or positive, got {config.max_steps}")
    if config.max_seq_length == 0 or config.max_seq_length < -1:
        raise InvalidInput(f"max_seq_length: must be -1 (model maximum) or positive, got {config.max_seq_length}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise InvalidInput(f"lora_dropout: must be in [0, 1), got {config.lora_dropout}")
    return config


def default_eval_steps(total_steps: int) -> int:
    """With `evaluation_strategy: steps` and no eval_steps: about four evaluations a run."""
    return max(1, -(-total_steps // 4))
