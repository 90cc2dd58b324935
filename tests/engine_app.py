"""Ray 2.60's ingress app answering from an engine, without a cluster.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' body types from
their annotations, which must be the classes themselves.
"""

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
)
from ray.llm._internal.serve.core.ingress import ingress
from ray.llm._internal.serve.core.ingress.utils import _openai_json_wrapper
from ray.llm._internal.serve.core.protocol import RawRequestInfo

from rayllm_auth.protect import protect_app


def build_engine_app(engine, *, batch: int = 1, protect: bool = True):
    """Ray's ingress app (``ingress.init()``, Ray's own route table) whose chat, completions
    and embeddings routes answer as Ray's OpenAiIngress does: the engine's response as a
    JSONResponse, or its stream through Ray's own ``_openai_json_wrapper``, ``batch`` events
    per message (LLMServer batches a stream's events)."""
    app = ingress.init()
    routes = ingress.DEFAULT_ENDPOINTS

    async def respond(generator):
        first = await generator.__anext__()
        if isinstance(first, ErrorResponse):  # Ray raises an OpenAIHTTPException
            return JSONResponse({"error": first.error.model_dump()}, first.error.code)
        if not isinstance(first, str):
            return JSONResponse(first.model_dump())

        async def batched():
            events = [first]
            while True:
                if len(events) == batch:
                    yield events
                    events = []
                try:
                    events.append(await generator.__anext__())
                except StopAsyncIteration:
                    break
            if events:
                yield events

        return StreamingResponse(_openai_json_wrapper(batched()),
                                 media_type="text/event-stream")

    @routes["chat"](app)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await respond(engine.chat(body, RawRequestInfo.from_starlette_request(request)))

    @routes["completions"](app)
    async def completions(body: CompletionRequest, request: Request):
        return await respond(
            engine.completions(body, RawRequestInfo.from_starlette_request(request)))

    @routes["embeddings"](app)
    async def embeddings(body: EmbeddingRequest, request: Request):
        return await respond(
            engine.embeddings(body, RawRequestInfo.from_starlette_request(request)))

    return protect_app(app) if protect else app
