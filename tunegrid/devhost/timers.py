"""Timer triggers on 6-field NCRONTAB schedules (`second minute hour day month day-of-week`, UTC) or
TimeSpan intervals (`hh:mm:ss`), with the host's `run_on_startup` and `past_due` semantics.

The schedule status (last and next occurrence) is kept per function in `timers.json` under the dev
host's state folder, like the host's `azure-webjobs-hosts/timers/...` blobs: when the host was down
across a scheduled occurrence, the first invocation after start has `past_due=True`. One timer never
runs two invocations at once; occurrences missed while an invocation overran collapse into one late
(`past_due`) invocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import azure.functions as func
from croniter import croniter

from shared.domain.clock import utcnow
from shared.errors import ConfigError
from tunegrid.devhost.catalog import FunctionSpec
from tunegrid.devhost.invoker import Invoker

log = logging.getLogger("tunegrid.devhost")

_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})$")


class TimerSchedule:
    """`next_after(t)`: the first occurrence strictly after `t`."""

    def __init__(self, expression: str) -> None:
        self.expression = expression.strip()
        self.interval: dt.timedelta | None = None
        span = _TIMESPAN.match(self.expression)
        if span:
            days, hours, minutes, seconds = (int(g) if g else 0 for g in span.groups())
            self.interval = dt.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
            if self.interval <= dt.timedelta(0):
                raise ConfigError(f"timer interval {expression!r} must be positive")
            return
        if len(self.expression.split()) != 6:
            raise ConfigError(
                f"timer schedule {expression!r} is not a 6-field NCRONTAB expression (second minute hour day month day-of-week)"
            )
        if not croniter.is_valid(self.expression, second_at_beginning=True):
            raise ConfigError(f"timer schedule {expression!r} is not a valid NCRONTAB expression")

    def next_after(self, when: dt.datetime) -> dt.datetime:
        if self.interval is not None:
            return when + self.interval
        nxt = croniter(self.expression, when, second_at_beginning=True).get_next(dt.datetime)
        return nxt if nxt.tzinfo else nxt.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class ScheduleStatus:
    schedule: str
    last: dt.datetime | None
    next: dt.datetime
    last_updated: dt.datetime

    def as_timer_status(self) -> dict[str, str]:
        """The `ScheduleStatus` dict the host passes in `TimerRequest.schedule_status`."""
        out = {"Next": self.next.isoformat(), "LastUpdated": self.last_updated.isoformat()}
        out["Last"] = self.last.isoformat() if self.last else dt.datetime.min.replace(tzinfo=dt.UTC).isoformat()
        return out


class TimerStatusStore:
    """`{function: {schedule, last, next, lastUpdated}}` in one JSON file, written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self, function: str) -> ScheduleStatus | None:
        raw = self._read().get(function)
        if not isinstance(raw, dict):
            return None
        try:
            return ScheduleStatus(
                schedule=str(raw["schedule"]),
                last=dt.datetime.fromisoformat(raw["last"]) if raw.get("last") else None,
                next=dt.datetime.fromisoformat(raw["next"]),
                last_updated=dt.datetime.fromisoformat(raw["lastUpdated"]),
            )
        except (KeyError, ValueError):
            return None

    def put(self, function: str, status: ScheduleStatus) -> None:
        with self._lock:
            doc = self._read()
            doc[function] = {
                "schedule": status.schedule,
                "last": status.last.isoformat() if status.last else None,
                "next": status.next.isoformat(),
                "lastUpdated": status.last_updated.isoformat(),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
            tmp.replace(self.path)


class TimerScheduler:
    """One loop per timer function."""

    def __init__(
        self,
        specs: Sequence[FunctionSpec],
        invoker: Invoker,
        *,
        store: TimerStatusStore,
        late_tolerance_s: float = 1.0,
    ) -> None:
        self._invoker = invoker
        self._store = store
        self._late = dt.timedelta(seconds=late_tolerance_s)
        self._timers: dict[str, tuple[FunctionSpec, TimerSchedule]] = {}
        self._errors: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        for spec in specs:
            try:
                self._timers[spec.name] = (spec, TimerSchedule(str(spec.trigger.get("schedule", ""))))
            except ConfigError as exc:
                self._errors[spec.name] = str(exc)

    @property
    def errors(self) -> Mapping[str, str]:
        return self._errors

    @property
    def schedules(self) -> dict[str, str]:
        return {name: schedule.expression for name, (_, schedule) in self._timers.items()}

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def run(self, stopping: asyncio.Event) -> None:
        loops = [
            asyncio.create_task(self._run_one(spec, schedule, stopping)) for spec, schedule in self._timers.values()
        ]
        if loops:
            await asyncio.gather(*loops)

    async def run_now(self, name: str) -> None:
        """Invoke a timer on request (the admin API), never alongside its scheduled run."""
        spec, schedule = self._timers[name]
        now = utcnow()
        status = ScheduleStatus(schedule.expression, None, schedule.next_after(now), now)
        await self._fire(
            spec, status, past_due=False, reason="This function was programmatically called via the host APIs."
        )

    async def _fire(self, spec: FunctionSpec, status: ScheduleStatus, *, past_due: bool, reason: str) -> None:
        request = func.timer.TimerRequest(
            past_due=past_due,
            schedule_status=status.as_timer_status(),
            schedule={"AdjustForDST": True},
        )
        async with self._lock(spec.name):
            with contextlib.suppress(Exception):  # the invoker logged it; a timer keeps its schedule
                await self._invoker.invoke(spec, request, reason=reason, extra={"past_due": past_due})

    async def _run_one(self, spec: FunctionSpec, schedule: TimerSchedule, stopping: asyncio.Event) -> None:
        try:
            await self._schedule_loop(spec, schedule, stopping)
        except Exception:
            log.exception("timer %s stopped: its schedule loop failed", spec.name, extra={"function": spec.name})

    async def _schedule_loop(self, spec: FunctionSpec, schedule: TimerSchedule, stopping: asyncio.Event) -> None:
        name = spec.name
        previous = self._store.get(name)
        if previous is not None and previous.schedule != schedule.expression:
            previous = None  # the schedule changed: the old status says nothing about missed runs
        now = utcnow()
        last = previous.last if previous else None
        if previous is not None and previous.next < now:
            following = schedule.next_after(now)
            log.info(
                "timer %s is past due (missed %s while the host was down)",
                name,
                previous.next.isoformat(),
                extra={"function": name},
            )
            status = ScheduleStatus(schedule.expression, previous.next, following, now)
            await self._fire(spec, status, past_due=True, reason="Timer fired (past due)")
            last = previous.next
        elif spec.trigger.get("runOnStartup"):
            status = ScheduleStatus(schedule.expression, last, schedule.next_after(now), now)
            await self._fire(spec, status, past_due=False, reason="Timer fired at startup")
        next_at = schedule.next_after(utcnow())
        self._store.put(name, ScheduleStatus(schedule.expression, last, next_at, utcnow()))
        log.info("timer %s: next run at %s", name, next_at.isoformat(), extra={"function": name})
        while not stopping.is_set():
            delay = (next_at - utcnow()).total_seconds()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)
                if stopping.is_set():
                    break
            fired_at = utcnow()
            past_due = fired_at - next_at > self._late
            following = schedule.next_after(fired_at if past_due else next_at)
            status = ScheduleStatus(schedule.expression, next_at, following, fired_at)
            await self._fire(spec, status, past_due=past_due, reason="Timer fired")
            self._store.put(name, ScheduleStatus(schedule.expression, next_at, following, utcnow()))
            next_at = following
