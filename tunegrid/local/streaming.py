"""A streamed HTTP answer for the local endpoint's processes (the deployment server and the router).

Starlette's `StreamingResponse` notices a caller that hung up only at its next write, and leaves
closing the body iterator to the garbage collector. A deployment must stop generating as soon as its
caller is gone, whether or not a token is due, so `StreamedBody` races the caller's disconnect against
every next piece and closes the iterator itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("tunegrid.streaming")


class StreamedBody:
    """An ASGI response whose body pieces are sent as the iterator yields them; `done` runs once at the end."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        headers: list[tuple[bytes, bytes]],
        status: int = 200,
        done: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._headers = headers
        self._status = status
        self._done = done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def hung_up() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(hung_up())
        try:
            await send({"type": "http.response.start", "status": self._status, "headers": self._headers})
            while True:
                following = asyncio.ensure_future(anext(self._chunks, None))
                await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():  # the caller went away: stop whatever produces the pieces
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)
                    return
                chunk = following.result()
                if chunk is None:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the caller went away while we wrote
        finally:
            gone.cancel()
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # type: ignore[attr-defined]
            if self._done is not None:
                self._done()
