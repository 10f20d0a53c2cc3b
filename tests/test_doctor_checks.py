"""The doctor's pure checks as tables: RBAC wildcard arithmetic, quota grading, Event Grid routes, and
where the settings come from. Documents are the files of tests/data/doctor (REST API examples, see
its README) or cut down to the fields a case is about."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from tests.test_doctor_cli import AZD_ENV, load, write_azd_env
from tunegrid.doctor import events, quota, roles
from tunegrid.doctor.report import CheckResult, Report, Status
from tunegrid.doctor.target import resolve_target

DS = roles.role_definition(load("role_azureml_data_scientist.json"))
MR = roles.role_definition(load("role_monitoring_reader.json"))
ML = "Microsoft.MachineLearningServices/workspaces"


# -- roles ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("blocks", "action", "allowed"),
    [
        (DS, f"{ML}/jobs/write", True),
        (DS, f"{ML}/onlineEndpoints/deployments/delete", True),
        (DS, f"{ML}/onlineEndpoints/listKeys/action", True),  # workspaces/listKeys/action is denied, not this
        (DS, f"{ML}/listKeys/action", False),
        (DS, f"{ML}/computes/cluster/write", False),  # notActions computes/*/write, `*` spans segments
        (DS, f"{ML}/write", False),
        (DS, "Microsoft.Insights/metrics/read", False),
        (MR, "Microsoft.Insights/metrics/read", True),
        (MR, "microsoft.insights/METRICS/read", True),  # case-insensitive
        (MR, f"{ML}/jobs/write", False),
        ([*DS, *MR], "Microsoft.Insights/metrics/read", True),  # the union of the blocks
        (
            [roles.PermissionBlock(actions=("*",), not_actions=("Microsoft.Authorization/*/Write",))],
            "Microsoft.Authorization/roleAssignments/write",
            False,
        ),
        ([roles.PermissionBlock(actions=("*",))], f"{ML}/jobs/write", True),
        ([], f"{ML}/jobs/write", False),
    ],
)
def test_an_action_is_allowed_by_a_matching_action_no_not_action_denies(
    blocks: list[roles.PermissionBlock], action: str, allowed: bool
) -> None:
    """Azure RBAC: an action matches a pattern with `*` wildcards, case-insensitively, minus notActions, per block."""
    assert roles.allows(blocks, action) is allowed


def test_a_not_action_of_one_role_does_not_remove_what_another_grants() -> None:
    """notActions subtract within their own block only: Contributor-like `*` minus writes, plus a role with that write."""
    contributor = roles.PermissionBlock(actions=("*",), not_actions=(f"{ML}/jobs/write",))
    writer = roles.PermissionBlock(actions=(f"{ML}/jobs/write",))
    assert not roles.allows([contributor], f"{ML}/jobs/write")
    assert roles.allows([contributor, writer], f"{ML}/jobs/write")


def test_data_actions_are_judged_apart_from_actions() -> None:
    """A dataAction pattern does not allow a control-plane action, and the reverse."""
    b = roles.PermissionBlock(data_actions=(f"{ML}/onlineEndpoints/score/action",))
    assert roles.allows([b], f"{ML}/onlineEndpoints/score/action", data=True)
    assert not roles.allows([b], f"{ML}/onlineEndpoints/score/action")


def test_the_template_roles_of_the_app_allow_every_capability() -> None:
    """AzureML Data Scientist + Monitoring Reader (what infra/app/ml-workspace.bicep grants the app) pass
    every row; Data Scientist alone fails only the metrics row, naming Monitoring Reader."""
    subject = roles.Subject("app identity", "the app's identity", grant_to="pid")
    both = roles.capability_results([*DS, *MR], subject, scope="/ws", scope_label="workspace w")
    assert {r.status for r in both} == {Status.PASS} and len(both) == len(roles.CAPABILITIES)

    alone = roles.capability_results(DS, subject, scope="/ws", scope_label="workspace w")
    [failed] = [r for r in alone if r.status is Status.FAIL]
    assert failed.check == "read endpoint metrics"
    assert "Microsoft.Insights/metrics/read" in failed.detail and "Monitoring Reader" in failed.detail
    assert failed.fix == 'az role assignment create --assignee pid --role "Monitoring Reader" --scope /ws'


def test_a_soft_capability_only_warns() -> None:
    """For you, missing metrics is a warning (the janitor runs as the app)."""
    you = roles.Subject("you", "you", grant_to="me", soft=frozenset({"read endpoint metrics"}))
    results = roles.capability_results(DS, you, scope="/ws", scope_label="w")
    assert [r.status for r in results if r.check == "read endpoint metrics"] == [Status.WARN]


WS = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/w"


@pytest.mark.parametrize(
    ("assignment_scope", "scope", "applies"),
    [
        ("/subscriptions/s", WS, True),
        ("/subscriptions/S/resourceGroups/RG", WS, True),
        (WS, WS, True),
        ("/", WS, True),
        ("/subscriptions/s/resourceGroups/rg2", WS, False),
        ("/subscriptions/s/resourceGroups/r", "/subscriptions/s/resourceGroups/rg", False),  # a text prefix only
        (f"{WS}/onlineEndpoints/e", WS, False),
    ],
)
def test_an_assignment_applies_at_its_scope_and_below(assignment_scope: str, scope: str, applies: bool) -> None:
    """Role assignments are inherited downwards only, compared segment by segment, case-insensitively."""
    assert roles.covers(assignment_scope, scope) is applies


def test_only_the_principals_assignments_above_the_workspace_count() -> None:
    """From the listing: the two workspace roles, not the storage account's role."""
    doc = load("role_assignments_app.json")
    ws = next(a["properties"]["scope"] for a in doc["value"] if "/workspaces/" in a["properties"]["scope"])
    principal = doc["value"][0]["properties"]["principalId"]
    ids = roles.assignments_at(doc, principal_id=principal, scope=ws)
    assert [i.rsplit("/", 1)[-1] for i in ids] == [
        "f6c7c914-8db3-469d-8ca1-694a8f32e121",
        "43d0d8ad-25c7-4714-9337-8ba259a9fe05",
    ]
    assert roles.assignments_at(doc, principal_id="someone-else", scope=ws) == []


def test_the_apps_principal_is_read_from_its_site() -> None:
    """The user-assigned identity (matched by client id when one is set), else the system-assigned one."""
    site = load("site.json")
    principal, source = roles.app_principal(site)
    assert (
        principal
        == site["identity"]["userAssignedIdentities"][next(iter(site["identity"]["userAssignedIdentities"]))][
            "principalId"
        ]
    )
    assert source == "user-assigned identity id-api-tunegrid"
    assert roles.app_principal(site, client_id="another-client") == ("", "")
    assert roles.app_principal({"identity": {"type": "SystemAssigned", "principalId": "p1"}}) == (
        "p1",
        "system-assigned identity",
    )
    assert roles.app_principal({}) == ("", "")


# -- quota ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("standardNCADSA100v4Family", "ncadsa100v4"),
        ("StandardNCADSA100v4Family", "ncadsa100v4"),
        ("standardNCadsA100v4Family", "ncadsa100v4"),
        ("Standard NCADSA100v4 Family Cluster Dedicated vCPUs", "ncadsa100v4"),
        ("Standard_NCADSA100v4_Family_Cluster_Dedicated_vCPUs", "ncadsa100v4"),
        ("standardDv2Family", "dv2"),
        ("Standard Dv2 Family Cluster Dedicated vCPUs", "dv2"),
        ("standardNDAMSv4_A100Family", "ndamsv4a100"),
        ("Standard NC Family Cluster Dedicated vCPUs", "nc"),
    ],
)
def test_a_family_has_one_key_in_both_apis(text: str, key: str) -> None:
    """vmSizes' `family` and usages' names reduce to the same key, whatever their case and separators."""
    assert quota.family_key(text) == key


SIZES = quota.vm_sizes(json.loads((Path(__file__).parent / "data" / "azureml" / "vm_sizes.json").read_text()))


def _usages(current: int, limit: int, *, total: tuple[int, int] = (0, 1000)) -> dict[str, Any]:
    return {
        "value": [
            {
                "type": "Microsoft.MachineLearningServices/dedicatedCores/usages",
                "currentValue": total[0],
                "limit": total[1],
                "name": {"value": "Total Cluster Dedicated Regional vCPUs"},
            },
            {
                "type": "Microsoft.MachineLearningServices/vmFamily/usages",
                "currentValue": current,
                "limit": limit,
                "name": {"value": "Standard NCADSA100v4 Family Cluster Dedicated vCPUs"},
            },
            {
                "type": "Microsoft.MachineLearningServices/vmFamily/usages",
                "currentValue": 0,
                "limit": -1,
                "name": {"value": "Standard NCADSA100v4 Family Cluster LowPriority vCPUs"},
            },
        ]
    }


@pytest.mark.parametrize(
    ("need", "current", "limit", "total", "status", "says"),
    [
        (quota.Need("fine-tune", "Standard_NC24ads_A100_v4"), 0, 48, (0, 1000), Status.PASS, "48 free"),
        (quota.Need("fine-tune", "Standard_NC24ads_A100_v4"), 0, 0, (0, 1000), Status.FAIL, "below one node"),
        (
            quota.Need("fine-tune", "Standard_NC24ads_A100_v4"),
            0,
            12,
            (0, 1000),
            Status.FAIL,
            "below one node (24 vCPUs)",
        ),
        (quota.Need("fine-tune", "Standard_NC24ads_A100_v4"), 48, 48, (0, 1000), Status.FAIL, "nothing left"),
        (
            quota.Need("fine-tune", "Standard_NC24ads_A100_v4", nodes=2),
            24,
            48,
            (0, 1000),
            Status.WARN,
            "24 free; 48 needed; Total",
        ),
        (
            quota.Need("inference", "Standard_NC24ads_A100_v4", peak=2),
            0,
            24,
            (0, 1000),
            Status.WARN,
            "during a roll-out",
        ),
        (
            quota.Need("fine-tune", "Standard_NC24ads_A100_v4"),
            0,
            48,
            (1000, 1000),
            Status.FAIL,
            "Total Cluster Dedicated",
        ),
    ],
)
def test_quota_fails_without_a_node_and_warns_when_short(
    need: quota.Need, current: int, limit: int, total: tuple[int, int], status: Status, says: str
) -> None:
    """Family and regional total: none free or a limit under one node fails; fewer free than needed warns."""
    [row] = quota.quota_results([need], SIZES, _usages(current, limit, total=total), region="eastus")
    assert row.status is status
    assert says in row.detail
    assert bool(row.fix) is (status is not Status.PASS)


def test_a_size_or_family_it_cannot_find_is_a_warning() -> None:
    """A size missing from vmSizes, or a family missing from usages: not checked, said so."""
    missing_size, missing_family = quota.quota_results(
        [quota.Need("x", "Standard_Nope_v9"), quota.Need("y", "Standard_ND96asr_v4")],
        SIZES,
        _usages(0, 48),
        region="eastus",
    )
    assert missing_size.status is Status.WARN and "not in the Azure ML VM sizes of eastus" in missing_size.detail
    assert (
        missing_family.status is Status.WARN
        and "no usage entry for family standardNDASv4_A100Family" in missing_family.detail
    )


def test_low_priority_and_workspace_entries_are_not_the_family_quota() -> None:
    """The example's shapes: only `vmFamily/usages` dedicated entries count."""
    families = quota.family_usages(load("usages.json"))
    assert families["ncadsa100v4"].limit == 48 and families["dv2"].limit == 24 and families["ncv3"].limit == 0


# -- event grid ----------------------------------------------------------------------------------------
HOST = "func.azurewebsites.net"
STORAGE = "/subscriptions/s/resourceGroups/app/providers/Microsoft.Storage/storageAccounts/st"
TOPIC = {
    "id": "/subscriptions/s/resourceGroups/app/providers/Microsoft.EventGrid/systemTopics/t",
    "name": "t",
    "properties": {"source": STORAGE.lower()},
}


def _subscription(
    *,
    base: str = f"https://{HOST}/runtime/webhooks/blobs",
    events_: list[str] | None = None,
    prefix: str = "/blobServices/default/containers/training-data/",
    state: str = "Succeeded",
) -> dict[str, Any]:
    return {
        "name": "tunegrid-ingest",
        "properties": {
            "destination": {"endpointType": "WebHook", "properties": {"endpointBaseUrl": base}},
            "filter": {
                "includedEventTypes": events_ if events_ is not None else ["Microsoft.Storage.BlobCreated"],
                "subjectBeginsWith": prefix,
            },
            "provisioningState": state,
        },
    }


def _full(
    function: str = "Host.Functions.ingest_dataset", path: str = "/runtime/webhooks/blobs"
) -> events.WebhookTarget:
    return events.webhook_target(f"https://{HOST}{path}?functionName={function}&code=secret-key")


def test_a_webhook_target_keeps_no_key() -> None:
    """Host, path and functionName survive; the `code` is gone from every field and from `where`."""
    target = _full()
    assert target == events.WebhookTarget(HOST, "/runtime/webhooks/blobs", "Host.Functions.ingest_dataset")
    assert "secret-key" not in repr(target) and "secret-key" not in target.where


@pytest.mark.parametrize(
    ("deliveries", "status", "says"),
    [
        (
            [events.Delivery(_subscription(), _full())],
            Status.PASS,
            "delivers Microsoft.Storage.BlobCreated to https://",
        ),
        ([events.Delivery(_subscription(), _full("ingest_dataset"))], Status.PASS, "functionName=ingest_dataset"),
        ([], Status.FAIL, "(it has none)"),
        (
            [
                events.Delivery(
                    _subscription(base="https://other.example.net/hook"),
                    events.webhook_target("https://other.example.net/hook", function_known=False),
                )
            ],
            Status.FAIL,
            "(it delivers to: https://other.example.net/hook)",
        ),
        (
            [events.Delivery(_subscription(), _full("janitor"))],
            Status.FAIL,
            "function janitor, not Host.Functions.ingest_dataset",
        ),
        (
            [events.Delivery(_subscription(), _full(path="/runtime/webhooks/eventgrid"))],
            Status.FAIL,
            "not /runtime/webhooks/blobs",
        ),
        (
            [events.Delivery(_subscription(events_=["Microsoft.Storage.BlobDeleted"]), _full())],
            Status.FAIL,
            "does not deliver Microsoft.Storage.BlobCreated",
        ),
        ([events.Delivery(_subscription(state="Failed"), _full())], Status.FAIL, "provisioning state Failed"),
        (
            [
                events.Delivery(
                    _subscription(),
                    events.webhook_target(f"https://{HOST}/runtime/webhooks/blobs", function_known=False),
                    "getFullUrl answered HTTP 403",
                )
            ],
            Status.WARN,
            "function name not verified (getFullUrl answered HTTP 403)",
        ),
        ([events.Delivery(_subscription(prefix=""), _full())], Status.WARN, "every blob outside"),
        (
            [events.Delivery(_subscription(state="Failed"), _full()), events.Delivery(_subscription(), _full())],
            Status.PASS,
            "delivers",
        ),
    ],
)
def test_the_storage_route(deliveries: list[events.Delivery], status: Status, says: str) -> None:
    """One good subscription is enough; otherwise the least bad one is reported."""
    row = events.route_result(
        events.storage_route(container="training-data"),
        source_id=STORAGE,
        topic=TOPIC,
        deliveries=deliveries,
        app_host=HOST,
    )
    assert row.status is status, row.detail
    assert says in row.detail
    assert bool(row.fix) is (status is not Status.PASS)


def test_a_missing_system_topic_fails_with_provision() -> None:
    """No topic has the source: azd provision creates it."""
    row = events.route_result(events.workspace_route(), source_id="/x", topic=None, deliveries=[], app_host=HOST)
    assert row.status is Status.FAIL and "azd provision" in row.fix


def test_the_topic_is_found_by_its_source_in_any_case() -> None:
    """The examples answer sources lower-cased; the workspace id is mixed case."""
    topics = load("system_topics.json")["value"]
    source = topics[1]["properties"]["source"].replace(
        "microsoft.machinelearningservices", "Microsoft.MachineLearningServices"
    )
    assert events.find_system_topic(topics, source) is topics[1]
    assert events.find_system_topic(topics, "/subscriptions/x/none") is None


def test_an_azure_function_destination_on_the_app_counts() -> None:
    """endpointType AzureFunction with the app's `.../functions/job_events` resource id."""
    site = "/subscriptions/s/resourceGroups/app/providers/Microsoft.Web/sites/func"
    doc = {
        "name": "jobs",
        "properties": {
            "destination": {
                "endpointType": "AzureFunction",
                "properties": {"resourceId": f"{site}/functions/job_events"},
            },
            "filter": {
                "includedEventTypes": [
                    "Microsoft.MachineLearningServices.RunCompleted",
                    "Microsoft.MachineLearningServices.RunStatusChanged",
                ]
            },
            "provisioningState": "Succeeded",
        },
    }
    target = events.base_target(doc, app_site_id=site)
    row = events.route_result(
        events.workspace_route(),
        source_id="/ws",
        topic={"name": "t"},
        deliveries=[events.Delivery(doc, target)],
        app_host=HOST,
    )
    assert row.status is Status.PASS
    assert events.base_target(doc, app_site_id="/other/site") is None


def test_the_function_names_are_the_apps() -> None:
    """The names the routes expect are functions of function_app (the webhook's functionName)."""
    import function_app
    from tunegrid.appindex import functions_of

    names = {fn.get_function_name() for fn in functions_of(function_app.app)}
    assert {events.INGEST_FUNCTION, events.JOB_EVENTS_FUNCTION} <= names


# -- report --------------------------------------------------------------------------------------------
def test_warnings_do_not_fail_the_run() -> None:
    """Exit 0 with warnings, 1 with any failure."""
    warn = CheckResult("a", "b", Status.WARN, "w")
    fail = CheckResult("a", "c", Status.FAIL, "f", "do x")
    assert Report((warn,)).exit_code == 0
    assert Report((warn, fail)).exit_code == 1
    assert Report((warn, fail)).to_dict()["counts"] == {"pass": 0, "warn": 1, "fail": 1}


# -- settings ------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "local.settings.json").write_text(
        json.dumps(
            {
                "Values": {
                    "AZURE_SUBSCRIPTION_ID": "local-sub",
                    "AZUREML_WORKSPACE_NAME": "local-ws",
                    "AZURE_RESOURCE_GROUP": "local-rg",
                    "BASE_MODEL_NAME": "Phi-4",
                    "AZUREML_COMPUTE": "",
                }
            }
        )
    )
    return tmp_path


def test_the_azd_environment_wins_over_local_settings_and_the_environment_over_both(folder: Path) -> None:
    """flags > environment > azd env > local.settings.json; AZUREML_RESOURCE_GROUP is the workspace's group."""
    write_azd_env(folder, {**AZD_ENV, "AZURE_RESOURCE_GROUP": "the-apps-group"})
    target = resolve_target(root=folder, environ={"AZUREML_WORKSPACE_NAME": "env-ws"})
    s = target.settings
    assert (s.subscription_id, s.resource_group, s.workspace_name) == (
        AZD_ENV["AZURE_SUBSCRIPTION_ID"],
        AZD_ENV["AZUREML_RESOURCE_GROUP"],
        "env-ws",
    )
    assert s.compute == "serverless"  # an empty value hides nothing
    assert target.app.host == AZD_ENV["SERVICE_API_URI"].removeprefix("https://")
    assert target.storage_id.endswith(
        f"/resourceGroups/{AZD_ENV['RESOURCE_GROUP']}/providers/Microsoft.Storage/storageAccounts/{AZD_ENV['AZURE_STORAGE_ACCOUNT_NAME']}"
    )
    assert target.sources == ("environment", "azd env dev (.azure/dev/.env)", "local.settings.json")

    flagged = resolve_target(root=folder, environ={"AZUREML_WORKSPACE_NAME": "env-ws"}, flags={"workspace": "flag-ws"})
    assert flagged.settings.workspace_name == "flag-ws" and flagged.sources[0] == "flags"


def test_local_settings_alone_name_the_workspace(folder: Path) -> None:
    """Without .azure/, local.settings.json is read as every command reads it; the app is unknown."""
    target = resolve_target(root=folder, environ={})
    assert target.settings.workspace_name == "local-ws" and target.app.host == "" and target.storage_id == ""


def test_an_azd_environment_asked_for_must_exist(folder: Path) -> None:
    """--azd-env NAME with no .azure/NAME/.env is a configuration error; no default environment is fine."""
    with pytest.raises(ConfigError, match="azd environment 'prod'"):
        resolve_target(root=folder, environ={}, azd_env="prod")


def test_missing_coordinates_name_the_flags(tmp_path: Path) -> None:
    """Nothing anywhere: one ConfigError listing each setting with its flag."""
    with pytest.raises(ConfigError) as info:
        resolve_target(root=tmp_path, environ={})
    assert "AZURE_SUBSCRIPTION_ID (--subscription)" in str(info.value)
    assert "AZURE_RESOURCE_GROUP (--resource-group)" in str(info.value)
