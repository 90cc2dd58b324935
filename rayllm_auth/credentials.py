"""Find the one API key a request presents, from its raw ASGI headers.

Accepted: ``Authorization: Bearer <key>`` (scheme in any case) and ``x-api-key: <key>``.
Several such headers are fine if they all carry the same key. Anything else is a
:class:`Denial`: no credential, a malformed one (other scheme, empty, non-ASCII, too long,
inner whitespace), or conflicting ones. Cookies and query strings are never read: a key is
never ambient, so a browser cannot be made to send it by another site.
"""

from __future__ import annotations

import enum
from typing import Iterable, Union

from rayllm_auth.keys import is_sendable_key

__all__ = ["Denial", "presented_key"]


class Denial(enum.Enum):
    """Why a request is refused. The value is the outcome label used in logs and metrics."""

    MISSING = "missing"
    MALFORMED = "malformed"
    CONFLICTING = "conflicting"
    INVALID = "invalid"


_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_OWS = b" \t"


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> Union[bytes, Denial]:
    """The key carried by ``headers`` (ASGI: lower-case names, raw bytes), or why there is none.

    Never raises on hostile bytes: anything that is not a clean single key is a Denial.
    """
    found = None
    for name, value in headers:
        if name == _AUTHORIZATION:
            key = _bearer_token(value)
        elif name == _X_API_KEY:
            key = value.strip(_OWS)
        else:
            continue
        if key is None or not is_sendable_key(key):
            return Denial.MALFORMED
        if found is None:
            found = key
        elif key != found:  # both values come from the client: nothing secret is compared
            return Denial.CONFLICTING
    return Denial.MISSING if found is None else found


def _bearer_token(value: bytes):
    scheme, space, token = value.strip(_OWS).partition(b" ")
    if not space or scheme.lower() != b"bearer":
        return None
    return token.lstrip(b" ")
