"""Is there vCPU quota for the chosen VM sizes in the workspace's region?

Azure ML counts dedicated vCPUs per VM family and region (`.../locations/{region}/usages`: one
`vmFamily/usages` entry per family, e.g. "Standard NCADSA100v4 Family Cluster Dedicated vCPUs", and
the regional total "Total Cluster Dedicated Regional vCPUs"); serverless jobs, clusters and managed
online deployments draw on it. A size's family and vCPUs come from `.../locations/{region}/vmSizes`
(`family: standardNCADSA100v4Family`, `vCPUs: 24`). The two name the family differently and with
varying case, so both are reduced to the same key (`ncadsa100v4`).

Grading, per use of a size: no free vCPU at all (or a limit below one node) fails; free vCPUs short
of what the use needs (e.g. the second deployment of a roll-out, which runs beside the old one)
warns, since usage changes as jobs and deployments come and go.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunegrid.doctor.report import CheckResult, Status, worst

_SUFFIXES = ("familyclusterdedicatedvcpus", "familydedicatedvcpus", "familyvcpus", "family")


def family_key(text: str) -> str:
    """`standardNCADSA100v4Family`, `Standard NCADSA100v4 Family Cluster Dedicated vCPUs` and
    `Standard_NCADSA100v4_Family_Cluster_Dedicated_vCPUs` -> `ncadsa100v4`."""
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    key = key.removeprefix("standard")
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


@dataclass(frozen=True)
class VmSize:
    name: str
    family: str
    vcpus: int
    gpus: int


def vm_sizes(doc: Mapping[str, Any]) -> dict[str, VmSize]:
    """Lower-case size name -> size, from a `vmSizes` answer."""
    out: dict[str, VmSize] = {}
    for item in doc.get("value") or []:
        name = str(item.get("name") or "")
        if name:
            out[name.lower()] = VmSize(
                name, str(item.get("family") or ""), int(item.get("vCPUs") or 0), int(item.get("gpus") or 0)
            )
    return out


@dataclass(frozen=True)
class Usage:
    name: str
    current: int
    limit: int
    """-1 (or any negative value) means no limit of its own."""

    @property
    def free(self) -> int | None:
        return None if self.limit < 0 else self.limit - self.current


def _usage(item: Mapping[str, Any]) -> Usage:
    name = item.get("name") or {}
    text = str(name.get("localizedValue") or name.get("value") or "") if isinstance(name, Mapping) else str(name)
    return Usage(text, int(item.get("currentValue") or 0), int(item.get("limit") or 0))


def _is_dedicated(item: Mapping[str, Any]) -> bool:
    name = item.get("name") or {}
    text = " ".join(str(v) for v in name.values()) if isinstance(name, Mapping) else str(name)
    return "lowpriority" not in re.sub(r"[^a-z]", "", (text + str(item.get("id") or "")).lower())


def family_usages(doc: Mapping[str, Any]) -> dict[str, Usage]:
    """Family key -> the subscription's dedicated usage in the region (`vmFamily/usages` entries; the
    workspace- and compute-level entries of the same answer are parts of these)."""
    out: dict[str, Usage] = {}
    for item in doc.get("value") or []:
        if not str(item.get("type") or "").lower().endswith("/vmfamily/usages") or not _is_dedicated(item):
            continue
        usage = _usage(item)
        name = item.get("name") or {}
        text = str(name.get("value") or usage.name) if isinstance(name, Mapping) else usage.name
        out.setdefault(family_key(text), usage)
    return out


def regional_total(doc: Mapping[str, Any]) -> Usage | None:
    """ "Total Cluster Dedicated Regional vCPUs" (`dedicatedCores/usages`)."""
    for item in doc.get("value") or []:
        if str(item.get("type") or "").lower().endswith("/dedicatedcores/usages"):
            return _usage(item)
    return None


@dataclass(frozen=True)
class Need:
    """One use of a VM size: `nodes` at once; `peak` nodes at the busiest moment (a roll-out's second
    deployment), warned about when short."""

    use: str
    size: str
    nodes: int = 1
    peak: int = 0


def _grade(usage: Usage, *, one: int, need: int, peak: int) -> tuple[Status, str]:
    free = usage.free
    if free is None:
        return Status.PASS, f"{usage.name}: no limit"
    said = f"{usage.name}: {usage.current} of {usage.limit} in use, {max(free, 0)} free"
    if usage.limit < one:
        return Status.FAIL, f"{said}; the limit is below one node ({one} vCPUs)"
    if free <= 0:
        return Status.FAIL, f"{said}; nothing left for {one} vCPUs"
    if free < need:
        return Status.WARN, f"{said}; {need} needed"
    if free < peak:
        return Status.WARN, f"{said}; {need} needed, {peak} during a roll-out (new deployment beside the old one)"
    return Status.PASS, said


def quota_results(
    needs: Sequence[Need], sizes: Mapping[str, VmSize], usages_doc: Mapping[str, Any], *, region: str
) -> list[CheckResult]:
    """One row per use: the size's family quota and the regional total against its vCPUs."""
    families = family_usages(usages_doc)
    total = regional_total(usages_doc)
    fix = (
        f"request more vCPUs for that family in {region}: Azure ML studio > Quota (or the Azure portal's "
        "Usage + quotas, provider Machine Learning), or pick another size from the model's list"
    )
    out: list[CheckResult] = []
    for need in needs:
        check = f"{need.size} ({need.use})"
        size = sizes.get(need.size.lower())
        if size is None:
            out.append(
                CheckResult(
                    "quota",
                    check,
                    Status.WARN,
                    f"{need.size} is not in the Azure ML VM sizes of {region}; its quota was not checked",
                    f"pick a size offered in {region} (az ml compute list-sizes --location {region})",
                )
            )
            continue
        one = size.vcpus
        wanted, peak = one * need.nodes, one * max(need.peak, need.nodes)
        usage = families.get(family_key(size.family))
        if usage is None:
            out.append(
                CheckResult(
                    "quota",
                    check,
                    Status.WARN,
                    f"no usage entry for family {size.family} in {region}; its quota was not checked",
                )
            )
            continue
        graded = [_grade(usage, one=one, need=wanted, peak=peak)]
        if total is not None:
            graded.append(_grade(total, one=one, need=wanted, peak=peak))
        status = worst(s for s, _ in graded)
        nodes = f"{need.nodes} x {one} vCPUs"
        detail = f"{nodes}; " + "; ".join(text for _, text in graded)
        out.append(CheckResult("quota", check, status, detail, fix if status is not Status.PASS else ""))
    return out
