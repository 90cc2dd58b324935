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

__all__ = ["record_request", "record_ok", "ok_counts", "record_reload", "pending", "flush",
           "FLUSH_INTERVAL_S"]

logger = logging.getLogger("rayllm_auth")

FLUSH_INTERVAL_S = 1.0
_REQUESTS = ("rayllm_auth_requests", "Auth decisions of rayllm-auth", ("outcome", "key_id"))
_RELOADS = ("rayllm_auth_key_reloads", "Key file reloads of rayllm-auth", ("outcome",))

_requests: dict[tuple[str, str], int] = {}  # (outcome, key_id) -> count not yet handed to Ray
_ok: dict[str, int] = {}  # key_id -> count of ("ok", key_id): the hot path's own dict
_reloads: dict[tuple[str], int] = {}  # (outcome,) -> count not yet handed to Ray
_counters: dict[str, object] = {}
_flush_loop: Optional[asyncio.AbstractEventLoop] = None  # where a flush is scheduled


def ok_counts() -> dict[str, int]:
    """The live dict of ``ok`` counts by key id, for the middleware's hot path:
    ``counts[key_id] += 1``, calling :func:`record_ok` on KeyError. This saves a function
    call and a tuple per request, a tenth of the whole auth check."""
    return _ok


def record_ok(key_id: str) -> None:
    _ok[key_id] = _ok.get(key_id, 0) + 1
    _schedule_flush()


def record_request(outcome: str, key_id: str = "") -> None:
    if outcome == "ok":
        return record_ok(key_id)
    label = (outcome, key_id)
    _requests[label] = _requests.get(label, 0) + 1
    _schedule_flush()


def record_reload(outcome: str) -> None:
    label = (outcome,)
    _reloads[label] = _reloads.get(label, 0) + 1
    _schedule_flush()


def pending() -> dict[tuple[str, tuple], int]:
    """Counts not yet handed to Ray, by (metric name, tag values). For tests and ``doctor``."""
    return {(spec[0], label): n for spec, counts in _pending_batches()
            for label, n in counts.items()}


def _pending_batches() -> list[tuple[tuple, dict]]:
    """(metric spec, {tag values: count}) for each metric, the hot path's ``ok`` counts
    folded into the requests metric. Copies: the module's dicts are left as they are."""
    requests = dict(_requests)
    for key_id, n in _ok.items():
        requests[("ok", key_id)] = requests.get(("ok", key_id), 0) + n
    return [(_REQUESTS, requests), (_RELOADS, dict(_reloads))]


def _schedule_flush() -> None:
    global _flush_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no event loop here (start-up, a test): flush() is called explicitly
    if loop is not _flush_loop:  # one pending flush per loop
        loop.call_later(FLUSH_INTERVAL_S, flush)
        _flush_loop = loop


def flush() -> None:
    """Hand every pending count to Ray's metrics API."""
    global _flush_loop
    _flush_loop = None
    batches = _pending_batches()
    for counts in (_ok, _requests, _reloads):
        counts.clear()
    for spec, counts in batches:
        counter = _counter(spec) if counts else None
        if counter is not None:
            for label, count in counts.items():
                counter.inc(count, tags=dict(zip(spec[2], label)))


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
