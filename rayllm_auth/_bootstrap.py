"""Interpreter start-up: the only rayllm-auth code that ``rayllm_auth.pth`` runs.

``rayllm_auth.pth`` calls :func:`on_interpreter_start` only in a process that has a key
source set (enforce mode) or is a Ray worker (report mode: the ingress logs that auth is
off). Everything else pays nothing beyond two dictionary lookups.

Start-up must stay cheap in every Ray worker, so this module imports nothing but ``os`` and
``sys`` and does not import wrapt (60-80 ms, it pulls in asyncio) or Ray. It puts a small
finder on ``sys.meta_path`` that waits for the first ``import ray.llm``; only then, when Ray
and asyncio are loaded anyway, :mod:`rayllm_auth.activation` registers wrapt post-import
hooks for the Serve LLM modules to patch.

It also holds the fail-closed switch, :func:`block_serve_llm`, because it must work even when
the rest of the package cannot be imported.
"""

import os
import sys

#: Variables that configure keys; ``rayllm_auth.pth`` repeats them (a test keeps them equal).
KEY_SOURCES = ("RAY_LLM_API_KEYS", "VLLM_API_KEY", "RAY_LLM_API_KEYS_FILE")
#: Set to 1/true/yes to turn off automatic patching (explicit install() still works).
KILL_SWITCH = "RAY_LLM_AUTH_DISABLE_AUTOPATCH"
#: Set by the raylet in every Ray worker process.
RAY_WORKER_MARKER = "RAY_RAYLET_PID"
#: Importing this package means Serve LLM (or another Ray LLM part) is about to load.
TRIGGER = "ray.llm"
#: What stays unimportable once rayllm-auth has failed closed in a process.
BLOCKED_PACKAGES = ("ray.serve.llm", "ray.llm._internal.serve")


def autopatch_disabled(environ=os.environ) -> bool:
    return environ.get(KILL_SWITCH, "").strip().lower() in ("1", "true", "yes")


def on_interpreter_start(environ=os.environ) -> None:
    """Arm the ``ray.llm`` trigger unless the kill switch is set. Never raises."""
    if autopatch_disabled(environ):
        return
    enforce = any(name in environ for name in KEY_SOURCES)
    if not enforce and RAY_WORKER_MARKER not in environ:
        return
    sys.meta_path.insert(0, _ServeLlmTrigger(enforce))


class _ServeLlmTrigger:
    """Meta path finder that activates rayllm-auth right after ``ray.llm`` is first imported.

    It lets the other finders locate ``ray.llm`` and wraps the loader so that activation
    runs after the package body, like a wrapt post-import hook: outside ``find_spec``, where
    CPython holds the global import lock and importing wrapt or starlette could deadlock
    against another thread. After firing it stays on ``sys.meta_path`` as a no-op (removing
    a finder while the import system iterates that list could skip the next finder).
    """

    def __init__(self, enforce: bool):
        self.enforce = enforce
        self.fired = False

    def find_spec(self, fullname, path=None, target=None):
        if self.fired or fullname != TRIGGER:
            return None
        self.fired = True
        from importlib.util import find_spec  # re-enters the finders; this one is now a no-op

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ActivateAfterLoading(spec.loader, self.enforce)
        return spec

    def invalidate_caches(self):
        pass


class _ActivateAfterLoading:
    """Loader wrapper: runs the real loader, then activation. Everything else is forwarded."""

    def __init__(self, loader, enforce: bool):
        self.loader = loader
        self.enforce = enforce

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # hide the wrapper
        self.loader.exec_module(module)
        try:
            from rayllm_auth.activation import activate

            activate(enforce=self.enforce)
        except BaseException as exc:
            if not self.enforce:
                return  # report mode (no keys): stock Ray keeps working
            # Keys are configured: a failure to activate must not leave Serve LLM
            # importable without auth. block_serve_llm raises (again, if it already did).
            block_serve_llm(f"rayllm-auth could not be activated ({exc})")


class _ServeLlmBlocker:
    """Meta path finder that makes every Serve LLM import fail with one message."""

    def __init__(self, message: str):
        self.message = message

    def find_spec(self, fullname, path=None, target=None):
        if _is_blocked(fullname):
            from rayllm_auth.errors import AuthUnavailableError

            raise AuthUnavailableError(self.message)
        return None

    def invalidate_caches(self):
        pass


def _is_blocked(module_name: str) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in BLOCKED_PACKAGES)


def block_serve_llm(message: str) -> None:
    """Fail closed: from now on, importing Ray Serve LLM in this process raises
    ``AuthUnavailableError(message)``. Modules already imported are dropped from
    ``sys.modules`` so they cannot be reached by a new import either. Always raises.

    An exception from a wrapt post-import hook alone is not enough: wrapt forgets a hook
    that raised, and a second import of the same module would then succeed unpatched.
    """
    from rayllm_auth.errors import AuthUnavailableError

    if not any(isinstance(f, _ServeLlmBlocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _ServeLlmBlocker(message))
        for name in [n for n in sys.modules if _is_blocked(n)]:
            del sys.modules[name]
        import logging

        logging.getLogger("rayllm_auth").error("rayllm-auth: %s", message)
    raise AuthUnavailableError(message)
