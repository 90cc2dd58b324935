"""Ray Serve LLM with ``core/ingress/ingress.py``, where Serve hands a replica its app in
``ASGIAppReplicaWrapper.__init__(app_or_func)`` (before ``_set_asgi_app`` existed).

The builder side is the same as :mod:`rayllm_auth.patches.core_ingress_layout`'s (``init``
and ``make_fastapi_ingress(app=...)``, before ``serve.ingress`` freezes the app). The replica
side wraps ``ASGIAppReplicaWrapper.__init__``, which these releases give every Serve replica's
app (or a function building it); it protects ``OpenAiIngress`` replicas whose app was built by
a process without rayllm-auth. These releases have no direct streaming, so the ingress is the
only client-facing class.
"""

from rayllm_auth.layout import ClientFacing, Layout, Target, Wrap
from rayllm_auth.patches.core_ingress_layout import INGRESS_MODULE, REPLICA_WRAPPER_MODULE

LAYOUT = Layout(
    name="core_ingress_init_layout",
    ray=">=2.51,<2.56",
    summary="same builder side; replica side `ASGIAppReplicaWrapper.__init__(app_or_func)`",
    targets=(
        Target(INGRESS_MODULE, "init", Wrap.RETURNED_APP),
        Target(INGRESS_MODULE, "make_fastapi_ingress", Wrap.APP_ARGUMENT),
        Target(REPLICA_WRAPPER_MODULE, "ASGIAppReplicaWrapper.__init__", Wrap.REPLICA_APP),
    ),
    client_facing=(ClientFacing(INGRESS_MODULE, "OpenAiIngress"),),
    replica_app_argument="app_or_func",
)
