"""API keys: where they come from, how they are written, how a presented key is looked up.

Key sources (read from the environment of the process that serves requests):

``VLLM_API_KEY``
    The whole value is one key, as in vLLM. Surrounding whitespace is ignored (a Secret
    written with ``echo`` ends in a newline that no client could ever send).
``RAY_LLM_API_KEYS``
    Comma-separated entries; whitespace around entries is ignored, empty entries are skipped.
    Each entry is ``[ID:]SECRET`` where ``SECRET`` is either the key itself or
    ``sha256:<64 hex digits>`` (its SHA-256 digest, so the configuration holds nothing a
    client could send). ``ID`` is a non-secret name (``[A-Za-z0-9._-]``, at most 64
    characters, not ``sha256``) used in logs and metrics. Because a plain key may not
    contain ``:`` or ``,``, every entry has exactly one reading, and base64 keys (which end
    in ``=``) need no quoting.

A variable that is set but yields no usable key is a configuration error
(:class:`~rayllm_auth.errors.ConfigError`), never "auth off". Error messages name the variable and the entry
number, never the entry's text, which may be a key.

Lookup: every accepted key is stored as ``sha256(key)`` in a dict. A request's key is hashed
and looked up, which costs the same for 1 or 10,000 keys. The lookup's timing depends only on
the SHA-256 digest of what the client sent; learning anything about a stored digest from that
timing would still leave the attacker needing a SHA-256 preimage, so no key content leaks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional

from rayllm_auth._bootstrap import KEY_SOURCES
from rayllm_auth.errors import ConfigError

__all__ = [
    "KEY_SOURCES",
    "KeySet",
    "load_key_set",
    "configured_sources",
    "key_id_for_digest",
    "is_sendable_key",
    "MAX_KEY_LENGTH",
]

logger = logging.getLogger("rayllm_auth")

RAY_LLM_API_KEYS, VLLM_API_KEY = KEY_SOURCES

#: Longest key accepted, in bytes, both in configuration and in a request.
MAX_KEY_LENGTH = 512
#: Keys shorter than this are accepted with a warning: fine for a demo, guessable in production.
SHORT_KEY_WARNING_LENGTH = 20

_HASHED_PREFIX = "sha256"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# Printable ASCII without space: what an HTTP header can carry as a bearer token.
_SENDABLE = bytes(range(0x21, 0x7F))
_RESERVED_IN_LIST = frozenset(b",:")


def is_sendable_key(key: bytes) -> bool:
    """True if ``key`` could be sent in an ``Authorization`` header: 1..MAX_KEY_LENGTH
    printable ASCII bytes, no whitespace."""
    # translate() deletes every allowed byte (in C, on the per-request path): anything left
    # over is a byte a key may not contain.
    return 0 < len(key) <= MAX_KEY_LENGTH and not key.translate(None, _SENDABLE)


def key_id_for_digest(digest: bytes) -> str:
    """Stable id for an unnamed key, derived from its SHA-256 digest.

    A second, domain-separated hash of the digest: the id is the same whether the key was
    configured in plain or hashed form, and reveals nothing that helps guess a random key.
    """
    return "key-" + hashlib.sha256(b"rayllm-auth key id\x00" + digest).hexdigest()[:12]


@dataclass(frozen=True)
class _Entry:
    key_id: str
    digest: bytes


class KeySet:
    """The accepted keys of one process: ``sha256(key) -> key id``. Immutable, never pickled."""

    __slots__ = ("_ids_by_digest", "sources")

    def __init__(self, entries: Iterable[_Entry], sources: tuple[str, ...]):
        ids_by_digest: dict[bytes, str] = {}
        for entry in entries:
            known = ids_by_digest.get(entry.digest)
            if known is not None and known != entry.key_id:
                raise ConfigError(
                    f"the same key is configured twice, with ids {known!r} and "
                    f"{entry.key_id!r} (in {', '.join(sources)}); give it one id"
                )
            ids_by_digest[entry.digest] = entry.key_id
        self._ids_by_digest = ids_by_digest
        self.sources = sources

    def lookup(self, presented: bytes) -> Optional[str]:
        """Key id of ``presented`` if it is an accepted key, else None."""
        return self._ids_by_digest.get(hashlib.sha256(presented).digest())

    @property
    def key_ids(self) -> list[str]:
        return sorted(set(self._ids_by_digest.values()))

    def __len__(self) -> int:
        return len(self._ids_by_digest)

    def __repr__(self) -> str:
        return f"KeySet({len(self)} keys from {', '.join(self.sources)})"

    def __reduce__(self):
        # Key digests travel nowhere: a replica reads its own keys from its own environment.
        raise TypeError("rayllm_auth.KeySet must not be pickled")


def configured_sources(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """Names of the key source variables that are set (even to an empty value)."""
    return tuple(name for name in KEY_SOURCES if name in environ)


def load_key_set(environ: Mapping[str, str] = os.environ) -> Optional[KeySet]:
    """Read every key source in ``environ``.

    Returns None when no key source is set (auth is off), a non-empty :class:`KeySet`
    otherwise. Raises :class:`ConfigError` when a set variable yields no usable key or
    holds an entry that cannot be read.
    """
    sources = configured_sources(environ)
    if not sources:
        return None
    entries: list[_Entry] = []
    if VLLM_API_KEY in environ:
        entries.append(_parse_vllm_api_key(environ[VLLM_API_KEY]))
    if RAY_LLM_API_KEYS in environ:
        entries.extend(_parse_key_list(environ[RAY_LLM_API_KEYS], RAY_LLM_API_KEYS))
    return KeySet(entries, sources)


def _parse_vllm_api_key(value: str) -> _Entry:
    key = value.strip()
    if not key:
        raise ConfigError(
            f"{VLLM_API_KEY} is set but empty: set it to a key, or unset it and use "
            f"{RAY_LLM_API_KEYS}"
        )
    return _plain_entry(key, None, VLLM_API_KEY, reserved=frozenset())


def _parse_key_list(value: str, variable: str) -> list[_Entry]:
    entries = []
    for number, raw in enumerate(value.split(","), start=1):
        text = raw.strip()
        if text:
            entries.append(_parse_entry(text, f"entry {number} of {variable}"))
    if not entries:
        raise ConfigError(
            f"{variable} is set but holds no key: give one or more comma-separated keys, "
            f"or unset it"
        )
    return entries


def _parse_entry(text: str, where: str) -> _Entry:
    parts = text.split(":")
    if len(parts) == 1:
        return _plain_entry(text, None, where, reserved=_RESERVED_IN_LIST)
    if len(parts) == 2 and parts[0] == _HASHED_PREFIX:
        return _hashed_entry(parts[1], None, where)
    if len(parts) == 2:
        return _plain_entry(parts[1], _key_id(parts[0], where), where, _RESERVED_IN_LIST)
    if len(parts) == 3 and parts[1] == _HASHED_PREFIX:
        return _hashed_entry(parts[2], _key_id(parts[0], where), where)
    raise ConfigError(
        f"{where} cannot be read: expected KEY, ID:KEY, sha256:HEX or ID:sha256:HEX "
        f"(a plain key may not contain ':' or ',')"
    )


def _key_id(text: str, where: str) -> str:
    if not _KEY_ID.fullmatch(text) or text == _HASHED_PREFIX:
        raise ConfigError(
            f"{where} has an invalid id: ids use letters, digits, '.', '_' or '-' "
            f"(at most 64) and may not be 'sha256'"
        )
    return text


def _plain_entry(
    key: str, key_id: Optional[str], where: str, reserved: frozenset[int]
) -> _Entry:
    raw = key.encode("utf-8")
    if not is_sendable_key(raw) or not reserved.isdisjoint(raw):
        forbidden = "".join(f" or {chr(b)!r}" for b in sorted(reserved))
        raise ConfigError(
            f"{where} is not a usable key: keys are 1 to {MAX_KEY_LENGTH} printable ASCII "
            f"characters without spaces{forbidden}"
        )
    if len(raw) < SHORT_KEY_WARNING_LENGTH:
        logger.warning(
            "rayllm-auth: %s is shorter than %d characters and could be guessed; "
            "use at least 32 random bytes for production keys, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            where,
            SHORT_KEY_WARNING_LENGTH,
        )
    digest = hashlib.sha256(raw).digest()
    return _Entry(key_id or key_id_for_digest(digest), digest)


def _hashed_entry(hex_digest: str, key_id: Optional[str], where: str) -> _Entry:
    if not _HEX_DIGEST.fullmatch(hex_digest):
        raise ConfigError(
            f"{where} is not a usable hashed key: write sha256: followed by the 64 "
            f"lowercase hex digits of the key's SHA-256 digest"
        )
    digest = bytes.fromhex(hex_digest)
    return _Entry(key_id or key_id_for_digest(digest), digest)
