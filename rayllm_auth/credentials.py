"""Take the one API key a request presents out of its raw ASGI headers.

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

__all__ = ["Denial", "take_key"]


class Denial(enum.Enum):
    """Why a request is refused. The value is the outcome label used in logs and metrics."""

    MISSING = "missing"
    MALFORMED = "malformed"
    CONFLICTING = "conflicting"
    INVALID = "invalid"


_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_OWS = b" \t"


def take_key(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Union[bytes, Denial], list]:
    """The key ``headers`` carry (ASGI: lower-case names, raw bytes), or why there is none;
    and the other headers, i.e. ``headers`` without the credential headers.

    One pass, as this runs for every request. Never raises on hostile bytes: anything that is
    not a clean single key is a Denial.
    """
    found = None
    others = []
    for header in headers:
        name = header[0]
        if name == _AUTHORIZATION:
            key = _bearer_token(header[1])
        elif name == _X_API_KEY:
            key = header[1].strip(_OWS)
        else:
            others.append(header)
            continue
        if key is None or not is_sendable_key(key):
            return Denial.MALFORMED, others
        if found is None:
            found = key
        elif key != found:  # both values come from the client: nothing secret is compared
            return Denial.CONFLICTING, others
    return (Denial.MISSING if found is None else found), others


def _bearer_token(value: bytes):
    scheme, space, token = value.strip(_OWS).partition(b" ")
    if not space or scheme.lower() != b"bearer":
        return None
    return token.lstrip(b" ")
