"""Ray Serve LLM with ``ray/llm/_internal/serve/core/ingress/`` and Serve's
``ASGIAppReplicaWrapper._set_asgi_app``.

1. ``core.ingress.ingress.init`` creates the FastAPI app of every ``OpenAiIngress``:
   ``build_openai_app``, ``build_dp_openai_app``, ``build_pd_openai_app``, DevIngress and
   custom ``ingress_cls_config.ingress_cls`` all reach it through ``make_fastapi_ingress``,
   which hands the app to ``serve.ingress(app)``; that deep-copies (pickles) it at once.
   Wrapping ``init`` is the last moment to add middleware that travels with the app.
2. ``make_fastapi_ingress(cls, app=...)`` freezes a caller-supplied app: protect that one too.
3. ``ASGIAppReplicaWrapper._set_asgi_app`` is where every Serve replica receives its ASGI
   app: the frozen one (OpenAiIngress) and the one built late in the replica by
   ``__serve_build_asgi_app__`` (direct streaming: ``LLMServer`` and its DP / prefill-decode
   subclasses serve vLLM's own app; ``SGLangServer`` serves SGLang's). Guarding it protects
   apps built by a process without rayllm-auth. The direct-streaming ``LLMRouter`` (HAProxy
   calls ``/internal/route`` without client headers) is not client-facing and is left alone.
"""

from rayllm_auth.layout import ClientFacing, Layout, Target, Wrap

INGRESS_MODULE = "ray.llm._internal.serve.core.ingress.ingress"
REPLICA_WRAPPER_MODULE = "ray.serve._private.http_util"

LAYOUT = Layout(
    name="core_ingress_layout",
    ray=">=2.56,<2.61",
    summary="wrap `core/ingress/ingress.py:init()` and `make_fastapi_ingress(app=)`; replica "
            "side `ASGIAppReplicaWrapper._set_asgi_app`",
    targets=(
        Target(INGRESS_MODULE, "init", Wrap.RETURNED_APP),
        Target(INGRESS_MODULE, "make_fastapi_ingress", Wrap.APP_ARGUMENT),
        Target(REPLICA_WRAPPER_MODULE, "ASGIAppReplicaWrapper._set_asgi_app", Wrap.REPLICA_APP),
    ),
    client_facing=(
        ClientFacing(INGRESS_MODULE, "OpenAiIngress"),
        ClientFacing("ray.llm._internal.serve.core.server.llm_server", "LLMServer",
                     serves_one_model=True),
        ClientFacing("ray.llm._internal.serve.engines.sglang.sglang_engine", "SGLangServer",
                     serves_one_model=True),
    ),
    replica_app_argument="app",
)
