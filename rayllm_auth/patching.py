"""Applying a layout record (:class:`~rayllm_auth.layout.Layout`): exact target checks, wrap
once, and one wrapper per kind of target.

* :attr:`Wrap.RETURNED_APP` / :attr:`Wrap.APP_ARGUMENT` / :attr:`Wrap.MODULE_APP` run where
  Serve LLM builds its FastAPI app, before ``serve.ingress`` freezes (pickles) it: the
  middleware then travels inside the deployment to every replica.
* :attr:`Wrap.REPLICA_APP` runs where a Serve replica receives its ASGI app, so a replica
  with keys protects an app that was built by a process without rayllm-auth.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any

import wrapt

from rayllm_auth.errors import ConfigError
from rayllm_auth.keys import KEY_SOURCES
from rayllm_auth.keystore import load_keys
from rayllm_auth.layout import Layout, Wrap
from rayllm_auth.protect import is_protected, protect_app

__all__ = ["LayoutMismatch", "apply", "missing_attributes", "replica_guard"]

logger = logging.getLogger("rayllm_auth")


class LayoutMismatch(AttributeError):
    """A patch target is not where the patch module expects it (Ray changed its code)."""


def apply(layout: Layout, module, *, builder_side: bool) -> None:
    """Wrap the targets of ``layout`` in ``module``, which has just been imported: the
    replica-side target always, builder-side ones only when ``builder_side``. Every attribute
    the layout requires of the module is checked first: LayoutMismatch names each one missing,
    and nothing is wrapped then. Wrapping twice is a no-op."""
    missing = missing_attributes(module, layout.required().get(module.__name__, ()))
    if missing:
        raise LayoutMismatch(f"{module.__name__} has no {', '.join(missing)}")
    for target in layout.targets:
        if target.module != module.__name__ or (target.builder_side and not builder_side):
            continue
        owner_path, _, name = target.attribute.rpartition(".")
        owner = _resolve(module, owner_path)
        if target.wrap is Wrap.MODULE_APP:
            _protect_where_built(getattr(owner, name))
        else:
            _wrap_once(owner, name, _WRAPPERS.get(target.wrap) or replica_guard(layout))


def missing_attributes(module, paths) -> list[str]:
    """The attribute paths (``a`` or ``A.b``) in ``paths`` that ``module`` lacks."""
    return [path for path in paths if _resolve(module, path) is None]


def _resolve(owner: Any, path: str) -> Any:
    """The attribute at ``path`` of ``owner`` (``a`` or ``A.b``; ``""`` is ``owner``), or None."""
    for name in filter(None, path.split(".")):
        owner = getattr(owner, name, None)
        if owner is None:
            return None
    return owner


def _wrap_once(owner: Any, name: str, wrapper) -> None:
    """``wrapt.wrap_function_wrapper(owner, name, wrapper)`` unless already done."""
    current = inspect.getattr_static(owner, name)
    if isinstance(current, wrapt.FunctionWrapper) and current._self_wrapper is wrapper:
        return
    wrapt.wrap_function_wrapper(owner, name, wrapper)


def _protect_where_built(app):
    """``protect_app(app)`` in the process that builds it. A key variable that is set but
    unusable fails the build here, with its message, instead of later in every replica. No
    keys in this process is fine: replicas read their own."""
    load_keys_where_built()
    return protect_app(app)


def load_keys_where_built():
    """:func:`~rayllm_auth.keystore.load_keys` in a process that builds a Serve app. Raises
    :class:`~rayllm_auth.build_error.BuildConfigError` (a ConfigError) for an unusable key
    source: Serve then fails the deploy at once instead of building it three more times."""
    try:
        return load_keys()
    except ConfigError as error:
        from rayllm_auth.build_error import BuildConfigError  # imports Ray Serve: only here

        raise BuildConfigError(*error.args) from None


def _protect_returned_app(wrapped, instance, args, kwargs):
    """For a function that creates the ingress app (``ingress.init``)."""
    return _protect_where_built(wrapped(*args, **kwargs))


def _protect_app_argument(wrapped, instance, args, kwargs):
    """For a function that freezes a caller's app (``make_fastapi_ingress(cls, app=...)``)."""
    app = kwargs.get("app")
    if app is not None:
        _protect_where_built(app)
    return wrapped(*args, **kwargs)


_WRAPPERS = {Wrap.RETURNED_APP: _protect_returned_app, Wrap.APP_ARGUMENT: _protect_app_argument}


@functools.cache  # one guard per layout: _wrap_once recognises it
def replica_guard(layout: Layout):
    """Wrapper for the method that hands a Serve replica its ASGI app (``self``, then the app
    as the first argument, named ``layout.replica_app_argument``). The app may also be a plain
    function that builds it (``ASGIAppReplicaWrapper.__init__(app_or_func)`` in Ray before
    2.60): then the app it builds is guarded.

    Only replicas whose deployment class derives from one of ``layout.client_facing`` are
    touched, so internal ingresses such as the direct-streaming ``LLMRouter`` stay as Ray
    made them. For those replicas:

    * keys configured here: the app is protected (no-op if the builder already did it); a
      class that serves one model (direct streaming's ``LLMServer``) tells the middleware
      which (its ``_llm_config.model_id``), or refuses to start if it cannot be found;
    * a key variable set but unusable: ConfigError, the replica refuses to start;
    * no keys, but the app carries the middleware: ConfigError (it was meant to be protected);
    * no keys and no middleware: stock behaviour, with one log line saying auth is off.
    """
    def guard(wrapped, instance, args, kwargs):
        serves_one_model = _client_facing(instance, layout)
        if serves_one_model is None:
            return wrapped(*args, **kwargs)
        app, rest = (args[0], args[1:]) if args else (kwargs.pop(layout.replica_app_argument), ())
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


def _client_facing(instance: Any, layout: Layout):
    """None if ``instance`` is not client-facing, else whether its class serves one model."""
    if instance is None:
        return None
    # Look classes up in sys.modules instead of importing them: a class that is not
    # imported cannot be a base of this instance, and importing it could pull in vLLM.
    for client_facing in layout.client_facing:
        cls = getattr(sys.modules.get(client_facing.module), client_facing.name, None)
        if isinstance(cls, type) and isinstance(instance, cls):
            return client_facing.serves_one_model
    return None


def _served_model(instance: Any) -> str:
    """The model a one-model replica serves. Raises ConfigError (the replica refuses to start)
    if it cannot be found: keys limited to some models could not be checked."""
    model_id = getattr(getattr(instance, "_llm_config", None), "model_id", None)
    if not isinstance(model_id, str):
        raise ConfigError(f"rayllm-auth cannot tell which model this {type(instance).__name__} "
                          f"replica serves (no _llm_config.model_id)")
    return model_id
