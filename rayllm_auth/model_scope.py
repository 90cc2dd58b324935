"""Per-key model allowlists: what a key limited to some models may reach.

Only requests with a limited key come here; keys without ``models=`` never pay for it. The
rule, applied in the middleware before the app sees the request, so it is the same in every
serving mode (Ray's ingress app, and vLLM's own app under direct streaming):

* ``GET /v1/models``: the app's answer, with the models the key may not use removed.
* ``/v1/models/{id}``: the id must be allowed.
* ``GET``/``HEAD``/``OPTIONS`` elsewhere (docs, health): pass; they name no model.
* every other request (``POST`` completions, chat, embeddings, transcriptions, score,
  tokenize, admin routes...): the body is read in full (FastAPI reads it in full anyway before
  the handler runs), its ``model`` field is taken from JSON, multipart or urlencoded form data,
  and the body is then replayed to the app unchanged. Responses are not touched, so streaming
  is unaffected. A body without a ``model`` gets 400: with a limited key, the model must be
  named (Ray would otherwise pick the only model itself).
* WebSocket handshakes are refused (close 1008): no model is known before accepting.

A model the key may not use gets the same 404 ``model_not_found`` whether it exists or not, so
a key cannot probe which models are deployed. A LoRA id ``base:adapter`` follows its base
model's rule (:meth:`rayllm_auth.keys.Grant.allows`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

from starlette._utils import get_route_path
from starlette.datastructures import Headers

from rayllm_auth.keys import Grant
from rayllm_auth.rejections import error_response, reject_websocket, with_cors

__all__ = ["ModelScope", "MAX_SCOPED_BODY_BYTES"]

#: Largest request body read to find the model (OpenAI's audio upload limit is 25 MB).
MAX_SCOPED_BODY_BYTES = 64 * 1024 * 1024
_MODELS = "/v1/models"
_MODEL_PREFIX = "/v1/models/"
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


class ModelScope:
    """Runs a request made with a limited key: ``await model_scope(app, grant, scope,
    receive, send)`` returns True if the request was passed to the app, False if it was
    refused here (counted as ``model_denied``)."""

    def __init__(self, cors: Optional[Mapping[str, Any]]):
        self._not_found = with_cors(error_response(
            404, "The model does not exist or you do not have access to it.",
            "model_not_found", param="model"), cors)
        self._model_required = with_cors(error_response(
            400, "This API key is limited to some models: name the model in the request's "
                 "'model' field.", "model_required", param="model"), cors)
        self._too_large = with_cors(error_response(
            413, f"Request bodies over {MAX_SCOPED_BODY_BYTES} bytes are refused for keys "
                 f"limited to some models.", "request_too_large"), cors)

    async def __call__(self, app, grant: Grant, scope, receive, send) -> bool:
        if scope["type"] != "http":
            await reject_websocket(scope, receive, send)
            return False
        method, path = scope["method"], get_route_path(scope)
        if path == _MODELS and method == "GET":
            await app(scope, receive, _FilteredModelList(send, grant))
            return True
        if path.startswith(_MODEL_PREFIX):
            return await self._gate(grant.allows(path[len(_MODEL_PREFIX):]),
                                    app, scope, receive, send)
        if method in _BODYLESS:
            await app(scope, receive, send)
            return True
        body = await _read_body(receive)
        if body is None:
            return True  # the client went away before sending its body: nothing to answer
        if len(body) > MAX_SCOPED_BODY_BYTES:
            await self._too_large(scope, receive, send)
            return False
        model = await _model_in_body(scope, body)
        if model is None:
            await self._model_required(scope, receive, send)
            return False
        return await self._gate(grant.allows(model), app, scope, _replay(body, receive), send)

    async def _gate(self, allowed: bool, app, scope, receive, send) -> bool:
        if allowed:
            await app(scope, receive, send)
        else:
            await self._not_found(scope, receive, send)
        return allowed


async def _read_body(receive) -> Optional[bytes]:
    """The whole request body, or None if the client disconnected. Stops reading (and
    returns what it has) once the body is over the limit."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_SCOPED_BODY_BYTES or not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that gives the app the body already read, then the client's own
    messages (so the app still sees a disconnect during a streamed response)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _model_in_body(scope, body: bytes) -> Optional[str]:
    """The ``model`` field of a JSON, multipart or urlencoded body; None if there is none or
    the body cannot be read (never raises on hostile bytes)."""
    headers = Headers(scope=scope)
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    try:
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            from starlette.requests import Request

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(scope, receive).form(max_files=1000, max_fields=1000)
            try:
                model = form.get("model")
            finally:
                await form.close()
        else:
            document = json.loads(body)
            model = document.get("model") if isinstance(document, dict) else None
    except Exception:  # malformed JSON or form data: no model can be read from it
        return None
    return model if isinstance(model, str) else None


class _FilteredModelList:
    """``send`` for ``GET /v1/models``: buffers the (small, non-streamed) list and removes the
    models the key may not use. A 200 whose body is not a model list becomes an empty list:
    an unexpected answer must not leak the full list."""

    def __init__(self, send, grant: Grant):
        self._send, self._grant = send, grant
        self._start: Optional[dict] = None
        self._chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body" or self._start is None:
            return await self._send(message)
        self._chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self._chunks)
        if self._start["status"] == 200:
            body = self._filter(body)
        headers = [(k, v) for k, v in self._start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})

    def _filter(self, body: bytes) -> bytes:
        try:
            listing = json.loads(body)
            listing["data"] = [m for m in listing["data"]
                               if isinstance(m, dict) and self._grant.allows(str(m.get("id")))]
        except Exception:
            listing = {"object": "list", "data": []}
        return json.dumps(listing).encode()
