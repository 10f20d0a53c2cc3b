"""The function catalog: what `app.get_functions()` declares, as the worker reports it to the host.

`get_functions()` can be called only once per process (a second call raises on duplicate names), so it
goes through `shared.appindex.functions_of`, which caches the result on the app object. Bindings are read from `get_raw_bindings()`, the exact JSON the
worker sends to the Functions host, and `%NAME%` references are resolved from the app settings.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from tunegrid.appindex import functions_of
from tunegrid.devhost.config import resolve_binding

HTTP_TRIGGER = "httpTrigger"
EVENT_GRID_TRIGGER = "eventGridTrigger"
BLOB_TRIGGER = "blobTrigger"
TIMER_TRIGGER = "timerTrigger"
SUPPORTED_TRIGGERS = (HTTP_TRIGGER, EVENT_GRID_TRIGGER, BLOB_TRIGGER, TIMER_TRIGGER)


def app_functions(app: object) -> tuple[Any, ...]:
    """`app.get_functions()`, called once per app per process (shared with everything else that asks)."""
    return tuple(functions_of(app))


def import_app(spec: str) -> tuple[object, Path | None]:
    """Import `module:attribute` (default attribute `app`); returns the app and its module's directory."""
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "app"
    if not module_name:
        raise ConfigError(f"app spec {spec!r} must look like module:attribute")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import the function app module {module_name!r}: {exc}") from exc
    try:
        app = getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from exc
    if not hasattr(app, "get_functions"):
        raise ConfigError(f"{spec} is not an azure.functions FunctionApp")
    module_file = getattr(module, "__file__", None)
    return app, Path(module_file).resolve().parent if module_file else None


def app_directory(app: object) -> Path | None:
    """Directory of the module that defines `app` (where host.json lives), when it can be found."""
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", None) and any(v is app for v in vars(module).values()):
            module_file = getattr(module, "__file__", None)
            if module_file:
                return Path(module_file).resolve().parent
    return None


@dataclass(frozen=True)
class FunctionSpec:
    """One function as the host sees it: its trigger binding (settings resolved) and how to call it."""

    name: str
    raw_bindings: tuple[Mapping[str, Any], ...]
    trigger: Mapping[str, Any]
    user_function: Callable[..., Any]
    is_async: bool
    trigger_param: str
    trigger_annotation: Any
    wants_context: bool
    error: str | None = None
    other_bindings: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    http_streams: bool = False
    """The trigger parameter takes a FastAPI `Request` (azurefunctions-extensions-http-fastapi)."""

    @property
    def kind(self) -> str:
        return str(self.trigger.get("type", ""))

    def annotation_name(self) -> str:
        """`module.Qualname` of the trigger parameter's annotation ('' when unannotated)."""
        ann = self.trigger_annotation
        if ann is None or ann is inspect.Parameter.empty:
            return ""
        if isinstance(ann, str):
            return ann
        return f"{getattr(ann, '__module__', '')}.{getattr(ann, '__qualname__', getattr(ann, '__name__', ''))}"


def _type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # names imported under TYPE_CHECKING, forward refs: keep the strings
        return dict(getattr(function, "__annotations__", {}))


def takes_fastapi_request(annotation: Any) -> bool:
    """Whether a trigger annotation is the HTTP-streams request type (`azurefunctions.extensions.http.fastapi.Request`
    is FastAPI's, a Starlette `Request`)."""
    if not isinstance(annotation, type):
        return False
    from starlette.requests import Request

    return issubclass(annotation, Request)


def build_catalog(functions: Sequence[Any], env: Mapping[str, str]) -> list[FunctionSpec]:
    """One `FunctionSpec` per function; a function the host could not index carries `error`."""
    specs = []
    for fn in functions:
        name = fn.get_function_name()
        raw = tuple(json.loads(b) for b in fn.get_raw_bindings())
        user_function = fn.get_user_function()
        trigger_raw = next((b for b in raw if str(b.get("type", "")).endswith("Trigger")), None)
        error: str | None = None
        trigger: Mapping[str, Any] = trigger_raw or {}
        if trigger_raw is None:
            error = "no trigger binding"
        else:
            try:
                trigger = resolve_binding(trigger_raw, env)
            except ConfigError as exc:
                error = str(exc)
            if trigger_raw.get("type") not in SUPPORTED_TRIGGERS:
                error = f"trigger type {trigger_raw.get('type')!r} is not supported by the dev host"
        param = str(trigger.get("name", ""))
        try:
            signature = inspect.signature(user_function)
        except (TypeError, ValueError):
            signature = None
        hints = _type_hints(user_function)
        others = tuple(
            b for b in raw if b is not trigger_raw and not (b.get("type") == "http" and b.get("direction") == "OUT")
        )
        if error is None and signature is not None:
            bound = {param, "context"} | {str(b.get("name")) for b in others}
            unbound = [
                p.name
                for p in signature.parameters.values()
                if p.name not in bound
                and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if unbound:
                error = f"parameters {unbound} have no binding"
            elif others:
                kinds = sorted({str(b.get("type")) for b in others})
                error = f"bindings {kinds} are not supported by the dev host (only triggers and the HTTP output)"
        annotation = (
            hints.get(param, signature.parameters[param].annotation)
            if signature is not None and param in signature.parameters
            else None
        )
        specs.append(
            FunctionSpec(
                name=name,
                raw_bindings=raw,
                trigger=trigger,
                user_function=user_function,
                is_async=inspect.iscoroutinefunction(user_function),
                trigger_param=param,
                trigger_annotation=annotation,
                wants_context=signature is not None and "context" in signature.parameters,
                error=error,
                other_bindings=others,
                http_streams=trigger.get("type") == HTTP_TRIGGER and takes_fastapi_request(annotation),
            )
        )
    return specs
