"""The registry model's tags that steer a fine-tune: compute allow lists and `model_specific_defaults`.

The tags are Python literals stored as strings (the notebook reads them with `ast.literal_eval`);
a model spec file (YAML) holds the same values as lists and mappings, which are taken as they are.
Some registry models wrap the defaults as `ordereddict({...})` or `OrderedDict([...])`; both are
unwrapped here. Nothing is ever `eval`-ed. A tag that cannot be read gives a `ConfigError` naming
the model and the tag, because retrying will not fix it.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping
from typing import Any

from shared.domain.sidecar import FINETUNE_PARAMS, validate_finetune_params
from shared.errors import ConfigError, InvalidInput

FINETUNE_ALLOW_LIST_TAG = "finetune_compute_allow_list"
INFERENCE_ALLOW_LIST_TAG = "inference_compute_allow_list"
MODEL_DEFAULTS_TAG = "model_specific_defaults"

_MAX_TAG_CHARS = 65_536
_ORDERED_DICT = re.compile(r"(?:collections\.)?(?:ordereddict|OrderedDict)\((?P<inner>.*)\)", re.DOTALL)


def _literal(model: str, tag: str, raw: str) -> Any:
    if len(raw) > _MAX_TAG_CHARS:
        raise ConfigError(
            f"model {model}: tag {tag!r} is {len(raw)} characters long; refusing to parse more than {_MAX_TAG_CHARS}"
        )
    text = raw.strip()
    wrapped = _ORDERED_DICT.fullmatch(text)
    if wrapped:
        text = wrapped.group("inner").strip() or "{}"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            value = json.loads(text)
        except ValueError:
            raise ConfigError(f"model {model}: tag {tag!r} is not a Python or JSON literal: {raw[:120]!r}") from None
    if wrapped and isinstance(value, list | tuple):
        try:
            value = dict(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"model {model}: tag {tag!r} is an OrderedDict of something other than pairs: {raw[:120]!r}"
            ) from None
    return value


def parse_allow_list(model: str, tag: str, raw: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A VM-size allow list, or None when the model has no such tag."""
    if raw is None:
        return None
    value = list(raw) if isinstance(raw, list | tuple) else _literal(model, tag, raw)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(
            f"model {model}: tag {tag!r} must be a list of VM sizes such as ['Standard_NC24ads_A100_v4'], got {str(raw)[:120]!r}"
        )
    return tuple(v.strip() for v in value)


def _lenient(name: str, value: Any) -> Any:
    """Tags often carry numbers as strings ('1') or choices as numbers (2): bring them to the
    sidecar's kinds before the strict check."""
    kind = FINETUNE_PARAMS[name][0]
    if kind in ("int", "float") and isinstance(value, str):
        try:
            return int(value) if kind == "int" else float(value)
        except ValueError:
            return value
    if kind == "bool" and isinstance(value, str):
        return value.strip().lower()
    if kind == "choice" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else str(value)
    return value


def parse_model_defaults(model: str, raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """`model_specific_defaults` as component input values. Known parameters are checked like the
    sidecar's; unknown names are kept (the component may know them) when they are plain scalars."""
    if raw is None:
        return {}
    value = dict(raw) if isinstance(raw, Mapping) else _literal(model, MODEL_DEFAULTS_TAG, raw)
    if not isinstance(value, dict):
        raise ConfigError(
            f"model {model}: tag {MODEL_DEFAULTS_TAG!r} must be a dict of fine-tune parameters, got {str(raw)[:120]!r}"
        )
    known: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise ConfigError(f"model {model}: tag {MODEL_DEFAULTS_TAG!r} has a non-string key {name!r}")
        if name in FINETUNE_PARAMS:
            known[name] = _lenient(name, item)
        elif isinstance(item, str | int | float) and not isinstance(item, bool):
            other[name] = item
        else:
            raise ConfigError(
                f"model {model}: tag {MODEL_DEFAULTS_TAG!r} value of {name!r} must be a string or a number, got {item!r}"
            )
    try:
        checked = validate_finetune_params(known, where=MODEL_DEFAULTS_TAG)
    except InvalidInput as exc:
        raise ConfigError(f"model {model}: {exc}") from None
    return {**checked, **other}
