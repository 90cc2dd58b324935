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

import importlib
import logging
import threading

import wrapt

from rayllm_auth import __version__
from rayllm_auth._bootstrap import block_serve_llm
from rayllm_auth.support import (
    ALLOW_UNTESTED_RAY,
    SUPPORTED_RAY,
    layout_for,
    nearest_older_layout,
    untested_ray_allowed,
)

__all__ = ["activate", "install"]

logger = logging.getLogger("rayllm_auth")

_lock = threading.Lock()
_registered: set[tuple[str, str, bool]] = set()  # (module, hook, enforce) given to wrapt


def install() -> None:
    """Protect Ray Serve LLM in this process, whatever the environment says.

    For people who prefer an explicit call to the ``.pth`` auto-activation. Apps built
    afterwards carry the middleware; their replicas must have keys configured or they refuse
    to start. Raises AuthUnavailableError if this Ray cannot be patched.
    """
    activate(enforce=True)


def activate(*, enforce: bool) -> None:
    """Register the patch hooks for the running Ray (see module docstring)."""
    import ray

    version = getattr(ray, "__version__", "unknown")
    layout = layout_for(version)
    if layout is None and enforce and untested_ray_allowed():
        layout = nearest_older_layout(version)
        if layout is not None:
            logger.warning(
                "rayllm-auth: Ray %s is not in the support table (ray %s); %s is set, so "
                "trying the patches for ray %s. Every patch target is still checked: a missing "
                "one disables Serve LLM here", version, SUPPORTED_RAY, ALLOW_UNTESTED_RAY,
                layout.ray)
    if layout is None:
        if enforce:
            block_serve_llm(
                f"API keys are configured but Ray {version} is not supported by "
                f"rayllm-auth {__version__} (supported: ray {SUPPORTED_RAY}); Ray Serve LLM "
                f"is disabled in this process rather than served without auth (to try it on "
                f"an untested newer Ray anyway, set {ALLOW_UNTESTED_RAY}=1)"
            )
        logger.debug("rayllm-auth: Ray %s unsupported; auth stays off", version)
        return
    patches = importlib.import_module(layout.patch_module)
    hooks = dict(patches.REPLICA_HOOKS)
    if enforce:
        hooks.update(patches.BUILDER_HOOKS)
    with _lock:
        new = {m: h for m, h in hooks.items() if (m, h, enforce) not in _registered}
        _registered.update((m, h, enforce) for m, h in new.items())
    # Outside the lock: wrapt runs a hook at once if its module is already imported.
    for module_name, hook_name in new.items():
        wrapt.register_post_import_hook(
            _hook(getattr(patches, hook_name), version, enforce), module_name
        )


def _hook(patch, ray_version: str, enforce: bool):
    """Run ``patch(module)``; if it fails, fail closed (enforce) or leave Ray stock (report)."""

    def hook(module):
        try:
            patch(module)
        except Exception as exc:
            where = f"{patch.__module__}.{patch.__name__} on {module.__name__} of Ray {ray_version}"
            if not enforce:
                logger.warning("rayllm-auth: %s failed (%s); auth stays off", where, exc)
                return
            block_serve_llm(
                f"API keys are configured but {where} failed ({exc}); Ray Serve LLM is "
                f"disabled in this process rather than served without auth"
            )

    return hook
