"""Warning log lines for refused requests, rate-limited so an attack cannot flood the logs.

At most ``LINES_PER_WINDOW`` lines per ``WINDOW_S`` seconds per process; the next line after
a window in which some were dropped says how many. Every refusal is still counted in the
``rayllm_auth_requests`` metric. A line holds the outcome, method, route, key id (when the key
was recognised) and client address, never key material: the method only when it is a standard
HTTP method and the client only when it is an IP address (both else say what they are not:
``curl -X "$KEY"`` or a forged forwarding header would put a key there); the path only when it is a
route of :data:`~rayllm_auth.model_scope.ROUTES` (``/v1/models/<id>`` without its id), else as
``<other path, N characters>``, since a client may put a key anywhere in a path (a segment, a
part of one, across a ``/``). Everything is ASCII-escaped and truncated, so a line cannot be
forged or made huge by the client.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Callable, Optional

from starlette._utils import get_route_path

from rayllm_auth.model_scope import MODEL_PREFIX, ROUTES

__all__ = ["DenialLog"]

logger = logging.getLogger("rayllm_auth")

LINES_PER_WINDOW = 10
WINDOW_S = 10.0
_MAX_FIELD = 200


class DenialLog:
    def __init__(self, clock: Optional[Callable[[], float]] = None):
        self._clock = clock or time.monotonic
        self._window_end = 0.0
        self._lines = 0
        self._dropped = 0

    def refused(self, outcome: str, scope, key_id: str = "") -> None:
        now = self._clock()
        if now >= self._window_end:
            if self._dropped:
                logger.warning(
                    "rayllm-auth: %d more refused request(s) were not logged in the last %.0f s",
                    self._dropped, WINDOW_S,
                )
            self._window_end, self._lines, self._dropped = now + WINDOW_S, 0, 0
        if self._lines >= LINES_PER_WINDOW:
            self._dropped += 1
            return
        self._lines += 1
        logger.warning(
            "rayllm-auth: refused %s: %s %s key_id=%s client=%s",
            outcome, _method(scope), _clean(_route(scope)), key_id or "-", _client(scope),
        )


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
                      "CONNECT"})


def _method(scope) -> str:
    if scope["type"] == "websocket":
        return "WEBSOCKET"
    method = scope.get("method")
    return method if method in _METHODS else "<other method>"


def _client(scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    try:
        return str(ipaddress.ip_address(client[0]))
    except ValueError:
        return "<not an IP address>"


def _route(scope) -> str:
    """What of the path may be logged: the route prefix (from the Serve config, not the
    client) and a known route, never anything else the client wrote."""
    route = get_route_path(scope) if "path" in scope else ""
    if route.startswith(MODEL_PREFIX):
        route = MODEL_PREFIX + "<id>"
    elif route not in ROUTES:
        route = f"<other path, {len(route)} characters>"
    return scope.get("root_path", "") + route


def _clean(text: str) -> str:
    text = ascii(text)[1:-1]  # escapes control and non-ASCII characters; no quotes around
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "..."
