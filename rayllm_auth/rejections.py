"""What a refused client receives: an OpenAI-shaped 401, or a WebSocket closed before accept.

Bodies follow OpenAI's error shape, so the ``openai`` SDK raises ``AuthenticationError``
with a readable message. No body ever repeats what the client sent.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

from rayllm_auth.credentials import Denial

__all__ = ["build_rejectors", "WEBSOCKET_POLICY_VIOLATION"]

#: RFC 6455 close code for "policy violation"; sent before the handshake is accepted.
WEBSOCKET_POLICY_VIOLATION = 1008

_HOW_TO_SEND = "'Authorization: Bearer <key>' or 'x-api-key: <key>'"
_MESSAGES = {
    Denial.MISSING: f"Missing API key. Send it as {_HOW_TO_SEND}.",
    Denial.MALFORMED: f"Malformed API key header. Send exactly one key, as {_HOW_TO_SEND}.",
    Denial.CONFLICTING: "The request carries more than one different API key. Send exactly one.",
    Denial.INVALID: "Incorrect API key provided.",
}
# RFC 6750 section 3: no credentials get a bare challenge, bad ones say why.
_CHALLENGES = {
    Denial.MISSING: b"Bearer",
    Denial.MALFORMED: b'Bearer error="invalid_request"',
    Denial.CONFLICTING: b'Bearer error="invalid_request"',
    Denial.INVALID: b'Bearer error="invalid_token"',
}

ASGIApp = Callable[..., Any]


def _http_rejector(denial: Denial) -> ASGIApp:
    body = json.dumps(
        {
            "error": {
                "message": _MESSAGES[denial],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        }
    ).encode()
    start = {
        "type": "http.response.start",
        "status": 401,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", _CHALLENGES[denial]),
        ],
    }
    end = {"type": "http.response.body", "body": body}

    async def reject(scope, receive, send):
        await send(start)
        await send(end)

    return reject


async def _reject_websocket(scope, receive, send):
    await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION, "reason": ""})


def build_rejectors(cors: Optional[Mapping[str, Any]]) -> dict[str, dict[Denial, ASGIApp]]:
    """``{scope type: {denial: ASGI app}}``, built once per middleware.

    With ``cors`` (the keyword arguments of the app's own ``CORSMiddleware``), each HTTP
    rejector sits behind an identical ``CORSMiddleware``: a browser preflight is answered by
    that policy without a key, and a 401 carries the same CORS headers as any other response,
    so a browser client can read it.
    """
    http = {denial: _http_rejector(denial) for denial in Denial}
    if cors is not None:
        from starlette.middleware.cors import CORSMiddleware

        http = {denial: CORSMiddleware(app, **cors) for denial, app in http.items()}
    return {"http": http, "websocket": {denial: _reject_websocket for denial in Denial}}
