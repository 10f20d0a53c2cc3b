"""The notebook's compute checks, before any money is spent.

- A cluster must exist and not be in the failed provisioning state.
- The fine-tune VM size must be in the model's `finetune_compute_allow_list` when it has one,
  else must not be a K80 size (standard_nc6 / nc12 / nc24 / nc24r).
- GPUs per node come from `compute.list_sizes()` matched by size name (an explicit sidecar or
  settings value wins, but may not exceed what the size has).
- `serverless` applies the same size rules to `instance_type_finetune`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from shared.adapters.azureml.job_spec import K80_SIZES, ComputePlan
from shared.adapters.azureml.model_tags import in_allow_list
from shared.adapters.azureml.service_calls import not_found_is_none
from shared.errors import ComputeError

log = logging.getLogger(__name__)

Read = Callable[[Callable[[], Any], str], Any]
"""`read(fn, action)` runs an SDK call through the adapter's retry and error translation."""


def check_vm_size(size: str, *, model: str, allow_list: tuple[str, ...] | None, where: str) -> None:
    if allow_list is not None:
        if not in_allow_list(size, allow_list):
            raise ComputeError(
                f"VM size {size} ({where}) is not in the allow-listed computes for fine-tuning {model}: {', '.join(allow_list)}"
            )
    elif size.lower() in K80_SIZES:
        raise ComputeError(
            f"VM size {size} ({where}) is not supported for fine-tuning (K80 GPUs); pick an NCv3, NC A100 or ND size"
        )


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


def resolve_compute(
    workspace: Any,
    read: Read,
    plan: ComputePlan,
    *,
    model: str,
    allow_list: tuple[str, ...] | None,
    workspace_name: str,
) -> ComputePlan:
    """The plan with `gpus_per_node` filled in, or ComputeError saying what to fix."""
    if plan.serverless:
        size = plan.instance_types["instance_type_finetune"]
        where = "serverless instance_type_finetune"
    else:
        cluster = read(
            not_found_is_none(lambda: workspace.compute.get(plan.target)), f"read compute cluster {plan.target}"
        )
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
        where = f"cluster {plan.target}"
    check_vm_size(size, model=model, allow_list=allow_list, where=where)
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
