"""A local host for the function app, without Azure Functions Core Tools (`python -m tunegrid devhost`)."""

from tunegrid.devhost.host import DEFAULT_APP, DEFAULT_PORT, DevHost, HostTimings

__all__ = ["DEFAULT_APP", "DEFAULT_PORT", "DevHost", "HostTimings"]
