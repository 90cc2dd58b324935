"""The key set a replica serves with, kept current while the key file changes.

Reloading is driven by requests, not by a thread: when a request arrives and the last look at
the key file is more than ``RAY_LLM_AUTH_RELOAD_INTERVAL_S`` seconds old (default 5), the
file is stat'ed, and read again only if its signature (inode, size, mtime) changed. So every
request is checked against a key set at most one interval old, a removed key is refused from
the first request after that, and an idle replica does no work at all. In Kubernetes add the
kubelet's own delay in updating a mounted Secret (about a minute by default).

A file that becomes unreadable or invalid leaves the last good key set in place; the error is
logged once per distinct file state and counted in ``rayllm_auth_key_reloads{outcome=
"failed"}``. A valid new file replaces the file's keys: a key it no longer lists is revoked.
Keys from the environment variables never change while the process lives.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Mapping, Optional

from rayllm_auth import metrics
from rayllm_auth.errors import ConfigError
from rayllm_auth.keyfile import KeyFile, file_signature, read_key_file
from rayllm_auth.keys import (
    KEY_SOURCES,
    RAY_LLM_API_KEYS_FILE,
    KeySet,
    configured_sources,
    environment_entries,
    key_file_path,
)

__all__ = ["KeyStore", "RELOAD_INTERVAL_VAR"]

logger = logging.getLogger("rayllm_auth")

RELOAD_INTERVAL_VAR = "RAY_LLM_AUTH_RELOAD_INTERVAL_S"
DEFAULT_RELOAD_INTERVAL_S = 5.0


def reload_interval(environ: Mapping[str, str] = os.environ) -> float:
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


class KeyStore:
    """Current keys of this process. Raises ConfigError when built if no key source is set
    or any source is unusable: a replica never starts on a partial or empty key set."""

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.monotonic,
    ):
        sources = configured_sources(environ)
        if not sources:
            raise ConfigError(
                "this Serve LLM app requires API keys (rayllm-auth is installed in it) but "
                f"none of {', '.join(KEY_SOURCES)} is set in this replica's environment"
            )
        self._sources = sources
        self._env_entries = environment_entries(environ)
        self._clock = clock
        self._path: Optional[str] = None
        self._file: Optional[KeyFile] = None
        self._failed_signature: Optional[tuple] = None
        if RAY_LLM_API_KEYS_FILE in environ:
            self._path = key_file_path(environ)
            self._interval = reload_interval(environ)
            self._file = read_key_file(self._path)
            self._next_check = clock() + self._interval
        self._keys = self._combine(self._file)

    @property
    def watches_file(self) -> bool:
        return self._path is not None

    def current(self) -> KeySet:
        """The key set to check this request against (re-reading the file when due)."""
        if self._path is not None and (now := self._clock()) >= self._next_check:
            self._next_check = now + self._interval
            self._refresh()
        return self._keys

    def _combine(self, key_file: Optional[KeyFile]) -> KeySet:
        entries = list(self._env_entries)
        if key_file is not None:
            entries.extend(key_file.entries)
        return KeySet(entries, self._sources)

    def _refresh(self) -> None:
        try:
            signature = file_signature(self._path)
        except OSError as exc:
            message = f"{RAY_LLM_API_KEYS_FILE} ({self._path}) cannot be read: {exc.strerror}"
            return self._failed(("unreadable", exc.errno), message)
        if signature == self._file.signature:
            return
        try:
            key_file = read_key_file(self._path)
            keys = self._combine(key_file)
        except ConfigError as exc:
            return self._failed(signature, str(exc))
        self._file, self._keys, self._failed_signature = key_file, keys, None
        metrics.record_reload("ok")
        logger.info(
            "rayllm-auth: %s reloaded: %d key(s), ids %s",
            RAY_LLM_API_KEYS_FILE, len(keys), ", ".join(keys.key_ids[:10]),
        )

    def _failed(self, signature: tuple, message: str) -> None:
        if signature == self._failed_signature:
            return  # already reported for this state of the file
        self._failed_signature = signature
        metrics.record_reload("failed")
        logger.error(
            "rayllm-auth: key file reload failed: %s; still serving with the last good key "
            "set (%d key(s))", message, len(self._keys),
        )
