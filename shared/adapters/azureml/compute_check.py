"""The notebook's compute checks on the workspace, before any money is spent.

- A cluster must exist and not be in the failed provisioning state; its VM size is what the
  model's lists are checked against (`model_lifecycle.sku_findings`, by the caller).
- GPUs per node come from `compute.list_sizes()` matched by size name (an explicit sidecar or
  settings value wins, but may not exceed what the size has).
Which sizes are allowed (the model's lists, retired families, K80) is decided in `model_lifecycle`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from shared.adapters.azureml.job_spec import ComputePlan
from shared.adapters.azureml.service_calls import not_found_is_none
from shared.errors import ComputeError

log = logging.getLogger(__name__)

Read = Callable[[Callable[[], Any], str], Any]
"""`read(fn, action)` runs an SDK call through the adapter's retry and error translation."""


def gpus_of_size(sizes: list[Any], size: str, *, where: str) -> int:
    names = []
    for sku in sizes:
        names.append(sku.name)
        if str(sku.name).lower() == size.lower():
            gpus = int(getattr(sku, "gpus", 0) or 0)
            if gpus < 1:
                raise ComputeError(f"VM size {size} ({where}) has no GPU; the fine-tune step needs GPUs")
            return gpus
    shown = ", ".join(sorted(str(n) for n in names)[:40])
    raise ComputeError(
        f"the number of GPUs of VM size {size} ({where}) was not found in the workspace's VM sizes: {shown}"
    )


def cluster_size(workspace: Any, read: Read, plan: ComputePlan, *, workspace_name: str) -> str:
    """The VM size of the plan's cluster, or ComputeError when it is missing or failed."""
    cluster = read(not_found_is_none(lambda: workspace.compute.get(plan.target)), f"read compute cluster {plan.target}")
    if cluster is None:
        raise ComputeError(
            f"compute cluster {plan.target!r} does not exist in workspace {workspace_name}: create it "
            "(the notebook's AmlCompute) or set AZUREML_COMPUTE=serverless"
        )
    state = str(getattr(cluster, "provisioning_state", "") or "")
    if state.split(".")[-1].lower() == "failed":
        raise ComputeError(
            f"compute cluster {plan.target!r} is in the failed provisioning state; recreate it or use another cluster"
        )
    size = str(getattr(cluster, "size", "") or "")
    if not size:
        raise ComputeError(f"compute {plan.target!r} has no VM size; it must be an AmlCompute cluster")
    return size


def resolve_gpus(workspace: Any, read: Read, plan: ComputePlan, *, size: str, where: str) -> ComputePlan:
    """The plan with `gpus_per_node` filled in from the size, or ComputeError saying what to fix."""
    sizes = read(lambda: list(workspace.compute.list_sizes()), "list the workspace's VM sizes")
    sku_gpus = gpus_of_size(sizes, size, where=where)
    if plan.gpus_per_node is None:
        return dataclasses.replace(plan, gpus_per_node=sku_gpus, gpus_source=f"list_sizes() for {size}")
    if plan.gpus_per_node > sku_gpus:
        raise ComputeError(
            f"gpus_per_node {plan.gpus_per_node} ({plan.gpus_source}) is more than the {sku_gpus} GPUs of {size} ({where})"
        )
    if plan.gpus_per_node < sku_gpus:
        log.warning("using %d of the %d GPUs of %s (%s)", plan.gpus_per_node, sku_gpus, size, plan.gpus_source)
    return plan
