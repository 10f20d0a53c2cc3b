"""`tunegrid doctor --json` run in-process against captured HTTP: the rig answers at azure-core's transport
(no socket may open), the settings come from an azd environment written the way `azd up` leaves it.

Answers served (see tests/data/doctor/README.md and tests/data/azure-reference/README.md):
- the workspace (`tests/data/azureml/workspace.json`, after the recording `test_online_endpoint_e2e`);
- the registry's model and component versions built from the azureml-assets specs (Phi-4 8,
  Phi-3-mini-4k-instruct 15, chat_completion_pipeline 0.0.82), and the recorded registry 403
  (`test_online_deployment_create_when_registry_assets`);
- permissions, role assignments and definitions, the Function App, usages, system topics, event
  subscriptions and their full URLs from tests/data/doctor (REST API examples);
- the VM sizes of `tests/data/azureml/vm_sizes.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError

from shared.settings import SETTINGS
from tests import azure_reference as ref
from tests import azureml_rig as rig_module
from tests.azureml_rig import LOCATION, RESOURCE_GROUP, SUBSCRIPTION, WORKSPACE, WS_PATH, AzureMLRig, Reply
from tunegrid.cli import main
from tunegrid.commands import doctor as doctor_command

azureml_rig = rig_module.azureml_rig
no_sockets = rig_module.no_sockets

DOCTOR_DATA = Path(__file__).resolve().parent / "data" / "doctor"
APP_RESOURCE_GROUP = "rg-tunegrid-app"
FUNCTION_APP = "func-api-tunegrid"
APP_HOST = f"{FUNCTION_APP}.azurewebsites.net"
STORAGE_ACCOUNT = "sttunegriddata"
STORAGE_TOPIC = "evgt-st-tunegrid"
ML_TOPIC = "evgt-mlw-tunegrid"
APP_PRINCIPAL = "7e0b2f1c-0000-4000-8000-00000000a11a"
APP_CLIENT_ID = "c1d2e3f4-0000-4000-8000-00000000c11e"
BLOBS_KEY = "fake-blobs-extension-key-Zq8v"
EVENTGRID_KEY = "fake-eventgrid-extension-key-Kx3w"
DATA_SCIENTIST_ID = "f6c7c914-8db3-469d-8ca1-694a8f32e121"
MONITORING_READER_ID = "43d0d8ad-25c7-4714-9337-8ba259a9fe05"
APP_RG_PATH = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{APP_RESOURCE_GROUP}"
STORAGE_TOPIC_PATH = f"{APP_RG_PATH}/providers/Microsoft.EventGrid/systemTopics/{STORAGE_TOPIC}"
ML_TOPIC_PATH = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.EventGrid/systemTopics/{ML_TOPIC}"
ML_LOCATIONS = f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft\\.MachineLearningServices/locations/{LOCATION}"


def load(filename: str) -> Any:
    """A file of tests/data/doctor with its `{placeholders}` filled in."""
    text = (DOCTOR_DATA / filename).read_text(encoding="utf-8")
    values = {
        "subscription": SUBSCRIPTION,
        "resource_group": RESOURCE_GROUP,
        "workspace": WORKSPACE,
        "app_resource_group": APP_RESOURCE_GROUP,
        "function_app": FUNCTION_APP,
        "app_host": APP_HOST,
        "storage_account": STORAGE_ACCOUNT,
        "storage_topic": STORAGE_TOPIC,
        "ml_topic": ML_TOPIC,
        "app_principal": APP_PRINCIPAL,
        "app_client_id": APP_CLIENT_ID,
        "blobs_key": BLOBS_KEY,
        "eventgrid_key": EVENTGRID_KEY,
    }
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return json.loads(text)


AZD_ENV = {
    "AZURE_ENV_NAME": "dev",
    "AZURE_LOCATION": LOCATION,
    "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
    "AZUREML_WORKSPACE_NAME": WORKSPACE,
    "AZUREML_RESOURCE_GROUP": RESOURCE_GROUP,
    "AZURE_FUNCTION_NAME": FUNCTION_APP,
    "RESOURCE_GROUP": APP_RESOURCE_GROUP,
    "SERVICE_API_URI": f"https://{APP_HOST}",
    "AZURE_STORAGE_ACCOUNT_NAME": STORAGE_ACCOUNT,
    "STORAGE_SYSTEM_TOPIC_NAME": STORAGE_TOPIC,
    "AZUREML_SYSTEM_TOPIC_NAME": ML_TOPIC,
    "TRAINING_CONTAINER_NAME": "training-data",
}


def write_azd_env(folder: Path, values: dict[str, str], *, name: str = "dev") -> None:
    """`.azure/config.json` and `.azure/<name>/.env` as azd writes them (quoted values)."""
    (folder / ".azure" / name).mkdir(parents=True, exist_ok=True)
    (folder / ".azure" / "config.json").write_text(json.dumps({"version": 1, "defaultEnvironment": name}))
    lines = [f'{k}="{v}"' for k, v in values.items()]
    (folder / ".azure" / name / ".env").write_text("\n".join(lines) + "\n")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No app setting or azd value leaks in from the test process."""
    for name in {s.name for s in SETTINGS} | set(AZD_ENV) | {"AZURE_CLIENT_ID", "AZURE_RESOURCE_GROUP"}:
        monkeypatch.delenv(name, raising=False)


def serve_app(rig: AzureMLRig, *, permissions: str = "permissions_data_scientist_and_monitoring_reader.json") -> None:
    """Everything a healthy deployment answers, beyond the workspace the rig fixture serves."""
    rig.on(
        "GET", re.escape(f"{APP_RG_PATH}/providers/Microsoft.Web/sites/{FUNCTION_APP}"), Reply(200, load("site.json"))
    )
    rig.on("GET", re.escape(f"{WS_PATH}/providers/Microsoft.Authorization/permissions"), Reply(200, load(permissions)))
    rig.on(
        "GET",
        re.escape(f"{WS_PATH}/providers/Microsoft.Authorization/roleAssignments"),
        Reply(200, load("role_assignments_app.json")),
    )
    for role_id, filename in (
        (DATA_SCIENTIST_ID, "role_azureml_data_scientist.json"),
        (MONITORING_READER_ID, "role_monitoring_reader.json"),
    ):
        rig.on(
            "GET",
            re.escape(f"/providers/Microsoft.Authorization/roleDefinitions/{role_id}"),
            Reply(200, load(filename)),
        )
    rig.serve_registry()
    rig.serve_vm_sizes()
    rig.on("GET", ML_LOCATIONS + "/usages", Reply(200, load("usages.json")))
    rig.on(
        "GET",
        f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft\\.EventGrid/systemTopics",
        Reply(200, load("system_topics.json")),
    )
    rig.on(
        "GET",
        re.escape(f"{STORAGE_TOPIC_PATH}/eventSubscriptions"),
        Reply(200, load("event_subscriptions_storage.json")),
    )
    rig.on(
        "GET", re.escape(f"{ML_TOPIC_PATH}/eventSubscriptions"), Reply(200, load("event_subscriptions_workspace.json"))
    )
    rig.on(
        "POST",
        re.escape(f"{STORAGE_TOPIC_PATH}/eventSubscriptions/tunegrid-ingest/getFullUrl"),
        Reply(200, load("full_url_ingest.json")),
    )
    rig.on(
        "POST",
        re.escape(f"{ML_TOPIC_PATH}/eventSubscriptions/tunegrid-jobs-{FUNCTION_APP}/getFullUrl"),
        Reply(200, load("full_url_job_events.json")),
    )


@pytest.fixture
def deployed(
    azureml_rig: AzureMLRig, tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AzureMLRig]:
    """A healthy deployment: the azd environment in the working directory, every answer served, and the
    doctor's credential and transport those of the rig."""
    rig = azureml_rig
    write_azd_env(tmp_path, AZD_ENV)
    serve_app(rig)
    monkeypatch.setattr(doctor_command, "open_connection", lambda: (rig.credential, rig.transport()))
    yield rig


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_doctor(capsys, "--json", *args)
    return code, json.loads(out)


def rows(doc: dict[str, Any], status: str | None = None, area: str | None = None) -> list[dict[str, str]]:
    return [
        r
        for r in doc["checks"]
        if (status is None or r["status"] == status) and (area is None or r["area"].startswith(area))
    ]


def secrets_of(rig: AzureMLRig) -> list[str]:
    """Every bearer token the doctor sent, and the webhook keys the getFullUrl answers carried."""
    tokens = {c.headers["Authorization"].split(" ", 1)[1] for c in rig.calls if "Authorization" in c.headers}
    assert tokens, "no request carried a token"
    return [*tokens, BLOBS_KEY, EVENTGRID_KEY]


def assert_no_secret(rig: AzureMLRig, *texts: str) -> None:
    for secret in secrets_of(rig):
        for text in texts:
            assert secret not in text


# -- the cases the issue names ---------------------------------------------------------------------------
def test_a_healthy_deployment_passes_every_check(deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]) -> None:
    """Workspace, both identities' roles, Phi-4 and its sizes, the component, quota and both event routes pass: exit 0."""
    code, out, err = run_doctor(capsys, "--json")
    doc = json.loads(out)

    assert code == 0, json.dumps(rows(doc, "fail") + rows(doc, "warn"), indent=1)
    assert doc["ok"] is True and doc["counts"] == {"pass": len(doc["checks"]), "warn": 0, "fail": 0}
    assert doc["target"]["region"] == LOCATION and doc["target"]["app_principal_id"] == APP_PRINCIPAL
    assert "azd env dev (.azure/dev/.env)" in doc["target"]["sources"]
    checks = {(r["area"], r["check"]): r["detail"] for r in doc["checks"]}
    assert len(rows(doc, area="roles: you")) == len(rows(doc, area="roles: app identity")) == 5
    assert "Phi-4:8" in checks[("model", "base model Phi-4")]
    assert checks[("VM sizes", "fine-tune")].startswith("Standard_NC24ads_A100_v4 (")
    assert "resolves to 0.0.82" in checks[("component", "pipeline component chat_completion_pipeline")]
    quota_rows = {r["check"]: r["detail"] for r in rows(doc, area="quota")}
    assert (
        "Standard NCADSA100v4 Family Cluster Dedicated vCPUs: 0 of 48 in use, 48 free"
        in quota_rows["Standard_NC24ads_A100_v4 (inference)"]
    )
    assert "?functionName=Host.Functions.ingest_dataset" in checks[("event grid", "BlobCreated -> ingest_dataset")]
    assert "?functionName=job_events" in checks[("event grid", "job events -> job_events")]
    assert_no_secret(deployed, out, err)


def test_the_requests_are_the_documented_ones(deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]) -> None:
    """Each read goes where its REST reference says, with its api-version; the only POST is getFullUrl."""
    rig = deployed
    run_doctor(capsys, "--json")

    assert rig.one("GET", r"/providers/Microsoft\.Authorization/permissions$").query == {"api-version": "2022-04-01"}
    assignments = rig.one("GET", r"/roleAssignments$").query
    assert assignments == {"api-version": "2022-04-01", "$filter": f"principalId eq '{APP_PRINCIPAL}'"}
    assert rig.one("GET", r"/locations/eastus/usages$").query == {"api-version": "2024-04-01"}
    assert rig.one("GET", r"/locations/eastus/vmSizes$").query == {"api-version": "2024-04-01"}
    assert rig.one("GET", r"/providers/Microsoft\.EventGrid/systemTopics$").query == {"api-version": "2025-02-15"}
    latest = rig.one("GET", r"/registries/azureml/components/chat_completion_pipeline/versions$").query
    assert latest == {"api-version": "2021-10-01-dataplanepreview", "$orderBy": "createdtime desc", "$top": "1"}
    assert {c.path.rsplit("/", 2)[-2] for c in rig.requests("POST")} == {
        "tunegrid-ingest",
        f"tunegrid-jobs-{FUNCTION_APP}",
    }
    assert not rig.requests("PUT") and not rig.requests("DELETE") and not rig.requests("PATCH")
    assert {s for scopes in rig.credential.scopes for s in scopes} == {"https://management.azure.com/.default"}


def test_a_caller_without_the_data_scientist_role_fails_naming_the_role_and_actions(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only Monitoring Reader: submitting, registering, managing endpoints and listing keys fail for
    you, each naming the missing actions, the role and the command that grants it; metrics pass."""
    serve_app(deployed, permissions="permissions_monitoring_reader_only.json")
    code, doc = doctor_json(capsys)

    assert code == 1 and doc["ok"] is False
    failed = {r["check"]: r for r in rows(doc, "fail", "roles: you")}
    assert set(failed) == {
        "submit a fine-tune job",
        "register a model",
        "manage online endpoints and deployments",
        "list endpoint keys and tokens",
    }
    job = failed["submit a fine-tune job"]
    assert "Microsoft.MachineLearningServices/workspaces/jobs/write" in job["detail"]
    assert "Microsoft.MachineLearningServices/workspaces/jobs/read" not in job["detail"]  # */read allows it
    assert "AzureML Data Scientist" in job["detail"]
    assert job["fix"].startswith(
        'az role assignment create --assignee $(az ad signed-in-user show --query id -o tsv) --role "AzureML Data Scientist"'
    )
    assert job["fix"].endswith(f"--scope {WS_PATH}")
    assert [r["status"] for r in rows(doc, area="roles: you") if r["check"] == "read endpoint metrics"] == ["pass"]
    assert not rows(doc, "fail", "roles: app identity")


def test_a_retired_base_model_fails_with_its_date_and_a_fine_tunable_alternative(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phi-3-mini-4k-instruct (its system_metadata form): retired for fine-tuning on 2025-08-30 and
    archived; the alternative is Phi-4 from the registry's own listing, and the fix sets it."""
    monkeypatch.setenv("BASE_MODEL_NAME", "Phi-3-mini-4k-instruct")
    deployed.serve_registry(model=ref.model_version_doc(ref.PHI3_MINI_SYSTEM_METADATA))
    code, doc = doctor_json(capsys)

    assert code == 1
    [row] = [r for r in doc["checks"] if r["check"] == "base model Phi-3-mini-4k-instruct"]
    assert row["status"] == "fail"
    assert "retired for fine-tuning on 2025-08-30" in row["detail"]
    assert "Fine-tunable alternative in registry azureml: Phi-4 (version 8" in row["detail"]
    assert row["fix"] == (
        f"az functionapp config appsettings set -n {FUNCTION_APP} -g {APP_RESOURCE_GROUP} --settings BASE_MODEL_NAME=Phi-4"
    )
    assert deployed.requests("GET", r"/registries/azureml/models$"), "the alternative comes from the registry's listing"


def test_no_quota_for_the_models_size_fails(deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]) -> None:
    """The NCADSA100v4 family at limit 0 (as a new subscription has it): the fine-tune/evaluation and
    inference rows fail and say where to ask for more; the CPU steps' family still passes."""
    usages = load("usages.json")
    for item in usages["value"]:
        if item["name"]["value"] == "Standard NCADSA100v4 Family Cluster Dedicated vCPUs":
            item["limit"] = 0
    deployed.on("GET", ML_LOCATIONS + "/usages", Reply(200, usages))
    code, doc = doctor_json(capsys)

    assert code == 1
    quota_rows = {r["check"]: r for r in rows(doc, area="quota")}
    assert set(quota_rows) == {
        "Standard_d12_v2 (model import, preprocess)",
        "Standard_NC24ads_A100_v4 (fine-tune, model evaluation)",
        "Standard_NC24ads_A100_v4 (inference)",
    }
    for check in ("Standard_NC24ads_A100_v4 (fine-tune, model evaluation)", "Standard_NC24ads_A100_v4 (inference)"):
        row = quota_rows[check]
        assert row["status"] == "fail"
        assert "Standard NCADSA100v4 Family Cluster Dedicated vCPUs: 0 of 0 in use, 0 free" in row["detail"]
        assert "Quota" in row["fix"] and LOCATION in row["fix"]
    assert quota_rows["Standard_d12_v2 (model import, preprocess)"]["status"] == "pass"


def test_missing_event_subscriptions_fail_with_the_command_that_creates_them(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The system topics exist but deliver nowhere (post-deploy never ran): both routes fail and name
    `azd hooks run postdeploy`; no full URL is asked for."""
    for topic in (STORAGE_TOPIC_PATH, ML_TOPIC_PATH):
        deployed.on("GET", re.escape(f"{topic}/eventSubscriptions"), Reply(200, {"value": []}))
    code, doc = doctor_json(capsys)

    assert code == 1
    failed = {r["check"]: r for r in rows(doc, "fail", "event grid")}
    assert set(failed) == {"BlobCreated -> ingest_dataset", "job events -> job_events"}
    for row in failed.values():
        assert f"delivers to {APP_HOST} (it has none)" in row["detail"]
        assert "azd hooks run postdeploy" in row["fix"]
    assert not deployed.requests("POST")


def test_a_subscription_to_the_wrong_function_fails(deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]) -> None:
    """A webhook on the app's host whose full URL names another function fails, naming both; the key
    its URL carries is not shown."""
    wrong = {"endpointUrl": f"https://{APP_HOST}/runtime/webhooks/eventgrid?functionName=janitor&code={EVENTGRID_KEY}"}
    deployed.on(
        "POST",
        re.escape(f"{ML_TOPIC_PATH}/eventSubscriptions/tunegrid-jobs-{FUNCTION_APP}/getFullUrl"),
        Reply(200, wrong),
    )
    code, out, err = run_doctor(capsys, "--json")
    doc = json.loads(out)

    assert code == 1
    [row] = rows(doc, "fail", "event grid")
    assert "delivers to function janitor, not job_events" in row["detail"]
    assert_no_secret(deployed, out, err)


# -- what cannot be read -----------------------------------------------------------------------------------
def test_the_recorded_registry_403_fails_the_registry_row_with_the_services_reason(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """azure-ai-ml's recording of a registry refusing discovery: one failing registry row with the
    service's message; quota is then not checked (no size known) and says so."""
    ref.replay(deployed, ref.RECORDED_REGISTRY_403)
    code, doc = doctor_json(capsys)

    assert code == 1
    [row] = rows(doc, "fail", "model")
    assert row["check"] == "registry azureml"
    assert "HTTP 403" in row["detail"]
    assert "User/tenant/subscription is not allowed to access registry azureml" in row["detail"]
    assert [r["detail"] for r in rows(doc, area="quota")] == ["not checked: no usable VM size was found above"]
    assert not rows(doc, area="component")


def test_without_a_token_one_sign_in_row_fails(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credential that cannot get a token: a single failing sign-in row telling to `az login`; no request is sent."""

    class SignedOut:
        def get_token(self, *scopes: str, **_: Any) -> AccessToken:
            raise ClientAuthenticationError(
                "DefaultAzureCredential failed to retrieve a token from the included credentials."
            )

    monkeypatch.setattr(doctor_command, "open_connection", lambda: (SignedOut(), deployed.transport()))
    code, doc = doctor_json(capsys)

    assert code == 1
    assert [(r["area"], r["status"]) for r in doc["checks"]] == [("sign-in", "fail")]
    assert "az login" in doc["checks"][0]["fix"]
    assert not deployed.calls


def test_without_a_workspace_it_is_a_usage_error(
    azureml_rig: AzureMLRig, clean_env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No azd environment, no settings, no flags: exit 2 naming each missing setting and its flag."""
    monkeypatch.setattr(doctor_command, "open_connection", lambda: (azureml_rig.credential, azureml_rig.transport()))
    code, out, err = run_doctor(capsys, "--json")

    assert code == 2 and out == ""
    assert "AZURE_SUBSCRIPTION_ID (--subscription)" in err and "AZUREML_WORKSPACE_NAME (--workspace)" in err
    assert not azureml_rig.calls


def test_flags_name_the_workspace_and_the_rest_is_reported_as_unknown(
    azureml_rig: AzureMLRig, clean_env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the flags (no azd environment): the workspace checks run; the app's identity and Event Grid
    warn that they were not checked, and the run still passes (warnings do not fail)."""
    rig = azureml_rig
    serve_app(rig)
    monkeypatch.setattr(doctor_command, "open_connection", lambda: (rig.credential, rig.transport()))
    code, doc = doctor_json(
        capsys, "--subscription", SUBSCRIPTION, "--resource-group", RESOURCE_GROUP, "--workspace", WORKSPACE
    )

    assert code == 0
    warned = {(r["area"], r["check"]) for r in rows(doc, "warn")}
    assert warned == {
        ("roles: app identity", "all"),
        ("event grid", "BlobCreated -> ingest_dataset"),
        ("event grid", "job events -> job_events"),
    }
    assert doc["target"]["sources"] == ["flags", "environment"]


def test_the_table_lists_every_check_and_how_to_fix_what_failed(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json: a header with the workspace and region, one aligned row per check, the fixes, the counts."""
    serve_app(deployed, permissions="permissions_monitoring_reader_only.json")
    code, out, err = run_doctor(capsys)

    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"tunegrid doctor: {WS_PATH} (eastus)"
    header = next(line for line in lines if line.startswith("STATUS"))
    assert header.split() == ["STATUS", "AREA", "CHECK", "DETAIL"]
    assert any(line.startswith("FAIL    roles: you") for line in lines)
    assert "to fix:" in lines
    assert lines[-1].endswith("4 failed")
    assert_no_secret(deployed, out, err)


def test_the_permissions_answers_are_the_role_definitions_blocks() -> None:
    """The permissions fixtures hold exactly the published roles' blocks (so the two paths agree)."""
    ds = load("role_azureml_data_scientist.json")["properties"]["permissions"]
    mr = load("role_monitoring_reader.json")["properties"]["permissions"]
    assert load("permissions_data_scientist_and_monitoring_reader.json")["value"] == ds + mr
    assert load("permissions_monitoring_reader_only.json")["value"] == mr


def test_a_throttled_read_is_retried_with_the_services_wait(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """usages answers 429 with retry-after-ms once: ServiceCaller waits and asks again; the rows pass."""
    throttled = Reply(429, {"error": {"code": "TooManyRequests", "message": "slow down"}}, {"retry-after-ms": "5"})
    deployed.on("GET", ML_LOCATIONS + "/usages", throttled, Reply(200, load("usages.json")))
    code, doc = doctor_json(capsys)

    assert code == 0
    assert len(deployed.requests("GET", r"/locations/eastus/usages$")) == 2
    assert {r["status"] for r in rows(doc, area="quota")} == {"pass"}


def test_a_pinned_model_version_that_does_not_exist_fails_naming_the_setting(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """BASE_MODEL_VERSION=99: the registry's 404 fails the base model row, the fix names BASE_MODEL_VERSION;
    no VM size can be judged, so quota says it was not checked."""
    monkeypatch.setenv("BASE_MODEL_VERSION", "99")
    deployed.on(
        "GET",
        re.escape(rig_module.REGISTRY_PATH) + "/models/Phi-4/versions/99",
        rig_module.error_reply(404, "UserError", "Not found"),
    )
    code, doc = doctor_json(capsys)

    assert code == 1
    [row] = rows(doc, "fail", "model")
    assert "model Phi-4 (version 99) in registry azureml: HTTP 404" in row["detail"]
    assert "--settings BASE_MODEL_VERSION=" in row["fix"]
    assert [r["status"] for r in rows(doc, area="quota")] == ["warn"]


def test_the_principal_id_flag_names_the_identity_whose_roles_are_read(
    deployed: AzureMLRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """--principal-id wins over the site's identity: its assignments are listed and, holding none of the
    listing's roles, every app-identity row fails, naming the roles to grant it."""
    other = "0a0b0c0d-0000-4000-8000-000000000123"
    code, doc = doctor_json(capsys, "--principal-id", other)

    assert code == 1
    assert deployed.one("GET", r"/roleAssignments$").query["$filter"] == f"principalId eq '{other}'"
    app_rows = rows(doc, area="roles: app identity")
    assert {r["status"] for r in app_rows} == {"fail"} and len(app_rows) == 5
    assert all(f"--assignee {other}" in r["fix"] for r in app_rows)
    assert doc["target"]["app_principal_id"] == other
