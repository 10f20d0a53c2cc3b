"""The rules of one row: what `_inspect_row` names, the role-order rules both paths share
(`_RolePattern`), and the bounded memory of the rows seen (`DuplicateIndex`)."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import orjson

ROLES = frozenset(("system", "user", "assistant"))
MESSAGE_KEYS = frozenset(("role", "content", "name", "weight"))
ROW_KEYS = frozenset(("messages", "prompt", "prompt_id", "tools"))
"""Row keys the Azure ML chat pipeline reads; it drops any other (hence `extra_fields`)."""

_INDEXES_SHOWN = 3


def _kind(value: object) -> str:
    """A JSON type name for messages; never the value itself (it may be huge or deeply nested)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: object, limit: int = 40) -> str:
    if isinstance(value, str):
        text = value if len(value) <= limit else value[:limit] + "..."
        return repr(text)
    return _kind(value)


def _scalar(value: object) -> str:
    """A short JSON spelling of a scalar (`2`, `true`, `"bob"`), else its kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return orjson.dumps(value).decode()
    if isinstance(value, str):
        return orjson.dumps(value if len(value) <= 40 else value[:40] + "...").decode()
    return _kind(value)


def _indexes(indexes: Sequence[int]) -> str:
    shown = ", ".join(f"messages[{i}]" for i in indexes[:_INDEXES_SHOWN])
    more = len(indexes) - _INDEXES_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


@dataclass(frozen=True, eq=False)  # identity equality: `None in patterns` stays in C
class _RolePattern:
    """What the role sequence of a row says: order errors, the last-turn warning, assistant turns."""

    roles: tuple[str, ...]
    errors: tuple[tuple[str, str], ...]
    last_not_assistant: bool
    assistant_slice: slice  # the assistant turns, when the row is valid (they alternate)


def _role_pattern(roles: tuple[str, ...]) -> _RolePattern:
    """Order rules over a sequence of valid roles (system | user | assistant)."""
    errors: list[tuple[str, str]] = []
    late_system = [i for i, r in enumerate(roles) if r == "system" and i > 0]
    if late_system:
        errors.append(("system_not_first", f"{_indexes(late_system)}: a system message may only come first"))
    turns = [(i, r) for i, r in enumerate(roles) if r != "system"]
    if turns and turns[0][1] != "user":
        i, r = turns[0]
        errors.append(("first_not_user", f"the first non-system message, messages[{i}], is from the {r}, not the user"))
    for (i, a), (j, b) in pairwise(turns):
        if a == b:
            errors.append(
                (
                    "roles_not_alternating",
                    f"messages[{i}] and messages[{j}] are both from the {a}; user and assistant must alternate",
                )
            )
            break
    if "user" not in roles:
        errors.append(("no_user_message", "the conversation has no user message"))
    if "assistant" not in roles:
        errors.append(("no_assistant_message", "the conversation has no assistant message"))
    start = 1 if roles and roles[0] == "system" else 0
    return _RolePattern(
        roles=roles,
        errors=tuple(errors),
        last_not_assistant=bool(roles) and roles[-1] != "assistant",
        assistant_slice=slice(start + 1, None, 2),
    )


@dataclass
class _RowVerdict:
    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    roles: tuple[str, ...] = ()
    contents: list[str] = field(default_factory=list)
    pattern: _RolePattern | None = None
    extras: tuple[tuple[object, object], ...] = ()  # (name, weight) per message when any is present


def _inspect_row(obj: object, patterns: Callable[[tuple[str, ...]], _RolePattern]) -> _RowVerdict:
    """Every problem of one parsed row, one issue per code (naming the messages concerned)."""
    verdict = _RowVerdict()
    errors, warnings = verdict.errors, verdict.warnings
    if type(obj) is not dict:
        errors.append(("not_object", f"the row is {_kind(obj)}, not an object"))
        return verdict
    extra = [k for k in obj if k not in ROW_KEYS]
    if extra:
        names = ", ".join(_short(k) for k in extra[:_INDEXES_SHOWN])
        more = f" (and {len(extra) - _INDEXES_SHOWN} more)" if len(extra) > _INDEXES_SHOWN else ""
        plural = len(extra) > 1
        warnings.append(
            (
                "extra_fields",
                f"row key{'s' if plural else ''} {names}{more} {'are' if plural else 'is'} dropped by the pipeline",
            )
        )
    if "messages" not in obj:
        errors.append(("missing_messages", "the row has no `messages` key"))
        return verdict
    messages = obj["messages"]
    if type(messages) is not list:
        errors.append(("messages_not_list", f"`messages` is {_kind(messages)}, not an array"))
        return verdict
    if len(messages) < 2:
        errors.append(("too_few_messages", f"the conversation has {len(messages)} message(s); at least 2 are needed"))

    found: dict[str, list[int]] = {}
    unknown_keys: list[str] = []
    bad_roles: list[str] = []
    bad_weights: list[str] = []
    roles: list[str] = []
    contents: list[str] = []
    extras: list[tuple[object, object]] = []
    has_extras = False
    for i, m in enumerate(messages):
        if type(m) is not dict:
            found.setdefault("message_not_object", []).append(i)
            continue
        if len(m) > 2 or "role" not in m or "content" not in m:
            for k in m:
                if k not in MESSAGE_KEYS:
                    found.setdefault("unknown_key", []).append(i)
                    if len(unknown_keys) < _INDEXES_SHOWN:
                        unknown_keys.append(_short(k))
        if "role" not in m:
            found.setdefault("missing_role", []).append(i)
        else:
            role = m["role"]
            if type(role) is str and role in ROLES:
                roles.append(role)
            else:
                found.setdefault("unknown_role", []).append(i)
                if len(bad_roles) < _INDEXES_SHOWN:
                    bad_roles.append(_short(role))
        content = m.get("content")
        if content is None:
            found.setdefault("missing_content", []).append(i)
        elif type(content) is not str:
            found.setdefault("content_not_string", []).append(i)
        elif not content or content.isspace():
            found.setdefault("empty_content", []).append(i)
        else:
            contents.append(content)
        name, weight = m.get("name"), m.get("weight")
        if "weight" in m and not (type(weight) is int and weight in (0, 1)):
            found.setdefault("_invalid_weight", []).append(i)
            if len(bad_weights) < _INDEXES_SHOWN:
                bad_weights.append(_scalar(weight))
        if name is not None or weight is not None:
            has_extras = True
        extras.append((name if type(name) is str else (_kind(name), _scalar(name)), (_kind(weight), _scalar(weight))))

    # One issue per code, in the order of the codes list (deterministic).
    details = {
        "message_not_object": "is not an object",
        "missing_role": "has no `role`",
        "unknown_role": f"has a role other than system, user, assistant ({', '.join(bad_roles)})",
        "missing_content": "has no `content` (absent or null)",
        "content_not_string": "has a `content` that is not a string",
        "empty_content": "has an empty or whitespace-only `content`",
        "unknown_key": f"has keys other than role, content, name, weight ({', '.join(unknown_keys)})",
    }
    for code, detail in details.items():
        if code in found:
            idx = sorted(set(found[code]))
            errors.append((code, f"{_indexes(idx)} {detail}"))
    if "_invalid_weight" in found:
        warnings.append(
            (
                "invalid_weight",
                f"{_indexes(found['_invalid_weight'])} has a `weight` other than 0 or 1 ({', '.join(bad_weights)})",
            )
        )
    structurally_sound = len(roles) == len(messages) >= 2
    if structurally_sound:
        pattern = patterns(tuple(roles))
        errors.extend(pattern.errors)
        if pattern.last_not_assistant:
            warnings.append(("last_not_assistant", f"the last message is from the {roles[-1]}, not the assistant"))
        verdict.pattern = pattern
    verdict.roles = tuple(roles)
    verdict.contents = contents
    verdict.extras = tuple(extras) if has_extras else ()
    return verdict


class DuplicateIndex:
    """Remembers the 64-bit hashes of the rows seen, to name the line a duplicate repeats.

    A Python set (batch membership tests run in C) plus the hashes and lines in arrival order (to
    find the earlier line of a listed duplicate). Memory: about 80 bytes a remembered row, and it
    stops remembering new rows after `max_rows` (it still finds duplicates of those it holds).
    """

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(0, max_rows)
        self.full = False
        self._set: set[int] = set()
        self._keys = array("Q")
        self._lines = array("Q")

    @property
    def size(self) -> int:
        return len(self._set)

    def earlier_line(self, key: int) -> int:
        """The line that first had `key` (a linear scan in C: call it only for duplicates you list)."""
        return int(self._lines[self._keys.index(key)])

    def add_new(self, keys: list[int], first_line: int) -> bool:
        """Remember hashes of rows on consecutive lines if none was seen before (True), else change nothing."""
        seen = self._set
        before = len(seen)
        if before + len(keys) > self.max_rows or not seen.isdisjoint(keys):
            return False
        seen.update(keys)
        if len(seen) - before != len(keys):  # a repeat within the batch
            seen.difference_update(keys)
            return False
        self._keys.extend(keys)
        self._lines.extend(range(first_line, first_line + len(keys)))
        return True

    def add_many(self, keys: array[int], lines: array[int]) -> list[int]:
        """`add` each (key, line) in order; the positions of the keys seen before (bulk in C when there are none)."""
        seen = self._set
        if len(seen) + len(keys) <= self.max_rows and seen.isdisjoint(keys):
            before = len(seen)
            seen.update(keys)
            if len(seen) - before == len(keys):
                self._keys.extend(keys)
                self._lines.extend(lines)
                return []
            seen.difference_update(keys)  # a repeat among the new keys: none was there before
        return [i for i, (key, line) in enumerate(zip(keys, lines, strict=True)) if not self.add(key, line)]

    def add(self, key: int, line: int) -> bool:
        """Remember one hash; False if it was seen before."""
        if key in self._set:
            return False
        if len(self._set) < self.max_rows:
            self._set.add(key)
            self._keys.append(key)
            self._lines.append(line)
        else:
            self.full = True
        return True

    @property
    def memory_bytes(self) -> int:
        """Approximate: set slots and int objects, plus the two arrays."""
        return len(self._set) * 70 + (len(self._keys) + len(self._lines)) * 8
