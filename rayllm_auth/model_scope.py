"""What a key limited to some models may reach. Deny by default.

Only requests with a limited key come here; keys without ``models=`` never pay for it. The
check runs in the middleware before the app sees the request, so it is the same in every
serving mode. Each route is looked up in :data:`ROUTES`, which says where the route takes its
model from (read from Ray's and vLLM's own route code, see the README's route-by-route table):

* ``NONE`` (docs, health): passes; it names no model.
* ``LIST`` (``GET /v1/models``): the app's answer, with the models the key may not use removed.
* ``PATH`` (``GET /v1/models/{id}``): the id, as Ray maps it (``--`` becomes ``/``), must be
  allowed.
* ``QUERY`` (``GET /is_sleeping?model=``): every ``model`` in the query string must be allowed.
* ``BODY`` (``POST`` completions, chat, embeddings, admin routes...): the body is read in full
  (FastAPI reads it in full anyway before the handler runs), every ``model`` field of the JSON
  object or form is taken, and the body is replayed to the app unchanged; every one, and
  every ``model`` in the query string, must be allowed. Responses are not touched, so
  streaming is unaffected.

A ``QUERY``, ``PATH`` or ``BODY`` request that names no model is refused (400): Ray would pick
the only model itself. A route not in the table, or a method the route does not serve, is
refused (403): its model cannot be determined.

**Direct streaming** (``served_model`` set): the replica serves vLLM's own app for exactly one
model, whatever a request names, and vLLM does not always check the name (pooling routes,
``VLLM_SKIP_MODEL_NAME_VALIDATION``). So the key must be allowed that model for anything but
``NONE`` and ``LIST`` routes; then routes outside the table pass too (they can reach nothing
else), and the table's rules still apply to the routes in it.

A model the key may not use gets the same 404 ``model_not_found`` whether it exists or not, so
a key cannot probe which models are deployed. A LoRA id ``base:adapter`` follows its base
model's rule (:meth:`rayllm_auth.keys.Grant.allows`). WebSocket handshakes are refused: no
model is known before accepting.
"""

from __future__ import annotations

import enum
import json
from typing import Optional, Union

from starlette._utils import get_route_path
from starlette.datastructures import Headers, QueryParams

from rayllm_auth.bodies import read_body, replay
from rayllm_auth.keys import Grant
from rayllm_auth.refusals import Refusal

__all__ = ["ModelScope", "Source", "ROUTES", "MODEL_PREFIX", "MAX_SCOPED_BODY_BYTES"]

#: Largest request body read to find the model (OpenAI's audio upload limit is 25 MB).
MAX_SCOPED_BODY_BYTES = 64 * 1024 * 1024


class Source(enum.Enum):
    """Where a route takes the model it serves from."""

    NONE = "names no model"
    LIST = "lists the models"
    PATH = "model id in the path"
    QUERY = "model in the query string"
    BODY = "model in the body"


_GET = frozenset({"GET"})
_GET_HEAD = frozenset({"GET", "HEAD"})
_POST = frozenset({"POST"})

#: Route path -> (where its model comes from, the methods it serves). Ray 2.60's ingress
#: (DEFAULT_ENDPOINTS, DevIngress), FastAPI's docs, and the vLLM routes that take a model
#: field (direct streaming). Paths are compared after the route prefix, as the router does.
ROUTES: dict[str, tuple[Source, frozenset[str]]] = {
    **{path: (Source.NONE, _GET_HEAD) for path in (
        "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/health", "/version")},
    "/ping": (Source.NONE, frozenset({"GET", "HEAD", "POST"})),  # vLLM: a health check
    "/v1/models": (Source.LIST, _GET),
    "/is_sleeping": (Source.QUERY, _GET),
    "/is_paused": (Source.QUERY, _GET),
    **{path: (Source.BODY, _POST) for path in (
        # Ray's ingress: the handler routes by the body's model (Ray 2.44 onwards)
        "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions",
        "/v1/score", "/tokenize", "/detokenize",
        # DevIngress admin routes: broadcast to the replicas of the body's model
        "/sleep", "/wakeup", "/pause", "/resume", "/reset_prefix_cache", "/collective_rpc",
        # vLLM's app under direct streaming: routes with a model field
        "/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/audio/translations",
        "/invocations", "/pooling", "/classify", "/score", "/rerank", "/v1/rerank", "/v2/rerank",
    )},
}
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{model:path}

# What admit() returns: a Refusal, None when the client went away while sending its body
# (nothing to answer), or the (receive, send) pair to call the app with.
Verdict = Union[Refusal, None, tuple]


class ModelScope:
    """``await scope.admit(grant, scope, receive, send)`` for a request made with a limited
    key; ``served_model`` is the one model a direct-streaming replica serves (None for Ray's
    ingress, which routes by the model a request names)."""

    def __init__(self, served_model: Optional[str] = None):
        self._served = served_model

    async def admit(self, grant: Grant, scope, receive, send) -> Verdict:
        if scope["type"] != "http":
            return Refusal.ROUTE_DENIED
        path, method = get_route_path(scope), scope["method"]
        source = _source(path, method)
        if source is Source.NONE:
            return receive, send
        if source is Source.LIST:
            return receive, _FilteredModelList(send, grant)
        if self._served is not None and not grant.allows(self._served):
            return Refusal.MODEL_NOT_FOUND
        if source is None:
            return (receive, send) if self._served is not None else Refusal.ROUTE_DENIED
        if source is Source.PATH:
            model = path[len(MODEL_PREFIX):]
            # Ray's ingress serves the card of replace_prefix(id): '--' read as '/'.
            named = [model if self._served is not None else model.replace("--", "/")]
        elif source is Source.QUERY:
            named = _query_models(scope)
        else:
            body = await read_body(receive, MAX_SCOPED_BODY_BYTES)
            if body is None:
                return None
            if len(body) > MAX_SCOPED_BODY_BYTES:
                return Refusal.TOO_LARGE
            named = await _body_models(scope, body)
            if named:
                named += _query_models(scope)  # whatever else a handler might read
            receive = replay(body, receive)
        if not named:
            return Refusal.MODEL_REQUIRED
        if not all(grant.allows(model) for model in named):
            return Refusal.MODEL_NOT_FOUND
        return receive, send


def _source(path: str, method: str) -> Optional[Source]:
    """Where the route at ``path`` takes its model from; None if the route is not known, or
    does not serve ``method``."""
    source, methods = ROUTES.get(path) or (
        (Source.PATH, _GET) if path.startswith(MODEL_PREFIX) else (None, ()))
    return source if method in methods else None


def _query_models(scope) -> list[str]:
    # Starlette's own parser, as FastAPI's Query() uses: the same decoding, every repeat.
    query = scope.get("query_string")
    return QueryParams(query).getlist("model") if query else []


async def _body_models(scope, body: bytes) -> list[str]:
    """Every ``model`` field of a JSON object, multipart or urlencoded body (JSON and form
    parsers keep the last of repeated fields; all are returned so each can be checked).
    Empty if there is none, one is not a string, or the body cannot be read: never raises
    on hostile bytes."""
    content_type = Headers(scope=scope).get("content-type", "").partition(";")[0].strip().lower()
    try:
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            from starlette.requests import Request

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(scope, receive).form(max_files=1000, max_fields=1000)
            try:
                models = form.getlist("model")
            finally:
                await form.close()
        elif body.isascii() and body.count(b"model") <= 1 and b"\\u" not in body:
            # A second "model" name could only be written with those bytes again or with a
            # \u escape: without either, the plain (fast) parse sees every model field.
            document = json.loads(body)
            is_object = isinstance(document, dict)
            models = [document["model"]] if is_object and "model" in document else []
        else:
            objects = []  # the pairs of every JSON object, in the order they close
            document = json.loads(
                body, object_pairs_hook=lambda pairs: objects.append(pairs) or dict(pairs))
            # An object document closes last: its pairs, repeated names included, are last.
            top = objects[-1] if isinstance(document, dict) else ()
            models = [value for name, value in top if name == "model"]
    except Exception:  # malformed JSON or form data: no model can be read from it
        return []
    return models if all(isinstance(m, str) for m in models) else []


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
