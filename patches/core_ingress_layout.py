"""Ray Serve LLM layout with ``ray/llm/_internal/serve/core/ingress/`` (Ray 2.51 onwards).

Supported Ray versions: the row of :data:`rayllm_auth.support.LAYOUTS` naming this module.

What is patched, and why:

1. ``core.ingress.ingress.init`` creates the FastAPI app of every ``OpenAiIngress``:
   ``build_openai_app``, ``build_dp_openai_app``, ``build_pd_openai_app``, DevIngress and
   custom ``ingress_cls_config.ingress_cls`` all reach it through ``make_fastapi_ingress``,
   which hands the app to ``serve.ingress(app)``; that deep-copies (pickles) it at once.
   Wrapping ``init`` is the last moment to add middleware that travels with the app.
2. ``make_fastapi_ingress(cls, app=...)`` freezes a caller-supplied app: protect that one too.
3. ``ray.serve._private.http_util.ASGIAppReplicaWrapper._set_asgi_app`` is where every Serve
   replica receives its ASGI app: the frozen one (OpenAiIngress) and the one built late in
   the replica by ``__serve_build_asgi_app__`` (direct streaming: ``LLMServer`` and its
   DP / prefill-decode subclasses serve vLLM's own app; ``SGLangServer`` serves SGLang's).
   Guarding it protects apps built by a process without rayllm-auth. The direct-streaming
   ``LLMRouter`` (HAProxy calls ``/internal/route`` without client headers) is not a
   client-facing class and is left alone.
"""

from rayllm_auth.patching import (
    protect_app_argument,
    protect_returned_app,
    replica_app_guard,
    require,
    wrap_once,
)

INGRESS_MODULE = "ray.llm._internal.serve.core.ingress.ingress"
REPLICA_WRAPPER_MODULE = "ray.serve._private.http_util"

#: Deployment classes whose replicas answer clients directly, and whether each serves one
#: model whatever a request names (direct streaming: the engine's own app).
CLIENT_FACING_CLASSES = (
    (INGRESS_MODULE, "OpenAiIngress", False),
    ("ray.llm._internal.serve.core.server.llm_server", "LLMServer", True),
    ("ray.llm._internal.serve.engines.sglang.sglang_engine", "SGLangServer", True),
)

#: Everything the hooks below need, by module (``doctor`` checks the same list).
TARGETS = {
    INGRESS_MODULE: ("init", "make_fastapi_ingress", "OpenAiIngress"),
    REPLICA_WRAPPER_MODULE: ("ASGIAppReplicaWrapper", "ASGIAppReplicaWrapper._set_asgi_app"),
}

BUILDER_HOOKS = {INGRESS_MODULE: "patch_ingress_builder"}
REPLICA_HOOKS = {REPLICA_WRAPPER_MODULE: "patch_replica_wrapper"}

_guard_replica_app = replica_app_guard(CLIENT_FACING_CLASSES)


def patch_ingress_builder(ingress) -> None:
    require(ingress, *TARGETS[INGRESS_MODULE])
    wrap_once(ingress, "init", protect_returned_app)
    wrap_once(ingress, "make_fastapi_ingress", protect_app_argument)


def patch_replica_wrapper(http_util) -> None:
    require(http_util, *TARGETS[REPLICA_WRAPPER_MODULE])
    wrap_once(http_util.ASGIAppReplicaWrapper, "_set_asgi_app", _guard_replica_app)
