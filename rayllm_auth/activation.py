"""Turning the patches on in one process, and failing closed when that is impossible.

Two modes:

* **enforce** (a key source is set, or :func:`rayllm_auth.install` was called): the builder
  hooks add the middleware where Serve LLM builds its app, and the replica hook adds it in
  every client-facing replica. Unsupported Ray, a missing patch target or any error while
  patching makes Serve LLM unimportable in this process (:func:`_bootstrap.block_serve_llm`).
* **report** (a Ray worker with no key source): only the replica hook, which logs one line
  saying auth is off, and refuses to start an app that was built with the middleware but
  finds no keys here. Stock Ray otherwise; an unsupported Ray is left alone.

Idempotent: activating again (or in both modes) registers nothing twice, and each patch
checks that its target is not already wrapped.
"""

from __future__ import annotations

import logging
import threading

import wrapt

from rayllm_auth import __version__
from rayllm_auth._bootstrap import block_serve_llm
from rayllm_auth.patching import apply
from rayllm_auth.support import ALLOW_UNTESTED_RAY, SUPPORTED_RAY, choose_layout

__all__ = ["activate", "install"]

logger = logging.getLogger("rayllm_auth")

_lock = threading.Lock()
_registered: set[tuple[str, bool]] = set()  # (module, enforce) given to wrapt


def install() -> None:
    """Protect Ray Serve LLM in this process, whatever the environment says.

    For people who prefer an explicit call to the ``.pth`` auto-activation. Apps built
    afterwards carry the middleware; their replicas must have keys configured or they refuse
    to start. Raises AuthUnavailableError if this Ray cannot be patched.
    """
    activate(enforce=True)


def activate(*, enforce: bool) -> None:
    """Register the patch hooks of the running Ray's layout (see module docstring)."""
    import ray

    version = getattr(ray, "__version__", "unknown")
    layout, untested = choose_layout(version, enforce=enforce)
    if layout is None:
        if enforce:
            block_serve_llm(
                f"API keys are configured but Ray {version} is not supported by "
                f"rayllm-auth {__version__} (supported: ray {SUPPORTED_RAY}); Ray Serve LLM "
                f"is disabled in this process rather than served without auth ({ALLOW_UNTESTED_RAY}"
                f"=1 tries the newest layout, only on a Ray newer than every supported release)"
            )
        logger.debug("rayllm-auth: Ray %s unsupported; auth stays off", version)
        return
    if untested:
        logger.warning(
            "rayllm-auth: Ray %s is not in the support table (ray %s); %s is set, so trying "
            "the patches for ray %s. Every patch target is still checked: a missing one "
            "disables Serve LLM here", version, SUPPORTED_RAY, ALLOW_UNTESTED_RAY, layout.ray)
    with _lock:
        new = [m for m in layout.modules(builder_side=enforce) if (m, enforce) not in _registered]
        _registered.update((m, enforce) for m in new)
    # Outside the lock: wrapt runs a hook at once if its module is already imported.
    for module_name in new:
        wrapt.register_post_import_hook(_hook(layout, version, enforce), module_name)


def _hook(layout, ray_version: str, enforce: bool):
    """Apply ``layout`` to a module; if that fails, fail closed (enforce) or leave Ray stock
    (report)."""

    def hook(module):
        try:
            apply(layout, module, builder_side=enforce)
        except Exception as exc:
            where = f"patching {module.__name__} of Ray {ray_version} ({layout.name})"
            if not enforce:
                logger.warning("rayllm-auth: %s failed (%s); auth stays off", where, exc)
                return
            block_serve_llm(
                f"API keys are configured but {where} failed ({exc}); Ray Serve LLM is "
                f"disabled in this process rather than served without auth"
            )

    return hook
