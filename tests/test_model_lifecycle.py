"""The base model's lifecycle, its SKU lists and the component's choices, read from the registry's own
specs (tests/data/azure-reference/azureml-assets):

- model-Phi-4.spec.yaml: `system_metadata` form, fine-tunable, no deprecation date; its lists start
  with Standard_NC24ads_A100_v4;
- model-Phi-3-mini-4k-instruct.{tags-form,system-metadata-form}.spec.yaml: the notebook's model in
  both forms, archived, retired for fine-tuning on 2025-08-30;
- model-Phi-3-small-8k-instruct.spec.yaml: `system_metadata.deprecation`, retired the same day;
- component-chat_completion_pipeline.spec.yaml (0.0.82): `optim: adamw_torch | adafactor`.

Pure checks first, then the adapter through the rig (the registry answering from those specs), with
the shipped default settings.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.adapters.azureml.component_choices import choice_findings, component_enums
from shared.adapters.azureml.model_lifecycle import (
    RETIRED_VM_FAMILIES,
    ModelMetadata,
    default_sku,
    finetune_lifecycle_findings,
    pick_alternative,
    read_model_entity,
    read_model_spec,
    read_model_version,
    sku_findings,
    vm_size_findings,
)
from shared.domain.resources import DataRef, Finding, FindingLevel, FineTuneRequest
from shared.errors import ComputeError, ConfigError
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import AzureMLRig

azureml_rig = rig_module.azureml_rig  # fixtures: the rig (no socket may open) and the socket guard alone
no_sockets = rig_module.no_sockets

NOW = datetime(2026, 7, 23, tzinfo=UTC)
"""The day of the registry snapshot the specs come from."""
PHI4_FINETUNE_SKUS = (
    "Standard_NC24ads_A100_v4",
    "Standard_NC48ads_A100_v4",
    "Standard_NC96ads_A100_v4",
    "Standard_ND96asr_v4",
    "Standard_ND96amsr_A100_v4",
    "Standard_NC40ads_H100_v5",
    "Standard_NC80adis_H100_v5",
    "Standard_ND96isr_H100_v5",
)
PHI3_FINETUNE_SKUS = (
    "Standard_NC24ads_A100_v4",
    "Standard_NC48ads_A100_v4",
    "Standard_NC96ads_A100_v4",
    "Standard_ND96asr_v4",
    "Standard_ND96amsr_A100_v4",
)


def _day(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- reading both metadata forms ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("filename", "archived", "retired", "deprecated", "skus", "source"),
    [
        (ref.PHI4, False, None, None, PHI4_FINETUNE_SKUS, "system_metadata.SKU.finetuneRecommendedSkus"),
        (
            ref.PHI3_MINI_SYSTEM_METADATA,
            True,
            "system_metadata.deprecation.finetuneRetirementDate",
            "system_metadata.deprecation.finetuneDeprecationDate",
            PHI3_FINETUNE_SKUS,
            "system_metadata.SKU.finetuneRecommendedSkus",
        ),
        (
            ref.PHI3_MINI_TAGS,
            True,
            "the FinetuneRetirementDate tag",
            "the FinetuneDeprecationDate tag",
            PHI3_FINETUNE_SKUS,
            "the finetune_compute_allow_list tag",
        ),
        (
            ref.PHI3_SMALL,
            False,
            "system_metadata.deprecation.finetuneRetirementDate",
            "system_metadata.deprecation.finetuneDeprecationDate",
            ("Standard_NC96ads_A100_v4", "Standard_ND96amsr_A100_v4"),
            "system_metadata.SKU.finetuneRecommendedSkus",
        ),
    ],
)
def test_both_metadata_forms_are_read_from_the_specs(
    filename: str, archived: bool, retired: str | None, deprecated: str | None, skus: tuple[str, ...], source: str
) -> None:
    """Dates (tags or system_metadata.deprecation), isArchived and the fine-tune list (tag or
    system_metadata.SKU), each with where it was read; the REST document built from the spec reads the same."""
    meta = read_model_spec(ref.spec(filename), registry="azureml")
    assert meta.archived is archived
    assert meta.finetune_skus is not None and (meta.finetune_skus.skus, meta.finetune_skus.source) == (skus, source)
    assert meta.finetune_tasks == ("chat-completion",)
    if retired is None:
        assert meta.finetune_retirement is None and meta.finetune_deprecation is None
    else:
        assert meta.finetune_retirement is not None and meta.finetune_deprecation is not None
        assert (meta.finetune_retirement.when, meta.finetune_retirement.source) == (_day("2025-08-30"), retired)
        assert (meta.finetune_deprecation.when, meta.finetune_deprecation.source) == (_day("2025-06-30"), deprecated)
        assert meta.inference_retirement is not None and meta.inference_retirement.when == _day("2025-08-30")
    from_rest = read_model_version(ref.model_version_doc(filename))
    assert (from_rest.ref, from_rest.registry) == (meta.ref, "azureml")
    assert (from_rest.archived, from_rest.finetune_skus, from_rest.finetune_retirement) == (
        meta.archived,
        meta.finetune_skus,
        meta.finetune_retirement,
    )


def test_the_sdk_entity_alone_loses_system_metadata_and_is_archived() -> None:
    """Why the adapter reads the REST document too: azure-ai-ml's Model entity built from the registry's
    answer keeps the tags but not `system_metadata` (Phi-4 then has no list at all) nor `isArchived`."""
    from azure.ai.ml._restclient.arm_ml_service.models import ModelVersion
    from azure.ai.ml.entities import Model

    doc = ref.model_version_doc(ref.PHI4)
    entity = Model._from_rest_object(ModelVersion._deserialize(doc, []))
    alone = read_model_entity(entity, registry="azureml")
    assert alone.finetune_skus is None and alone.tags and "model_specific_defaults" in alone.tags
    with_document = read_model_entity(entity, raw=doc, registry="azureml")
    assert with_document.finetune_skus is not None and with_document.finetune_skus.skus == PHI4_FINETUNE_SKUS
    phi3 = ref.model_version_doc(ref.PHI3_MINI_SYSTEM_METADATA)
    phi3_entity = Model._from_rest_object(ModelVersion._deserialize(phi3, []))
    assert not read_model_entity(phi3_entity).archived and read_model_entity(phi3_entity, raw=phi3).archived


# -- lifecycle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("filename", [ref.PHI3_MINI_TAGS, ref.PHI3_MINI_SYSTEM_METADATA, ref.PHI3_SMALL])
def test_a_retired_model_is_an_error_naming_the_date(filename: str) -> None:
    """Retired for fine-tuning on 2025-08-30: an error with the date, where it was read, and the
    alternative sentence; plus a warning that inference is retired too."""
    meta = read_model_spec(ref.spec(filename), registry="azureml")
    findings = finetune_lifecycle_findings(meta, now=NOW, alternative="Use Phi-4.")
    [error] = [f for f in findings if f.is_error]
    assert error.code == "model_retired"
    assert f"base model {meta.ref} was retired for fine-tuning on 2025-08-30" in error.message
    assert error.message.endswith("Use Phi-4.")
    assert [f.code for f in findings if not f.is_error] == ["model_inference_retired"]


@pytest.mark.parametrize(
    ("now", "codes"),
    [
        (datetime(2025, 5, 1, tzinfo=UTC), [("warning", "model_retiring")]),
        (datetime(2025, 7, 15, tzinfo=UTC), [("warning", "model_deprecated")]),
        (datetime(2025, 8, 30, tzinfo=UTC), [("error", "model_retired"), ("warning", "model_inference_retired")]),
    ],
)
def test_a_deprecated_model_is_a_warning_until_its_retirement(now: datetime, codes: list[tuple[str, str]]) -> None:
    """Phi-3-small before its deprecation date (retirement ahead), deprecated, then retired on the day."""
    meta = read_model_spec(ref.spec(ref.PHI3_SMALL))
    findings = finetune_lifecycle_findings(meta, now=now)
    assert [(f.level.value, f.code) for f in findings] == codes
    if now.month == 7:
        assert "deprecated for fine-tuning since 2025-06-30" in findings[0].message
        assert "it retires on 2025-08-30" in findings[0].message


def test_an_archived_model_without_a_date_is_refused() -> None:
    """isArchived alone stops a fine-tune."""
    meta = ModelMetadata(name="Old", version="3", registry="azureml", archived=True)
    [finding] = finetune_lifecycle_findings(meta, now=NOW)
    assert (finding.code, finding.is_error) == ("model_archived", True)


def test_phi4_passes_and_is_the_alternative_from_the_registrys_models() -> None:
    """Phi-4 has no lifecycle finding; among every model spec of the snapshot it is the one a retired
    Phi-3 is pointed to."""
    specs = [ref.PHI4, ref.PHI3_MINI_SYSTEM_METADATA, ref.PHI3_MINI_TAGS, ref.PHI3_SMALL]
    candidates = [read_model_spec(ref.spec(f), registry="azureml") for f in specs]
    assert finetune_lifecycle_findings(candidates[0], now=NOW) == []
    alternative = pick_alternative(candidates, like="Phi-3-mini-4k-instruct")
    assert alternative is not None and (alternative.name, alternative.version) == ("Phi-4", "8")
    assert pick_alternative(candidates[1:], like="Phi-3-mini-4k-instruct") is None


# -- VM sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["Standard_NC6s_v3", "standard_nc12s_v3", "STANDARD_NC24S_V3", "Standard_nc24rs_v3"])
def test_the_ncv3_family_is_retired_in_any_case(size: str) -> None:
    """Every NCv3 size, whatever its case, is an error after 2025-09-30 and a warning before."""
    [after] = vm_size_findings(size, where="test", now=NOW)
    assert (after.code, after.is_error) == ("sku_retired", True) and "retired on 2025-09-30" in after.message
    [before] = vm_size_findings(size, where="test", now=datetime(2025, 9, 1, tzinfo=UTC))
    assert (before.code, before.is_error) == ("sku_retiring", False)
    assert [f.family for f in RETIRED_VM_FAMILIES] == ["NCv3"]


def test_explicit_sizes_must_be_on_the_models_list() -> None:
    """On the list: fine. Off it: an error listing the allowed sizes. On a stale list but retired (Phi-3's
    inference list starts with NC6s_v3): still an error. No list at all: a warning, not silence."""
    phi4 = read_model_spec(ref.spec(ref.PHI4))
    assert (
        sku_findings("standard_nc48ads_a100_v4", phi4.finetune_skus, meta=phi4, role="fine-tune", where="x", now=NOW)
        == []
    )
    [off] = sku_findings("Standard_E4s_v3", phi4.finetune_skus, meta=phi4, role="fine-tune", where="x", now=NOW)
    assert off.code == "sku_not_allowed" and "Standard_NC24ads_A100_v4, Standard_NC48ads_A100_v4" in off.message
    phi3 = read_model_spec(ref.spec(ref.PHI3_MINI_TAGS))
    assert phi3.inference_skus is not None and phi3.inference_skus.skus[0] == "Standard_NC6s_v3"
    stale = sku_findings("Standard_NC6s_v3", phi3.inference_skus, meta=phi3, role="inference", where="x", now=NOW)
    assert [f.code for f in stale] == ["sku_retired"]
    [warned] = sku_findings("Standard_NC24ads_A100_v4", None, meta=phi4, role="fine-tune", where="x", now=NOW)
    assert (warned.code, warned.level) == ("no_sku_list", FindingLevel.WARNING)


def test_default_sizes_are_the_first_usable_of_the_list() -> None:
    """Phi-4: Standard_NC24ads_A100_v4. Phi-3's inference list: its NCv3 sizes are skipped. No list: an
    error naming the setting to set."""
    phi4 = read_model_spec(ref.spec(ref.PHI4))
    assert default_sku(phi4.finetune_skus, meta=phi4, role="fine-tune", setting="S") == (
        "Standard_NC24ads_A100_v4",
        [],
    )
    phi3 = read_model_spec(ref.spec(ref.PHI3_MINI_TAGS))
    chosen, _ = default_sku(phi3.inference_skus, meta=phi3, role="inference", setting="S")
    assert chosen == "Standard_ND40rs_v2"
    none, [error] = default_sku(None, meta=phi4, role="fine-tune", setting="AZUREML_INSTANCE_TYPE_FINETUNE")
    assert none is None and error.code == "no_sku_list" and "set AZUREML_INSTANCE_TYPE_FINETUNE" in error.message


# -- the component's choices -----------------------------------------------------------------------
def test_choices_come_from_the_component_spec() -> None:
    """0.0.82's enums: optim adamw_torch | adafactor; adamw_hf is refused with the allowed values."""
    enums = component_enums(ref.spec(ref.PIPELINE_COMPONENT))
    assert enums["optim"] == ("adamw_torch", "adafactor")
    assert enums["evaluation_strategy"] == ("epoch", "steps", "disable")
    assert enums["deepspeed_stage"] == ("2", "3")
    [finding] = choice_findings(
        {"optim": "adamw_hf", "deepspeed_stage": 3, "apply_lora": True, "learning_rate": 1e-4},
        enums,
        component="chat_completion_pipeline 0.0.82",
        sources={"optim": "the sidecar's finetune.optim"},
    )
    assert finding.message == (
        "optim='adamw_hf' (from the sidecar's finetune.optim) is not a choice of chat_completion_pipeline 0.0.82: "
        "allowed values are adamw_torch, adafactor"
    )


# -- the adapter, against the registry's specs, with the shipped defaults --------------------------
def _request(**kwargs: Any) -> FineTuneRequest:
    base: dict[str, Any] = {
        "run_id": "r1",
        "job_name": "tunegrid-r1",
        "dataset": "ultrachat.jsonl",
        "train": DataRef(
            "prepared-data", "r1/train.jsonl", "https://st.blob.core.windows.net/prepared-data/r1/train.jsonl"
        ),
        "test": DataRef(
            "prepared-data", "r1/test.jsonl", "https://st.blob.core.windows.net/prepared-data/r1/test.jsonl"
        ),
    }
    return FineTuneRequest(**{**base, **kwargs})


def test_the_shipped_defaults_pass_the_checks_against_phi4_and_the_component(azureml_rig: AzureMLRig) -> None:
    """The dry run of a submission (`plan_submission`, reads only) with only the workspace settings: Phi-4
    from its spec, component 0.0.82 from its spec; no finding, and the job Tunegrid would submit."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    settings = rig.settings()
    assert (settings.base_model_name, settings.instance_type_finetune, settings.inference_instance_type) == (
        "Phi-4",
        "",
        "",
    )

    plan = rig.backend(settings, clock=lambda: NOW).plan_submission(_request())

    assert plan.findings == ()
    assert plan.spec is not None and plan.model is not None and plan.model.ref == "Phi-4:8"
    assert plan.spec.experiment_name == "chat_completion_Phi-4"
    assert plan.spec.compute_inputs["instance_type_finetune"] == "Standard_NC24ads_A100_v4"
    assert plan.spec.compute_inputs["instance_type_model_evaluation"] == "Standard_NC24ads_A100_v4"
    assert plan.spec.training_inputs["number_of_gpu_to_use_finetuning"] == 1
    assert plan.spec.training_inputs["deepspeed_stage"] == "3"  # Phi-4's model_specific_defaults
    assert any(
        "the first usable size of Phi-4:8's list (system_metadata.SKU.finetuneRecommendedSkus)" in n
        for n in plan.spec.notes
    )
    assert not rig.requests("PUT")


@pytest.mark.parametrize("filename", [ref.PHI3_MINI_TAGS, ref.PHI3_MINI_SYSTEM_METADATA])
def test_phi3_mini_is_refused_with_its_retirement_date_and_phi4_named(azureml_rig: AzureMLRig, filename: str) -> None:
    """BASE_MODEL_NAME=Phi-3-mini-4k-instruct (the notebook's), in either metadata form: refused before
    any job is submitted, naming 2025-08-30 and Phi-4, found by listing the registry's models."""
    rig = azureml_rig
    rig.serve_registry(model=ref.model_version_doc(filename))
    rig.accept_job_submission()
    backend = rig.backend(rig.settings(BASE_MODEL_NAME="Phi-3-mini-4k-instruct"), clock=lambda: NOW)

    [error] = [f for f in backend.check_finetune(_request()) if f.is_error]
    assert error.code == "model_retired"
    assert "base model Phi-3-mini-4k-instruct:15 was retired for fine-tuning on 2025-08-30" in error.message
    assert "Fine-tunable alternative in registry azureml: Phi-4 (version 8, no deprecation date)" in error.message
    with pytest.raises(
        ConfigError, match=r"fine-tune refused before submission: .*retired for fine-tuning on 2025-08-30"
    ):
        backend.submit_finetune(_request())
    assert not rig.requests("PUT")
    assert not rig.requests("GET", r"/vmSizes$") and not rig.requests("GET", r"/components/")
    assert rig.requests("GET", r"/registries/azureml/models$")  # the registry's listing


def test_a_deprecated_model_is_warned_and_still_submitted(azureml_rig: AzureMLRig) -> None:
    """Phi-4 with a deprecation date behind and a retirement date ahead (hand-edited from its spec): a
    warning, and the job goes out."""
    rig = azureml_rig
    model = ref.model_version_doc(ref.PHI4)
    model["properties"]["system_metadata"]["deprecation"] = {
        "finetuneDeprecationDate": "2026-06-30T00:00:00.000000Z",
        "finetuneRetirementDate": "2026-12-31T00:00:00.000000Z",
    }
    rig.serve_registry(model=model)
    rig.serve_vm_sizes()
    put = rig.accept_job_submission()
    backend = rig.backend(clock=lambda: NOW)
    [warning] = backend.check_finetune(_request())
    assert (warning.level, warning.code) == (FindingLevel.WARNING, "model_deprecated")
    assert (
        "deprecated for fine-tuning since 2026-06-30" in warning.message and "retires on 2026-12-31" in warning.message
    )
    backend.submit_finetune(_request())
    assert len(put.calls) == 1


@pytest.mark.parametrize(
    ("env", "compute", "codes"),
    [
        ({"AZUREML_INSTANCE_TYPE_FINETUNE": "Standard_nc24rs_v3"}, {}, ["sku_retired", "sku_not_allowed"]),
        ({}, {"instance_type_finetune": "Standard_E4s_v3"}, ["sku_not_allowed"]),
        ({"AZUREML_INSTANCE_TYPE_MODEL_EVALUATION": "Standard_NC6s_v3"}, {}, ["sku_retired", "sku_not_allowed"]),
    ],
)
def test_an_explicit_size_off_the_list_is_refused(
    azureml_rig: AzureMLRig, env: dict[str, str], compute: dict[str, str], codes: list[str]
) -> None:
    """A set size (setting or sidecar) must be on Phi-4's list and not retired; ComputeError, nothing sent."""
    rig = azureml_rig
    rig.serve_registry()
    rig.accept_job_submission()
    backend = rig.backend(rig.settings(**env), clock=lambda: NOW)
    findings = backend.check_finetune(_request(compute=compute))
    assert [f.code for f in findings] == codes
    where = "the sidecar's compute.instance_type_finetune" if compute else next(iter(env))
    assert all(where in f.message for f in findings)
    with pytest.raises(ComputeError, match="not on the fine-tune SKU list of Phi-4:8"):
        backend.submit_finetune(_request(compute=compute))
    assert not rig.requests("PUT")


def test_a_model_with_no_list_is_warned_about_or_needs_a_size(azureml_rig: AzureMLRig) -> None:
    """Phi-4 without system_metadata.SKU (and no tag): with no size set it is an error saying what to set;
    with one set, a warning that it is not checked, and the job goes out."""
    rig = azureml_rig
    model = ref.model_version_doc(ref.PHI4)
    del model["properties"]["system_metadata"]["SKU"]
    rig.serve_registry(model=model)
    rig.serve_vm_sizes()
    put = rig.accept_job_submission()
    [error, again] = rig.backend(clock=lambda: NOW).check_finetune(_request())
    assert (error.code, again.code) == ("no_sku_list", "no_sku_list") and error.is_error
    assert "set AZUREML_INSTANCE_TYPE_FINETUNE or the sidecar's compute.instance_type_finetune" in error.message
    pinned = rig.backend(
        rig.settings(
            AZUREML_INSTANCE_TYPE_FINETUNE="Standard_NC48ads_A100_v4",
            AZUREML_INSTANCE_TYPE_MODEL_EVALUATION="Standard_NC48ads_A100_v4",
        ),
        clock=lambda: NOW,
    )
    findings = pinned.check_finetune(_request())
    assert {(f.level, f.code) for f in findings} == {(FindingLevel.WARNING, "no_sku_list")}
    pinned.submit_finetune(_request())
    assert len(put.calls) == 1


def test_a_bad_choice_is_refused_with_the_components_allowed_values(azureml_rig: AzureMLRig) -> None:
    """`optim: adamw_hf` in the sidecar passes the sidecar (types only) and is refused against 0.0.82."""
    rig = azureml_rig
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.accept_job_submission()
    backend = rig.backend(clock=lambda: NOW)
    [finding] = backend.check_finetune(_request(params={"optim": "adamw_hf"}))
    assert finding.code == "invalid_choice" and finding.is_error
    assert (
        "optim='adamw_hf' (from the sidecar's finetune.optim) is not a choice of chat_completion_pipeline 0.0.82"
        in finding.message
    )
    assert finding.message.endswith("allowed values are adamw_torch, adafactor")
    with pytest.raises(ConfigError, match="allowed values are adamw_torch, adafactor"):
        backend.submit_finetune(_request(params={"optim": "adamw_hf"}))
    assert not rig.requests("PUT")


def test_the_enum_of_the_fetched_version_decides(azureml_rig: AzureMLRig) -> None:
    """A component version whose enum still offers adamw_hf (hand-edited from the 0.0.82 spec) accepts it:
    no list of our own stands in the way."""
    rig = azureml_rig
    component = ref.component_version_doc()
    spec = copy.deepcopy(component["properties"]["componentSpec"])
    spec["inputs"]["optim"]["enum"] = ["adamw_hf", "adamw_torch", "adafactor"]
    component["properties"]["componentSpec"] = spec
    rig.serve_registry(component=component)
    rig.serve_vm_sizes()
    assert rig.backend(clock=lambda: NOW).check_finetune(_request(params={"optim": "adamw_hf"})) == []


def test_a_finding_as_the_report_shows_it() -> None:
    """Findings carry a level, a stable code and the message the report shows."""
    finding = Finding(FindingLevel.ERROR, "model_retired", "m")
    assert finding.to_dict() == {"level": "error", "code": "model_retired", "message": "m"} and finding.is_error
