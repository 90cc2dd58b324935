"""Warning log lines for refused requests, rate-limited so an attack cannot flood the logs.

At most ``LINES_PER_WINDOW`` lines per ``WINDOW_S`` seconds per process; the next line after
a window in which some were dropped says how many. Every refusal is still counted in the
``rayllm_auth_requests`` metric. A line holds the outcome, method, path, key id (when the key
was recognised) and client address, never key material: path segments that are a configured
key (a client putting its key in the URL) are replaced by ``<key>``, and everything is
ASCII-escaped and truncated, so a line cannot be forged or made huge by the client.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable, Optional

from rayllm_auth.keys import KeySet

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

    def refused(self, outcome: str, scope, keys: KeySet, key_id: Optional[str] = None) -> None:
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
        client = scope.get("client") or ("-", 0)
        logger.warning(
            "rayllm-auth: refused %s: %s %s key_id=%s client=%s",
            outcome,
            _clean(scope.get("method", "WEBSOCKET")),
            _clean(_redact_keys(scope.get("path", ""), keys)),
            key_id or "-",
            _clean(str(client[0])),
        )


def _redact_keys(path: str, keys: KeySet) -> str:
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if segment and keys.holds_digest(hashlib.sha256(segment.encode("utf-8", "replace")).digest()):
            segments[i] = "<key>"
    return "/".join(segments)


def _clean(text: str) -> str:
    text = ascii(text)[1:-1]  # escapes control and non-ASCII characters; no quotes around
    return text if len(text) <= _MAX_FIELD else text[:_MAX_FIELD] + "..."
