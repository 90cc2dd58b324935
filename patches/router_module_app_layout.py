"""Ray Serve LLM 2.44 to 2.46:
:mod:`router_module_layout` with the replica-side argument named ``app``.

The builder side is the same (the module-level ``fastapi_router_app`` in
``deployments/routers/router.py``, protected in place as that module is imported). Only
``ASGIAppReplicaWrapper.__init__`` differs: from 2.44 to 2.46 it takes an already frozen app, as
``app``, never a function building one. Serve passes it positionally, so the guard sees the
same call; the record names the argument so that ``doctor`` and the canary check the
signature these releases really have.
"""

import dataclasses

from rayllm_auth.patches import router_module_layout

LAYOUT = dataclasses.replace(
    router_module_layout.LAYOUT,
    name="router_module_app_layout",
    ray=">=2.44,<2.47",
    summary="as `router_module_layout`; replica side `ASGIAppReplicaWrapper.__init__(app)`",
    replica_app_argument="app",
)
