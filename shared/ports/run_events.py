"""The run-events port: where the app announces run state changes (`shared.adapters.run_events` over Event Grid)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class RunEvents(Protocol):
    """Publishes pending run events (`shared.domain.run_events.run_event` dicts) as CloudEvents.

    `publish` sends the events in the order given, all or nothing, and raises when they were not accepted:
    `InvalidInput` when the topic refuses them for good (they would never be accepted), `PermissionDenied`
    when the identity lacks the sender role, `TransientError` for anything worth trying again later."""

    @property
    def enabled(self) -> bool: ...

    def publish(self, events: Sequence[Mapping[str, Any]]) -> None: ...
