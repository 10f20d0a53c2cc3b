"""The embedded local backend: fine-tune, registry, online endpoints and Event Grid events on this machine.

Importing this package is cheap: torch, transformers and mlflow load only in the job, server and
registry code paths that need them.
"""

from tunegrid.local.backend import LocalBackend

__all__ = ["LocalBackend"]
