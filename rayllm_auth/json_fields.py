"""One top-level field of a JSON object, read without parsing the whole object when the field
sits where engines write it.

Token accounting needs a response's ``usage`` and ``model``, two small fields of a body that
can be hundreds of MiB (an embeddings batch). ``json.loads`` of such a body holds the event
loop for seconds and takes several times its size in memory; here only the bytes around
the field are parsed when the field is near the end (``usage``) or the start (``model``).
Anywhere else, or when the search does not settle quickly, the body is parsed whole: the
answer is always the one ``json.loads(body)[name]`` gives, or :class:`FieldNotFound` where
that gives none (tests compare both on generated objects). Two liberties, for a body that is
not one JSON object (the app's own answers are): :func:`last_field` does not check what
comes before the field, :func:`first_field` what comes after it (nor a repeated key).

How a key is known to be the object's own, and not a nested object's, without parsing
what comes before it:

* ``"name"`` preceded by ``{`` or ``,`` (whitespace aside) and followed by ``:`` is a key:
  inside a string every ``"`` is escaped, so those bytes cannot be string content, and a
  quote that closed a string cannot be followed by a bare word.
* Its depth is checked by parsing only one side of it. After the value (the last key, for
  ``usage``): ``{`` plus the rest of the body is one JSON object only if the rest closes
  exactly one object. Before the key (the first key, for ``model``): what comes before it,
  ``}`` added, is one JSON object only if it opened exactly one.
"""

from __future__ import annotations

import json

__all__ = ["FieldNotFound", "last_field", "first_field"]

_DECODER = json.JSONDecoder()
_WHITESPACE = b" \t\n\r"
#: Occurrences of the name's bytes looked at (string values too) before parsing it all.
MAX_LOOKS = 64
#: The most bytes parsed on the far sides of keys (after them for last_field, before them for
#: first_field), all keys looked at together, before parsing the body all instead.
MAX_SIDE_BYTES = 1024 * 1024
#: A value read by first_field() ends within this many bytes after its key (model names are
#: short), or the body is parsed all.
FIRST_FIELD_WINDOW = 64 * 1024


class FieldNotFound(ValueError):
    """The body is not a JSON object with that key."""


def last_field(body: bytes, name: str):
    """``json.loads(body)[name]``, fast when the key comes late."""
    parsed = 0
    for _, colon in _keys(body, name, last=True):
        parsed += len(body) - colon
        if parsed > MAX_SIDE_BYTES:
            break
        try:
            text = body[colon + 1:].decode("utf-8", "surrogatepass").lstrip()
            value, end = _DECODER.raw_decode(text)
            if _closes_one_object(text[end:]):
                return value
        except (ValueError, RecursionError):
            pass  # not JSON here
    return _parsed(body, name)


def first_field(body: bytes, name: str):
    """``json.loads(body)[name]``, fast when the key comes early (the first, if repeated)."""
    parsed = 0
    for before, colon in _keys(body, name, last=False):
        parsed += before
        if parsed > MAX_SIDE_BYTES:
            break
        if _opens_one_object(body, before):
            window = body[colon + 1:colon + 1 + FIRST_FIELD_WINDOW]
            try:
                return _DECODER.raw_decode(_decoded(window).lstrip())[0]
            except (ValueError, RecursionError):
                break  # longer than the window
    return _parsed(body, name)


def _keys(body: bytes, name: str, last: bool):
    """For each key ``name`` in ``body`` (at any depth), from the end if ``last``: the index
    of the ``{`` or ``,`` before it and of the ``:`` after it; among the first MAX_LOOKS
    occurrences of its bytes."""
    key = json.dumps(name).encode()
    at = body.rfind(key) if last else body.find(key)
    for _ in range(MAX_LOOKS):
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


def _parsed(body: bytes, name: str):
    """``json.loads(body)[name]``, the whole body parsed."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise FieldNotFound(name) from None
    if not isinstance(document, dict) or name not in document:
        raise FieldNotFound(name)
    return document[name]


def _decoded(window: bytes) -> str:
    """``window`` decoded as json.loads decodes, a character cut at its end left out."""
    try:
        return window.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        if exc.start < len(window) - 3:
            raise
        return window[:exc.start].decode("utf-8", "surrogatepass")


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
        return isinstance(json.loads(body[:before].decode("utf-8", "surrogatepass") + "}"),
                          dict)
    except (ValueError, RecursionError):
        return False
