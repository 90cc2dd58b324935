"""Which Ray releases rayllm-auth supports, and which patch module serves each.

One row per Ray code layout. A Ray version outside every row is refused when keys are
configured (see :mod:`rayllm_auth.activation`). The same range is published as the
``ray`` extra in the package metadata (``pip install 'rayllm-auth[ray]'``), so tools can
read it without importing anything; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = ["Layout", "LAYOUTS", "SUPPORTED_RAY", "supported_specifier", "layout_for",
           "nearest_older_layout",
           "ALLOW_UNTESTED_RAY", "untested_ray_allowed"]

#: Set to 1/true/yes to try the nearest older layout on a Ray release the table does not list
#: (off by default; the patches still check every target and fail closed if one is missing).
ALLOW_UNTESTED_RAY = "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY"


@dataclass(frozen=True)
class Layout:
    ray: str  #: PEP 440 specifier of the Ray releases this row covers
    patch_module: str  #: module with BUILDER_HOOKS / REPLICA_HOOKS for that layout
    verified: str  #: what was run end to end, and when


LAYOUTS = (
    Layout(
        ray=">=2.49,<2.50",
        patch_module="rayllm_auth.patches.router_module_layout",
        verified="Ray 2.49.2 with vLLM 0.10.0, tests/compat/run.py (18 of 18), 2026-11-26",
    ),
    Layout(
        ray=">=2.54,<2.55",
        patch_module="rayllm_auth.patches.core_ingress_init_layout",
        verified="Ray 2.54.1 with vLLM 0.15.0, tests/compat/run.py (18 of 18), 2026-11-27",
    ),
    Layout(
        ray=">=2.60,<2.61",
        patch_module="rayllm_auth.patches.core_ingress_layout",
        verified="Ray 2.60.0 with vLLM 0.29.0, full suite (CI) and tests/compat/run.py, 2026-11-27",
    ),
)

#: Human-readable union of every row, for messages and docs.
SUPPORTED_RAY = " or ".join(layout.ray for layout in LAYOUTS)


def supported_specifier() -> SpecifierSet:
    """Every row as one PEP 440 specifier (the span of the rows, minus the minor releases
    between them): what the package's ``ray`` extra publishes."""
    minors = sorted({(v.major, v.minor) for layout in LAYOUTS
                     for v in [Version(s.version) for s in SpecifierSet(layout.ray)
                               if s.operator == ">="]})
    low, high = minors[0], minors[-1]
    parts = [f">={low[0]}.{low[1]}", f"<{high[0]}.{high[1] + 1}"]
    parts += [f"!={low[0]}.{m}.*" for m in range(low[1] + 1, high[1])
              if (low[0], m) not in minors]
    return SpecifierSet(",".join(parts))


def untested_ray_allowed(environ=None) -> bool:
    import os

    environ = os.environ if environ is None else environ
    return environ.get(ALLOW_UNTESTED_RAY, "").strip().lower() in ("1", "true", "yes")


def nearest_older_layout(ray_version: str) -> Optional[Layout]:
    """The row with the highest lower bound at or below ``ray_version`` (for the escape
    hatch): a newer Ray most likely kept the layout of the release before it."""
    try:
        version = Version(ray_version)
    except InvalidVersion:
        return None
    below = [(_lower_bound(layout), layout) for layout in LAYOUTS]
    below = [(bound, layout) for bound, layout in below if bound is not None and bound <= version]
    return max(below, key=lambda pair: pair[0])[1] if below else None


def _lower_bound(layout: Layout) -> Optional[Version]:
    bounds = [Version(spec.version) for spec in SpecifierSet(layout.ray)
              if spec.operator in (">=", "==", "~=")]
    return min(bounds) if bounds else None


def layout_for(ray_version: str) -> Optional[Layout]:
    """The row covering ``ray_version``, or None (also for an unparsable version)."""
    try:
        version = Version(ray_version)
    except InvalidVersion:
        return None
    for layout in LAYOUTS:
        if SpecifierSet(layout.ray).contains(version, prereleases=True):
            return layout
    return None
