"""Run every check against one workspace and its app: reads through `AzureReads`, judgements in the pure
modules (`roles`, `quota`, `events`, and `shared.adapters.azureml.model_lifecycle` for the model).

Each section turns what it could not read into a row of its own (a refusal is a fail where the app
would be refused too, a warning where only the doctor is), so one unreadable thing never hides the
others. Only a caller without any token stops the run at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from shared.adapters.azureml.job_spec import (
    INSTANCE_TYPE_INPUTS,
    INSTANCE_TYPE_SETTINGS,
    MODEL_LISTED_INPUTS,
    compute_plan,
)
from shared.adapters.azureml.model_lifecycle import (
    CHAT_COMPLETION,
    ModelMetadata,
    alternative_sentence,
    candidate_order,
    default_sku,
    finetune_lifecycle_findings,
    is_retired_for_finetuning,
    pick_alternative,
    read_model_version,
    sku_findings,
    vm_size_findings,
)
from shared.domain.resources import Finding, FindingLevel
from shared.errors import TunegridError
from tunegrid.doctor import events, quota, roles
from tunegrid.doctor.reads import AzureReads, ReadError, Registry, SignInError
from tunegrid.doctor.report import CheckResult, Report, Status, from_findings
from tunegrid.doctor.target import AppTarget, Target

log = logging.getLogger(__name__)

ALTERNATIVE_READS = 12
"""Latest versions read when looking for a fine-tunable alternative (the backend reads as many)."""


@dataclass
class _State:
    target: Target
    reads: AzureReads
    now: datetime
    results: list[CheckResult]
    region: str = ""
    app: AppTarget = field(default_factory=AppTarget)

    def add(self, *rows: CheckResult) -> None:
        self.results.extend(rows)


def diagnose(target: Target, reads: AzureReads, *, now: datetime) -> Report:
    """Every check, in the order a user fixes things: reach, roles, model and sizes, component, quota, events."""
    state = _State(target=target, reads=reads, now=now, results=[], app=target.app)
    try:
        _workspace(state)
        _function_app(state)
        _caller_roles(state)
        _app_roles(state)
        needs = _model(state)
        _quota(state, needs)
        _event_grid(state)
    except SignInError as exc:
        state.results = [
            CheckResult(
                "sign-in",
                "token for Azure Resource Manager",
                Status.FAIL,
                str(exc),
                "run `az login` (or `azd auth login`); a service principal sets AZURE_CLIENT_ID, AZURE_TENANT_ID "
                "and AZURE_CLIENT_SECRET",
            )
        ]
    return Report(tuple(state.results), _described(state))


def _described(state: _State) -> dict[str, Any]:
    s, app = state.target.settings, state.app
    return {
        "workspace_id": state.target.workspace_id,
        "region": state.region or None,
        "registry": s.registry_name,
        "base_model": s.base_model_name,
        "function_app": app.function_name or None,
        "app_host": app.host or None,
        "app_principal_id": app.principal_id or None,
        "sources": list(state.target.sources),
    }


# -- workspace and app ------------------------------------------------------------------------------------
def _workspace(state: _State) -> None:
    s = state.target.settings
    name = s.workspace_name
    try:
        doc = state.reads.workspace(state.target.workspace_id)
    except ReadError as exc:
        if exc.not_found:
            detail = (
                f"workspace {name} not found in resource group {s.resource_group} of subscription {s.subscription_id}"
            )
            fix = "check AZUREML_WORKSPACE_NAME and AZURE_RESOURCE_GROUP (azd: AZUREML_RESOURCE_GROUP), or pass --workspace/--resource-group/--subscription"
        else:
            detail, fix = (
                str(exc),
                "ask for a role on the workspace (Reader lets you see it; the app needs AzureML Data Scientist)",
            )
        state.add(CheckResult("workspace", "reachable", Status.FAIL, detail, fix))
        return
    except TunegridError as exc:
        state.add(CheckResult("workspace", "reachable", Status.FAIL, str(exc)))
        return
    state.region = str(doc.get("location") or "").replace(" ", "").lower()
    provisioning = str((doc.get("properties") or {}).get("provisioningState") or "")
    detail = f"{name} in {state.region or 'an unknown region'} (provisioning state {provisioning or 'unknown'})"
    status = Status.PASS if provisioning.lower() in ("succeeded", "") else Status.WARN
    if provisioning.lower() == "failed":
        status = Status.FAIL
    state.add(CheckResult("workspace", "reachable", status, detail))


def _function_app(state: _State) -> None:
    """The app's host and identity from its site document, where azd named the app."""
    app, t = state.app, state.target
    if not (app.function_name and app.resource_group):
        return
    try:
        site = state.reads.site(t.subscription, app.resource_group, app.function_name)
    except ReadError as exc:
        status = Status.FAIL if exc.not_found else Status.WARN
        state.add(CheckResult("app", f"Function App {app.function_name}", status, str(exc)))
        return
    except TunegridError as exc:
        state.add(CheckResult("app", f"Function App {app.function_name}", Status.WARN, str(exc)))
        return
    host = str((site.get("properties") or {}).get("defaultHostName") or "")
    principal, source = app.principal_id, app.principal_source
    if not principal:
        principal, source = roles.app_principal(site, client_id=t.settings.client_id)
    state.app = replace(app, host=app.host or host, principal_id=principal, principal_source=source)
    identity = f"identity {principal} ({source})" if principal else "no managed identity found"
    state.add(
        CheckResult(
            "app",
            f"Function App {app.function_name}",
            Status.PASS if principal else Status.WARN,
            f"host {state.app.host or 'unknown'}, {identity}",
        )
    )


# -- roles ------------------------------------------------------------------------------------------------
def _scope_label(state: _State) -> str:
    return f"workspace {state.target.settings.workspace_name}"


def _caller_roles(state: _State) -> None:
    scope = state.target.workspace_id
    try:
        blocks = roles.permissions_answer({"value": state.reads.permissions(scope)})
    except TunegridError as exc:
        state.add(CheckResult("roles: you", "permissions", Status.WARN, f"could not read them: {exc}"))
        return
    you = roles.Subject(
        label="you",
        who="you (the signed-in caller)",
        grant_to="$(az ad signed-in-user show --query id -o tsv)",
        soft=frozenset({"read endpoint metrics"}),
    )
    rows = roles.capability_results(blocks, you, scope=scope, scope_label=_scope_label(state))
    state.add(*[_soften(r) for r in rows])


def _soften(row: CheckResult) -> CheckResult:
    if row.status is Status.WARN:
        return replace(row, detail=f"{row.detail}; only the app's identity needs it (the janitor reads the metrics)")
    return row


def _app_roles(state: _State) -> None:
    app, scope = state.app, state.target.workspace_id
    if not app.principal_id:
        hint = (
            f"az functionapp identity show -n {app.function_name} -g {app.resource_group} "
            "--query 'userAssignedIdentities.*.principalId' -o tsv"
            if app.function_name
            else "az functionapp identity show -n <app> -g <group> --query 'userAssignedIdentities.*.principalId' -o tsv"
        )
        state.add(
            CheckResult(
                "roles: app identity",
                "all",
                Status.WARN,
                "not checked: the app's identity is unknown (no Function App in the azd environment, or it has none)",
                f"pass --principal-id (its object id: {hint})",
            )
        )
        return
    pid = app.principal_id
    try:
        role_ids = roles.assignments_at(
            {"value": state.reads.role_assignments(scope, pid)}, principal_id=pid, scope=scope
        )
        blocks = [b for rid in role_ids for b in roles.role_definition(state.reads.role_definition(rid))]
    except TunegridError as exc:
        state.add(
            CheckResult(
                "roles: app identity",
                "all",
                Status.WARN,
                f"could not read the role assignments of {pid}: {exc}",
                "reading them needs Microsoft.Authorization/roleAssignments/read on the workspace (Reader has it)",
            )
        )
        return
    subject = roles.Subject(
        label="app identity",
        who=f"the app's identity {pid}",
        grant_to=pid,
        note=" (direct assignments at or above the workspace were read; group memberships are not resolved)",
    )
    state.add(*roles.capability_results(blocks, subject, scope=scope, scope_label=_scope_label(state)))


# -- model, sizes, component ------------------------------------------------------------------------------
def _set_fix(setting: str, value: str, app: AppTarget) -> str:
    where = f"-n {app.function_name} -g {app.resource_group}" if app.function_name else "-n <app> -g <group>"
    return f"az functionapp config appsettings set {where} --settings {setting}={value}"


def _model(state: _State) -> list[quota.Need]:
    """The registry rows (base model, VM sizes, component); returns the sizes the quota check needs."""
    s = state.target.settings
    try:
        registry = state.reads.registry(s.registry_name)
    except TunegridError as exc:
        fix = (
            "the public azureml registry is readable by any signed-in identity; a private one needs AzureML Registry User"
            if isinstance(exc, ReadError) and exc.refused
            else "check AZUREML_REGISTRY_NAME"
        )
        state.add(CheckResult("model", f"registry {s.registry_name}", Status.FAIL, str(exc), fix))
        return []
    needs = _base_model(state, registry)
    _component(state, registry)
    return needs


def _base_model(state: _State, registry: Registry) -> list[quota.Need]:
    s, now = state.target.settings, state.now
    check = f"base model {s.base_model_name}"
    try:
        doc = state.reads.model_version(
            registry, s.base_model_name, version=s.base_model_version, label=s.base_model_label or "latest"
        )
    except TunegridError as exc:
        setting, value = (
            ("BASE_MODEL_VERSION", "<a published version, or empty for the latest>")
            if s.base_model_version
            else ("BASE_MODEL_NAME", "<a model of the registry>")
        )
        state.add(CheckResult("model", check, Status.FAIL, str(exc), _set_fix(setting, value, state.app)))
        return []
    meta = read_model_version(doc, registry=registry.name)
    alternative, found = ("", None)
    if is_retired_for_finetuning(meta, now=now):
        alternative, found = _alternative(state.reads, registry, meta)
    findings = finetune_lifecycle_findings(meta, now=now, alternative=alternative)
    if meta.finetune_tasks and CHAT_COMPLETION not in meta.finetune_tasks:
        findings.append(
            Finding(
                FindingLevel.ERROR,
                "model_task",
                f"base model {meta.ref} is not fine-tunable for {CHAT_COMPLETION} (its tasks: {', '.join(meta.finetune_tasks)})",
            )
        )
    fix = _set_fix("BASE_MODEL_NAME", found.name if found else "<a fine-tunable model>", state.app)
    ok = f"{meta.ref} in registry {registry.name}: no retirement or deprecation date for fine-tuning"
    state.add(from_findings("model", check, findings, ok=ok, fix=fix))
    return _sizes(state, meta)


def _alternative(reads: AzureReads, registry: Registry, meta: ModelMetadata) -> tuple[str, ModelMetadata | None]:
    try:
        containers = reads.models(registry)
        latest = {
            str(c.get("name") or ""): str((c.get("properties") or {}).get("latestVersion") or "") for c in containers
        }
        found = None
        for name in candidate_order(latest, like=meta.name)[:ALTERNATIVE_READS]:
            if not latest.get(name):
                continue
            try:
                doc = reads.model_version(registry, name, version=latest[name])
            except ReadError as exc:
                log.debug("skipping %s: %s", name, exc)
                continue
            found = pick_alternative([read_model_version(doc, registry=registry.name)], like=meta.name)
            if found is not None:
                break
        return alternative_sentence(found, registry=registry.name), found
    except TunegridError as exc:
        detail = f" (its models could not be read: {exc})"
        return alternative_sentence(None, registry=registry.name, detail=detail), None


def _sizes(state: _State, meta: ModelMetadata) -> list[quota.Need]:
    """A row per VM size the app will use (from settings or the model's lists), and the quota needs."""
    s, now = state.target.settings, state.now
    plan = compute_plan(s, {})
    needs: list[quota.Need] = []
    if plan.serverless:
        for key in INSTANCE_TYPE_INPUTS:
            value, source = plan.instance_types[key], plan.sources.get(key, key)
            use = key.removeprefix("instance_type_").replace("_", " ").replace("finetune", "fine-tune")
            where = f"serverless {key}, from {source}"
            if key not in MODEL_LISTED_INPUTS:
                size, findings, how = value, vm_size_findings(value, where=where, now=now, gpu_step=False), source
            elif value:
                size, how = value, f"{source}, on {meta.finetune_skus.source if meta.finetune_skus else 'no list'}"
                findings = sku_findings(value, meta.finetune_skus, meta=meta, role="fine-tune", where=where, now=now)
            else:
                chosen, findings = default_sku(
                    meta.finetune_skus, meta=meta, role="fine-tune", setting=INSTANCE_TYPE_SETTINGS[key]
                )
                size = chosen or ""
                how = f"the first usable size of {meta.finetune_skus.source if meta.finetune_skus else '-'}"
            state.add(
                from_findings(
                    "VM sizes",
                    use,
                    findings,
                    ok=f"{size} ({how})",
                    fix=_set_fix(INSTANCE_TYPE_SETTINGS[key], "<size>", state.app),
                )
            )
            if size and not any(f.is_error for f in findings):
                needs.append(quota.Need(use, size, nodes=plan.num_nodes if key == "instance_type_finetune" else 1))
    else:
        needs += _cluster(state, meta, plan.target, plan.num_nodes)
    needs += _inference_size(state, meta)
    return needs


def _cluster(state: _State, meta: ModelMetadata, name: str, nodes: int) -> list[quota.Need]:
    check = f"cluster {name}"
    try:
        doc = state.reads.compute(state.target.workspace_id, name)
    except TunegridError as exc:
        fix = "create the cluster (AmlCompute) or set AZUREML_COMPUTE=serverless"
        state.add(CheckResult("VM sizes", check, Status.FAIL, str(exc), fix))
        return []
    props = doc.get("properties") or {}
    size = str((props.get("properties") or {}).get("vmSize") or "")
    findings: list[Finding] = []
    if str(props.get("provisioningState") or "").lower() == "failed":
        findings.append(Finding(FindingLevel.ERROR, "compute", f"cluster {name} is in the failed provisioning state"))
    if not size:
        findings.append(
            Finding(FindingLevel.ERROR, "compute", f"compute {name} has no VM size (not an AmlCompute cluster)")
        )
    else:
        findings += sku_findings(size, meta.finetune_skus, meta=meta, role="fine-tune", where=check, now=state.now)
    state.add(
        from_findings(
            "VM sizes",
            check,
            findings,
            ok=f"{size} (AZUREML_COMPUTE)",
            fix="recreate the cluster with a size from the model's list",
        )
    )
    return [quota.Need(check, size, nodes=nodes)] if size and not any(f.is_error for f in findings) else []


def _inference_size(state: _State, meta: ModelMetadata) -> list[quota.Need]:
    s = state.target.settings
    where = "INFERENCE_INSTANCE_TYPE"
    if s.inference_instance_type:
        size = s.inference_instance_type
        findings = sku_findings(size, meta.inference_skus, meta=meta, role="inference", where=where, now=state.now)
        how = f"{where}, on {meta.inference_skus.source if meta.inference_skus else 'no list'}"
    else:
        chosen, findings = default_sku(meta.inference_skus, meta=meta, role="inference", setting=where)
        size = chosen or ""
        how = f"the first usable size of {meta.inference_skus.source if meta.inference_skus else '-'}"
    count = s.inference_instance_count
    state.add(
        from_findings(
            "VM sizes", "inference", findings, ok=f"{size} x {count} ({how})", fix=_set_fix(where, "<size>", state.app)
        )
    )
    if size and not any(f.is_error for f in findings):
        return [quota.Need("inference", size, nodes=count, peak=2 * count)]
    return []


def _component(state: _State, registry: Registry) -> None:
    s = state.target.settings
    pinned = s.pipeline_component_version
    ref = f"version {pinned}" if pinned else f"label {s.pipeline_component_label or 'latest'}"
    check = f"pipeline component {s.pipeline_component}"
    try:
        doc = state.reads.component_version(
            registry, s.pipeline_component, version=pinned, label=s.pipeline_component_label or "latest"
        )
    except TunegridError as exc:
        fix = "set AZUREML_PIPELINE_COMPONENT_VERSION to a published version (or empty for the latest)"
        state.add(CheckResult("component", check, Status.FAIL, str(exc), fix))
        return
    props = doc.get("properties") or {}
    version = str((props.get("componentSpec") or {}).get("version") or doc.get("name") or "?")
    if str(props.get("isArchived", "")).lower() == "true":
        state.add(
            CheckResult(
                "component",
                check,
                Status.FAIL,
                f"{s.pipeline_component} {version} ({ref}) is archived in registry {registry.name}",
                "pin a version that is not archived, or empty AZUREML_PIPELINE_COMPONENT_VERSION for the latest",
            )
        )
        return
    state.add(CheckResult("component", check, Status.PASS, f"{ref} resolves to {version} in registry {registry.name}"))


# -- quota ------------------------------------------------------------------------------------------------
def _merge(needs: Sequence[quota.Need]) -> list[quota.Need]:
    """One row per (size, nodes, peak); the uses joined (the fine-tune and evaluation steps share a size)."""
    out: dict[tuple[str, int, int], quota.Need] = {}
    for n in needs:
        key = (n.size.lower(), n.nodes, n.peak)
        out[key] = replace(out[key], use=f"{out[key].use}, {n.use}") if key in out else n
    return list(out.values())


def _quota(state: _State, needs: Sequence[quota.Need]) -> None:
    if not state.region:
        state.add(CheckResult("quota", "vCPUs", Status.WARN, "not checked: the workspace's region is unknown"))
        return
    if not needs:
        state.add(CheckResult("quota", "vCPUs", Status.WARN, "not checked: no usable VM size was found above"))
        return
    t = state.target
    try:
        sizes = quota.vm_sizes(state.reads.vm_sizes(t.subscription, state.region))
        usages = {"value": state.reads.usages(t.subscription, state.region)}
    except TunegridError as exc:
        state.add(
            CheckResult(
                "quota",
                "vCPUs",
                Status.WARN,
                f"could not read the region's usages: {exc}",
                "reading them needs read access on the subscription (Reader)",
            )
        )
        return
    state.add(*quota.quota_results(_merge(needs), sizes, usages, region=state.region))


# -- event grid -------------------------------------------------------------------------------------------
def _event_grid(state: _State) -> None:
    t, app = state.target, state.app
    routes: list[tuple[events.Route, str]] = [
        (events.storage_route(container=app.training_container), t.storage_id),
        (events.workspace_route(), t.workspace_id),
    ]
    if not app.host:
        for route, _ in routes:
            state.add(
                CheckResult(
                    "event grid",
                    route.check,
                    Status.WARN,
                    "not checked: the Function App's host is unknown",
                    "run in the folder of `azd up` (its .azure/ environment) or pass --azd-env",
                )
            )
        return
    try:
        topics = state.reads.system_topics(t.subscription)
    except TunegridError as exc:
        for route, _ in routes:
            state.add(CheckResult("event grid", route.check, Status.WARN, f"could not list the system topics: {exc}"))
        return
    for route, source_id in routes:
        if not source_id:
            state.add(
                CheckResult(
                    "event grid",
                    route.check,
                    Status.WARN,
                    f"not checked: the {route.source_kind} is unknown (AZURE_STORAGE_ACCOUNT_NAME, RESOURCE_GROUP)",
                )
            )
            continue
        topic = events.find_system_topic(topics, source_id)
        try:
            deliveries = _deliveries(state, topic) if topic is not None else []
        except TunegridError as exc:
            state.add(CheckResult("event grid", route.check, Status.WARN, f"could not list the subscriptions: {exc}"))
            continue
        state.add(
            events.route_result(route, source_id=source_id, topic=topic, deliveries=deliveries, app_host=app.host)
        )


def _deliveries(state: _State, topic: Mapping[str, Any]) -> list[events.Delivery]:
    """The topic's subscriptions; for the webhooks on the app's host, where they deliver (getFullUrl)."""
    topic_id = str(topic.get("id") or "")
    out: list[events.Delivery] = []
    for doc in state.reads.event_subscriptions(topic_id):
        base = events.base_target(doc, app_site_id=state.target.site_id)
        if base is None or not base.host or base.host.lower() != state.app.host.lower():
            out.append(events.Delivery(doc, base))
            continue
        try:
            full = state.reads.webhook_target(topic_id, str(doc.get("name") or ""))
        except ReadError as exc:
            out.append(events.Delivery(doc, base, function_unread=f"getFullUrl answered HTTP {exc.status}"))
            continue
        out.append(events.Delivery(doc, full))
    return out
