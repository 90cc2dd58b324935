"""Counters exported through Ray's own metrics API (``ray.util.metrics``), so they show up
wherever Ray's metrics are scraped (KubeRay pods' metrics port, Ray's Prometheus endpoint).

``rayllm_auth_requests`` (Counter; tags ``outcome``, ``key_id``)
    One per auth decision. ``outcome``: ``ok``, ``missing``, ``malformed``, ``conflicting``,
    ``invalid``, ``model_denied``, ``exempt``, or ``config_error`` (a replica that refused
    to start because its key configuration is unusable). ``key_id`` is the key's non-secret
    id when the key was recognised, else empty.
``rayllm_auth_key_reloads`` (Counter; tag ``outcome``: ``ok`` or ``failed``)
    Key file reloads.

Ray exports them with its ``ray_`` prefix (and ``_total`` for counters).

Recording a request costs one dict update: a ``Counter.inc`` call takes about 2 µs, as much
as the whole auth check, so counts are added up in the process and handed to Ray at most
once per second per label set, from the event loop that served the requests (no thread, no
lock). If Ray's metrics API is unavailable (no Ray, a test), counts are kept and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

__all__ = ["record_request", "record_reload", "pending", "flush", "FLUSH_INTERVAL_S"]

logger = logging.getLogger("rayllm_auth")

FLUSH_INTERVAL_S = 1.0
_REQUESTS = ("rayllm_auth_requests", "Auth decisions of rayllm-auth", ("outcome", "key_id"))
_RELOADS = ("rayllm_auth_key_reloads", "Key file reloads of rayllm-auth", ("outcome",))

_pending: dict[tuple, int] = {}  # (metric, tag values) -> count not yet handed to Ray
_counters: dict[str, object] = {}
_flush_scheduled = False


def record_request(outcome: str, key_id: str = "") -> None:
    _add((_REQUESTS, (outcome, key_id)))


def record_reload(outcome: str) -> None:
    _add((_RELOADS, (outcome,)))


def pending() -> dict[tuple[str, tuple], int]:
    """Counts not yet handed to Ray, by (metric name, tag values). For tests and ``doctor``."""
    return {(spec[0], tags): n for (spec, tags), n in _pending.items()}


def _add(label_set: tuple) -> None:
    global _flush_scheduled
    _pending[label_set] = _pending.get(label_set, 0) + 1
    if not _flush_scheduled:
        try:
            asyncio.get_running_loop().call_later(FLUSH_INTERVAL_S, flush)
            _flush_scheduled = True
        except RuntimeError:
            pass  # no event loop here (start-up, a test): the next request schedules it


def flush() -> None:
    """Hand every pending count to Ray's metrics API."""
    global _flush_scheduled
    _flush_scheduled = False
    batch = dict(_pending)
    _pending.clear()
    for (spec, tags), count in batch.items():
        counter = _counter(spec)
        if counter is not None:
            counter.inc(count, tags=dict(zip(spec[2], tags)))


def _counter(spec: tuple) -> Optional[object]:
    name, description, tag_keys = spec
    if name not in _counters:
        try:
            from ray.util.metrics import Counter

            _counters[name] = Counter(name, description=description, tag_keys=tag_keys)
        except Exception as exc:  # no Ray here: counting must never break serving
            logger.debug("rayllm-auth: metrics unavailable (%s)", exc)
            _counters[name] = None
    return _counters[name]
