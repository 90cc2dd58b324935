"""Reading a request's body in the middleware, and giving it to the app afterwards.

Used by :mod:`rayllm_auth.model_scope` (to find the models a request names) and
:mod:`rayllm_auth.usage` (to ask the engine for a stream's usage). FastAPI reads a body in
full before its handler runs anyway, so reading it first costs no streaming.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["read_body", "replay"]


async def read_body(receive, limit: int) -> Optional[bytes]:
    """The whole request body, or None if the client disconnected. Stops reading once the
    body is over ``limit`` bytes and returns what it has (callers refuse such a body: what
    is left of it is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit or not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that gives the app ``body`` (read before), then the client's own
    messages (so the app still sees a disconnect during a streamed response)."""
    sent = False

    async def replaying():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying
