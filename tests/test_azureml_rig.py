"""The capture rig itself: a request no route answers, or one that tries a real socket, fails loudly."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from tests import azureml_rig as rig_module
from tests.azureml_rig import WS_PATH, AzureMLRig, Reply

no_sockets = rig_module.no_sockets  # fixture


def test_a_real_socket_is_refused(no_sockets: list[Any]) -> None:
    """Outside the rig's session, any connection attempt raises and is recorded."""
    with pytest.raises(RuntimeError, match="real socket"):
        requests.get("http://192.0.2.1:9/", timeout=1)
    assert no_sockets, "the guard did not see the attempt"
    no_sockets.clear()  # seen on purpose; the fixture's own check would fail the test otherwise


def test_unrouted_requests_are_recorded_and_answered_501(no_sockets: list[Any]) -> None:
    """A call with no route is kept in `unmatched` (the fixture then fails the test) and gets a 501."""
    rig = AzureMLRig()
    rig.serve_workspace()
    client = rig.workspace_client()
    with pytest.raises(Exception, match="RigNoRoute"):
        client.jobs.get("not-routed")
    assert [c.path for c in rig.unmatched] == [f"{WS_PATH}/jobs/not-routed"]


def test_later_routes_win_and_replies_play_in_order(no_sockets: list[Any]) -> None:
    """The newest matching route answers; its replies are used in turn and the last one repeats."""
    rig = AzureMLRig()
    rig.on("GET", "/x", Reply(500))
    route = rig.on("GET", "/x", Reply(200, {"n": 1}), Reply(200, {"n": 2}))
    session = rig.session
    assert [session.get("https://h.example/x").json()["n"] for _ in range(3)] == [1, 2, 2]
    assert len(route.calls) == 3 and not rig.unmatched
