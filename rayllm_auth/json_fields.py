"""One top-level field of a JSON object, read without parsing the whole object.

Token accounting needs a response's ``usage`` and ``model``, two small fields of a body that
can be hundreds of MiB (an embeddings batch). ``json.loads`` of such a body holds the event
loop for seconds and takes several times its size in memory; here only the bytes around
the field are parsed. For a JSON object, the answer is the one ``json.loads(body)[name]``
gives, or :class:`FieldNotFound` where that would not give one (tests compare both on
generated objects); :func:`last_field` also checks that the body ends as the object's end,
:func:`first_field` reads nothing past its value.

How a key is known to be the object's own, and not a nested object's, without parsing
what comes before it:

* ``"name"`` preceded by ``{`` or ``,`` (whitespace aside) and followed by ``:`` is a key:
  inside a string every ``"`` is escaped, so those bytes cannot be string content, and a
  quote that closed a string cannot be followed by a bare word.
* Its depth is checked by parsing only one side of it. After the value (the last key, for
  ``usage``, which engines write at the end): ``{`` plus the rest of the body is one JSON
  object only if the rest closes exactly one object. Before the key (the first key, for
  ``model``, written near the start): what comes before it, ``}`` added, is one JSON object
  only if it opened exactly one.
"""

from __future__ import annotations

import json

__all__ = ["FieldNotFound", "last_field", "first_field"]

_DECODER = json.JSONDecoder()
_WHITESPACE = b" \t\n\r"
#: A value read by first_field() must end within this many bytes after its key (model
#: names are short): the rest of the body is never decoded.
FIRST_FIELD_WINDOW = 64 * 1024
#: Keys of the name looked at, nested ones included, before giving up.
MAX_CANDIDATES = 32


class FieldNotFound(ValueError):
    """The body is not a JSON object with that key, or not readable as one here."""


def last_field(body: bytes, name: str):
    """``json.loads(body)[name]`` for an object ``body`` whose ``name`` key comes late:
    parses the value and what follows it (JSON keeps the last of repeated keys)."""
    for _, colon in _keys(body, name, last=True):
        try:
            text = body[colon + 1:].decode().lstrip()
            value, end = _DECODER.raw_decode(text)
            if _closes_one_object(text[end:]):
                return value
        except (ValueError, RecursionError):
            pass  # not JSON here
    raise FieldNotFound(name)


def first_field(body: bytes, name: str):
    """``json.loads(body)[name]`` for an object ``body`` whose ``name`` key comes early and
    appears once at the top: parses what precedes the key and the value (which must end
    within FIRST_FIELD_WINDOW bytes)."""
    for before, colon in _keys(body, name, last=False):
        if _opens_one_object(body, before):
            window = body[colon + 1:colon + 1 + FIRST_FIELD_WINDOW]
            try:  # a character cut at the window's end is past the value, or fails it
                return _DECODER.raw_decode(window.decode(errors="ignore").lstrip())[0]
            except (ValueError, RecursionError):
                break
    raise FieldNotFound(name)


def _keys(body: bytes, name: str, last: bool):
    """For each key ``name`` in ``body`` (at any depth), from the end if ``last``: the index
    of the ``{`` or ``,`` before it and of the ``:`` after it; at most MAX_CANDIDATES of them (each costs a parse: a body with many
    nested keys of that name and none at the top is not read)."""
    key = json.dumps(name).encode()
    at = body.rfind(key) if last else body.find(key)
    for _ in range(MAX_CANDIDATES):
        if at == -1:
            return
        before = at - 1
        while before >= 0 and body[before] in _WHITESPACE:
            before -= 1
        colon = at + len(key)
        while colon < len(body) and body[colon] in _WHITESPACE:
            colon += 1
        if before >= 0 and body[before] in b"{," and body[colon:colon + 1] == b":":
            yield before, colon
        at = body.rfind(key, 0, at) if last else body.find(key, at + 1)


def _closes_one_object(rest: str) -> bool:
    """Whether ``rest``, what follows a value, is the rest of the outermost object."""
    rest = rest.lstrip()
    if rest.startswith(","):
        return isinstance(json.loads("{" + rest[1:]), dict)  # ValueError if not JSON
    return rest.rstrip() == "}"


def _opens_one_object(body: bytes, before: int) -> bool:
    """Whether ``body[:before + 1]``, which ends with the ``{`` or ``,`` before a key,
    opened exactly one object, the outermost."""
    if body[before] == ord("{"):  # the first key: is this the outermost object's brace?
        return not body[:before].strip(_WHITESPACE)
    try:  # after a comma: the members before it, closed, must be one whole object
        return isinstance(json.loads(body[:before].decode() + "}"), dict)
    except (ValueError, RecursionError):
        return False
