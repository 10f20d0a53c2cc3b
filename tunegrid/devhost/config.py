"""What the dev host reads before it loads the app: `local.settings.json`, `host.json`, `%NAME%` references.

Core Tools puts the `Values` of `local.settings.json` into the environment before the worker imports the
app, and real environment variables win over file values; the dev host does the same, and so does every
other CLI command (`local_settings_environ`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

log = logging.getLogger(__name__)

SETTINGS_FILE = "local.settings.json"
SAMPLE_SETTINGS_FILE = "local.settings.sample.json"
_REFERENCE = re.compile(r"%([^%\s]+)%")


@dataclass(frozen=True)
class LocalSettings:
    """The `Values` (and `Host` section) of a local settings file; `source` None when there was no file."""

    values: Mapping[str, str]
    source: Path | None = None
    from_sample: bool = False
    host_section: Mapping[str, Any] = field(default_factory=dict)

    @property
    def local_http_port(self) -> int | None:
        port = self.host_section.get("LocalHttpPort")
        return int(port) if port not in (None, "") else None


def load_local_settings(
    path: Path | None = None, *, root: Path | None = None, fallback_level: int = logging.WARNING
) -> LocalSettings:
    """Read `path`, else `local.settings.json` in `root`, else the sample next to it (and say so, at
    `fallback_level`: the dev host warns, a one-shot CLI command only tells `-v`)."""
    root = root or Path.cwd()
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"settings file {path} does not exist")
        return _read_settings_file(path, from_sample=False)
    primary = root / SETTINGS_FILE
    if primary.is_file():
        return _read_settings_file(primary, from_sample=False)
    sample = root / SAMPLE_SETTINGS_FILE
    if sample.is_file():
        log.log(
            fallback_level,
            "%s not found; using %s (copy it to %s to change settings)",
            SETTINGS_FILE,
            sample.name,
            SETTINGS_FILE,
        )
        return _read_settings_file(sample, from_sample=True)
    log.log(fallback_level, "no %s or %s in %s; using the environment only", SETTINGS_FILE, SAMPLE_SETTINGS_FILE, root)
    return LocalSettings(values={})


def _read_settings_file(path: Path, *, from_sample: bool) -> LocalSettings:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"settings file {path} must hold a JSON object")
    if doc.get("IsEncrypted") is True:
        raise ConfigError(f"settings file {path} is encrypted; decrypt it with Core Tools or write plain values")
    raw_values = doc.get("Values") or {}
    if not isinstance(raw_values, dict):
        raise ConfigError(f"'Values' in {path} must be an object of name -> string")
    values: dict[str, str] = {}
    for name, value in raw_values.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            raise ConfigError(f"setting {name} in {path} must be a string, got {type(value).__name__}")
        values[str(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    host = doc.get("Host")
    host_section: dict[str, Any] = host if isinstance(host, dict) else {}
    return LocalSettings(values=values, source=path, from_sample=from_sample, host_section=host_section)


def apply_to_environ(values: Mapping[str, str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each value that the environment does not already have; returns the names it added."""
    environ = os.environ if environ is None else environ
    added = []
    for name, value in values.items():
        if name not in environ:
            environ[name] = value
            added.append(name)
    return added


@contextlib.contextmanager
def local_settings_environ(
    path: Path | None = None,
    *,
    root: Path | None = None,
    environ: MutableMapping[str, str] | None = None,
    fallback_level: int = logging.DEBUG,
) -> Iterator[LocalSettings]:
    """The settings file's values in the environment for the block, as Core Tools provides them before
    the worker starts: variables already set win; the ones it added are removed again afterwards.

    Every CLI command reads app settings through this (see `tunegrid.cli`), so `python -m tunegrid runs`
    in a fresh checkout finds Azurite as the dev host does."""
    environ = os.environ if environ is None else environ
    loaded = load_local_settings(path, root=root, fallback_level=fallback_level)
    added = apply_to_environ(loaded.values, environ)
    log.debug("app settings from %s: %d values added to the environment", loaded.source, len(added))
    try:
        yield loaded
    finally:
        for name in added:
            environ.pop(name, None)


def resolve_references(value: str, env: Mapping[str, str]) -> str:
    """Replace every `%NAME%` with the app setting NAME, as the host does for binding properties."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        resolved = env.get(name)
        if resolved is None or resolved == "":
            raise ConfigError(f"'%{name}%' does not resolve to a value (no app setting {name})")
        return resolved

    return _REFERENCE.sub(one, value)


def resolve_binding(binding: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A binding dict with `%NAME%` resolved in every string field (the raw dict is left as it is)."""
    return {k: resolve_references(v, env) if isinstance(v, str) else v for k, v in binding.items()}


@dataclass(frozen=True)
class HostConfig:
    """The parts of `host.json` the dev host honours."""

    route_prefix: str = "api"
    max_dequeue_count: int = 5
    source: Path | None = None

    @classmethod
    def load(cls, path: Path | None) -> HostConfig:
        if path is None or not path.is_file():
            return cls()
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        extensions = doc.get("extensions") or {}
        http = extensions.get("http") or {}
        queues = extensions.get("queues") or {}
        prefix = http.get("routePrefix", "api")
        return cls(
            route_prefix=str(prefix if prefix is not None else "").strip("/"),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            source=path,
        )
