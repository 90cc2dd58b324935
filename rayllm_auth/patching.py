"""What every patch module is made of: exact target checks, wrap-once, and the two wrappers.

* :func:`protect_returned_app` / :func:`protect_app_argument` run where Serve LLM builds its
  FastAPI app, before ``serve.ingress`` freezes (pickles) it: the middleware then travels
  inside the deployment to every replica.
* :func:`replica_app_guard` runs where a Serve replica receives its ASGI app, so a replica
  with keys protects an app that was built by a process without rayllm-auth.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any, Iterable

import wrapt

from rayllm_auth.errors import ConfigError
from rayllm_auth.keys import KEY_SOURCES
from rayllm_auth.keystore import load_keys
from rayllm_auth.protect import is_protected, protect_app

__all__ = [
    "LayoutMismatch",
    "require",
    "wrap_once",
    "protect_returned_app",
    "protect_app_argument",
    "protect_module_app",
    "replica_app_guard",
]

logger = logging.getLogger("rayllm_auth")


class LayoutMismatch(AttributeError):
    """A patch target is not where the patch module expects it (Ray changed its code)."""


def require(owner: Any, *paths: str) -> None:
    """Raise LayoutMismatch naming every attribute path (``a`` or ``A.b``) of ``owner``
    that is missing."""
    missing = [p for p in paths if missing_attribute(owner, p)]
    if missing:
        raise LayoutMismatch(f"{getattr(owner, '__name__', owner)} has no {', '.join(missing)}")


def missing_attribute(owner: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(owner, name):
            return True
        owner = getattr(owner, name)
    return False


def wrap_once(owner: Any, name: str, wrapper) -> None:
    """``wrapt.wrap_function_wrapper(owner, name, wrapper)`` unless already done."""
    current = inspect.getattr_static(owner, name)
    if isinstance(current, wrapt.FunctionWrapper) and current._self_wrapper is wrapper:
        return
    wrapt.wrap_function_wrapper(owner, name, wrapper)


def _protect_where_built(app):
    """``protect_app(app)`` in the process that builds it. A key variable that is set but
    unusable fails the build here, with its message, instead of later in every replica. No
    keys in this process is fine: replicas read their own."""
    load_keys()
    return protect_app(app)


def protect_returned_app(wrapped, instance, args, kwargs):
    """For a function that creates the ingress app (Ray 2.51+: ``ingress.init``)."""
    return _protect_where_built(wrapped(*args, **kwargs))


def protect_module_app(module, name: str) -> None:
    """For an app created while its module is imported (Ray 2.44-2.49's
    ``fastapi_router_app``): protect it in place, before anything freezes it."""
    _protect_where_built(getattr(module, name))


def protect_app_argument(wrapped, instance, args, kwargs):
    """For a function that freezes a caller's app (``make_fastapi_ingress(cls, app=...)``)."""
    app = kwargs.get("app")
    if app is not None:
        _protect_where_built(app)
    return wrapped(*args, **kwargs)


def replica_app_guard(client_facing: Iterable[tuple[str, str, bool]], argument: str = "app"):
    """Wrapper for the method that hands a Serve replica its ASGI app (``self``, then the app
    as the first argument, named ``argument``). The app may also be a plain function that
    builds it (``ASGIAppReplicaWrapper.__init__(app_or_func)`` in Ray before 2.60): then the
    app it builds is guarded.

    Only replicas whose deployment class derives from one of ``client_facing``
    (``(module, class name, serves one model)``) are touched, so internal ingresses such as
    the direct-streaming ``LLMRouter`` stay as Ray made them. For those replicas:

    * keys configured here: the app is protected (no-op if the builder already did it); a
      class that serves one model (direct streaming's ``LLMServer``) tells the middleware
      which (its ``_llm_config.model_id``), or refuses to start if it cannot be found;
    * a key variable set but unusable: ConfigError, the replica refuses to start;
    * no keys, but the app carries the middleware: ConfigError (it was meant to be protected);
    * no keys and no middleware: stock behaviour, with one log line saying auth is off.
    """
    client_facing = tuple(client_facing)

    def guard(wrapped, instance, args, kwargs):
        serves_one_model = _client_facing(instance, client_facing)
        if serves_one_model is None:
            return wrapped(*args, **kwargs)
        app, rest = (args[0], args[1:]) if args else (kwargs.pop(argument), ())
        served_model = _served_model(instance) if serves_one_model else None
        if inspect.isfunction(app) and not inspect.iscoroutinefunction(app):  # a builder
            build = app

            def build_then_guard():  # still a plain function, as Ray checks
                return _guard_app(build(), instance, served_model)

            return wrapped(build_then_guard, *rest, **kwargs)
        return wrapped(_guard_app(app, instance, served_model), *rest, **kwargs)

    return guard


def _guard_app(app, instance, served_model):
    if load_keys() is not None:
        return protect_app(app, served_model)
    if is_protected(app):
        raise ConfigError(
            "this Serve LLM app requires API keys (it was built with rayllm-auth) but none "
            f"of {', '.join(KEY_SOURCES)} is set in this replica's environment"
        )
    logger.warning(
        "rayllm-auth: API key auth is OFF for %s: none of %s is set in this replica",
        type(instance).__name__,
        ", ".join(KEY_SOURCES),
    )
    return app


def _client_facing(instance: Any, classes: tuple[tuple[str, str, bool], ...]):
    """None if ``instance`` is not client-facing, else whether its class serves one model."""
    if instance is None:
        return None
    # Look classes up in sys.modules instead of importing them: a class that is not
    # imported cannot be a base of this instance, and importing it could pull in vLLM.
    for module_name, class_name, serves_one_model in classes:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(instance, cls):
            return serves_one_model
    return None


def _served_model(instance: Any) -> str:
    """The model a one-model replica serves. Raises ConfigError (the replica refuses to start)
    if it cannot be found: keys limited to some models could not be checked."""
    model_id = getattr(getattr(instance, "_llm_config", None), "model_id", None)
    if not isinstance(model_id, str):
        raise ConfigError(f"rayllm-auth cannot tell which model this {type(instance).__name__} "
                          f"replica serves (no _llm_config.model_id)")
    return model_id
