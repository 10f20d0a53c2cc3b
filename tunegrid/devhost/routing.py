"""HTTP route templates as the Functions host reads them (ASP.NET route syntax), compiled once.

Supported: literal segments (case-insensitive), `{name}`, `{name?}`, `{name:constraint}` (int, long,
bool, guid, alpha, float, double, decimal, datetime; other constraints match any segment), `{*name}`
catch-all. Literal routes are found by one dict lookup; templated routes are tried most specific first.
A path with no function, or a method the function does not accept, gives 404 as on the real host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

ALL_METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "TRACE")

_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "bool": r"(?i:true|false)",
    "guid": r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}",
    "alpha": r"[A-Za-z]+",
    "float": r"-?\d+(?:\.\d+)?",
    "double": r"-?\d+(?:\.\d+)?",
    "decimal": r"-?\d+(?:\.\d+)?",
    "datetime": r"[^/]+",
}
_PARAM = re.compile(r"\{(\*{1,2})?([A-Za-z_][A-Za-z0-9_]*)(?::([^}?=]+))?(\?)?(?:=[^}]*)?\}")


@dataclass(frozen=True)
class Route:
    """One HTTP function's route: the path template under the prefix, its methods and auth level."""

    function: str
    template: str
    path: str
    methods: frozenset[str]
    auth_level: str
    literal: bool
    pattern: re.Pattern[str] | None
    specificity: tuple[int, int, int]
    payload: Any = None

    def accepts(self, method: str) -> bool:
        return method in self.methods


def _segment_regex(segment: str) -> tuple[str, bool, bool]:
    """(regex, has_literal, is_optional_only_param) for one path segment."""
    out = []
    pos = 0
    literal = False
    params = 0
    optional_only = False
    for match in _PARAM.finditer(segment):
        if match.start() > pos:
            out.append(re.escape(segment[pos : match.start()]))
            literal = True
        star, name, constraint, optional = match.groups()
        params += 1
        body = ".*" if star else _CONSTRAINTS.get((constraint or "").split("(")[0].lower(), "[^/]+")
        if optional or star:
            out.append(f"(?P<{name}>{body})?")
            optional_only = match.start() == 0 and match.end() == len(segment)
        else:
            out.append(f"(?P<{name}>{body})")
        pos = match.end()
    if pos < len(segment):
        out.append(re.escape(segment[pos:]))
        literal = True
    return "".join(out), literal and params == 0, optional_only


def compile_route(
    function: str,
    template: str,
    *,
    prefix: str,
    methods: Iterable[str] | None,
    auth_level: str,
    payload: Any = None,
) -> Route:
    template = template.strip().strip("/")
    segments = [s for s in ([prefix.strip("/")] if prefix.strip("/") else []) + template.split("/") if s != ""]
    path = "/" + "/".join(segments)
    regex_parts: list[str] = []
    literal_segments = 0
    all_literal = True
    catch_all = False
    for segment in segments:
        regex, is_literal, optional_only = _segment_regex(segment)
        literal_segments += is_literal
        all_literal &= is_literal
        catch_all |= "{*" in segment
        regex_parts.append(f"(?:/{regex})?" if optional_only else f"/{regex}")
    method_set = frozenset(m.upper() for m in methods) if methods else frozenset(ALL_METHODS)
    pattern = None if all_literal else re.compile("^" + "".join(regex_parts) + "/?$", re.IGNORECASE)
    return Route(
        function=function,
        template=template,
        path=path,
        methods=method_set,
        auth_level=auth_level.lower(),
        literal=all_literal,
        pattern=pattern,
        # more literal segments first, then longer templates, catch-all routes last
        specificity=(int(catch_all), -literal_segments, -len(segments)),
        payload=payload,
    )


class RouteTable:
    """Path + method -> route and route parameters."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._literal: dict[str, list[Route]] = {}
        for route in self.routes:
            if route.literal:
                self._literal.setdefault(route.path.lower(), []).append(route)
        self._templated = sorted((r for r in self.routes if not r.literal), key=lambda r: r.specificity)

    def match(self, path: str, method: str) -> tuple[Route, Mapping[str, str]] | None:
        key = path.lower()
        if len(key) > 1 and key.endswith("/"):
            key = key[:-1]
        candidates = self._literal.get(key)
        if candidates is not None:
            for route in candidates:
                if method in route.methods:
                    return route, {}
        for route in self._templated:
            if method not in route.methods:
                continue
            found = route.pattern.match(path)  # type: ignore[union-attr]
            if found is not None:
                return route, {k: v for k, v in found.groupdict().items() if v is not None}
        return None
