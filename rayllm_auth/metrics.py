"""Counters exported through Ray's own metrics API (``ray.util.metrics``), so they show up
wherever Ray's metrics are scraped (KubeRay pods' metrics port, Ray's Prometheus endpoint).

``rayllm_auth_requests`` (Counter; tags ``outcome``, ``key_id``)
    One per auth decision. ``outcome``: ``ok``, ``missing``, ``malformed``, ``conflicting``,
    ``invalid``, ``expired``, ``model_denied``, ``rate_limited`` (over its ``rpm``,
    ``concurrency`` or ``tpm``), ``too_large`` (token accounting: a body over its limit), ``exempt``, or
    ``config_error`` (a replica that refused to start because its key configuration is
    unusable). ``key_id`` is the key's non-secret id when the key was recognised, else empty.
``rayllm_auth_key_reloads`` (Counter; tag ``outcome``: ``ok`` or ``failed``)
    Key file reloads.
``rayllm_auth_limits_fallbacks`` (Counter; tag ``change``: ``entered`` or ``left``)
    A replica that could not reach its application's limits ledger and counts limits alone
    (``entered``), and back to cluster-wide limits (``left``). ``entered`` minus ``left``
    is the number of replicas in fallback now.
``rayllm_auth_tokens`` (Counter; tags ``key_id``, ``model``, ``kind``)
    Tokens the engine reported in a response's ``usage`` (:mod:`rayllm_auth.usage`), when
    token accounting is on, and for keys with ``tpm``. ``kind``: ``prompt`` or ``completion``; ``model``: the model
    the engine says it served.
``rayllm_auth_key_expiry_timestamp_seconds`` (Gauge; tag ``key_id``)
    Unix time at which a key expires (the earliest, if several keys share the id), for the
    keys that have an expiry; 0 once the id has no expiring key any more (removed from the
    key file, or its ``expires=`` removed), so alerts filter on ``> 0``.

Ray exports them with its ``ray_`` prefix (and ``_total`` for counters).

Recording a request costs one dict update: a ``Counter.inc`` call takes about 2 µs, as much
as the whole auth check, so counts are added up in the process and handed to Ray at most
once per second per label set, from the event loop that served the requests (no thread, no
lock). The expiry gauge is set again every second while it has values, even with no
traffic: Ray drops a gauge series that has not been set for two export intervals. If Ray's
metrics API is unavailable (no Ray, a test), counts are kept and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

__all__ = ["record_request", "record_ok", "ok_counts", "record_reload", "publish_expiries",
           "record_limits_fallback", "record_tokens",
           "pending", "flush", "FLUSH_INTERVAL_S"]

logger = logging.getLogger("rayllm_auth")

FLUSH_INTERVAL_S = 1.0
_REQUESTS = ("rayllm_auth_requests", "Auth decisions of rayllm-auth", ("outcome", "key_id"))
_RELOADS = ("rayllm_auth_key_reloads", "Key file reloads of rayllm-auth", ("outcome",))
_FALLBACKS = ("rayllm_auth_limits_fallbacks",
              "Replicas of rayllm-auth entering and leaving per-replica fallback limits",
              ("change",))
_TOKENS = ("rayllm_auth_tokens", "Prompt and completion tokens per API key and model",
           ("key_id", "model", "kind"))
_EXPIRY = ("rayllm_auth_key_expiry_timestamp_seconds",
           "Unix time at which an API key expires (0: no longer configured)", ("key_id",))

_requests: dict[tuple[str, str], int] = {}  # (outcome, key_id) -> count not yet handed to Ray
_ok: dict[str, int] = {}  # key_id -> count of ("ok", key_id): the hot path's own dict
_reloads: dict[tuple[str], int] = {}  # (outcome,) -> count not yet handed to Ray
_fallbacks: dict[tuple[str], int] = {}  # (change,) -> count not yet handed to Ray
_tokens: dict[tuple[str, str, str], int] = {}  # (key_id, model, kind) -> tokens not yet handed
# (key_id,) -> the expiry gauge's value, handed to Ray again on every flush: Ray 2.60 drops a
# gauge series that has not been set for two export intervals (about 20 s here).
_expiries: dict[tuple[str], float] = {}
_metrics: dict[str, object] = {}  # metric name -> Ray Counter/Gauge, or None without Ray
_flush_loop: Optional[asyncio.AbstractEventLoop] = None  # where a flush is scheduled


def ok_counts() -> dict[str, int]:
    """The live dict of ``ok`` counts by key id, for the middleware's hot path:
    ``counts[key_id] += 1``, calling :func:`record_ok` on KeyError. This saves a function
    call and a tuple per request, a tenth of the whole auth check. The price: a count there
    looks for no flush, so counts that an event loop left pending when it ended before their
    flush wait for the next flush another count schedules (a Serve replica runs one loop for
    its whole life)."""
    return _ok


def record_ok(key_id: str) -> None:
    _ok[key_id] = _ok.get(key_id, 0) + 1
    _schedule_flush()  # also when counts are pending: their flush may have gone with its loop


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


def record_limits_fallback(entered: bool) -> None:
    label = ("entered" if entered else "left",)
    _fallbacks[label] = _fallbacks.get(label, 0) + 1
    _schedule_flush()


def record_tokens(key_id: str, model: str, prompt: int, completion: int) -> None:
    for kind, count in (("prompt", prompt), ("completion", completion)):
        if count:
            label = (key_id, model, kind)
            _tokens[label] = _tokens.get(label, 0) + count
    _schedule_flush()


def publish_expiries(keys) -> None:
    """Set the expiry gauge to the earliest expiry of each key id in ``keys`` (a KeySet),
    and to 0 for ids published before that no longer have one."""
    earliest: dict[str, float] = {}
    for grant in keys.grants:
        if grant.expires is not None:
            earliest[grant.key_id] = min(grant.expires, earliest.get(grant.key_id, grant.expires))
    for label in _expiries:
        _expiries[label] = 0.0  # no longer configured, unless set again just below
    for key_id, expires in earliest.items():
        _expiries[(key_id,)] = expires
    _schedule_flush()


def pending() -> dict[tuple[str, tuple], float]:
    """Counts not yet handed to Ray and the gauge's current values, by (metric name, tag
    values). For tests."""
    return {(spec[0], label): n for spec, values in _pending_batches()
            for label, n in values.items()}


def _pending_batches() -> list[tuple[tuple, dict]]:
    """(metric spec, {tag values: count or gauge value}) for each metric, the hot path's
    ``ok`` counts folded into the requests metric. Copies: the module's dicts stay as they are."""
    requests = dict(_requests)
    for key_id, n in _ok.items():
        requests[("ok", key_id)] = requests.get(("ok", key_id), 0) + n
    return [(_REQUESTS, requests), (_RELOADS, dict(_reloads)), (_FALLBACKS, dict(_fallbacks)),
            (_TOKENS, dict(_tokens)), (_EXPIRY, dict(_expiries))]


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
    """Hand every pending count and the gauge's values to Ray's metrics API; while the gauge
    has values, flush again every FLUSH_INTERVAL_S, so Ray keeps exporting them."""
    global _flush_loop
    _flush_loop = None
    if _expiries:
        _schedule_flush()
    batches = _pending_batches()
    for values in (_ok, _requests, _reloads, _fallbacks, _tokens):
        values.clear()
    for spec, values in batches:
        metric = _metric(spec) if values else None
        if metric is not None:
            record = metric.set if spec is _EXPIRY else metric.inc
            for label, value in values.items():
                record(value, tags=dict(zip(spec[2], label)))


def _metric(spec: tuple) -> Optional[object]:
    name, description, tag_keys = spec
    if name not in _metrics:
        try:
            from ray.util.metrics import Counter, Gauge

            kind = Gauge if spec is _EXPIRY else Counter
            _metrics[name] = kind(name, description=description, tag_keys=tag_keys)
        except Exception as exc:  # no Ray here: counting must never break serving
            logger.debug("rayllm-auth: metrics unavailable (%s)", exc)
            _metrics[name] = None
    return _metrics[name]
