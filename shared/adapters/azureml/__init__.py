"""The Azure ML backend: the seed notebook's workflow behind the `FineTuneBackend` port.

`AzureMLBackend` is imported lazily so that `job_spec` (the pipeline job's parameters, shared by the
dry run and the real submission) can be used without importing azure-ai-ml (about 2 s).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.adapters.azureml.backend import AzureMLBackend

__all__ = ["AzureMLBackend"]


def __getattr__(name: str) -> Any:
    if name == "AzureMLBackend":
        from shared.adapters.azureml.backend import AzureMLBackend

        return AzureMLBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
