"""What a refused client receives: an OpenAI-shaped 401, or a WebSocket closed before accept.

Bodies follow OpenAI's error shape, so the ``openai`` SDK raises ``AuthenticationError``
with a readable message. No body ever repeats what the client sent.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

from rayllm_auth.credentials import Denial

__all__ = ["build_rejectors", "error_response", "with_cors", "reject_websocket",
           "WEBSOCKET_POLICY_VIOLATION"]

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


def error_response(status: int, message: str, code: str, param=None, headers=()) -> ASGIApp:
    """An ASGI app answering every request with one OpenAI-shaped JSON error."""
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": param,
                   "code": code}}
    ).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    end = {"type": "http.response.body", "body": body}

    async def respond(scope, receive, send):
        await send(start)
        await send(end)

    return respond


def with_cors(app: ASGIApp, cors: Optional[Mapping[str, Any]]) -> ASGIApp:
    """``app`` behind the app's own CORS policy (``cors``: its CORSMiddleware options), so a
    browser can read the error like any other response; ``app`` itself without a policy."""
    if cors is None:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, **cors)


def _http_rejector(denial: Denial) -> ASGIApp:
    return error_response(401, _MESSAGES[denial], "invalid_api_key",
                          headers=[(b"www-authenticate", _CHALLENGES[denial])])


async def reject_websocket(scope, receive, send):
    await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION, "reason": ""})


def build_rejectors(cors: Optional[Mapping[str, Any]]) -> dict[str, dict[Denial, ASGIApp]]:
    """``{scope type: {denial: ASGI app}}``, built once per middleware.

    With ``cors`` (the keyword arguments of the app's own ``CORSMiddleware``), each HTTP
    rejector sits behind an identical ``CORSMiddleware``: a browser preflight is answered by
    that policy without a key, and a 401 carries the same CORS headers as any other response,
    so a browser client can read it.
    """
    http = {denial: with_cors(_http_rejector(denial), cors) for denial in Denial}
    return {"http": http, "websocket": {denial: reject_websocket for denial in Denial}}
