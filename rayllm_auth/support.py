"""Which Ray releases rayllm-auth supports, and which layout record serves each.

:data:`LAYOUTS` holds one record per Ray code layout (from ``patches/``); its ``ray``
specifiers are the supported releases. :func:`choose_layout` is the one place that picks a
record for a Ray version (activation and ``doctor`` both call it). The same range is published
as the ``ray`` extra in the package metadata (``pip install 'rayllm-auth[ray]'``) and as the
README's support table; tests keep both equal to this module.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from rayllm_auth.layout import Layout
from rayllm_auth.patches import (core_ingress_init_layout, core_ingress_layout,
                                 router_module_app_layout, router_module_init_layout,
                                 router_module_layout)

__all__ = ["LAYOUTS", "SUPPORTED_RAY", "Choice", "choose_layout", "supported_specifier",
           "ALLOW_UNTESTED_RAY"]

#: Set to 1/true/yes to try the nearest older layout on a Ray release newer than every row
#: (off by default; every target is still checked, and a missing one fails closed).
ALLOW_UNTESTED_RAY = "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY"

#: Oldest row first.
LAYOUTS: tuple[Layout, ...] = (
    router_module_app_layout.LAYOUT,
    router_module_layout.LAYOUT,
    router_module_init_layout.LAYOUT,
    core_ingress_init_layout.LAYOUT,
    core_ingress_layout.LAYOUT,
)

#: Human-readable union of every row, for messages and docs.
SUPPORTED_RAY = " or ".join(layout.ray for layout in LAYOUTS)


class Choice(NamedTuple):
    layout: Optional[Layout]  #: None: this Ray is not supported
    untested: bool  #: True if chosen by the ALLOW_UNTESTED_RAY escape hatch


def choose_layout(ray_version: str, *, enforce: bool,
                  environ: Mapping[str, str] = os.environ) -> Choice:
    """The layout record for ``ray_version``: the row that covers it; else, only when keys
    are enforced and ALLOW_UNTESTED_RAY is set and the Ray is newer than every row, the newest
    row (a newer Ray most likely kept the newest layout); else none.

    Never a row for a Ray between two rows: an unlisted release there may sit on either side
    of a layout change, and the older row's replica guard would not know a newer release's
    client-facing classes (its app would be served open, without any error)."""
    version = _version(ray_version)
    if version is None:
        return Choice(None, False)
    for layout in LAYOUTS:
        if SpecifierSet(layout.ray).contains(version, prereleases=True):
            return Choice(layout, False)
    hatch = environ.get(ALLOW_UNTESTED_RAY, "").strip().lower() in ("1", "true", "yes")
    newest = LAYOUTS[-1]
    if enforce and hatch and version > _lower_bound(newest):  # not in it, so above it
        return Choice(newest, True)
    return Choice(None, False)


def supported_specifier() -> SpecifierSet:
    """Every row as one PEP 440 specifier (the span of the rows, minus the minor releases
    between them): what the package's ``ray`` extra publishes."""
    minors = sorted({minor for layout in LAYOUTS for minor in _minors(layout)})
    low, high = minors[0], minors[-1]
    parts = [f">={low[0]}.{low[1]}", f"<{high[0]}.{high[1] + 1}"]
    parts += [f"!={low[0]}.{m}.*" for m in range(low[1] + 1, high[1])
              if (low[0], m) not in minors]
    return SpecifierSet(",".join(parts))


def _minors(layout: Layout) -> list[tuple[int, int]]:
    """The (major, minor) release lines a row covers: from its ``>=`` bound up to, not
    including, its ``<`` bound (rows are written ``>=X.A,<X.B``)."""
    low = _lower_bound(layout)
    (high,) = [Version(s.version) for s in SpecifierSet(layout.ray) if s.operator == "<"]
    return [(low.major, minor) for minor in range(low.minor, high.minor)]


def _version(text: str) -> Optional[Version]:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _lower_bound(layout: Layout) -> Version:
    return min(Version(spec.version) for spec in SpecifierSet(layout.ray)
               if spec.operator in (">=", "==", "~="))
