"""`demo`: the full local loop (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from tunegrid.demo import config_from_args, main

    return main(
        config_from_args(
            model=args.model,
            rows=args.rows,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            max_seq_length=args.max_seq_length,
            learning_rate=args.learning_rate,
            temperature=args.temperature,
            workdir=args.workdir,
        )
    )


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the whole loop locally: upload, validate, fine-tune, roll out, chat, clean up")
    p.add_argument("--model", default=None, help="local base model (default smollm2; tiny-phi3 for a fast run)")
    p.add_argument("--rows", type=int, default=None, help="ultrachat rows to fine-tune on")
    p.add_argument("--max-steps", type=int, default=None, help="training steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None, help="of the demo question (0 = greedy)")
    p.add_argument("--workdir", type=Path, default=None, help="where the demo keeps its workspace (default .demo/)")
    # the demo runs on its own Azurite with its own settings: a local.settings.json must not leak into it
    p.set_defaults(func=_demo, local_settings=False)
