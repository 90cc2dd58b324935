"""The check itself: a pure ASGI middleware that lets a request through only with a valid key.

Deny by default: every HTTP request and WebSocket handshake, on every path and method,
needs a key, except paths an operator lists in ``RAY_LLM_AUTH_EXEMPT_PATHS`` (exact route
paths, empty by default). Lifespan events pass through untouched; an unknown scope type
raises. Keys are read where the middleware is built, i.e. inside the replica, never from
arguments: the app, with this middleware in its stack, is pickled into the deployment.

A request passes with a configured key that has not expired; a key limited to some models
also needs :class:`~rayllm_auth.model_scope.ModelScope`'s consent. Its credential headers are
then removed (the key goes no further than this middleware, exempt paths included) and the
key's non-secret id is stored as ``request.state.user_id``, which Ray Serve LLM's HTTP
metrics use as their ``user_id`` tag. Every other request gets one
:class:`~rayllm_auth.refusals.Refusal`, counted (:mod:`rayllm_auth.metrics`), logged
rate-limited (:mod:`rayllm_auth.audit`) and answered, all by :meth:`ApiKeyMiddleware._refuse`.

A valid request with an unlimited key costs one scan of the headers, one SHA-256, one dict
lookup and one counter update; responses are never touched, so streaming costs nothing per
chunk. With token accounting on (``RAY_LLM_AUTH_TOKEN_USAGE=1``), the requests and responses
of the generate routes are read for their usage (:mod:`rayllm_auth.usage`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import weakref
from typing import Any, Callable, Mapping, Optional

from starlette._utils import get_route_path  # the router's own path logic, see _is_exempt

from rayllm_auth import metrics
from rayllm_auth.audit import DenialLog
from rayllm_auth.credentials import take_key, without_credentials
from rayllm_auth.errors import ConfigError
from rayllm_auth.keystore import KeyStore
from rayllm_auth.model_scope import ModelScope
from rayllm_auth.quota import ReplicaQuota
from rayllm_auth.ray_ledger import replica_quota
from rayllm_auth.refusals import Answers, Refusal, rate_limit_headers
from rayllm_auth.usage import Settlement, is_metered, prepare as prepare_usage, usage_enabled

__all__ = ["ApiKeyMiddleware", "EXEMPT_PATHS_VAR", "load_exempt_paths"]

logger = logging.getLogger("rayllm_auth")

EXEMPT_PATHS_VAR = "RAY_LLM_AUTH_EXEMPT_PATHS"
_CHECKED_SCOPES = ("http", "websocket")


def load_exempt_paths(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Exact route paths that need no key, from ``RAY_LLM_AUTH_EXEMPT_PATHS`` (comma-separated).

    Raises ConfigError for an entry that is not an absolute path.
    """
    paths = frozenset(p.strip() for p in environ.get(EXEMPT_PATHS_VAR, "").split(",") if p.strip())
    for path in paths:
        if not path.startswith("/") or any(c in path for c in "*?# \t"):
            raise ConfigError(
                f"{EXEMPT_PATHS_VAR} holds {path!r}: list exact paths such as /health, "
                f"comma-separated, without wildcards"
            )
    return paths


class ApiKeyMiddleware:
    """Pure ASGI middleware: the wrapped app only ever sees requests with a valid key.

    ``cors`` is a copy of the app's own ``CORSMiddleware`` options, so refusals answer
    browsers like the app would; ``served_model`` is the one model a direct-streaming replica
    serves (see :mod:`rayllm_auth.model_scope`). Both are non-secret and travel with the
    pickled app. ``environ`` (keys, exempt paths), ``clock`` (monotonic, key file reloads) and
    ``wall_clock`` (Unix time, key expiry) default to this process's own; ``quota`` makes
    the per-key limits' :class:`~rayllm_auth.quota.ReplicaQuota` (by default shared with the
    application's other replicas through its ledger actor).

    Raises ConfigError when built in a process whose key configuration is missing or
    unusable (and counts it as ``config_error``).
    """

    def __init__(
        self,
        app,
        cors: Optional[Mapping[str, Any]] = None,
        served_model: Optional[str] = None,
        *,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        quota: Callable[[], ReplicaQuota] = replica_quota,
    ):
        self.app = app
        try:
            self._store = KeyStore(environ, clock, wall_clock=wall_clock,
                                   on_reload=_while_alive(self._new_keys))
            self._exempt = load_exempt_paths(environ)
            self._counts_tokens = usage_enabled(environ)
        except ConfigError:
            metrics.record_request("config_error")
            metrics.flush()  # the replica is about to fail: no request will flush it
            raise
        self._wall_clock = wall_clock
        self._make_quota, self._quota = quota, None  # built when a key with limits arrives
        self._answers = Answers(cors)
        self._model_scope = ModelScope(served_model)
        self._denials = DenialLog(clock)
        self._ok_counts = metrics.ok_counts()
        self._reloading = self._store.watches_file
        self._keys = keys = self._store.current()  # used as is when there is no key file
        self._store.keep_looking()  # built in the replica's event loop: idle replicas reload
        self._new_keys(keys)
        ids = keys.key_ids
        logger.info(
            "rayllm-auth: API key required on every route; %d key(s) from %s, ids %s%s; "
            "exempt paths: %s%s",
            len(keys),
            ", ".join(keys.sources),
            ", ".join(ids[:10]),
            f" and {len(ids) - 10} more" if len(ids) > 10 else "",
            ", ".join(sorted(self._exempt)) or "none",
            f"; serving model {served_model}" if served_model is not None else "",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] not in _CHECKED_SCOPES:
            return await self._unchecked_scope(scope, receive, send)
        keys = self._store.current() if self._reloading else self._keys
        key, other_headers = take_key(scope["headers"])  # the key, or the Refusal saying why not
        grant = keys.lookup(key) if key.__class__ is bytes else None
        if grant is None or not grant.plain or self._counts_tokens:
            return await self._decide(key, grant, other_headers, scope, receive, send)
        # A key for every model, without expiry or limits: nearly every request, so kept short.
        self._admit(grant, other_headers, scope)
        try:  # counted without a function call: this is the per-request path
            self._ok_counts[grant.key_id] += 1
        except KeyError:
            metrics.record_ok(grant.key_id)
        await self.app(scope, receive, send)

    def _decide(self, key, grant, other_headers, scope, receive, send):
        """Every request but the common one: refused, expired, limited, or exempt. Returns
        what to await (this and the functions it hands over to are plain functions where
        they can be: a coroutine less per step, on the path of every limited key)."""
        if grant is None:
            refusal = Refusal.INVALID if key.__class__ is bytes else key
        elif grant.expires is not None and self._wall_clock() >= grant.expires:
            refusal = Refusal.EXPIRED
        else:
            refusal = None
        # An exempt path serves anyone, credentials removed: a refused key, and a key limited
        # to some models or by rpm=/concurrency= too (it gets what a request without a key
        # gets there, not less, and spends none of its limits).
        if (refusal is not None or grant.models is not None or grant.rate_limited) \
                and self._exempt and self._is_exempt(scope):
            scope["headers"] = without_credentials(scope["headers"])  # exempt, not a key relay
            metrics.record_request("exempt")
            return self.app(scope, receive, send)
        if refusal is not None:
            key_id = grant.key_id if grant is not None else ""
            return self._refuse(refusal, key_id, scope, receive, send)
        self._admit(grant, other_headers, scope)
        if grant.models is not None:
            return self._call_limited(grant, scope, receive, send)
        return self._call_app(grant, scope, receive, send)

    @staticmethod
    def _admit(grant, other_headers, scope) -> None:
        # The key stops here: Ray copies every request header into the RawRequestInfo it
        # pickles to the LLMServer replica, and engines see them too.
        scope["headers"] = other_headers
        state = scope.get("state")
        if state is None:
            scope["state"] = state = {}
        state["user_id"] = grant.key_id

    def _new_keys(self, keys) -> None:
        """A key set now in force (at start, or from a reload). When the first key with
        limits arrives, reach the limits ledger at once: its actor takes seconds to start
        the first time, and the first limited requests then find it answering instead of
        waiting for it."""
        if self._quota is None and any(grant.rate_limited for grant in keys.grants):
            self._quota = self._make_quota()
            try:
                self._quota.reach_ledger_soon()
            except RuntimeError:
                pass  # built outside an event loop: the first limited request reaches it

    async def _unchecked_scope(self, scope, receive, send):
        if scope["type"] != "lifespan":
            raise ValueError(f"rayllm-auth: refusing unknown ASGI scope type {scope['type']!r}")
        self._store.keep_looking()  # the serving loop, for a middleware built outside it
        await self.app(scope, receive, send)

    async def _call_limited(self, grant, scope, receive, send):
        verdict = await self._model_scope.admit(grant, scope, receive, send)
        if verdict is None:
            return  # the client went away while sending its body: nobody to answer
        if verdict.__class__ is Refusal:
            return await self._refuse(verdict, grant.key_id, scope, receive, send)
        await self._call_app(grant, scope, *verdict)

    def _call_app(self, grant, scope, receive, send):
        """The call of an admitted request, to be awaited; a key with rpm=, concurrency= or
        tpm= first needs the quota's consent (:mod:`rayllm_auth.quota`), and its responses
        carry OpenAI's rate-limit headers. tpm= applies to the routes whose tokens are
        counted (:mod:`rayllm_auth.usage`)."""
        if not grant.rate_limited:
            return self._call_counting(grant, scope, receive, send)
        if self._quota is None:
            self._quota = self._make_quota()
        tpm = grant.tpm if grant.tpm is not None and is_metered(scope) else None
        verdict = self._quota.admit_now(grant.key_id, grant.rpm, grant.concurrency, tpm)
        if verdict is None:  # the ledger must be asked, or the key is refused
            return self._call_when_admitted(grant, tpm, scope, receive, send)
        return self._call_admitted(grant, verdict, scope, receive, send)

    async def _call_when_admitted(self, grant, tpm, scope, receive, send):
        """:meth:`_call_admitted` once the quota has decided, asking the ledger if it must
        (nothing held here for the key, or the key refused here until its window frees)."""
        verdict = await self._quota.admit(grant.key_id, grant.rpm, grant.concurrency, tpm)
        await self._call_admitted(grant, verdict, scope, receive, send)

    def _call_admitted(self, grant, verdict, scope, receive, send):
        """The quota's verdict on a limited key's request: its refusal, or the app's call
        with the rate-limit headers added to the response."""
        if verdict.refused is not None:
            return self._refuse(_RATE_REFUSALS[verdict.refused], grant.key_id, scope,
                                receive, send, rate_limit_headers(verdict))
        headers = rate_limit_headers(verdict)
        if grant.concurrency is None:
            return self._call_counting(grant, scope, receive, _adding_headers(send, headers),
                                       verdict.reservation)
        return self._call_holding_slot(grant, headers, verdict.reservation, scope, receive,
                                       send)

    async def _call_holding_slot(self, grant, headers, reservation, scope, receive, send):
        """The app's call for a request that holds one of its key's concurrency slots: the
        slot is held until the app returns, after the last byte of a stream, or when the
        client has gone."""
        quota, key_id, released = self._quota, grant.key_id, False

        def send_releasing(message):
            # _adding_headers' work and the slot's, in one wrapper: a stream's every chunk
            # passes here. The slot goes back before the last byte: a client that waits for
            # the end of one request before the next finds its slot free on any replica.
            nonlocal released
            kind = message["type"]
            if kind == "http.response.start":
                if headers:  # none for a key limited by concurrency= alone
                    message = _with_headers(message, headers)
            elif kind == "http.response.body" and not message.get("more_body") \
                    and not released:
                released = True
                giving_back = quota.release_soon(key_id)  # quota.release, without a coroutine
                if giving_back is not None:  # the key's last request here: its slots go back
                    return _send_after(giving_back, send, message)
            return send(message)

        try:
            await self._call_counting(grant, scope, receive, send_releasing, reservation)
        finally:
            if not released:  # an error, a client gone, a WebSocket
                await quota.release(key_id)  # frees the slot here before any await

    def _call_counting(self, grant, scope, receive, send, reservation=None):
        """The app's call, to be awaited, counted as ``ok``; with token accounting on, or a
        reservation of tokens (tpm=), through :meth:`_call_metering`. A plain function: most
        limited requests then pay for no coroutine of their own here."""
        if self._counts_tokens or reservation is not None:
            return self._call_metering(grant, scope, receive, send, reservation)
        metrics.record_ok(grant.key_id)
        return self.app(scope, receive, send)

    async def _call_metering(self, grant, scope, receive, send, reservation):
        """Call the app and count its usage (:mod:`rayllm_auth.usage`), which settles the
        reservation if there is one. Runs after the quota's consent: a key over its limit
        gets its 429 before its body is read."""
        prepared = await prepare_usage(grant.key_id, scope, receive)
        if prepared is None or prepared.__class__ is Refusal:
            if reservation is not None:  # it never reaches the engine
                self._quota.give_back(reservation)
            if prepared is None:
                return  # the client went away while sending its body: nobody to answer
            return await self._refuse(prepared, grant.key_id, scope, receive, send)
        receive, counting = prepared
        metrics.record_ok(grant.key_id)
        if counting is None:
            return await self.app(scope, receive, send)
        if reservation is None:
            return await self.app(scope, receive, counting(send))
        quota = self._quota
        send = counting(send, Settlement(
            functools.partial(quota.settle, reservation),
            functools.partial(quota.give_back, reservation),
            functools.partial(quota.settle_unfinished, reservation)))
        try:
            await self.app(scope, receive, send)
        finally:
            send.close()  # a client gone, an app failed: settled all the same

    async def _refuse(self, refusal: Refusal, key_id: str, scope, receive, send, headers=()):
        """Count, log and answer one refusal: the only way a request is refused."""
        metrics.record_request(refusal.outcome, key_id)
        self._denials.refused(refusal.outcome, scope, key_id)
        await self._answers(refusal, scope, headers)(scope, receive, send)

    def _is_exempt(self, scope) -> bool:
        # Starlette's router matches routes against get_route_path(scope); using the same
        # function means this check and the router always agree on which route a request
        # is for (whatever the root_path or route prefix). Exact match: no prefixes.
        return get_route_path(scope) in self._exempt


_RATE_REFUSALS = {"rpm": Refusal.RPM_EXCEEDED, "concurrency": Refusal.CONCURRENCY_EXCEEDED,
                  "tpm": Refusal.TPM_EXCEEDED}


def _adding_headers(send, headers: list[tuple[bytes, bytes]]):
    """``send``, with ``headers`` added to the response's start (the app's own come first)."""
    if not headers:
        return send

    def send_with_headers(message):
        # A plain function returning send's awaitable: no coroutine of its own per message
        # (a stream's every chunk passes here).
        if message["type"] == "http.response.start":
            message = _with_headers(message, headers)
        return send(message)

    return send_with_headers


def _with_headers(start: dict, headers: list[tuple[bytes, bytes]]) -> dict:
    """A copy of the response's ``start`` message with ``headers`` after its own (the app's
    message is never changed: it may be reused)."""
    return {**start, "headers": [*start.get("headers", ()), *headers]}


async def _send_after(giving_back, send, message) -> None:
    """Send ``message`` once the slots ``giving_back`` returns are back with the ledger
    (shielded: a client gone meanwhile must not keep them taken)."""
    await asyncio.shield(giving_back)
    await send(message)


def _while_alive(method: Callable) -> Callable:
    """``method`` (a bound method), called only while its object lives: the key store
    must not keep a replaced middleware alive (its file timer would run on, and a reload
    would build it a quota whose heartbeats erase the live one's slots). A replaced
    middleware still serving a request lives, and acts on reloads, until that request ends:
    Ray rebuilds a replica's middleware stack only while it starts."""
    method = weakref.WeakMethod(method)

    def call(*args) -> None:
        bound = method()
        if bound is not None:
            bound(*args)

    return call
