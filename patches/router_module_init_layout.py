"""Ray Serve LLM 2.50: :mod:`core_ingress_init_layout` at the older module path.

``deployments/routers/router.py`` has lost its module-level app and ``LLMRouter``; it now
holds ``init()``, ``make_fastapi_ingress(cls, *, endpoint_map=None, app=None)`` and
``OpenAiIngress``, as ``core/ingress/ingress.py`` does from 2.51 on (the same code, moved).
So this record is 2.51's with the ingress module replaced: the builder side wraps ``init``
and ``make_fastapi_ingress`` before ``serve.ingress`` freezes the app; the replica side is
``ASGIAppReplicaWrapper.__init__(app_or_func)``, guarding ``OpenAiIngress`` replicas. No
direct streaming in this release.
"""

import dataclasses

from rayllm_auth.patches import core_ingress_init_layout
from rayllm_auth.patches.core_ingress_layout import INGRESS_MODULE
from rayllm_auth.patches.router_module_layout import ROUTER_MODULE


def _moved(item):
    """``item`` (a target or a client-facing class) in the router module, if it is in the
    ingress module."""
    return dataclasses.replace(item, module=ROUTER_MODULE) if item.module == INGRESS_MODULE \
        else item


_LATER = core_ingress_init_layout.LAYOUT

LAYOUT = dataclasses.replace(
    _LATER,
    name="router_module_init_layout",
    ray=">=2.50,<2.51",
    summary="wrap `deployments/routers/router.py:init()` and `make_fastapi_ingress(app=)`; "
            "replica side `ASGIAppReplicaWrapper.__init__(app_or_func)`",
    targets=tuple(_moved(target) for target in _LATER.targets),
    client_facing=tuple(_moved(cls) for cls in _LATER.client_facing),
)
