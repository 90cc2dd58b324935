"""API keys: how they are written, and how a presented key is looked up. Parsing and the data
model only: :mod:`rayllm_auth.keystore` reads and combines the sources.

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
    in ``=``) need no quoting. Options (``models=``, ``expires=``) exist only in the key file:
    an entry that looks like one (``name=...``) is an error, never a key.
``RAY_LLM_API_KEYS_FILE``
    Path of a key file (format in :mod:`rayllm_auth.keyfile`).

Error messages name the variable and the entry number, never the entry's text, which may be a
key; they raise :class:`~rayllm_auth.errors.ConfigError`.

Lookup: every accepted key is stored as ``sha256(key)`` in a dict. A request's key is hashed
and looked up, which costs the same for 1 or 10,000 keys. The lookup's timing depends only on
the SHA-256 digest of what the client sent; learning anything about a stored digest from that
timing would still leave the attacker needing a SHA-256 preimage, so no key content leaks.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional

from rayllm_auth._bootstrap import KEY_SOURCES
from rayllm_auth.errors import ConfigError

# The per-request hash. CPython's own SHA-256 gives the same digest as hashlib's OpenSSL one,
# for a fraction of the cost where it runs: inside Ray's app, after ~400 us of other Python
# code, OpenSSL 3 setting up a digest context (provider lookup, context allocation) takes
# about 15 us of cold code per request, CPython's about 5 (benchmarks/in_app_bench.py).
try:
    from _sha2 import sha256 as _request_sha256  # Python 3.12 onwards
except ImportError:
    try:
        from _sha256 import sha256 as _request_sha256  # Python 3.10, 3.11
    except ImportError:  # a Python built without its own hashes
        _request_sha256 = hashlib.sha256

__all__ = [
    "KEY_SOURCES",
    "Grant",
    "Entry",
    "KeySet",
    "environment_entries",
    "parse_entry",
    "looks_like_option",
    "key_id_for_digest",
    "is_sendable_key",
    "MAX_KEY_LENGTH",
]

logger = logging.getLogger("rayllm_auth")

RAY_LLM_API_KEYS, VLLM_API_KEY, RAY_LLM_API_KEYS_FILE = KEY_SOURCES

#: Longest key accepted, in bytes, both in configuration and in a request.
MAX_KEY_LENGTH = 512
#: Keys shorter than this are accepted with a warning: fine for a demo, guessable in production.
SHORT_KEY_WARNING_LENGTH = 20

_HASHED_PREFIX = "sha256"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# What a key-file option looks like: a name and '=' (in any case: 'Models=' is a typo, not a
# key). A key written like this is refused, so a misplaced option (its own line, a stray
# comma) can never become a key.
_OPTION = re.compile(r"[A-Za-z][A-Za-z_]*=")
# Printable ASCII without space: what an HTTP header can carry as a bearer token.
_SENDABLE = bytes(range(0x21, 0x7F))
_RESERVED_IN_LIST = frozenset(b",:")


def is_sendable_key(key: bytes) -> bool:
    """True if ``key`` could be sent in an ``Authorization`` header: 1..MAX_KEY_LENGTH
    printable ASCII bytes, no whitespace."""
    # translate() deletes every allowed byte (in C, on the per-request path): anything left
    # over is a byte a key may not contain.
    return 0 < len(key) <= MAX_KEY_LENGTH and not key.translate(None, _SENDABLE)


def looks_like_option(text: str) -> bool:
    """True if ``text`` starts like a key-file option (``models=...``, ``expires=...``)."""
    return _OPTION.match(text) is not None


def key_id_for_digest(digest: bytes) -> str:
    """Stable id for an unnamed key, derived from its SHA-256 digest.

    A second, domain-separated hash of the digest: the id is the same whether the key was
    configured in plain or hashed form, and reveals nothing that helps guess a random key.
    """
    return "key-" + hashlib.sha256(b"rayllm-auth key id\x00" + digest).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted key may do. Holds no key material.

    ``models`` is None for a key that may use every model, else the model ids it may use
    (a LoRA id ``base:adapter`` is allowed when its base is, see :meth:`allows`).
    ``expires`` is None for a key that never expires, else the Unix time from which it is
    refused. ``rpm`` (requests per minute), ``concurrency`` (requests in flight) and ``tpm``
    (prompt and completion tokens per minute) are None for no limit, else enforced across
    the whole application (:mod:`rayllm_auth.quota`); ``rate_limited`` is True for a key with
    any of the three. ``plain`` is True for a key with none of these: the middleware's short
    path.
    """

    key_id: str
    models: Optional[frozenset[str]] = None
    expires: Optional[float] = None
    rpm: Optional[int] = None
    concurrency: Optional[int] = None
    tpm: Optional[int] = None
    # Worked out once: the middleware reads them on every request.
    rate_limited: bool = field(init=False, compare=False, repr=False)
    plain: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        limited = self.rpm is not None or self.concurrency is not None or self.tpm is not None
        object.__setattr__(self, "rate_limited", limited)
        object.__setattr__(self, "plain", self.models is None and self.expires is None
                           and not limited)

    def allows(self, model: str) -> bool:
        if self.models is None or model in self.models:
            return True
        base, colon, _ = model.partition(":")  # Ray's get_base_model_id: text before ':'
        return bool(colon) and base in self.models


@dataclass(frozen=True, slots=True)
class Entry:
    """One configured key: its digest and what it may do."""

    digest: bytes
    grant: Grant


class KeySet:
    """The accepted keys of one process: ``sha256(key) -> Grant``. Immutable, never pickled.

    Raises ConfigError when built from entries that configure one key twice differently.
    """

    __slots__ = ("_grants", "sources")

    def __init__(self, entries: Iterable[Entry], sources: tuple[str, ...]):
        grants: dict[bytes, Grant] = {}
        for entry in entries:
            known = grants.get(entry.digest)
            if known is not None and known != entry.grant:
                raise ConfigError(
                    f"the same key is configured twice, as {known.key_id!r} and "
                    f"{entry.grant.key_id!r} (in {', '.join(sources)}), with different ids, "
                    f"models or expiry; configure it once"
                )
            grants[entry.digest] = entry.grant
        _refuse_ids_with_different_limits(grants.values())
        self._grants = grants
        self.sources = sources

    def lookup(self, presented: bytes) -> Optional[Grant]:
        """The grant of ``presented`` if it is a configured key (expired or not), else None."""
        return self._grants.get(_request_sha256(presented).digest())

    def holds_digest(self, digest: bytes) -> bool:
        return digest in self._grants

    @property
    def grants(self) -> list[Grant]:
        return list(self._grants.values())

    @property
    def key_ids(self) -> list[str]:
        return sorted({grant.key_id for grant in self._grants.values()})

    def __len__(self) -> int:
        return len(self._grants)

    def __repr__(self) -> str:
        return f"KeySet({len(self)} keys from {', '.join(self.sources)})"

    def __reduce__(self):
        # Key digests travel nowhere: a replica reads its own keys from its own environment.
        raise TypeError("rayllm_auth.KeySet must not be pickled")


def _refuse_ids_with_different_limits(grants: Iterable[Grant]) -> None:
    # Limits are kept per key id across the application (keys sharing an id, e.g. an old
    # and a new key during a rotation, share one budget): one id, one set of limits.
    limits: dict[str, tuple] = {}
    for grant in grants:
        these = (grant.rpm, grant.concurrency, grant.tpm)
        if limits.setdefault(grant.key_id, these) != these:
            raise ConfigError(
                f"keys with the id {grant.key_id!r} have different rpm=, concurrency= or tpm=: keys "
                f"sharing an id share its limits, so give them the same ones"
            )


def environment_entries(environ: Mapping[str, str]) -> list[Entry]:
    """Entries of the key variables themselves (not the key file). Raises ConfigError."""
    entries: list[Entry] = []
    if VLLM_API_KEY in environ:
        entries.append(_parse_vllm_api_key(environ[VLLM_API_KEY]))
    if RAY_LLM_API_KEYS in environ:
        entries.extend(_parse_key_list(environ[RAY_LLM_API_KEYS], RAY_LLM_API_KEYS))
    return entries


def _parse_vllm_api_key(value: str) -> Entry:
    key = value.strip()
    if not key:
        raise ConfigError(
            f"{VLLM_API_KEY} is set but empty: set it to a key, or unset it and use "
            f"{RAY_LLM_API_KEYS}"
        )
    return _plain_entry(key, None, VLLM_API_KEY, frozenset(), Grant(""))


def _parse_key_list(value: str, variable: str) -> list[Entry]:
    entries = []
    for number, raw in enumerate(value.split(","), start=1):
        text = raw.strip()
        if text:
            entries.append(parse_entry(text, f"entry {number} of {variable}"))
    if not entries:
        raise ConfigError(
            f"{variable} is set but holds no key: give one or more comma-separated keys, "
            f"or unset it"
        )
    return entries


def parse_entry(text: str, where: str, limits: Grant = Grant(""), *,
                in_file: bool = False) -> Entry:
    """One ``[ID:]KEY`` or ``[ID:]sha256:HEX`` entry, with the models, expiry and limits of
    ``limits`` (its key id is ignored). Raises ConfigError naming ``where``.

    ``in_file``: a plain key must be named and at least SHORT_KEY_WARNING_LENGTH long, so
    a stray line of a key file (a model id wrapped onto a line of its own) is an error
    instead of a key anyone could guess.
    """
    if looks_like_option(text):
        raise _option_error(where)
    parts = text.split(":")
    if in_file and len(parts) < 3 and parts[0] != _HASHED_PREFIX and (
            len(parts) == 1 or len(parts[1]) < SHORT_KEY_WARNING_LENGTH):
        raise ConfigError(
            f"{where} is not a key file entry: a plain key there needs an id and at least "
            f"{SHORT_KEY_WARNING_LENGTH} characters (ID:KEY), or write it hashed "
            f"(ID:sha256:HEX); a bare word is most likely a stray line"
        )
    if len(parts) == 1:
        return _plain_entry(text, None, where, _RESERVED_IN_LIST, limits)
    if len(parts) == 2 and parts[0] == _HASHED_PREFIX:
        return _hashed_entry(parts[1], None, where, limits)
    if len(parts) == 2:
        return _plain_entry(parts[1], _key_id(parts[0], where), where, _RESERVED_IN_LIST, limits)
    if len(parts) == 3 and parts[1] == _HASHED_PREFIX:
        return _hashed_entry(parts[2], _key_id(parts[0], where), where, limits)
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
    key: str, key_id: Optional[str], where: str, reserved: frozenset[int], limits: Grant
) -> Entry:
    # isascii() first: a byte that is not UTF-8 reaches os.environ as a lone surrogate, which
    # encode() would reject with an error quoting it and its position.
    raw = key.encode("ascii") if key.isascii() else b"\x80"
    if not is_sendable_key(raw) or not reserved.isdisjoint(raw):
        forbidden = "".join(f" or {chr(b)!r}" for b in sorted(reserved))
        raise ConfigError(
            f"{where} is not a usable key: keys are 1 to {MAX_KEY_LENGTH} printable ASCII "
            f"characters without spaces{forbidden}"
        )
    if reserved and looks_like_option(key):  # a list entry (VLLM_API_KEY is one whole key)
        raise _option_error(where)
    if len(raw) < SHORT_KEY_WARNING_LENGTH:
        logger.warning(
            "rayllm-auth: %s is shorter than %d characters and could be guessed; "
            "use at least 32 random bytes for production keys, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'",
            where,
            SHORT_KEY_WARNING_LENGTH,
        )
    return _entry(hashlib.sha256(raw).digest(), key_id, limits)


def _option_error(where: str) -> ConfigError:
    return ConfigError(
        f"{where} looks like an option (NAME=...), not a key: options such as models= and "
        f"expires= follow a key on the same line of the key file"
    )


def _hashed_entry(hex_digest: str, key_id: Optional[str], where: str, limits: Grant) -> Entry:
    if not _HEX_DIGEST.fullmatch(hex_digest):
        raise ConfigError(
            f"{where} is not a usable hashed key: write sha256: followed by the 64 "
            f"lowercase hex digits of the key's SHA-256 digest"
        )
    return _entry(bytes.fromhex(hex_digest), key_id, limits)


def _entry(digest: bytes, key_id: Optional[str], limits: Grant) -> Entry:
    return Entry(digest, replace(limits, key_id=key_id or key_id_for_digest(digest)))
