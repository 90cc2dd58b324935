"""Take the one API key a request presents out of its raw ASGI headers.

Accepted: ``Authorization: Bearer <key>`` (scheme in any case) and ``x-api-key: <key>``.
Several such headers are fine if they all carry the same key. Anything else is a
:class:`~rayllm_auth.refusals.Refusal`: no credential, a malformed one (other scheme, empty,
non-ASCII, too long, inner whitespace, not bytes), or conflicting ones. Cookies and query
strings are never read: a key is never ambient, so a browser cannot be made to send it by
another site.

Header names are matched in any case. ASGI servers must lower-case them (uvicorn, which Ray
Serve's proxy runs, does); one that did not would otherwise let a second ``Authorization``
through unchecked, and on to the engine.
"""

from __future__ import annotations

from typing import Iterable, Union

from rayllm_auth.keys import is_sendable_key
from rayllm_auth.refusals import Refusal

__all__ = ["take_key", "without_credentials"]

_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_BEARER = b"bearer "  # the scheme and the one space that must follow it
_OWS = b" \t"
# Only a name this long can be a credential header's: the others (nearly all) pass on one
# length check, without a lower-cased copy of their name.
_CREDENTIAL_NAME_LENGTHS = frozenset((len(_AUTHORIZATION), len(_X_API_KEY)))


def take_key(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Union[bytes, Refusal], list]:
    """The key ``headers`` carry (raw ASGI bytes), or the Refusal saying why there is none;
    and the other headers, i.e. ``headers`` without the credential headers.

    One pass, as this runs for every request. Never raises on hostile bytes: anything that is
    not a clean single key is a Refusal.
    """
    found = None
    others = []
    for header in headers:
        name = header[0]
        if len(name) not in _CREDENTIAL_NAME_LENGTHS:
            others.append(header)
            continue
        name = name.lower()  # any case: see the module's docstring
        if name != _AUTHORIZATION and name != _X_API_KEY:
            others.append(header)
            continue
        key = _bearer_token(header[1]) if name == _AUTHORIZATION else header[1].strip(_OWS)
        # Not bytes: a value ASGI does not allow (a bytearray), whose key would be one too.
        if key is None or key.__class__ is not bytes or not is_sendable_key(key):
            return Refusal.MALFORMED, others
        if found is None:
            found = key
        elif key != found:  # both values come from the client: nothing secret is compared
            return Refusal.CONFLICTING, others
    return (Refusal.MISSING if found is None else found), others


def _bearer_token(value: bytes):
    """The token of ``Bearer <token>`` (scheme in any case, spaces after it), else None."""
    value = value.strip(_OWS)
    if value[:len(_BEARER)].lower() != _BEARER:
        return None
    return value[len(_BEARER):].lstrip(b" ")


def without_credentials(headers: Iterable[tuple[bytes, bytes]]) -> list:
    """``headers`` without any ``Authorization`` or ``x-api-key`` header, in any case (for
    requests that pass without a valid key: the credential goes no further either)."""
    return [h for h in headers if h[0].lower() not in (_AUTHORIZATION, _X_API_KEY)]
