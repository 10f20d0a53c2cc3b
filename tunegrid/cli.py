"""`python -m tunegrid <command>` (also installed as `tunegrid`).

Each module in `shared/commands/` adds its subcommands through `register(subparsers)`; a command
sets `func` to a callable taking the parsed args and returning the exit code.
Exit codes: 0 success, 1 a negative verdict (invalid dataset, failed run), 2 usage or input error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from shared.errors import ConfigError, TunegridError, UsageError
from tunegrid import commands


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 on usage errors; keep it, with our prefix
        self.print_usage(sys.stderr)
        self.exit(2, f"tunegrid: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunegrid", description="Tunegrid: fine-tune, roll out, serve and clean up chat models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("azure", "urllib3", "httpx", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (UsageError, ConfigError) as exc:
        print(f"tunegrid: error: {exc}", file=sys.stderr)
        return 2
    except TunegridError as exc:
        print(f"tunegrid: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
