"""Explicit entry point: ``import_path: rayllm_auth:build_openai_app`` in a Serve config."""

from __future__ import annotations

from rayllm_auth._bootstrap import autopatch_disabled
from rayllm_auth.activation import install
from rayllm_auth.patching import load_keys_where_built

__all__ = ["build_openai_app"]


def build_openai_app(builder_config: dict):
    """``ray.serve.llm.build_openai_app`` with API keys: same argument, same Application.

    Patches Serve LLM in this process (:func:`rayllm_auth.install`), then calls Ray's own
    builder unchanged, so the ingress app carries the middleware and its replicas need keys.

    Raises ConfigError if a key variable is set but unusable, or if direct streaming is on
    while auto-activation is switched off: that app is built inside the replicas, where only
    the activated plugin can protect it (both a
    :class:`~rayllm_auth.build_error.BuildConfigError`, which Serve does not retry). Raises
    AuthUnavailableError on an unsupported Ray.
    """
    load_keys_where_built()
    install()
    from ray.serve.llm import build_openai_app as ray_build_openai_app

    if _direct_streaming_enabled() and autopatch_disabled():
        from rayllm_auth.build_error import BuildConfigError

        raise BuildConfigError(
            "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING builds the app inside each replica; "
            "unset RAY_LLM_AUTH_DISABLE_AUTOPATCH so rayllm-auth can protect it there"
        )
    return ray_build_openai_app(builder_config)


def _direct_streaming_enabled() -> bool:
    try:
        from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING
    except ImportError:  # a Ray release without direct streaming
        return False
    return bool(RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING)
