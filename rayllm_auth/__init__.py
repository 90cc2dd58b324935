"""rayllm-auth: API keys for Ray Serve LLM, with one pip package and one environment variable.

Add ``rayllm-auth`` to the application's ``runtime_env.pip`` and set ``RAY_LLM_API_KEYS``
(or ``VLLM_API_KEY``, or a key file in ``RAY_LLM_API_KEYS_FILE``): ``rayllm_auth.pth``
activates the plugin in every process of that environment and every request to the Serve LLM
app then needs a valid key. Explicit
alternatives: ``import_path: rayllm_auth:build_openai_app`` or :func:`install`.

This module imports nothing on purpose: ``rayllm_auth.pth`` imports it at interpreter
start. Public names are loaded on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "install", "build_openai_app", "SUPPORTED_RAY"]

_LAZY = {
    "install": "rayllm_auth.activation",
    "build_openai_app": "rayllm_auth.builders",
    "SUPPORTED_RAY": "rayllm_auth.support",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayllm_auth' has no attribute {name!r}")
