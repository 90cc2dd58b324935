"""Every way rayllm-auth refuses a request, and what the client receives for each.

One :class:`Refusal` per reason: its outcome label (logs and metrics), HTTP status, OpenAI
error code, message and ``WWW-Authenticate`` challenge. :class:`Answers` turns them into ASGI
responses, built once per middleware: an OpenAI-shaped JSON error (the ``openai`` SDK raises
``AuthenticationError``, ``PermissionDeniedError``, ``NotFoundError``... with a readable
message) behind the app's own CORS policy, or, for a WebSocket, a close before the handshake
is accepted. No answer repeats what the client sent, beyond what the app's own CORS policy
reflects to that client (its ``Origin``, a preflight's requested headers), as the app does.
"""

from __future__ import annotations

import enum
import functools
import json
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

__all__ = ["Refusal", "Answers", "WEBSOCKET_POLICY_VIOLATION", "rate_limit_headers"]

#: RFC 6455 close code for "policy violation"; sent before the handshake is accepted.
WEBSOCKET_POLICY_VIOLATION = 1008

ASGIApp = Callable[..., Any]

_HOW_TO_SEND = "'Authorization: Bearer <key>' or 'x-api-key: <key>'"


class _Spec(NamedTuple):
    outcome: str  #: label in logs and in the rayllm_auth_requests metric
    status: int
    code: str
    message: str
    param: Optional[str] = None
    challenge: Optional[bytes] = None  #: WWW-Authenticate (RFC 6750 section 3)
    error_type: str = "invalid_request_error"  #: OpenAI's error "type"


class Refusal(_Spec, enum.Enum):
    # No credentials get a bare challenge; bad ones say why (RFC 6750 section 3).
    MISSING = _Spec("missing", 401, "invalid_api_key",
                    f"Missing API key. Send it as {_HOW_TO_SEND}.", challenge=b"Bearer")
    MALFORMED = _Spec("malformed", 401, "invalid_api_key",
                      f"Malformed API key header. Send exactly one key, as {_HOW_TO_SEND}.",
                      challenge=b'Bearer error="invalid_request"')
    CONFLICTING = _Spec("conflicting", 401, "invalid_api_key",
                        "The request carries more than one different API key. Send exactly one.",
                        challenge=b'Bearer error="invalid_request"')
    INVALID = _Spec("invalid", 401, "invalid_api_key", "Incorrect API key provided.",
                    challenge=b'Bearer error="invalid_token"')
    EXPIRED = _Spec("expired", 401, "invalid_api_key", "This API key has expired.",
                    challenge=b'Bearer error="invalid_token", error_description="expired"')
    # A key limited to some models (outcome model_denied): the same 404 whether the model
    # exists or not, so a key cannot probe what else is deployed.
    MODEL_NOT_FOUND = _Spec("model_denied", 404, "model_not_found",
                            "The model does not exist or you do not have access to it.",
                            param="model")
    MODEL_REQUIRED = _Spec("model_denied", 400, "model_required",
                           "This API key is limited to some models: name the model in the "
                           "request's 'model' field.", param="model")
    ROUTE_DENIED = _Spec("model_denied", 403, "permission_denied",
                         "This API key is limited to some models, and this route is not "
                         "known to use only the model the request names.")
    TOO_LARGE = _Spec("model_denied", 413, "request_too_large",
                      "Request body too large for a key limited to some models.")
    # Token accounting, or a key with tpm= (outcome too_large): a body it must read to ask
    # for a stream's usage.
    BODY_TOO_LARGE = _Spec("too_large", 413, "request_too_large",
                           "Request body too large: with token accounting on, or a limit of "
                           "tokens per minute, request bodies of completions, chat and "
                           "embeddings are read, up to 64 MiB.")
    # A key over its rpm=, concurrency= or tpm= (outcome rate_limited): OpenAI's 429, which the
    # openai SDK retries after Retry-After; the answer carries the rate-limit headers.
    RPM_EXCEEDED = _Spec("rate_limited", 429, "rate_limit_exceeded",
                         "Rate limit reached for requests per minute (RPM) of this API key. "
                         "Please try again after the time in the Retry-After header.",
                         error_type="requests")
    CONCURRENCY_EXCEEDED = _Spec("rate_limited", 429, "rate_limit_exceeded",
                                 "Too many requests in flight for this API key. Please try "
                                 "again when one of them has finished.", error_type="requests")
    TPM_EXCEEDED = _Spec("rate_limited", 429, "rate_limit_exceeded",
                         "Rate limit reached for tokens per minute (TPM) of this API key. "
                         "Please try again after the time in the Retry-After header.",
                         error_type="tokens")


class Answers:
    """``answers(refusal, scope)`` -> the ASGI app that answers it for that scope.

    With ``cors`` (the keyword arguments of the app's own ``CORSMiddleware``), every HTTP
    answer sits behind an identical ``CORSMiddleware``: a browser preflight is answered by
    that policy without a key, and an error carries the same CORS headers as any other
    response, so a browser client can read it.
    """

    def __init__(self, cors: Optional[Mapping[str, Any]]):
        self._cors = cors
        self._http = {refusal: _with_cors(_error_response(refusal), cors) for refusal in Refusal}

    def __call__(self, refusal: Refusal, scope, headers: Sequence[tuple[bytes, bytes]] = ()
                 ) -> ASGIApp:
        """``headers``: more response headers (a 429's Retry-After and rate-limit headers)."""
        if scope["type"] != "http":
            return _close_websocket
        if headers:
            return _with_cors(_error_response(refusal, headers), self._cors)
        return self._http[refusal]


def _error_response(refusal: Refusal, extra_headers: Sequence[tuple[bytes, bytes]] = ()
                    ) -> ASGIApp:
    body = json.dumps({"error": {"message": refusal.message, "type": refusal.error_type,
                                 "param": refusal.param, "code": refusal.code}}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), *extra_headers]
    if refusal.challenge is not None:
        headers.append((b"www-authenticate", refusal.challenge))

    async def respond(scope, receive, send):
        # New messages each time: what they pass through (the app's CORS policy) may change
        # them, and one answer must never carry what an earlier client sent.
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})

    return respond


def _with_cors(app: ASGIApp, cors: Optional[Mapping[str, Any]]) -> ASGIApp:
    if cors is None:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, **cors)


async def _close_websocket(scope, receive, send):
    await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION, "reason": ""})


def rate_limit_headers(verdict) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers for a limited key's request (a
    :class:`~rayllm_auth.quota.Verdict`): the requests-per-minute and tokens-per-minute
    limits, what is left of each and when its window frees some; on a refusal,
    ``Retry-After`` (whole seconds, as the ``openai`` SDK and HTTP read it) and
    ``retry-after-ms``."""
    headers = [] if verdict.limit is None else _window_headers(
        b"requests", verdict.limit, verdict.remaining, verdict.reset_s)
    if verdict.token_limit is not None:
        headers += _window_headers(b"tokens", verdict.token_limit, verdict.token_remaining,
                                   verdict.token_reset_s)
    if verdict.refused is not None:
        wait = max(verdict.retry_after_s, 0.001)
        headers += [(b"retry-after", str(math.ceil(wait)).encode()),
                    (b"retry-after-ms", str(math.ceil(wait * 1000)).encode())]
    return headers


def _window_headers(unit: bytes, limit: int, remaining: int, reset_s: float) -> list:
    """The limit, remaining and reset headers of one window (``unit``: requests or tokens)."""
    limit_header, reset_header = _limit_and_reset(unit, limit, reset_s)
    return [limit_header, (b"x-ratelimit-remaining-" + unit, b"%d" % remaining), reset_header]


# Cached: a limited key's every response carries these, and between two leases the limit
# and the reset time do not change (what remains does: not cached).
@functools.lru_cache(maxsize=1024)
def _limit_and_reset(unit: bytes, limit: int, reset_s: float) -> tuple[tuple, tuple]:
    return ((b"x-ratelimit-limit-" + unit, b"%d" % limit),
            (b"x-ratelimit-reset-" + unit, _duration(reset_s)))


def _duration(seconds: float) -> bytes:
    """OpenAI's (Go's) way of writing a duration, rounded up to the millisecond: ``120ms``,
    ``1.5s``, ``6m0s``."""
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms".encode()
    minutes, millis = divmod(millis, 60_000)
    text = f"{millis / 1000:g}s"
    return f"{minutes}m{text}".encode() if minutes else text.encode()
