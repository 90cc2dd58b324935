"""Put exactly one ApiKeyMiddleware in front of an ASGI app.

Used by every patch (builder side and replica side) and by the explicit API, so "installed
twice" and "builder and replica both patched" still give one auth layer.
"""

from __future__ import annotations

from typing import Any, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from rayllm_auth.middleware import ApiKeyMiddleware

__all__ = ["protect_app", "is_protected"]


def is_protected(app: Any) -> bool:
    """True if requests to ``app`` already pass through ApiKeyMiddleware."""
    if isinstance(app, ApiKeyMiddleware):
        return True
    return isinstance(app, Starlette) and any(
        m.cls is ApiKeyMiddleware for m in app.user_middleware
    )


def protect_app(app: Any, served_model: Optional[str] = None) -> Any:
    """Return ``app`` guarded by one ApiKeyMiddleware, outermost.

    A Starlette/FastAPI app is changed in place (and returned): the middleware goes first in
    ``user_middleware``, so nothing the app installed (LoRA resolution, metrics, request ids)
    runs for a refused request. The app's own CORS policy is copied into it so preflights and
    401s answer browsers exactly like the app. vLLM's ``AuthenticationMiddleware`` is dropped:
    it guards only /v1-style prefixes and accepts only ``VLLM_API_KEY``, so it would refuse
    keys from ``RAY_LLM_API_KEYS`` that this middleware accepts. Any other ASGI callable is
    wrapped. ``served_model``: the one model a direct-streaming replica serves (set on an
    app that is already protected, too). Never passes key material: the middleware reads
    keys where it runs.
    """
    if not isinstance(app, Starlette):
        if isinstance(app, ApiKeyMiddleware):
            return app
        return ApiKeyMiddleware(app, None, served_model)
    existing = next((m for m in app.user_middleware if m.cls is ApiKeyMiddleware), None)
    if existing is not None:
        if served_model is not None and existing.kwargs.get("served_model") != served_model:
            existing.kwargs["served_model"] = served_model
            app.middleware_stack = None
        if app.user_middleware[0] is not existing:
            # Middleware added after protection (add_middleware inserts in front) would see
            # every request, refused ones and their keys included: first again.
            app.user_middleware.remove(existing)
            app.user_middleware.insert(0, existing)
            existing.kwargs["cors"] = _cors_options(app)  # a CORS policy may be among them
            app.middleware_stack = None
        return app
    app.user_middleware[:] = [m for m in app.user_middleware if not _is_vllm_auth(m)]
    app.user_middleware.insert(
        0, Middleware(ApiKeyMiddleware, cors=_cors_options(app), served_model=served_model))
    # vLLM builds its middleware stack eagerly; a cleared stack is rebuilt on first use
    # (Ray does the same in llm_server._add_middleware_to_built_app).
    app.middleware_stack = None
    return app


def _cors_options(app: Starlette):
    for entry in app.user_middleware:  # outermost first: the policy a browser sees
        if entry.cls is CORSMiddleware:
            return dict(entry.kwargs)
    return None


def _is_vllm_auth(entry: Middleware) -> bool:
    cls = entry.cls
    return cls.__name__ == "AuthenticationMiddleware" and cls.__module__.startswith("vllm.")
