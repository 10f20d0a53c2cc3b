"""`FunctionApp.get_functions()` may run only once per process (a second call raises "does not have
a unique function name"), so everybody who needs the function list goes through here."""

from __future__ import annotations

import json
from typing import Any

_ATTR = "_tunegrid_functions"


def functions_of(app: Any) -> list[Any]:
    """The app's functions, computed once and cached on the app object itself."""
    cached = getattr(app, _ATTR, None)
    if cached is None:
        cached = list(app.get_functions())
        setattr(app, _ATTR, cached)
    return cached


def raw_bindings(fn: Any) -> list[dict[str, Any]]:
    """The exact binding JSON the worker sends to the Functions host."""
    return [json.loads(b) for b in fn.get_raw_bindings()]
