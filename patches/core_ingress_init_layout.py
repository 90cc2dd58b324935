"""Ray Serve LLM layout with ``core/ingress/ingress.py``, where Serve hands a replica its app
in ``ASGIAppReplicaWrapper.__init__`` (Ray 2.51 to 2.5x, before ``_set_asgi_app`` existed).

Supported Ray versions: the rows of :data:`rayllm_auth.support.LAYOUTS` naming this module.

What is patched, and why: the builder side is the same as in
:mod:`rayllm_auth.patches.core_ingress_layout` (``ingress.init`` and
``make_fastapi_ingress(app=...)``, before ``serve.ingress`` freezes the app). The replica side
wraps ``ray.serve._private.http_util.ASGIAppReplicaWrapper.__init__(app_or_func)``, where these
releases give every Serve replica its ASGI app (or a function building it); it protects
``OpenAiIngress`` replicas whose app was built by a process without rayllm-auth. These
releases have no direct streaming, so the ingress is the only client-facing class.
"""

from rayllm_auth.patches.core_ingress_layout import INGRESS_MODULE, patch_ingress_builder
from rayllm_auth.patching import replica_app_guard, require, wrap_once

REPLICA_WRAPPER_MODULE = "ray.serve._private.http_util"

#: Deployment classes whose replicas answer clients directly.
CLIENT_FACING_CLASSES = ((INGRESS_MODULE, "OpenAiIngress", False),)

#: Everything the hooks below need, by module (``doctor`` checks the same list).
TARGETS = {
    INGRESS_MODULE: ("init", "make_fastapi_ingress", "OpenAiIngress"),
    REPLICA_WRAPPER_MODULE: ("ASGIAppReplicaWrapper", "ASGIAppReplicaWrapper.__init__"),
}

BUILDER_HOOKS = {INGRESS_MODULE: "patch_ingress_builder"}
REPLICA_HOOKS = {REPLICA_WRAPPER_MODULE: "patch_replica_wrapper"}

_guard_replica_app = replica_app_guard(CLIENT_FACING_CLASSES, argument="app_or_func")

__all__ = ["TARGETS", "BUILDER_HOOKS", "REPLICA_HOOKS", "patch_ingress_builder",
           "patch_replica_wrapper"]


def patch_replica_wrapper(http_util) -> None:
    require(http_util, *TARGETS[REPLICA_WRAPPER_MODULE])
    wrap_once(http_util.ASGIAppReplicaWrapper, "__init__", _guard_replica_app)
