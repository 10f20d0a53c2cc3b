"""The workspace's model registry: register a completed job's `trained_model` as an MLflow model,
and read a registered version. A registered version is read first, so registering twice is a no-op.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from shared.adapters.azureml.clients import AzureMLClients, service_word
from shared.adapters.azureml.job_spec import BASE_MODEL_ID_TAG, TRAINED_MODEL_OUTPUT
from shared.adapters.azureml.model_lifecycle import read_model_version
from shared.adapters.azureml.model_tags import INFERENCE_ALLOW_LIST_TAG
from shared.adapters.azureml.service_calls import not_found_is_none
from shared.domain.naming import OWNER_TAG
from shared.domain.resources import JobState, ModelRef, job_state_from_run_status
from shared.errors import BackendError, ConfigError, ConflictError, NotFound, TunegridError

log = logging.getLogger(__name__)

_REGISTRY_MODEL_ID = re.compile(r"azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)")


class ModelsMixin(AzureMLClients):
    """`register_model` and `get_model`."""

    def get_model(self, name: str, version: str) -> ModelRef | None:
        model = self._call(
            not_found_is_none(lambda: self._ws.models.get(name, version=version)), f"read model {name}:{version}"
        )
        return None if model is None else ModelRef(name=model.name, version=str(model.version), id=model.id)

    def _inference_allow_list_tag(self, base_model_id: str | None) -> str | None:
        """The base model's inference SKU list (`system_metadata.SKU.inferenceRecommendedSkus` or the
        `inference_compute_allow_list` tag), as the tag the deployment step reads on the fine-tuned
        model; None (with a log line) when the base model has none or cannot be read."""
        match = _REGISTRY_MODEL_ID.fullmatch(base_model_id or "")
        if not match or match.group(1) != self._settings.registry_name:
            return None
        registry, name, version = match.groups()
        try:
            raw = self._raw_model_version(name, version)
        except TunegridError as exc:
            log.warning("inference SKU list of %s unavailable: %s", base_model_id, exc)
            return None
        if raw is None:
            return None
        try:
            skus = read_model_version(raw, registry=registry).inference_skus
        except ConfigError as exc:
            log.warning("inference SKU list of %s unreadable: %s", base_model_id, exc)
            return None
        if skus is None:
            log.warning(
                "base model %s lists no inference SKUs; deployments of its fine-tunes are not checked", base_model_id
            )
            return None
        return str(list(skus.skus))

    def register_model(
        self, *, job_name: str, name: str, version: str, description: str, tags: Mapping[str, str]
    ) -> ModelRef:
        existing = self.get_model(name, version)
        if existing is not None:
            log.info("model %s:%s is already registered", name, version)
            return existing
        job = self._job_entity(job_name)
        if job is None:
            raise NotFound(f"job {job_name} not found: nothing to register")
        raw = service_word(job.status)
        if job_state_from_run_status(raw) != JobState.COMPLETED:
            raise BackendError(
                f"job {job_name} is {raw}; only a completed job's {TRAINED_MODEL_OUTPUT} can be registered"
            )
        job_tags = dict(getattr(job, "tags", None) or {})
        model_tags: dict[str, str] = {OWNER_TAG: self._settings.instance, "tunegridjob": job_name}
        base_id = job_tags.get(BASE_MODEL_ID_TAG)
        if base_id:
            model_tags[BASE_MODEL_ID_TAG] = base_id
            allow = self._inference_allow_list_tag(base_id)
            if allow:
                model_tags[INFERENCE_ALLOW_LIST_TAG] = allow
        model_tags.update({str(k): str(v) for k, v in tags.items()})

        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model

        entity = Model(
            path=f"azureml://jobs/{job_name}/outputs/{TRAINED_MODEL_OUTPUT}",
            type=AssetTypes.MLFLOW_MODEL,
            name=name,
            version=version,
            description=description,
            tags=model_tags,
        )
        try:
            model = self._call(lambda: self._ws.models.create_or_update(entity), f"register model {name}:{version}")
        except ConflictError:
            again = self.get_model(name, version)
            if again is None:
                raise
            return again
        log.info("registered model %s:%s from job %s", name, version, job_name)
        return ModelRef(name=model.name, version=str(model.version), id=model.id)
