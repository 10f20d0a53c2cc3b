"""A local host for the function app, without Azure Functions Core Tools (`python -m tunegrid devhost`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunegrid.devhost.host import DEFAULT_APP, DEFAULT_PORT, DevHost, HostTimings

__all__ = ["DEFAULT_APP", "DEFAULT_PORT", "DevHost", "HostTimings"]


def __getattr__(name: str) -> Any:
    """The host (uvicorn, starlette, the storage SDK) loads on first use: every CLI command imports
    `tunegrid.devhost.config` for its settings and must not pay for the server."""
    if name in __all__:
        from tunegrid.devhost import host

        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
