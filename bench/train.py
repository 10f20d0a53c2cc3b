"""Training throughput of the local backend's path against a bare HF Trainer, same model, same data.

Both runs use the same tokenized rows (real ultrachat rows from samples/), the same LoRA setup and
the same TrainingArguments. "Ours" adds what a job adds per step: the progress callback (a log line
and progress.json) and MLflow metric logging into a sqlite store. Rounds alternate ours / bare so
that load drift on a shared machine hits both. tokens/s counts non-padding tokens over steps 2..N
(step 1 includes set-up); the figures are medians over the rounds.

    python bench/train.py                      # SmolLM2 (the demo's model): 6 steps, batch 1, seq 256
    python bench/train.py --model tiny-phi3    # the CI model

Prints per-round figures, SmolLM2 step time and peak RSS; the last line is `TRAIN_BENCH {json}`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), tiny-phi3, an HF folder")
    parser.add_argument("--steps", type=int, default=6, help="training steps per run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256, help="max_seq_length")
    parser.add_argument("--rounds", type=int, default=2, help="ours/bare pairs (alternating)")
    parser.add_argument("--rows", type=int, default=400, help="rows of samples/ultrachat_small.jsonl to draw from")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not counted)")

    import mlflow
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from tunegrid.local.base_models import resolve_base_model
    from tunegrid.local.params import resolve_train_config
    from tunegrid.local.trainer import (
        MetricBuffer,
        build_trainer,
        prepare_training,
        progress_callback,
        training_arguments,
    )

    work = Path(tempfile.mkdtemp(prefix="tunegrid-train-bench-"))
    rows = [
        ln for ln in (ROOT / "samples" / "ultrachat_small.jsonl").read_text(encoding="utf-8").splitlines() if ln.strip()
    ][: args.rows]
    train_file = work / "train.jsonl"
    train_file.write_text("\n".join(rows) + "\n", encoding="utf-8")
    params = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "max_seq_length": args.seq,
        "learning_rate": 2e-4,
        "lora_r": 8,
        "lora_alpha": 16,
        "logging_steps": 1,
    }
    config = resolve_train_config(params)

    started = time.monotonic()
    base = resolve_base_model(args.model)
    print(f"base model {base.label} ready in {time.monotonic() - started:.1f} s ({base.source})", flush=True)

    def fresh(say=lambda s: None):
        return prepare_training(base, config, train_file=train_file, test_file=None, max_eval_rows=0, say=say)

    load_started = time.monotonic()
    fresh(say=lambda s: print("  " + s, flush=True))
    load_s = time.monotonic() - load_started
    print(f"prepared (load + tokenize + LoRA) in {load_s:.1f} s; threads {torch.get_num_threads()}", flush=True)

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=(work / "artifacts").as_uri())

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Step end times and token counts: the same (negligible) probe in both runs."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

        def steady(self) -> tuple[float, int]:
            """(seconds, tokens) over the steps after the first (which includes set-up)."""
            (t1, k1), (tn, kn) = self.marks[1], self.marks[-1]
            return tn - t1, kn - k1

    def run_ours() -> tuple[float, int]:
        p = fresh()
        lines: list[str] = []
        with mlflow.start_run(experiment_id=experiment) as run:
            metrics = MetricBuffer(mlflow.MlflowClient(), run.info.run_id)
            trainer = build_trainer(
                p,
                output_dir=work / "ours",
                callbacks=[
                    progress_callback(say=lines.append, log_metrics=metrics.add, progress_file=work / "progress.json")
                ],
            )
            trainer.remove_callback(PrinterCallback)
            clock = StepClock()
            trainer.add_callback(clock)
            trainer.train()
            metrics.flush()
            mlflow.flush_async_logging()
        assert len([ln for ln in lines if ln.startswith("step ")]) == args.steps
        return clock.steady()

    def run_bare() -> tuple[float, int]:
        p = fresh()
        targs = training_arguments(
            config, output_dir=work / "bare", device=p.device, total_steps=p.total_steps, has_eval=False
        )
        from tunegrid.local.chat_data import ChatCollator

        trainer = Trainer(
            model=p.model,
            args=targs,
            train_dataset=p.train.examples,
            data_collator=ChatCollator(pad_token_id=int(p.tokenizer.pad_token_id)),
        )
        trainer.remove_callback(PrinterCallback)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
        return clock.steady()

    print("warm-up run (not counted)", flush=True)
    run_bare()
    ours_tps: list[float] = []
    bare_tps: list[float] = []
    step_s: list[float] = []
    for r in range(args.rounds):
        for name, fn, sink in (
            (("ours", run_ours, ours_tps), ("bare", run_bare, bare_tps))
            if r % 2 == 0
            else (("bare", run_bare, bare_tps), ("ours", run_ours, ours_tps))
        ):
            gc.collect()
            elapsed, tokens = fn()
            sink.append(tokens / elapsed)
            if name == "ours":
                step_s.append(elapsed / (args.steps - 1))
            print(
                f"round {r + 1} {name}: steps 2-{args.steps} in {elapsed:.2f} s, {tokens} tokens, {tokens / elapsed:.0f} tokens/s",
                flush=True,
            )

    ours, bare = statistics.median(ours_tps), statistics.median(bare_tps)
    figures = {
        "model": base.label,
        "steps": args.steps,
        "batch": args.batch,
        "max_seq_length": args.seq,
        "tokens_per_s": round(ours, 1),
        "baseline_tokens_per_s": round(bare, 1),
        "ratio": round(ours / bare, 3),
        "step_s": round(statistics.median(step_s), 3),
        "load_s": round(load_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
    }
    print(
        f"{base.label}: ours {ours:.0f} tokens/s, bare Trainer {bare:.0f} tokens/s, ratio {ours / bare:.3f}; step {figures['step_s']} s; peak RSS {figures['peak_rss_mb']} MB"
    )
    print("TRAIN_BENCH " + json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
