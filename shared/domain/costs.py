"""What a fine-tune will cost before it is submitted, and what an idle endpoint cost: pure rules.

The estimate (`estimate_run`) multiplies three numbers, each with its source written next to it:
- training tokens: the validator's token statistics of the training rows, times the epochs (capped by
  `max_steps` when the sidecar sets it), each row cut at `max_seq_length`;
- throughput: the median tokens per second per node of this app's earlier runs on the same SKU (the
  `tunegridcosts` table, written when a job completes), else `DEFAULT_TOKENS_PER_GPU_SECOND` for the SKU's
  GPU type times its GPU count: deliberately low figures, so that a first estimate errs on the expensive side;
- the price per hour of the SKU in the workspace's region (`PriceQuote`: the Azure Retail Prices API, its
  cached answer, or the dated table in the repo; `shared.adapters.retail_prices`).
The local backend has no bill: its estimate is a time, from the tokens/s it measured on earlier runs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

DEFAULT_TOKENS_PER_GPU_SECOND: Mapping[str, float] = {
    "H100": 1400.0,
    "A100": 600.0,
    "A10": 200.0,
    "V100": 200.0,
    "T4": 60.0,
    "cpu": 100.0,
    "cuda": 500.0,
    "unknown": 100.0,
}
"""Training tokens per second per GPU with no history on a SKU: about half of what LoRA fine-tuning of a
Phi-4-sized (14B) model with DeepSpeed ZeRO-2 reaches on that GPU, so a first estimate is on the high side.
`cpu` and `cuda` are the local backend's devices (a small model on this machine). One run on a SKU replaces
these with measured figures."""

OVERHEAD_HOURS = 0.25
"""Billed time of a job beyond its training tokens, per node: provisioning, image pull, model import and
the evaluation step (the pipeline's other steps run on small CPU sizes and are not counted)."""

HISTORY_SAMPLES = 10
"""Earlier runs on a SKU whose median throughput the estimate uses (the most recent ones)."""

_GPU_COUNT: Mapping[str, int] = {
    "standard_nc24ads_a100_v4": 1,
    "standard_nc48ads_a100_v4": 2,
    "standard_nc96ads_a100_v4": 4,
    "standard_nd96asr_v4": 8,
    "standard_nd96amsr_a100_v4": 8,
    "standard_nc40ads_h100_v5": 1,
    "standard_nc80adis_h100_v5": 2,
    "standard_nd96isr_h100_v5": 8,
    "standard_nc6s_v3": 1,
    "standard_nc12s_v3": 2,
    "standard_nc24s_v3": 4,
    "standard_nc24rs_v3": 4,
    "standard_nd40rs_v2": 8,
    "standard_nc4as_t4_v3": 1,
    "standard_nc8as_t4_v3": 1,
    "standard_nc16as_t4_v3": 1,
    "standard_nc64as_t4_v3": 4,
}
"""GPUs of the sizes on the fine-tune and inference lists of the registry's chat models (Azure's VM size
pages: NC A100 v4, ND A100 v4, NC H100 v5, ND H100 v5, NCv3, NDv2, NCasT4_v3)."""


def gpu_type(sku: str) -> str:
    """The GPU of a VM size (`A100`, `H100`, `V100`, `T4`, `A10`), `cpu`/`cuda` for the local backend's
    `local-cpu`/`local-cuda`, else `unknown`."""
    name = sku.lower()
    if name.startswith("local-"):
        return name.removeprefix("local-") or "cpu"
    if "h100" in name:
        return "H100"
    if "a100" in name or name == "standard_nd96asr_v4":
        return "A100"
    if "_t4_" in name:
        return "T4"
    if "a10" in name:
        return "A10"
    if re.fullmatch(r"standard_nc\d+r?s_v3|standard_nd40rs_v2", name):
        return "V100"
    return "unknown"


def gpu_count(sku: str, *, fallback: int | None = None) -> int:
    return _GPU_COUNT.get(sku.lower()) or fallback or 1


@dataclass(frozen=True)
class PriceQuote:
    """The pay-as-you-go price of one VM size in one region, in USD per hour, and where it comes from."""

    sku: str
    region: str
    usd_per_hour: float
    source: str
    """`retail-prices-api`, `retail-prices-api (cached)`, or `price table`."""
    as_of: str
    """The date of the answer (the API's answer is cached with it) or of the table."""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainingPlan:
    """What a backend will run a fine-tune on (`FineTuneBackend.plan_training`), read before submitting."""

    backend: str
    sku: str
    """The fine-tune step's VM size; `local-cpu` / `local-cuda` on the local backend."""
    region: str = ""
    nodes: int = 1
    gpus_per_node: int | None = None
    epochs: float = 1.0
    max_steps: int = -1
    rows_per_step: int = 1
    """Rows one optimiser step consumes: per-device batch x gradient accumulation x GPUs x nodes."""
    max_seq_length: int = -1
    inference_sku: str = ""
    """The size a new deployment gets when neither INFERENCE_INSTANCE_TYPE nor the sidecar names one."""
    priced: bool = True
    """False on the local backend: the estimate is a time, not money."""


@dataclass(frozen=True)
class ThroughputSample:
    """One finished run's training speed on a SKU, per node (the history the estimate learns from)."""

    sku: str
    tokens_per_second: float
    run_id: str
    at: str
    source: str


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float
    """Per node."""
    source: str
    samples: int = 0


def choose_throughput(sku: str, samples: Sequence[ThroughputSample], *, gpus_per_node: int | None = None) -> Throughput:
    """The median of the latest `HISTORY_SAMPLES` runs on `sku`, else the default of its GPU type."""
    recent = sorted(samples, key=lambda s: s.at, reverse=True)[:HISTORY_SAMPLES]
    usable = [s.tokens_per_second for s in recent if s.tokens_per_second > 0]
    if usable:
        n = len(usable)
        return Throughput(
            statistics.median(usable), f"median of {n} earlier run{'s' if n != 1 else ''} on {sku}", samples=n
        )
    kind = gpu_type(sku)
    gpus = 1 if kind in ("cpu", "cuda") else gpu_count(sku, fallback=gpus_per_node)
    per_gpu = DEFAULT_TOKENS_PER_GPU_SECOND.get(kind, DEFAULT_TOKENS_PER_GPU_SECOND["unknown"])
    if kind in ("cpu", "cuda"):
        return Throughput(per_gpu, f"default for the local backend on {kind}; no earlier run on {sku}")
    where = f"{gpus} x {kind}" if kind != "unknown" else "an unknown GPU"
    return Throughput(per_gpu * gpus, f"default for {where} ({per_gpu:g} tokens/s per GPU; no earlier run on {sku})")


def training_tokens(stats: Mapping[str, Any], split: Mapping[str, Any], plan: TrainingPlan) -> dict[str, Any]:
    """Tokens the job will train on, from the validator's statistics (`total_tokens`, `tokens_per_row`) and the
    split: the training rows' share of the tokens, times the epochs, capped by `max_steps`."""
    valid_rows = int(stats.get("valid_rows") or 0)
    total = int(stats.get("total_tokens") or 0)
    train_rows = int(split.get("train_rows") or valid_rows)
    per_row = total / valid_rows if valid_rows else 0.0
    notes = []
    if plan.max_seq_length > 0 and per_row > plan.max_seq_length:
        notes.append(f"rows average {per_row:.0f} tokens; max_seq_length {plan.max_seq_length} cuts them")
        per_row = float(plan.max_seq_length)
    rows = train_rows * plan.epochs
    if plan.max_steps > 0:
        capped = plan.max_steps * max(plan.rows_per_step, 1)
        if capped < rows:
            notes.append(f"max_steps {plan.max_steps} x {plan.rows_per_step} rows per step stops after {capped} rows")
            rows = capped
    return {
        "train_rows": train_rows,
        "epochs": plan.epochs,
        "rows_trained": round(rows, 1),
        "tokens_per_row": round(per_row, 1),
        "tokens": round(rows * per_row),
        "token_count_method": str(stats.get("token_count_method") or "estimate"),
        "notes": notes,
    }


def cost_cap(setting: float | None, sidecar: float | None) -> tuple[float | None, str]:
    """The cap that applies and who set it: the sidecar's `max_cost_usd` may only lower MAX_RUN_COST_USD."""
    if sidecar is not None and (setting is None or sidecar < setting):
        return sidecar, "the sidecar's max_cost_usd"
    if setting is not None:
        return setting, "MAX_RUN_COST_USD"
    return None, ""


@dataclass(frozen=True)
class CostEstimate:
    plan: TrainingPlan
    tokens: Mapping[str, Any]
    throughput: Throughput
    hours: float
    price: PriceQuote | None = None
    deployment_price: PriceQuote | None = None
    deployment_sku: str = ""
    deployment_count: int = 1
    cap_usd: float | None = None
    cap_source: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def training_usd(self) -> float | None:
        if not self.plan.priced or self.price is None:
            return None
        return round((self.hours + OVERHEAD_HOURS) * self.plan.nodes * self.price.usd_per_hour, 2)

    @property
    def deployment_usd_per_hour(self) -> float | None:
        if self.deployment_price is None:
            return None
        return round(self.deployment_price.usd_per_hour * self.deployment_count, 4)

    @property
    def refusal(self) -> str | None:
        """Why the run must not be submitted, or None: above the cap, or priceless while a cap is set."""
        if self.cap_usd is None or not self.plan.priced:
            return None
        cost = self.training_usd
        if cost is None:
            return (
                f"no price is known for {self.plan.sku} in {self.plan.region or 'an unknown region'}, so the run "
                f"cannot be checked against the cap of ${self.cap_usd:,.2f} ({self.cap_source}); refused rather than "
                "run unchecked"
            )
        if cost > self.cap_usd:
            return f"estimated training cost ${cost:,.2f} is above the cap of ${self.cap_usd:,.2f} ({self.cap_source})"
        return None

    def summary(self) -> str:
        time_text = _hours_text(self.hours)
        speed = f"{self.throughput.tokens_per_second:,.0f} tokens/s per node ({self.throughput.source})"
        if not self.plan.priced:
            return f"about {time_text} of training for {self.tokens['tokens']:,} tokens on this machine at {speed}"
        nodes = f"{self.plan.nodes} x " if self.plan.nodes != 1 else ""
        cost = self.training_usd
        money = (
            f"${cost:,.2f} at ${self.price.usd_per_hour:,.4g}/h ({self.price.source}, {self.price.as_of})"
            if cost is not None and self.price is not None
            else "cost unknown (no price for this size and region)"
        )
        serving = ""
        if self.deployment_usd_per_hour is not None:
            serving = f"; the deployment ({self.deployment_count} x {self.deployment_sku}) then bills ${self.deployment_usd_per_hour:,.4g}/h while it exists"
        return f"about {time_text} on {nodes}{self.plan.sku} for {self.tokens['tokens']:,} tokens at {speed}: {money}{serving}"

    def to_dict(self) -> dict[str, Any]:
        refusal = self.refusal
        return {
            "backend": self.plan.backend,
            "kind": "cost" if self.plan.priced else "time",
            "summary": self.summary(),
            "sku": self.plan.sku,
            "gpu_type": gpu_type(self.plan.sku),
            "region": self.plan.region,
            "nodes": self.plan.nodes,
            **{k: v for k, v in self.tokens.items() if k != "notes"},
            "tokens_per_second": round(self.throughput.tokens_per_second, 1),
            "throughput_source": self.throughput.source,
            "throughput_samples": self.throughput.samples,
            "hours": round(self.hours, 4),
            "overhead_hours": OVERHEAD_HOURS if self.plan.priced else 0.0,
            "training_usd": self.training_usd,
            "price": self.price.to_dict() if self.price else None,
            "deployment": {
                "sku": self.deployment_sku,
                "count": self.deployment_count,
                "usd_per_hour": self.deployment_usd_per_hour,
                "price": self.deployment_price.to_dict() if self.deployment_price else None,
            }
            if self.plan.priced
            else None,
            "cap_usd": self.cap_usd,
            "cap_source": self.cap_source,
            "over_cap": refusal is not None,
            "refusal": refusal,
            "notes": [*self.tokens.get("notes", []), *self.notes],
        }


def estimate_run(
    plan: TrainingPlan,
    *,
    tokens: Mapping[str, Any],
    history: Sequence[ThroughputSample],
    price: PriceQuote | None,
    deployment_sku: str = "",
    deployment_count: int = 1,
    deployment_price: PriceQuote | None = None,
    cap: tuple[float | None, str] = (None, ""),
) -> CostEstimate:
    throughput = choose_throughput(plan.sku, history, gpus_per_node=plan.gpus_per_node)
    seconds = tokens["tokens"] / max(throughput.tokens_per_second * max(plan.nodes, 1), 1e-9)
    notes = []
    if plan.priced and price is None:
        notes.append(f"no price for {plan.sku} in {plan.region or 'the workspace region'}: the cost is unknown")
    return CostEstimate(
        plan=plan,
        tokens=tokens,
        throughput=throughput,
        hours=seconds / 3600,
        price=price,
        deployment_price=deployment_price,
        deployment_sku=deployment_sku,
        deployment_count=deployment_count,
        cap_usd=cap[0],
        cap_source=cap[1],
        notes=tuple(notes),
    )


def _hours_text(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{hours:.1f} h"


def throughput_sample(
    metrics: Mapping[str, Any], estimate: Mapping[str, Any], *, run_id: str, at: datetime
) -> ThroughputSample | None:
    """The measured speed of a finished run, per node, from the metrics its job logged (the HF Trainer's
    log): `train_tokens_per_second` when logged, else `num_input_tokens_seen` / `train_runtime`, else the
    estimate's tokens / `train_runtime` (only when no max_steps cut the run short). None when unknowable."""
    sku = str(estimate.get("sku") or "")
    nodes = max(int(estimate.get("nodes") or 1), 1)

    def last(name: str) -> float | None:
        value = metrics.get(name)
        value = value.get("last") if isinstance(value, Mapping) else value
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    runtime = last("train_runtime")
    if not sku:
        return None
    rate, source = last("train_tokens_per_second"), "train_tokens_per_second"
    if not rate:
        seen = last("num_input_tokens_seen")
        if seen and runtime:
            rate, source = seen / runtime, "num_input_tokens_seen / train_runtime"
    if not rate and runtime and not any("max_steps" in n for n in estimate.get("notes") or []):
        tokens = estimate.get("tokens")
        if isinstance(tokens, int | float) and tokens > 0:
            rate, source = float(tokens) / runtime, "estimated tokens / train_runtime"
    if not rate or rate <= 0:
        return None
    return ThroughputSample(sku=sku, tokens_per_second=rate / nodes, run_id=run_id, at=at.isoformat(), source=source)


def idle_hours(idle_since: datetime | None, now: datetime) -> float | None:
    if idle_since is None:
        return None
    return max((now - idle_since).total_seconds() / 3600, 0.0)


def endpoint_hourly_usd(prices: Iterable[tuple[PriceQuote | None, int]]) -> float | None:
    """An endpoint's price per hour: each deployment's size price times its instances; None if any is unknown."""
    total = 0.0
    for quote, count in prices:
        if quote is None:
            return None
        total += quote.usd_per_hour * max(count, 1)
    return round(total, 4)
