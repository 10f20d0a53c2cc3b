"""Do the roles allow what the app does? Azure RBAC's own arithmetic on `actions` / `notActions`.

A permission block (one per role assignment in the caller's `permissions` answer, or a role
definition's `permissions`) allows an action when one of its `actions` matches it and none of its
`notActions` does; the effective permissions are the union of the blocks. Action patterns use `*` as
a wildcard and compare case-insensitively (Azure's "Understand role definitions"), which is what
`fnmatch.fnmatchcase` does on lower-cased strings (`?` and `[` never occur in an action name).

What is not evaluated: deny assignments, role-assignment conditions (ABAC), and, for the app's
identity, assignments it gets through a group. The caller's `permissions` answer already includes
group assignments; for the app's identity the doctor reads its direct assignments.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunegrid.doctor.report import CheckResult, Status

ML = "Microsoft.MachineLearningServices/workspaces"
DATA_SCIENTIST = "AzureML Data Scientist"
MONITORING_READER = "Monitoring Reader"


@dataclass(frozen=True)
class PermissionBlock:
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    data_actions: tuple[str, ...] = ()
    not_data_actions: tuple[str, ...] = ()
    source: str = ""
    """Where the block came from (a role name), for messages."""


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value or () if str(v).strip())


def block(doc: Mapping[str, Any], *, source: str = "") -> PermissionBlock:
    return PermissionBlock(
        actions=_strings(doc.get("actions")),
        not_actions=_strings(doc.get("notActions")),
        data_actions=_strings(doc.get("dataActions")),
        not_data_actions=_strings(doc.get("notDataActions")),
        source=source,
    )


def permissions_answer(doc: Mapping[str, Any]) -> list[PermissionBlock]:
    """`GET {scope}/providers/Microsoft.Authorization/permissions`: `{"value": [{actions, notActions, ...}]}`."""
    return [block(item) for item in doc.get("value") or [] if isinstance(item, Mapping)]


def role_definition(doc: Mapping[str, Any]) -> list[PermissionBlock]:
    """`GET {roleDefinitionId}`: the role's `properties.permissions`, named after `properties.roleName`."""
    props = doc.get("properties") or {}
    name = str(props.get("roleName") or doc.get("name") or "")
    return [block(item, source=name) for item in props.get("permissions") or [] if isinstance(item, Mapping)]


def matches(pattern: str, action: str) -> bool:
    return fnmatch.fnmatchcase(action.lower(), pattern.strip().lower())


def allows(blocks: Iterable[PermissionBlock], action: str, *, data: bool = False) -> bool:
    for b in blocks:
        granted, denied = (b.data_actions, b.not_data_actions) if data else (b.actions, b.not_actions)
        if any(matches(p, action) for p in granted) and not any(matches(p, action) for p in denied):
            return True
    return False


# -- what the app does, and the built-in role that allows it --------------------------------------------
@dataclass(frozen=True)
class Capability:
    name: str
    actions: tuple[str, ...]
    role: str
    why: str


CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "submit a fine-tune job",
        (f"{ML}/jobs/read", f"{ML}/jobs/write"),
        DATA_SCIENTIST,
        "ingest submits the chat_completion_pipeline job",
    ),
    Capability(
        "register a model",
        (f"{ML}/models/versions/read", f"{ML}/models/versions/write"),
        DATA_SCIENTIST,
        "roll-out registers the fine-tuned MLflow model",
    ),
    Capability(
        "manage online endpoints and deployments",
        (
            f"{ML}/onlineEndpoints/read",
            f"{ML}/onlineEndpoints/write",
            f"{ML}/onlineEndpoints/delete",
            f"{ML}/onlineEndpoints/deployments/read",
            f"{ML}/onlineEndpoints/deployments/write",
            f"{ML}/onlineEndpoints/deployments/delete",
        ),
        DATA_SCIENTIST,
        "roll-out deploys beside the old deployment and the janitor deletes idle endpoints",
    ),
    Capability(
        "list endpoint keys and tokens",
        (f"{ML}/onlineEndpoints/listKeys/action", f"{ML}/onlineEndpoints/token/action"),
        DATA_SCIENTIST,
        "the scoring proxy and the smoke test call the endpoint with its key or token",
    ),
    Capability(
        "read endpoint metrics",
        ("Microsoft.Insights/metrics/read",),
        MONITORING_READER,
        "the janitor reads RequestsPerMinute through the per-resource metrics API",
    ),
)


@dataclass(frozen=True)
class Subject:
    """Whose roles a row is about, and how a missing one is graded."""

    label: str
    """`you` or `app identity`."""
    who: str
    """For sentences: "you (the signed-in caller)", "the app's identity 1234…"."""
    grant_to: str
    """For the fix: the assignee argument of `az role assignment create`."""
    soft: frozenset[str] = frozenset()
    """Capabilities whose absence is only a warning for this subject."""
    note: str = ""
    """Appended to a missing row (e.g. that group assignments were not resolved)."""


def missing_actions(blocks: Sequence[PermissionBlock], capability: Capability) -> list[str]:
    return [a for a in capability.actions if not allows(blocks, a)]


def capability_results(
    blocks: Sequence[PermissionBlock], subject: Subject, *, scope: str, scope_label: str
) -> list[CheckResult]:
    """One row per capability: pass, or fail (warn where the subject only needs it softly) naming the
    missing actions and the built-in role that grants them."""
    out: list[CheckResult] = []
    area = f"roles: {subject.label}"
    for cap in CAPABILITIES:
        missing = missing_actions(blocks, cap)
        if not missing:
            out.append(CheckResult(area, cap.name, Status.PASS, f"allowed on {scope_label}"))
            continue
        status = Status.WARN if cap.name in subject.soft else Status.FAIL
        detail = (
            f"not allowed for {subject.who} on {scope_label}: {', '.join(missing)} ({cap.why}); "
            f"the built-in role {cap.role} grants it{subject.note}"
        )
        fix = f'az role assignment create --assignee {subject.grant_to} --role "{cap.role}" --scope {scope}'
        out.append(CheckResult(area, cap.name, status, detail, fix))
    return out


def covers(assignment_scope: str, scope: str) -> bool:
    """An assignment at `assignment_scope` applies at `scope` when it is that scope or one above it."""
    above = assignment_scope.strip().rstrip("/").lower()
    target = scope.strip().rstrip("/").lower()
    return above in ("", "/") or target == above or target.startswith(above + "/")


def assignments_at(doc: Mapping[str, Any], *, principal_id: str, scope: str) -> list[str]:
    """Role definition ids of the principal's assignments that apply at `scope`, from a role-assignment
    listing (`$filter=principalId eq '…'` returns those at, above and below the scope)."""
    ids: list[str] = []
    for item in doc.get("value") or []:
        props = item.get("properties") or {}
        if str(props.get("principalId") or "").lower() != principal_id.lower():
            continue
        if not covers(str(props.get("scope") or ""), scope):
            continue
        role_id = str(props.get("roleDefinitionId") or "")
        if role_id and role_id not in ids:
            ids.append(role_id)
    return ids


def app_principal(site: Mapping[str, Any], *, client_id: str = "") -> tuple[str, str]:
    """(principal id, where it was read) of the Function App's identity from its `Microsoft.Web/sites`
    document: the user-assigned identity whose client id is AZURE_CLIENT_ID, else the only one, else
    the system-assigned identity. Empty when the site has no identity or several and none is named."""
    identity = site.get("identity") or {}
    users = identity.get("userAssignedIdentities") or {}
    chosen = [
        (rid, v)
        for rid, v in users.items()
        if isinstance(v, Mapping) and (not client_id or str(v.get("clientId") or "").lower() == client_id.lower())
    ]
    if len(chosen) == 1 and chosen[0][1].get("principalId"):
        rid, value = chosen[0]
        return str(value["principalId"]), f"user-assigned identity {rid.rsplit('/', 1)[-1]}"
    if not users and identity.get("principalId"):
        return str(identity["principalId"]), "system-assigned identity"
    return "", ""
