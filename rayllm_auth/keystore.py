"""The key set a replica serves with: every key source read and combined here, and kept current
while the key file changes.

Reloading: when the last look at the key file is more than ``RAY_LLM_AUTH_RELOAD_INTERVAL_S``
seconds old (default 5), the next request, or a timer on the replica's event loop
(:meth:`KeyStore.keep_looking`), stats the file, and reads it again only if its signature
(inode, size, mtime, ctime) changed. The timer is what lets a replica that receives no
request take a change too: without it, its next request would make the first look and find
the file not yet settled, and serve with the old set (a removed key) for SETTLE_S more.

A changed file is taken only once it has **settled**: the same signature at two looks
``SETTLE_S`` seconds apart (our own monotonic clock, which no filesystem clock can skew). A file
rewritten in place is never read half written, unless its writer pauses longer than that
mid-write, even when the half parses (a key without the ``models=`` that follows it). So a
removed key is refused, and an added key accepted, at most ``interval + SETTLE_S`` seconds
after the change; in Kubernetes add the kubelet's own delay (about a minute by default). A
file that keeps changing for ``MAX_SETTLE_WAIT_S`` is reported as a failed reload.
A starting replica takes a file whose ctime is at least ``SETTLE_S`` old by its own clock at
once, else waits for two looks (at most ``MAX_SETTLE_WAIT_S``, then it refuses to start).

A file that becomes unreadable or invalid leaves the last good key set in place; the error is
logged once per distinct file state and counted in ``rayllm_auth_key_reloads{outcome=
"failed"}``. A valid new file replaces the file's keys: a key it no longer lists is revoked.
Keys from the environment variables never change while the process lives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

from rayllm_auth import metrics
from rayllm_auth.errors import ConfigError
from rayllm_auth.keyfile import KeyFile, Signature, file_signature, read_key_file
from rayllm_auth.keys import (
    KEY_SOURCES,
    RAY_LLM_API_KEYS_FILE,
    Entry,
    Grant,
    KeySet,
    environment_entries,
)

__all__ = ["KeyStore", "SourceReport", "configured_sources", "load_keys", "read_sources",
           "RELOAD_INTERVAL_VAR", "SETTLE_S"]

logger = logging.getLogger("rayllm_auth")

RELOAD_INTERVAL_VAR = "RAY_LLM_AUTH_RELOAD_INTERVAL_S"
DEFAULT_RELOAD_INTERVAL_S = 5.0
#: A changed key file is taken once it has been unchanged this long (seconds).
SETTLE_S = 1.0
#: How long a starting replica waits for a key file that keeps changing before it refuses to
#: start; a serving replica reports such a file as a failed reload after as long.
MAX_SETTLE_WAIT_S = 10 * SETTLE_S


def reload_interval(environ: Mapping[str, str]) -> float:
    text = environ.get(RELOAD_INTERVAL_VAR, "").strip()
    if not text:
        return DEFAULT_RELOAD_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise ConfigError(f"{RELOAD_INTERVAL_VAR} must be a number of seconds in (0, 3600]")
    return value


def configured_sources(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Names of the key source variables that are set (even to an empty value)."""
    return tuple(name for name in KEY_SOURCES if name in environ)


def key_file_path(environ: Mapping[str, str]) -> str:
    """The key file's path. Raises ConfigError if the variable is set but empty."""
    path = environ.get(RAY_LLM_API_KEYS_FILE, "").strip()
    if not path:
        raise ConfigError(f"{RAY_LLM_API_KEYS_FILE} is set but empty: give the key file's path")
    return path


@dataclass(frozen=True)
class SourceReport:
    """One key source as read now: its entries, or why it cannot be used (for ``doctor``)."""

    variable: str
    entries: tuple[Entry, ...] = ()
    error: Optional[str] = None
    path: Optional[str] = None  #: the key file's path, for RAY_LLM_API_KEYS_FILE


def read_sources(environ: Mapping[str, str] = os.environ) -> list[SourceReport]:
    """Every key source that is set, read once each; an unusable one carries its error."""
    reports = []
    for variable in configured_sources(environ):
        path = None
        try:
            if variable == RAY_LLM_API_KEYS_FILE:
                path = key_file_path(environ)
                entries = read_key_file(path).entries
            else:
                entries = environment_entries({variable: environ[variable]})
        except ConfigError as exc:
            reports.append(SourceReport(variable, error=str(exc), path=path))
            continue
        reports.append(SourceReport(variable, tuple(entries), path=path))
    return reports


def with_default_limits(entry: Entry, defaults: Grant) -> Entry:
    """``entry`` with the key file's default limits if it has no rpm=, concurrency= or tpm= of
    its own (keys from the environment variables never have)."""
    if entry.grant.rate_limited:
        return entry
    return Entry(entry.digest, replace(entry.grant, rpm=defaults.rpm,
                                       concurrency=defaults.concurrency, tpm=defaults.tpm))


def load_keys(environ: Mapping[str, str] = os.environ) -> Optional[KeySet]:
    """Every key source in ``environ``, read once and combined: None when none is set (auth
    off). Raises ConfigError when a set source is unusable or the sources conflict. For
    checking a configuration where an app is built; replicas serve from a :class:`KeyStore`.
    """
    if not configured_sources(environ):
        return None
    return KeyStore(environ, watch=False).current()


class KeyStore:
    """Current keys of this process.

    Raises ConfigError when built if no key source is set, any source is unusable, or the
    key file keeps changing for ``MAX_SETTLE_WAIT_S``: a replica never starts on a partial,
    empty or half-written key set. ``clock`` (monotonic) paces reloads and judges whether a
    changed file has settled; ``wall_clock`` (Unix time) lets a starting replica take a file
    whose ctime is old at once; ``sleep`` waits for the file at start.
    ``watch=False`` reads the sources once and never reloads or publishes metrics.
    ``on_reload`` is called with each key set a reload brings; what it raises is logged (its
    type only), never passed to the request that found the reload.
    """

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        watch: bool = True,
        on_reload: Callable[[KeySet], None] = lambda keys: None,
    ):
        sources = configured_sources(environ)
        if not sources:
            raise ConfigError(
                "this Serve LLM app requires API keys (rayllm-auth is installed in it) but "
                f"none of {', '.join(KEY_SOURCES)} is set in this replica's environment"
            )
        self._sources = sources
        self._env_entries = environment_entries(environ)
        self._clock, self._wall_clock = clock, wall_clock
        self._on_reload = on_reload
        self._path: Optional[str] = None
        self._file: Optional[KeyFile] = None
        self._failed_signature: Optional[object] = None
        self._unsettled: Optional[tuple[Signature, float]] = None  # (signature, first seen)
        self._changing_since: Optional[float] = None  # first look at an unsettled change
        self._looker: Optional[asyncio.Task] = None  # keep_looking()'s timer
        if RAY_LLM_API_KEYS_FILE in environ:
            path = key_file_path(environ)
            self._interval = reload_interval(environ)
            self._file = self._read_when_settled(path, sleep) if watch else read_key_file(path)
            self._path = path if watch else None
            self._next_check = clock() + self._interval
        self._keys = self._combine(self._file)
        if watch:
            metrics.publish_expiries(self._keys)

    @property
    def watches_file(self) -> bool:
        return self._path is not None

    def current(self) -> KeySet:
        """The key set to check this request against (re-reading the file when due)."""
        if self._path is not None and (now := self._clock()) >= self._next_check:
            self._next_check = now + self._interval
            self._refresh(now)
            self.keep_looking()  # at most once per interval: off the per-request path
        return self._keys

    def keep_looking(self) -> None:
        """Look at the key file when due even while no request arrives, from a task on the
        running event loop (none running: nothing; the middleware calls it again at lifespan
        startup, and a due look from a request starts it too). Calling it again is harmless;
        the task ends once nothing else holds this store."""
        if self._path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        looker = self._looker
        if looker is None or looker.done() or looker.get_loop() is not loop:
            self._looker = loop.create_task(_look_when_due(weakref.ref(self)))

    def _combine(self, key_file: Optional[KeyFile]) -> KeySet:
        entries = list(self._env_entries)
        if key_file is not None:
            entries.extend(key_file.entries)
            if key_file.defaults is not None:
                entries = [with_default_limits(e, key_file.defaults) for e in entries]
        return KeySet(entries, self._sources)

    def _time_to_settle(self, signature: Signature, looked: float, seen: float, *,
                        at_start: bool) -> float:
        """0 once the file has stayed in state ``signature`` for SETTLE_S, else how long to
        wait before looking again. Judged by our own looks (two, SETTLE_S apart), which no
        clock skew can fool; at start, a ctime at least SETTLE_S old by this node's clock is
        enough too, so a replica does not wait for a file that has not changed. A look's
        stat ran between ``looked`` (before it) and ``seen`` (after it): a state is first
        seen at ``seen`` and settled from ``looked``, so a stat that blocks (a slow network
        filesystem) can only make the two looks count as closer than they were."""
        if self._unsettled is None or self._unsettled[0] != signature:
            self._unsettled = (signature, seen)  # the first look at this state
        if at_start and self._wall_clock() - signature.ctime_ns / 1e9 >= SETTLE_S:
            return 0.0
        return max(0.0, SETTLE_S - (looked - self._unsettled[1]))

    def _read_when_settled(self, path: str, sleep: Callable[[float], None]) -> KeyFile:
        deadline = self._clock() + MAX_SETTLE_WAIT_S
        while True:
            looked = self._clock()
            try:
                signature = file_signature(path)
            except OSError:
                return read_key_file(path)  # raises ConfigError naming the file
            wait = self._time_to_settle(signature, looked, self._clock(), at_start=True)
            if not wait:
                key_file = read_key_file(path)
                if key_file.signature == signature:
                    self._unsettled = None
                    return key_file
            elif self._clock() + wait > deadline:
                raise ConfigError(f"{RAY_LLM_API_KEYS_FILE} ({path}) kept changing for "
                                  f"{MAX_SETTLE_WAIT_S:.0f} s; write it atomically (rename)")
            sleep(wait)

    def _refresh(self, now: float) -> None:
        try:
            signature = file_signature(self._path)
        except OSError as exc:
            message = f"{RAY_LLM_API_KEYS_FILE} ({self._path}) cannot be read: {exc.strerror}"
            return self._failed(("unreadable", exc.errno), message)
        if signature == self._file.signature:
            self._unsettled = self._changing_since = None
            return
        wait = self._time_to_settle(signature, now, self._clock(), at_start=False)
        if wait:
            # Changed since the last look: look again once it may have settled, so a
            # rotation takes at most interval + SETTLE_S. One that never settles is reported.
            self._next_check = now + wait
            if self._changing_since is None:
                self._changing_since = now
            if now - self._changing_since >= MAX_SETTLE_WAIT_S:
                self._failed(("changing",), f"{RAY_LLM_API_KEYS_FILE} ({self._path}) has kept "
                             f"changing for {MAX_SETTLE_WAIT_S:.0f} s; write it atomically")
            return
        self._changing_since = None  # settled: read it, whatever it holds
        try:
            key_file = read_key_file(self._path)
            if key_file.signature != signature:
                return  # changed again since the stat: not settled after all
            keys = self._combine(key_file)
        except ConfigError as exc:
            return self._failed(signature, str(exc))
        except Exception as exc:  # a parser bug must not turn a reload into a 500
            return self._failed(signature, f"{RAY_LLM_API_KEYS_FILE} ({self._path}) could not "
                                           f"be read ({type(exc).__name__})")
        self._file, self._keys, self._failed_signature = key_file, keys, None
        self._unsettled = None
        metrics.record_reload("ok")
        metrics.publish_expiries(keys)
        logger.info(
            "rayllm-auth: %s reloaded: %d key(s), ids %s",
            RAY_LLM_API_KEYS_FILE, len(keys), ", ".join(keys.key_ids[:10]),
        )
        try:
            self._on_reload(keys)
        except Exception as exc:  # the keys are in force; the request must not fail for it
            logger.error("rayllm-auth: acting on the reloaded key file failed (%s)",
                         type(exc).__name__)

    def _failed(self, signature: object, message: str) -> None:
        if signature == self._failed_signature:
            return  # already reported for this state of the file
        self._failed_signature = signature
        metrics.record_reload("failed")
        logger.error(
            "rayllm-auth: key file reload failed: %s; still serving with the last good key "
            "set (%d key(s))", message, len(self._keys),
        )


async def _look_when_due(store_ref: "weakref.ref[KeyStore]") -> None:
    """:meth:`KeyStore.keep_looking`'s timer. It holds its store only while looking: a store
    nothing else uses any more (a middleware stack rebuilt) ends its timer, rather than
    reloading, logging and counting beside the one in use."""
    while (store := store_ref()) is not None:
        # Until the next look is due (a settling file: SETTLE_S), never busy, never longer
        # than the interval (a clock moved by tests).
        delay = min(max(store._next_check - store._clock(), 0.05), store._interval)
        del store
        await asyncio.sleep(delay)
        if (store := store_ref()) is None:
            return
        try:
            store.current()
        except Exception:  # the timer must not die: requests would be the only looks
            logger.exception("rayllm-auth: looking at the key file failed")
        del store
