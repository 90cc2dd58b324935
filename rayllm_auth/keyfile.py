"""The key file named by ``RAY_LLM_API_KEYS_FILE``: its format, and reading it safely.

Format (UTF-8 text, one key per line; a line ends at ``\\n`` or ``\\r\\n`` and nowhere else)::

    # rayllm-auth key file. '#' starts a comment (at the start of a line or after a space).
    # ENTRY [models=MODEL[,MODEL...]] [expires=TIME] [rpm=N] [concurrency=N] [tpm=N]
    #   ENTRY: ID:KEY (KEY at least 20 characters), sha256:HEX or ID:sha256:HEX.
    #   models= limits the key to these model ids (a LoRA id base:adapter follows its base);
    #   without it the key may use every model.
    #   expires= an ISO 8601 time with its zone, e.g. 2027-01-31T00:00:00Z: from then on
    #   the key is refused (no reload needed).
    #   rpm= requests per minute, concurrency= requests in flight, tpm= prompt + completion
    #   tokens per minute, for the whole application (all keys with the same ID share them).
    team-a:sha256:3b1f...e9   models=llama-3-8b,qwen-2-7b   expires=2027-01-31T00:00:00Z
    batch:sha256:9c04...5d    rpm=600 concurrency=8 tpm=200000
    *                         rpm=60                        # every key without limits
    ci-bot:sha256:77aa...01                                 # every model, no expiry
    legacy:sk-plaintext-key-from-before-we-hashed

Fields are separated by spaces or tabs. Blank lines and comment lines are skipped; a file with
no key is invalid. Everything that could silently widen a key, or make a key of a stray word,
is an error instead (:class:`~rayllm_auth.errors.ConfigError`): a control or line-break
character other than ``\\n`` (``\\x0b``, ``\\x85``, U+2028... which ``str.splitlines`` would
split at), an option on a line of its own or in any case (``Models=``), an unknown or
repeated option, an empty model id (``models=a,``), an option written inside a comment, and
a plain key without an id or shorter than 20 characters (a model id wrapped onto its own line
would otherwise be a key for every model).
Error messages name the file and the line number, never the line's text (it may hold a key).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Optional

from rayllm_auth.errors import ConfigError
from rayllm_auth.keys import (
    _HASHED_PREFIX,
    RAY_LLM_API_KEYS_FILE,
    Entry,
    Grant,
    looks_like_option,
    parse_entry,
)

__all__ = ["KeyFile", "Signature", "read_key_file", "parse_key_file", "file_signature",
           "parse_expiry"]

#: A key file larger than this is refused: it is a mistake (a wrong path), not a key list.
MAX_KEY_FILE_BYTES = 16 * 1024 * 1024
_FIELD_SEPARATOR = re.compile(r"[ \t]+")
#: The first field of the line that sets default limits.
DEFAULTS_ENTRY = "*"


class Signature(NamedTuple):
    """What identifies one state of the file: device, inode, size, modification and change
    times. ``ctime_ns`` changes with every write or rename and cannot be set by a writer."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class KeyFile:
    path: str
    signature: Signature  #: what :func:`file_signature` said when this content was read
    entries: list[Entry]
    #: The ``*`` line's limits, for every key (from any source) without limits of its own.
    defaults: Optional[Grant] = None


def file_signature(path: str) -> Signature:
    """The signature of the file's current state. Raises OSError.

    ``os.stat`` follows symlinks, so a Kubernetes Secret update (a new directory swapped in
    behind the ``..data`` symlink) gives a new inode and a new signature.
    """
    st = os.stat(path)
    return Signature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_key_file(path: str) -> KeyFile:
    """Read and parse the key file. Raises ConfigError (naming the file, never its content)
    if it cannot be read, changed while it was read, or is invalid."""
    where = f"{RAY_LLM_API_KEYS_FILE} ({path})"
    try:
        before = file_signature(path)
        if before.size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{where} is larger than {MAX_KEY_FILE_BYTES} bytes")
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
        after = file_signature(path)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if before != after:
        # Written in place while we read it (not an atomic rename): the content may be torn.
        raise ConfigError(f"{where} changed while it was read; write it atomically (rename)")
    try:
        text = data.decode("utf-8-sig")  # a byte order mark (Windows editors) is not a key
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    return KeyFile(path, after, *_parse(text, where))


def parse_key_file(text: str, where: str) -> list[Entry]:
    """The entries of a key file's text. Raises ConfigError."""
    return _parse(text, where)[0]


def _parse(text: str, where: str) -> tuple[list[Entry], Optional[Grant]]:
    """The entries of a key file's text, and its ``*`` line's limits. Raises ConfigError."""
    entries = []
    defaults = None
    plain_ids = []  # (where, id) of each plain ID:KEY entry
    for number, line in enumerate(text.split("\n"), start=1):
        line_where = f"line {number} of {where}"
        line = line[:-1] if line.endswith("\r") else line
        if not line.replace("\t", " ").isprintable():
            raise ConfigError(
                f"{line_where} holds a control or line-break character other than a newline "
                f"(e.g. a soft line break pasted from a word processor); only \\n ends a line"
            )
        fields = _FIELD_SEPARATOR.split(line.strip(" \t"))
        comment = next((i for i, f in enumerate(fields) if f.startswith("#")), len(fields))
        fields, comment_words = fields[:comment], fields[comment:]
        if fields and fields != [""]:
            if any(looks_like_option(word.lstrip("#(")) for word in comment_words) or \
                    _OPTION_IN_COMMENT.search(" ".join(comment_words)):
                raise ConfigError(
                    f"{line_where} has an option inside its comment, where it would be "
                    f"ignored; move it before the '#'"
                )
            if fields[0] == DEFAULTS_ENTRY:
                if defaults is not None:
                    raise ConfigError(f"{line_where} is a second '{DEFAULTS_ENTRY}' line")
                defaults = _parse_defaults(fields[1:], line_where)
                continue
            entries.append(_parse_line(fields, line_where))
            key_id, colon, rest = fields[0].partition(":")
            if colon and key_id != _HASHED_PREFIX and not rest.startswith(_HASHED_PREFIX + ":"):
                plain_ids.append((line_where, key_id))
    if not entries:
        raise ConfigError(f"{where} holds no key: write one entry per line (see the README)")
    _refuse_model_ids_read_as_keys(entries, plain_ids)
    return entries, defaults


def _parse_defaults(options: list[str], where: str) -> Grant:
    """``* rpm=N concurrency=N tpm=N``: limits for every key without limits of its own."""
    limits = _parse_options(options, where)
    if limits.models is not None or limits.expires is not None or not limits.rate_limited:
        raise ConfigError(f"{where}: a '{DEFAULTS_ENTRY}' line sets default limits: rpm=, "
                          f"concurrency= and/or tpm=, nothing else")
    return limits


def _refuse_model_ids_read_as_keys(entries: list[Entry], plain_ids) -> None:
    """A LoRA id ``base:adapter`` has the shape of a plain ``ID:KEY`` entry, and model ids are
    public: a list wrapped onto its own line would be a key for every model. So a plain
    entry whose id is a model (or LoRA base) named in the file is an error."""
    named = {model for entry in entries for model in entry.grant.models or ()}
    named |= {model.partition(":")[0] for model in named}
    for where, key_id in plain_ids:
        if key_id in named:
            raise ConfigError(
                f"{where} reads as a plain key whose id is a model named in this file: most "
                f"likely a LoRA id (base:adapter) wrapped onto a line of its own; if it is a "
                f"key, write it hashed (ID:sha256:HEX) or give it another id"
            )


def _parse_line(fields: list[str], where: str) -> Entry:
    entry, *options = fields
    if looks_like_option(entry):
        raise ConfigError(
            f"{where} starts with an option, not a key: options follow their key on the "
            f"same line"
        )
    return parse_entry(entry, where, _parse_options(options, where), in_file=True)


def _parse_options(options: list[str], where: str) -> Grant:
    values: dict[str, str] = {}
    for option in options:
        name, equals, value = option.partition("=")
        if not equals or name not in _OPTIONS or name in values:
            raise ConfigError(
                f"{where} cannot be read: after the key, only the options "
                f"{', '.join(o + '=' for o in _OPTIONS)} may follow, each at most once"
            )
        values[name] = value
    return Grant("", *(parse(values[name], where) if name in values else None
                       for name, parse in _OPTIONS.items()))


def _parse_models(value: str, where: str) -> frozenset[str]:
    models = value.split(",")
    if not all(models):
        # 'models=a,' is a list wrapped onto the next line, or a typo: never a shorter list.
        raise ConfigError(f"{where} has an empty model id in models=; list ids separated by "
                          f"single commas (omit models= to allow every model)")
    return frozenset(models)


def parse_expiry(value: str, where: str) -> float:
    """Unix time of an ISO 8601 time with a zone (``2027-01-31T00:00:00Z``). Raises
    ConfigError: a time without a zone would depend on the replica's clock settings."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ConfigError(
            f"{where} has an unreadable expires= time: write an ISO 8601 time with its zone, "
            f"e.g. expires=2027-01-31T00:00:00Z"
        )
    return moment.timestamp()


#: Largest rpm=, concurrency= or tpm= accepted: more is a typo, not a limit.
MAX_LIMIT = 10**9


def _parse_limit(name: str):
    def parse(value: str, where: str) -> int:
        # Length first: int() of thousands of digits raises ValueError, not ConfigError.
        if not (value.isascii() and value.isdigit() and len(value) <= len(str(MAX_LIMIT))) \
                or not 0 < int(value) <= MAX_LIMIT:
            raise ConfigError(f"{where} has an unreadable {name}=: write a whole number from 1 "
                              f"to {MAX_LIMIT} (omit {name}= for no limit)")
        return int(value)
    return parse


# Option name -> parser, in the order of Grant's fields after key_id.
_OPTIONS = {"models": _parse_models, "expires": parse_expiry, "rpm": _parse_limit("rpm"),
            "concurrency": _parse_limit("concurrency"), "tpm": _parse_limit("tpm")}
# An option name followed by '=' or ':' anywhere in a comment ('# models = a', '(models=a)'):
# the writer meant a limit, which a comment would silently drop.
_OPTION_IN_COMMENT = re.compile(rf"\b(?:{'|'.join(_OPTIONS)})\s*[=:]", re.IGNORECASE)
