"""A registry model's lifecycle and compute lists, read from both metadata forms, and the checks a
fine-tune or a deployment must pass before anything is submitted.

Pure functions, no SDK import and no I/O: the adapter feeds them what the registry returned, and a
preflight command can feed them a model spec file (`read_model_spec`). Every check returns
`Finding`s (errors refuse the job, warnings are reported), never raises for a policy reason.

The two metadata forms (tests/data/azure-reference/README.md, "Facts these captures establish"):
- tags (older models): `FinetuneDeprecationDate`, `FinetuneRetirementDate`, `InferenceDeprecationDate`,
  `InferenceRetirementDate` ('2025-08-30'); `finetune_compute_allow_list` /
  `inference_compute_allow_list` (list literals); properties `finetune-recommended-sku` (comma list)
  and `finetuning-tasks`;
- `system_metadata` (newer models): `deprecation.{finetune,inference}{Deprecation,Retirement}Date`,
  `SKU.{finetune,inference}RecommendedSkus`, `tasks.fineTuningTasks`; plus the version's `isArchived`.
A model may carry both, one, or neither. A missing list is not "any SKU": it is a warning, and a
SKU cannot be chosen from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from shared.adapters.azureml.model_tags import (
    FINETUNE_ALLOW_LIST_TAG,
    INFERENCE_ALLOW_LIST_TAG,
    parse_allow_list,
)
from shared.domain.clock import parse_time
from shared.domain.resources import Finding, FindingLevel

CHAT_COMPLETION = "chat-completion"
"""The task of the `chat_completion_pipeline` component, as registry models name it."""

_REGISTRY_ASSET = re.compile(
    r"azureml://registries/(?P<registry>[^/]+)/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)"
)
_ARM_ASSET = re.compile(r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)$")


# -- retired and unsupported VM sizes ------------------------------------------------------------
@dataclass(frozen=True)
class RetiredVmFamily:
    family: str
    sizes: frozenset[str]
    """Lower-case size names."""
    retired_on: date
    source: str


RETIRED_VM_FAMILIES: tuple[RetiredVmFamily, ...] = (
    RetiredVmFamily(
        family="NCv3",
        sizes=frozenset({"standard_nc6s_v3", "standard_nc12s_v3", "standard_nc24s_v3", "standard_nc24rs_v3"}),
        retired_on=date(2025, 9, 30),
        source="Azure's NCv3-series retirement notice",
    ),
)
"""Every retired VM family the checks know, in one place. A size here is never chosen as a default and
an explicit one is refused, even where a (stale) model list still names it."""

K80_SIZES = frozenset({"standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r"})
"""VM sizes with K80 GPUs, which the fine-tune components do not support (the seed notebook's check)."""


def retired_family(size: str) -> RetiredVmFamily | None:
    key = size.strip().lower()
    return next((f for f in RETIRED_VM_FAMILIES if key in f.sizes), None)


def vm_size_findings(size: str, *, where: str, now: datetime, gpu_step: bool = True) -> list[Finding]:
    """A retired family is an error once its date has passed (a warning before); K80 sizes are an
    error for the GPU steps."""
    family = retired_family(size)
    if family is not None:
        retired_at = datetime(family.retired_on.year, family.retired_on.month, family.retired_on.day, tzinfo=UTC)
        if now >= retired_at:
            return [
                Finding(
                    FindingLevel.ERROR,
                    "sku_retired",
                    f"VM size {size} ({where}) is in the {family.family} family, retired on "
                    f"{family.retired_on.isoformat()} ({family.source}); pick a size from the model's list",
                )
            ]
        return [
            Finding(
                FindingLevel.WARNING,
                "sku_retiring",
                f"VM size {size} ({where}) is in the {family.family} family, which retires on "
                f"{family.retired_on.isoformat()} ({family.source})",
            )
        ]
    if gpu_step and size.strip().lower() in K80_SIZES:
        return [
            Finding(
                FindingLevel.ERROR,
                "sku_unsupported",
                f"VM size {size} ({where}) has K80 GPUs, which the fine-tune components do not support",
            )
        ]
    return []


def usable(size: str) -> bool:
    """A size a default may be: in no family of the retired table (retired or retiring) and not K80."""
    return retired_family(size) is None and size.strip().lower() not in K80_SIZES


# -- what a model version says about itself ------------------------------------------------------
@dataclass(frozen=True)
class SkuList:
    skus: tuple[str, ...]
    source: str
    """Where the list was read, e.g. `system_metadata.SKU.finetuneRecommendedSkus`."""

    def allows(self, size: str) -> bool:
        return size.strip().lower() in {s.lower() for s in self.skus}

    def first_usable(self) -> str | None:
        return next((s for s in self.skus if usable(s)), None)


@dataclass(frozen=True)
class Dated:
    when: datetime
    source: str

    @property
    def day(self) -> str:
        return self.when.date().isoformat()


@dataclass(frozen=True)
class ModelMetadata:
    """What the checks need from one registry model version, whichever form it was written in."""

    name: str
    version: str
    registry: str | None = None
    archived: bool = False
    finetune_deprecation: Dated | None = None
    finetune_retirement: Dated | None = None
    inference_deprecation: Dated | None = None
    inference_retirement: Dated | None = None
    finetune_skus: SkuList | None = None
    inference_skus: SkuList | None = None
    finetune_tasks: tuple[str, ...] = ()
    tags: Mapping[str, Any] | None = None
    """The raw tags (for `model_specific_defaults`)."""

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def where(self) -> str:
        return f"registry {self.registry}" if self.registry else "the registry"


_DATE_KEYS = {
    "finetune_deprecation": ("finetuneDeprecationDate", "FinetuneDeprecationDate"),
    "finetune_retirement": ("finetuneRetirementDate", "FinetuneRetirementDate"),
    "inference_deprecation": ("inferenceDeprecationDate", "InferenceDeprecationDate"),
    "inference_retirement": ("inferenceRetirementDate", "InferenceRetirementDate"),
}


def _date(value: Any) -> datetime | None:
    if isinstance(value, date) and not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return parse_time(value)


def _earliest(*candidates: Dated | None) -> Dated | None:
    known = [c for c in candidates if c is not None]
    return min(known, key=lambda c: c.when) if known else None


def _mapping(value: Any) -> Mapping[str, Any]:
    """`system_metadata` as a mapping; a service that sends it as JSON text is read too."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, Mapping) else {}


def _names(value: Any) -> tuple[str, ...]:
    """A list of names from a YAML/JSON list or a comma-separated string."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return ()


def _sku_list(
    ref: str,
    *,
    system: Mapping[str, Any],
    system_key: str,
    tags: Mapping[str, Any],
    tag: str,
    properties: Mapping[str, Any],
    property_key: str,
) -> SkuList | None:
    """The newer `system_metadata.SKU` list wins; else the tag; else the version's properties."""
    from_system = _names(_mapping(system.get("SKU")).get(system_key))
    if from_system:
        return SkuList(from_system, f"system_metadata.SKU.{system_key}")
    parsed = parse_allow_list(ref, tag, tags.get(tag))
    if parsed:
        return SkuList(parsed, f"the {tag} tag")
    from_properties = _names(properties.get(property_key))
    if from_properties:
        return SkuList(from_properties, f"the {property_key} property")
    return None


def model_metadata(
    *,
    name: str,
    version: str,
    registry: str | None = None,
    tags: Mapping[str, Any] | None = None,
    properties: Mapping[str, Any] | None = None,
    system_metadata: Any = None,
    archived: Any = False,
) -> ModelMetadata:
    """The metadata of one model version from its parts (tags, properties, system_metadata)."""
    tags = dict(tags or {})
    properties = dict(properties or {})
    system = _mapping(system_metadata)
    deprecation = _mapping(system.get("deprecation"))
    ref = f"{name}:{version}"
    dates: dict[str, Dated | None] = {}
    for field_name, (system_key, tag) in _DATE_KEYS.items():
        from_system = _date(deprecation.get(system_key))
        from_tag = _date(tags.get(tag))
        dates[field_name] = _earliest(
            Dated(from_system, f"system_metadata.deprecation.{system_key}") if from_system else None,
            Dated(from_tag, f"the {tag} tag") if from_tag else None,
        )
    tasks = _names(_mapping(system.get("tasks")).get("fineTuningTasks")) or _names(
        properties.get("finetuning-tasks") or tags.get("finetuning-tasks")
    )
    return ModelMetadata(
        name=name,
        version=str(version),
        registry=registry,
        archived=str(archived).strip().lower() == "true" if not isinstance(archived, bool) else archived,
        finetune_deprecation=dates["finetune_deprecation"],
        finetune_retirement=dates["finetune_retirement"],
        inference_deprecation=dates["inference_deprecation"],
        inference_retirement=dates["inference_retirement"],
        finetune_skus=_sku_list(
            ref,
            system=system,
            system_key="finetuneRecommendedSkus",
            tags=tags,
            tag=FINETUNE_ALLOW_LIST_TAG,
            properties=properties,
            property_key="finetune-recommended-sku",
        ),
        inference_skus=_sku_list(
            ref,
            system=system,
            system_key="inferenceRecommendedSkus",
            tags=tags,
            tag=INFERENCE_ALLOW_LIST_TAG,
            properties=properties,
            property_key="inference-recommended-sku",
        ),
        finetune_tasks=tuple(t.lower() for t in tasks),
        tags=tags,
    )


def read_model_version(doc: Mapping[str, Any], *, registry: str | None = None) -> ModelMetadata:
    """From a model version as the REST API returns it (`{"id", "name", "properties": {...}}`). The
    SDK uploads `system_metadata` under `properties.system_metadata`; `systemMetadata` is read too."""
    props = _mapping(doc.get("properties"))
    asset_id = str(doc.get("id") or "")
    match = _REGISTRY_ASSET.fullmatch(asset_id) or _ARM_ASSET.search(asset_id)
    name = match.group("name") if match else str(doc.get("name") or "")
    version = match.group("version") if match else str(doc.get("name") or "")
    if match is not None and "registry" in match.groupdict():
        registry = registry or match.group("registry")
    return model_metadata(
        name=name,
        version=version,
        registry=registry,
        tags=_mapping(props.get("tags")),
        properties=_mapping(props.get("properties")),
        system_metadata=props.get("system_metadata", props.get("systemMetadata")),
        archived=props.get("isArchived", False),
    )


def read_model_spec(spec: Mapping[str, Any], *, registry: str | None = None) -> ModelMetadata:
    """From a model spec as azureml-assets keeps it (`spec.yaml` loaded with a YAML parser)."""
    return model_metadata(
        name=str(spec.get("name") or ""),
        version=str(spec.get("version") or ""),
        registry=registry,
        tags=_mapping(spec.get("tags")),
        properties=_mapping(spec.get("properties")),
        system_metadata=spec.get("system_metadata"),
        archived=spec.get("isArchived", False),
    )


def read_model_entity(
    entity: Any, *, raw: Mapping[str, Any] | None = None, registry: str | None = None
) -> ModelMetadata:
    """From azure-ai-ml's `Model` entity, completed by the raw REST document when there is one: the
    entity has no `isArchived`, and keeps `system_metadata` only where the REST object has that
    attribute (the registry's hybrid objects do not)."""
    if raw is not None:
        return read_model_version(raw, registry=registry)
    return model_metadata(
        name=str(getattr(entity, "name", "") or ""),
        version=str(getattr(entity, "version", "") or ""),
        registry=registry,
        tags=getattr(entity, "tags", None) or {},
        properties=getattr(entity, "properties", None) or {},
        system_metadata=getattr(entity, "_system_metadata", None),
        archived=False,
    )


# -- checks --------------------------------------------------------------------------------------
def is_retired_for_finetuning(meta: ModelMetadata, *, now: datetime) -> bool:
    return meta.archived or (meta.finetune_retirement is not None and meta.finetune_retirement.when <= now)


def finetune_lifecycle_findings(meta: ModelMetadata, *, now: datetime, alternative: str = "") -> list[Finding]:
    """Archived or retired: error (with `alternative`, a sentence naming a model to use instead).
    Deprecated, or with a retirement date ahead: warning. Retired for inference: warning (the
    fine-tuned model could not be deployed from this base)."""
    out: list[Finding] = []
    tail = f" {alternative}" if alternative else ""
    retirement = meta.finetune_retirement
    archived = " The registry marks this version archived." if meta.archived else ""
    if retirement is not None and retirement.when <= now:
        out.append(
            Finding(
                FindingLevel.ERROR,
                "model_retired",
                f"base model {meta.ref} was retired for fine-tuning on {retirement.day} ({retirement.source}).{archived}{tail}",
            )
        )
    elif meta.archived:
        out.append(
            Finding(
                FindingLevel.ERROR,
                "model_archived",
                f"base model {meta.ref} is archived in {meta.where} and cannot be fine-tuned.{tail}",
            )
        )
    else:
        deprecation = meta.finetune_deprecation
        if deprecation is not None and deprecation.when <= now:
            ends = f"; it retires on {retirement.day}" if retirement else ""
            out.append(
                Finding(
                    FindingLevel.WARNING,
                    "model_deprecated",
                    f"base model {meta.ref} is deprecated for fine-tuning since {deprecation.day} "
                    f"({deprecation.source}){ends}.{tail}",
                )
            )
        elif retirement is not None:
            out.append(
                Finding(
                    FindingLevel.WARNING,
                    "model_retiring",
                    f"base model {meta.ref} will be retired for fine-tuning on {retirement.day} ({retirement.source}).{tail}",
                )
            )
    inference = meta.inference_retirement
    if inference is not None and inference.when <= now:
        out.append(
            Finding(
                FindingLevel.WARNING,
                "model_inference_retired",
                f"base model {meta.ref} was retired for inference on {inference.day} ({inference.source}); "
                "a model fine-tuned from it may not deploy",
            )
        )
    return out


def sku_findings(
    size: str, skus: SkuList | None, *, meta: ModelMetadata, role: str, where: str, now: datetime
) -> list[Finding]:
    """An explicit size: not retired, and on the model's `role` list (fine-tune or inference); a model
    with no list gets a warning saying the size is not checked."""
    out = vm_size_findings(size, where=where, now=now, gpu_step=True)
    if skus is None:
        out.append(
            Finding(
                FindingLevel.WARNING,
                "no_sku_list",
                f"base model {meta.ref} lists no {role} SKUs (neither system_metadata.SKU nor the "
                f"{'finetune' if role == 'fine-tune' else 'inference'}_compute_allow_list tag); "
                f"VM size {size} ({where}) is not checked against a list",
            )
        )
    elif not skus.allows(size):
        out.append(
            Finding(
                FindingLevel.ERROR,
                "sku_not_allowed",
                f"VM size {size} ({where}) is not on the {role} SKU list of {meta.ref} ({skus.source}): "
                f"{', '.join(skus.skus)}",
            )
        )
    return out


def default_sku(
    skus: SkuList | None, *, meta: ModelMetadata, role: str, setting: str
) -> tuple[str | None, list[Finding]]:
    """The model's first listed size in no retired (or retiring) family, or an error saying what to set."""
    if skus is None:
        return None, [
            Finding(
                FindingLevel.ERROR,
                "no_sku_list",
                f"base model {meta.ref} lists no {role} SKUs, so no VM size can be chosen for it: set {setting}",
            )
        ]
    chosen = skus.first_usable()
    if chosen is None:
        return None, [
            Finding(
                FindingLevel.ERROR,
                "no_usable_sku",
                f"every {role} SKU of {meta.ref} ({skus.source}: {', '.join(skus.skus)}) is retired or unsupported: "
                f"set {setting}",
            )
        ]
    return chosen, []


# -- a fine-tunable alternative ------------------------------------------------------------------
def is_finetunable(meta: ModelMetadata, *, task: str = CHAT_COMPLETION) -> bool:
    """Fine-tunable for `task`, not archived, and with no deprecation or retirement date at all."""
    return (
        not meta.archived
        and task in meta.finetune_tasks
        and meta.finetune_deprecation is None
        and meta.finetune_retirement is None
    )


def _family(name: str) -> str:
    match = re.match(r"[A-Za-z]+", name)
    return match.group(0).lower() if match else ""


def candidate_order(names: Iterable[str], *, like: str) -> list[str]:
    """Registry model names to read as alternatives to `like`: its family first (the same leading
    word, e.g. Phi), newest-looking names first within a group (Phi-4 before Phi-3.5 before Phi-3)."""
    unique = sorted({n for n in names if n and n.lower() != like.lower()}, reverse=True)
    family = _family(like)
    return sorted(unique, key=lambda n: 0 if family and _family(n) == family else 1)


def pick_alternative(
    candidates: Sequence[ModelMetadata], *, like: str, task: str = CHAT_COMPLETION
) -> ModelMetadata | None:
    """The candidate closest to `like` that `is_finetunable`."""
    order = {n: i for i, n in enumerate(candidate_order((c.name for c in candidates), like=like))}
    usable_ones = [c for c in candidates if c.name in order and is_finetunable(c, task=task)]
    return min(usable_ones, key=lambda c: order[c.name]) if usable_ones else None


def alternative_sentence(alternative: ModelMetadata | None, *, registry: str, detail: str = "") -> str:
    if alternative is None:
        return f"No fine-tunable {CHAT_COMPLETION} model without a deprecation date was found in registry {registry}{detail}."
    return (
        f"Fine-tunable alternative in registry {registry}: {alternative.name} (version {alternative.version}, "
        f'no deprecation date); set BASE_MODEL_NAME={alternative.name} or the sidecar\'s "model".'
    )
