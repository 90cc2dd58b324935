"""The key file named by ``RAY_LLM_API_KEYS_FILE``: its format, and reading it safely.

Format (UTF-8 text, one key per line)::

    # rayllm-auth key file. '#' starts a comment (at the start of a line or after a space).
    # ENTRY [models=MODEL[,MODEL...]]
    #   ENTRY is written as in RAY_LLM_API_KEYS: KEY, ID:KEY, sha256:HEX or ID:sha256:HEX.
    #   models= limits the key to these model ids (a LoRA id base:adapter follows its base);
    #   without it the key may use every model.
    team-a:sha256:3b1f...e9   models=llama-3-8b,qwen-2-7b
    ci-bot:sha256:77aa...01                                 # every model
    legacy:sk-plaintext-key-from-before-we-hashed

Blank lines and comment lines are skipped; a file with no key is invalid. Error messages name
the file and the line number, never the line's text (it may hold a key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from rayllm_auth.errors import ConfigError
from rayllm_auth.keys import RAY_LLM_API_KEYS_FILE, Entry, parse_entry

__all__ = ["KeyFile", "read_key_file", "parse_key_file", "file_signature"]

#: A key file larger than this is refused: it is a mistake (a wrong path), not a key list.
MAX_KEY_FILE_BYTES = 16 * 1024 * 1024
_MODELS_FIELD = "models="


@dataclass(frozen=True)
class KeyFile:
    path: str
    signature: tuple  #: what :func:`file_signature` said when this content was read
    entries: list[Entry]


def file_signature(path: str) -> tuple:
    """Identity of the file's current content: device, inode, size, modification time.

    ``os.stat`` follows symlinks, so a Kubernetes Secret update (a new directory swapped in
    behind the ``..data`` symlink) gives a new inode and a new signature. Raises OSError.
    """
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_key_file(path: str) -> KeyFile:
    """Read and parse the key file. Raises ConfigError (naming the file, never its content)
    if it cannot be read, is being rewritten while read, or is invalid."""
    where = f"{RAY_LLM_API_KEYS_FILE} ({path})"
    try:
        before = file_signature(path)
        if before[2] > MAX_KEY_FILE_BYTES:
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
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None
    return KeyFile(path, after, parse_key_file(text, where))


def parse_key_file(text: str, where: str) -> list[Entry]:
    """The entries of a key file's text. Raises ConfigError."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = _fields(line)
        if fields:
            entries.append(_parse_line(fields, f"line {number} of {where}"))
    if not entries:
        raise ConfigError(f"{where} holds no key: write one entry per line (see the README)")
    return entries


def _fields(line: str) -> list[str]:
    fields = []
    for field in line.split():
        if field.startswith("#"):
            break
        fields.append(field)
    return fields


def _parse_line(fields: list[str], where: str) -> Entry:
    entry, *options = fields
    models: Optional[frozenset[str]] = None
    for option in options:
        if not option.startswith(_MODELS_FIELD) or models is not None:
            raise ConfigError(
                f"{where} cannot be read: after the key, only one models=MODEL[,MODEL...] "
                f"field may follow"
            )
        models = frozenset(m for m in option[len(_MODELS_FIELD):].split(",") if m)
        if not models:
            raise ConfigError(f"{where} has an empty models= list; omit it to allow every model")
    return parse_entry(entry, where, models)
