"""Local function keys, as the Functions host keeps them: a master key, host keys, one default key per
function and the `eventgrid_extension` system key. Generated once, persisted with mode 0600, never logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from shared.domain.keys import KeySet
from shared.errors import ConfigError

MASTER_KEY_ENV = "DEVHOST_MASTER_KEY"
EVENT_GRID_SYSTEM_KEY = "eventgrid_extension"
DEFAULT = "default"


def _new_key() -> str:
    return secrets.token_urlsafe(40)


class KeyStore:
    """Keys in `path` (JSON). `DEVHOST_MASTER_KEY` from the environment replaces the stored master key."""

    def __init__(self, path: Path, *, environ: Mapping[str, str] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._doc = self._load()
        env = os.environ if environ is None else environ
        self._master_override = env.get(MASTER_KEY_ENV) or None

    def _load(self) -> dict[str, object]:
        if not self.path.is_file():
            return {}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the dev host keys in {self.path}: {exc}") from exc
        return doc if isinstance(doc, dict) else {}

    def ensure(self, function_names: Iterable[str]) -> None:
        """Create whatever key is missing (master, host default, system, one per function) and persist."""
        with self._lock:
            changed = False
            if not self._doc.get("masterKey"):
                self._doc["masterKey"] = _new_key()
                changed = True
            for section, names in (
                ("hostKeys", [DEFAULT]),
                ("systemKeys", [EVENT_GRID_SYSTEM_KEY]),
            ):
                table = self._section(section)
                for name in names:
                    if not table.get(name):
                        table[name] = _new_key()
                        changed = True
            functions = self._section("functionKeys")
            for fn in function_names:
                keys = functions.setdefault(fn, {})
                if not isinstance(keys, dict):
                    keys = functions[fn] = {}
                if not keys.get(DEFAULT):
                    keys[DEFAULT] = _new_key()
                    changed = True
            if changed:
                self._save()

    def _section(self, name: str) -> dict[str, object]:
        table = self._doc.get(name)
        if not isinstance(table, dict):
            table = self._doc[name] = {}
        return table

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(self._doc, out, indent=2, sort_keys=True)
        with contextlib.suppress(OSError):
            tmp.chmod(0o600)
        tmp.replace(self.path)

    @property
    def master_key(self) -> str:
        return self._master_override or str(self._doc.get("masterKey", ""))

    def host_keys(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._section("hostKeys").items() if v}

    def system_key(self, name: str = EVENT_GRID_SYSTEM_KEY) -> str:
        return str(self._section("systemKeys").get(name, ""))

    def function_keys(self, function_name: str) -> dict[str, str]:
        keys = self._section("functionKeys").get(function_name) or {}
        return {k: str(v) for k, v in keys.items() if v} if isinstance(keys, dict) else {}

    def all_function_keys(self) -> dict[str, dict[str, str]]:
        return {name: self.function_keys(name) for name in self._section("functionKeys")}

    def accepted_for_function(self, function_name: str) -> tuple[bytes, ...]:
        """Keys that authorise a `function`-level call: the function's own keys, host keys, the master key."""
        keys = [*self.function_keys(function_name).values(), *self.host_keys().values(), self.master_key]
        return tuple(k.encode() for k in keys if k)

    def accepted_for_admin(self) -> tuple[bytes, ...]:
        return (self.master_key.encode(),) if self.master_key else ()

    def accepted_for_system(self, name: str = EVENT_GRID_SYSTEM_KEY) -> tuple[bytes, ...]:
        return tuple(k.encode() for k in (self.system_key(name), self.master_key) if k)


def key_matches(candidate: bytes | None, accepted: tuple[bytes, ...]) -> bool:
    """Constant-time comparison against every accepted key (`shared.domain.keys`)."""
    return KeySet(accepted).matches(candidate)
