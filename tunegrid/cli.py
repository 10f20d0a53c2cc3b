"""`python -m tunegrid <command>` (also installed as `tunegrid`).

Each module in `tunegrid/commands/` adds its subcommands through `register(subparsers)`; a command
sets `func` to a callable taking the parsed args and returning the exit code.
Exit codes: 0 success, 1 a negative verdict (invalid dataset, failed run), 2 usage or input error.

App settings: every command runs with `local.settings.json` (else `local.settings.sample.json`) of the
current directory in the environment, as the dev host loads them; environment variables win. A command
that builds its own environment sets `local_settings=False` (devhost: its `--settings`; demo: its Azurite).
Logging: warnings and errors only, so a command prints its result and nothing else; `-v` shows debug
logs; a command may raise its own default with `log_level` (the dev host logs each invocation at INFO).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import NoReturn

from shared.errors import ConfigError, TunegridError, UsageError
from tunegrid import commands
from tunegrid.devhost.config import local_settings_environ


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 on usage errors; keep it, with our prefix
        self.print_usage(sys.stderr)
        self.exit(2, f"tunegrid: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunegrid", description="Tunegrid: fine-tune, roll out, serve and clean up chat models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # helpers shared by the commands
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("azure", "urllib3", "httpx", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        with local_settings_environ() if getattr(args, "local_settings", True) else contextlib.nullcontext():
            return int(args.func(args))
    except (UsageError, ConfigError) as exc:
        print(f"tunegrid: error: {exc}", file=sys.stderr)
        return 2
    except TunegridError as exc:
        print(f"tunegrid: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tunegrid settings | head`): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
