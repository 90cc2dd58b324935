"""vLLM's real OpenAI app for the stand-in engine's direct-streaming mode.

Built by vLLM's own ``build_app`` from vLLM's own argument parser, so its routes and
middleware are exactly vLLM's (``/tokenize``, ``/invocations``, ``/v1/messages``, ``/metrics``,
CORS, and vLLM's own ``AuthenticationMiddleware`` when ``VLLM_API_KEY`` is set). Only the
generate routes are re-pointed at the stand-in engine, as Ray's prefill/decode server does
for its own engine.
"""

from __future__ import annotations

import types

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
)
from ray.llm._internal.serve.core.protocol import RawRequestInfo

__all__ = ["build_vllm_app"]

_ENGINE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def build_vllm_app(engine):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", engine.model_id])
    app = build_app(args, supported_tasks=("generate",))
    # State vLLM's init_app_state would set for a real engine: its lifespan reads log_stats,
    # its error handler reads server (Ray's VLLMEngine.build_asgi_app sets the same).
    app.state.log_stats = False
    app.state.server = types.SimpleNamespace()
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) not in _ENGINE_ROUTES
    ]

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = ChatCompletionRequest.model_validate(await request.json())
        raw = RawRequestInfo.from_starlette_request(request)
        return await _respond(engine.chat(body, raw), body.stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = CompletionRequest.model_validate(await request.json())
        raw = RawRequestInfo.from_starlette_request(request)
        return await _respond(engine.completions(body, raw), body.stream)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "owned_by": "rayllm-auth stand-in"}]}

    return app


async def _respond(generator, stream: bool):
    if stream:
        async def sse():
            async for chunk in generator:
                yield chunk
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    result = await generator.__anext__()
    status = result.error.code if isinstance(result, ErrorResponse) else 200
    return JSONResponse(result.model_dump(), status_code=status)
