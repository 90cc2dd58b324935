"""Ray Serve LLM layout with a module-level app in ``deployments/routers/router.py``
(Ray 2.44 to 2.49).

Supported Ray versions: the rows of :data:`rayllm_auth.support.LAYOUTS` naming this module.

What is patched, and why:

1. ``deployments.routers.router.fastapi_router_app`` is created by ``init()`` while the module
   is imported, and ``LLMRouter``'s routes are added to it as the class body runs;
   ``LLMRouter.as_deployment()`` (called by ``build_openai_app``) then freezes it with
   ``serve.ingress``. Wrapping ``init`` would be too late, so the post-import hook protects
   that app object in place, before anything can freeze it.
2. ``ray.serve._private.http_util.ASGIAppReplicaWrapper.__init__(app_or_func)`` is where
   every Serve replica receives its ASGI app (or a function building it). Guarding it for
   ``LLMRouter`` replicas protects apps built by a process without rayllm-auth.
"""

from rayllm_auth.patching import protect_module_app, replica_app_guard, require, wrap_once

ROUTER_MODULE = "ray.llm._internal.serve.deployments.routers.router"
REPLICA_WRAPPER_MODULE = "ray.serve._private.http_util"

#: Deployment classes whose replicas answer clients directly.
CLIENT_FACING_CLASSES = ((ROUTER_MODULE, "LLMRouter", False),)

#: Everything the hooks below need, by module (``doctor`` checks the same list).
TARGETS = {
    ROUTER_MODULE: ("fastapi_router_app", "LLMRouter"),
    REPLICA_WRAPPER_MODULE: ("ASGIAppReplicaWrapper", "ASGIAppReplicaWrapper.__init__"),
}

BUILDER_HOOKS = {ROUTER_MODULE: "patch_router_app"}
REPLICA_HOOKS = {REPLICA_WRAPPER_MODULE: "patch_replica_wrapper"}

_guard_replica_app = replica_app_guard(CLIENT_FACING_CLASSES, argument="app_or_func")


def patch_router_app(router) -> None:
    require(router, *TARGETS[ROUTER_MODULE])
    protect_module_app(router, "fastapi_router_app")


def patch_replica_wrapper(http_util) -> None:
    require(http_util, *TARGETS[REPLICA_WRAPPER_MODULE])
    wrap_once(http_util.ASGIAppReplicaWrapper, "__init__", _guard_replica_app)
