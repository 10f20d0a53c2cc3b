"""Calls user functions as the Python worker does: `async def` on the event loop, plain functions in a
thread pool, a `context` argument when the function declares one, one invocation id per call."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import azure.functions as func
from azure.functions import _abc as functions_abc

from tunegrid.devhost.catalog import FunctionSpec

log = logging.getLogger("tunegrid.devhost")


class _TraceContext(functions_abc.TraceContext):
    def __init__(self) -> None:
        self._parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-00"

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(functions_abc.RetryContext):
    def __init__(self, retry_count: int, max_retry_count: int) -> None:
        self._count = retry_count
        self._max = max_retry_count

    @property
    def retry_count(self) -> int:
        return self._count

    @property
    def max_retry_count(self) -> int:
        return self._max

    @property
    def exception(self) -> Any:
        return None


class InvocationContext(func.Context):
    """The `context` argument: invocation id, function name and directory, trace and retry context."""

    def __init__(
        self, invocation_id: str, function_name: str, directory: str, *, retry_count: int = 0, max_retry_count: int = 0
    ) -> None:
        self._id = invocation_id
        self._name = function_name
        self._directory = directory
        self._local = threading.local()
        self._local.invocation_id = invocation_id
        self._trace = _TraceContext()
        self._retry = _RetryContext(retry_count, max_retry_count)

    @property
    def invocation_id(self) -> str:
        return self._id

    @property
    def thread_local_storage(self) -> Any:
        return self._local

    @property
    def function_name(self) -> str:
        return self._name

    @property
    def function_directory(self) -> str:
        return self._directory

    @property
    def trace_context(self) -> Any:
        return self._trace

    @property
    def retry_context(self) -> Any:
        return self._retry


@dataclass(frozen=True)
class RetryPolicy:
    """How often the host tries one delivery, with exponential backoff between tries."""

    tries: int
    first_delay_s: float
    max_delay_s: float = 30.0

    def delay_after(self, failed_attempt: int) -> float:
        return float(min(self.max_delay_s, self.first_delay_s * 2 ** (failed_attempt - 1)))


@dataclass
class Invoker:
    """Runs invocations and keeps count of those in flight, so shutdown can wait for them."""

    function_directory: str = ""
    max_workers: int = field(default_factory=lambda: min(32, (os.cpu_count() or 1) + 4))

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="devhost-fn")
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def _enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no invocation is running (True) or the timeout passes (False)."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def arguments(
        self,
        spec: FunctionSpec,
        trigger_value: Any,
        invocation_id: str,
        *,
        retry_count: int = 0,
        max_retry_count: int = 0,
    ) -> dict[str, Any]:
        kwargs = {spec.trigger_param: trigger_value}
        if spec.wants_context:
            kwargs["context"] = InvocationContext(
                invocation_id,
                spec.name,
                self.function_directory,
                retry_count=retry_count,
                max_retry_count=max_retry_count,
            )
        return kwargs

    async def call(self, spec: FunctionSpec, kwargs: Mapping[str, Any]) -> Any:
        """Run the function with these arguments (no logging: the hot HTTP path calls this)."""
        self._enter()
        try:
            if spec.is_async:
                return await spec.user_function(**kwargs)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, lambda: spec.user_function(**kwargs))
        finally:
            self._leave()

    async def invoke(
        self,
        spec: FunctionSpec,
        trigger_value: Any,
        *,
        reason: str,
        invocation_id: str | None = None,
        retry_count: int = 0,
        max_retry_count: int = 0,
        extra: Mapping[str, Any] | None = None,
    ) -> Any:
        """One logged invocation: 'Executing', then 'Executed' with outcome and duration. Re-raises."""
        invocation_id = invocation_id or str(uuid.uuid4())
        fields = {"invocation_id": invocation_id, "function": spec.name, **(extra or {})}
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, invocation_id, extra=fields)
        started = time.perf_counter()
        kwargs = self.arguments(
            spec, trigger_value, invocation_id, retry_count=retry_count, max_retry_count=max_retry_count
        )
        try:
            result = await self.call(spec, kwargs)
        except Exception as exc:
            log.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%dms): %s: %s",
                spec.name,
                invocation_id,
                (time.perf_counter() - started) * 1000,
                type(exc).__name__,
                exc,
                exc_info=exc,
                extra=fields,
            )
            raise
        log.info(
            "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%dms)",
            spec.name,
            invocation_id,
            (time.perf_counter() - started) * 1000,
            extra=fields,
        )
        return result

    def close(self, *, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=not wait)
