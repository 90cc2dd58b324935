"""Ray Serve LLM with a module-level app in ``deployments/routers/router.py`` (Ray 2.44 to
2.49 era).

1. ``deployments.routers.router.fastapi_router_app`` is created by ``init()`` while the module
   is imported, and ``LLMRouter``'s routes are added to it as the class body runs;
   ``LLMRouter.as_deployment()`` (called by ``build_openai_app``) then freezes it with
   ``serve.ingress``. Wrapping ``init`` would be too late, so the post-import hook protects
   that app object in place, before anything can freeze it.
2. ``ASGIAppReplicaWrapper.__init__(app_or_func)`` is where every Serve replica receives its
   ASGI app (or a function building it). Guarding it for ``LLMRouter`` replicas protects apps
   built by a process without rayllm-auth.
"""

from rayllm_auth.layout import ClientFacing, Layout, Target, Wrap
from rayllm_auth.patches.core_ingress_layout import REPLICA_WRAPPER_MODULE

ROUTER_MODULE = "ray.llm._internal.serve.deployments.routers.router"

LAYOUT = Layout(
    name="router_module_layout",
    ray=">=2.47,<2.50",
    summary="protect the module-level `deployments/routers/router.py:fastapi_router_app` when "
            "that module is imported; replica side `ASGIAppReplicaWrapper.__init__(app_or_func)`",
    targets=(
        Target(ROUTER_MODULE, "fastapi_router_app", Wrap.MODULE_APP),
        Target(REPLICA_WRAPPER_MODULE, "ASGIAppReplicaWrapper.__init__", Wrap.REPLICA_APP),
    ),
    client_facing=(ClientFacing(ROUTER_MODULE, "LLMRouter"),),
    replica_app_argument="app_or_func",
)
