"""Choice parameters checked against the pipeline component that was actually fetched.

A component version declares the allowed values of each choice input as an `enum` (in 0.0.82,
`optim: adamw_torch | adafactor`; `adamw_hf` was dropped). Tunegrid keeps no list of its own: the
values of the job's inputs are checked against the enums of the component the submission uses, and
a bad value is refused with the allowed ones. Pure functions; the component is either azure-ai-ml's
entity (`component.inputs[name].enum`) or a component spec mapping (`spec["inputs"][name]["enum"]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.domain.resources import Finding, FindingLevel


def _enum_of(spec: Any) -> tuple[str, ...] | None:
    enum = spec.get("enum") if isinstance(spec, Mapping) else getattr(spec, "enum", None)
    if not enum:
        return None
    return tuple(str(v) for v in enum)


def component_enums(component: Any) -> dict[str, tuple[str, ...]]:
    """Input name -> allowed values, for every choice input of the component."""
    inputs = component.get("inputs") if isinstance(component, Mapping) else getattr(component, "inputs", None)
    out: dict[str, tuple[str, ...]] = {}
    for name, spec in (inputs or {}).items():
        allowed = _enum_of(spec)
        if allowed:
            out[str(name)] = allowed
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def choice_findings(
    values: Mapping[str, Any], enums: Mapping[str, tuple[str, ...]], *, component: str, sources: Mapping[str, str]
) -> list[Finding]:
    """An error for every value outside its input's enum, naming where the value came from."""
    out: list[Finding] = []
    for name, value in values.items():
        allowed = enums.get(name)
        if allowed is None or _text(value) in allowed:
            continue
        source = sources.get(name, "the job")
        out.append(
            Finding(
                FindingLevel.ERROR,
                "invalid_choice",
                f"{name}={_text(value)!r} (from {source}) is not a choice of {component}: "
                f"allowed values are {', '.join(allowed)}",
            )
        )
    return out
