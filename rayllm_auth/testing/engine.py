"""A CPU stand-in for the vLLM engine behind Ray Serve LLM, for demos, tests and benchmarks.

Selected with Ray's own switch, ``RAYLLM_VLLM_ENGINE_CLS=rayllm_auth.testing.engine:StandInEngine``,
so ``build_openai_app``, the ingress, the router and the Serve proxy all run unchanged; only
the GPU part is replaced. Never use it to serve real traffic: it generates placeholder text.

It answers chat and completions (streaming or not) in OpenAI's shape, and records every
call it receives, so tests can prove that refused requests never reach the engine:

``RAYLLM_AUTH_STANDIN_CALLS_FILE``
    if set, each call appends one line ``<method> <model> credentials=<forwarded|none>`` to
    this file; ``forwarded`` when the request that reached the engine still carried an
    ``Authorization`` or ``x-api-key`` header.
``RAYLLM_AUTH_STANDIN_TOKEN_DELAY_S``
    seconds per generated token (default 0): a GPU-like decode time for benchmarks.
``RAYLLM_AUTH_STANDIN_MAX_BATCH``
    sequences decoded at once (default unlimited); more requests wait, like a full batch.

For direct streaming (``build_asgi_app``) it returns vLLM's real OpenAI app, built from
vLLM's own argument parser, with only the generate routes answered by this engine; every
other vLLM route (``/tokenize``, ``/invocations``, ``/v1/messages``...) is vLLM's. On a
CPU-only machine set ``VLLM_TARGET_DEVICE=cpu`` for the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any, AsyncGenerator, Optional

try:  # Ray 2.51 and later
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionResponse,
        CompletionResponse,
        ErrorResponse,
    )
    from ray.llm._internal.serve.core.engine.protocol import LLMEngine
except ImportError:  # Ray 2.44 to 2.49: same protocol, other modules
    from ray.llm._internal.serve.configs.openai_api_models import (
        ChatCompletionResponse,
        CompletionResponse,
        ErrorResponse,
    )
    from ray.llm._internal.serve.deployments.llm.llm_engine import LLMEngine

__all__ = ["StandInEngine", "CALLS_FILE_VAR", "WORDS"]

CALLS_FILE_VAR = "RAYLLM_AUTH_STANDIN_CALLS_FILE"
TOKEN_DELAY_VAR = "RAYLLM_AUTH_STANDIN_TOKEN_DELAY_S"
MAX_BATCH_VAR = "RAYLLM_AUTH_STANDIN_MAX_BATCH"
#: The generated text cycles through these words, one word per token.
WORDS = ("hello", "from", "the", "stand-in", "engine")
_DEFAULT_MAX_TOKENS = 16


class StandInEngine(LLMEngine):
    def __init__(self, llm_config):
        self.llm_config = llm_config
        self.model_id = llm_config.model_id
        self._calls_file = os.environ.get(CALLS_FILE_VAR)
        self._token_delay = float(os.environ.get(TOKEN_DELAY_VAR, "0"))
        max_batch = int(os.environ.get(MAX_BATCH_VAR, "0"))
        self._batch = asyncio.Semaphore(max_batch) if max_batch > 0 else None

    async def start(self):
        pass

    def routing_stats(self) -> dict:
        return {}

    async def resolve_lora(self, lora_model):
        pass

    async def reset_prefix_cache(self) -> None:
        pass

    async def chat(self, request, raw_request_info=None) -> AsyncGenerator[Any, None]:
        async for item in self._generate("chat", request, raw_request_info):
            yield item

    async def completions(self, request, raw_request_info=None) -> AsyncGenerator[Any, None]:
        async for item in self._generate("completions", request, raw_request_info):
            yield item

    async def embeddings(self, request, raw_request_info=None):
        self._record("embeddings", request.model, raw_request_info)
        yield _error("the stand-in engine does not compute embeddings", 400)

    async def transcriptions(self, request, raw_request_info=None):
        self._record("transcriptions", request.model, raw_request_info)
        yield _error("the stand-in engine does not transcribe", 400)

    def _record(self, method: str, model: Optional[str], raw_request_info) -> None:
        if not self._calls_file:
            return
        headers = {h.lower() for h in getattr(raw_request_info, "headers", None) or {}}
        forwarded = "forwarded" if headers & {"authorization", "x-api-key"} else "none"
        fd = os.open(self._calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{method} {model} credentials={forwarded}\n".encode())
        finally:
            os.close(fd)

    async def _generate(self, method: str, request, raw_request_info) -> AsyncGenerator[Any, None]:
        self._record(method, request.model, raw_request_info)
        n_tokens = request.max_tokens or _DEFAULT_MAX_TOKENS
        tokens = [WORDS[i % len(WORDS)] + " " for i in range(n_tokens)]
        chat = method == "chat"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        async with self._batch or contextlib.nullcontext():
            if request.stream:
                for index, token in enumerate(tokens):
                    await self._decode_one_token()
                    last = index == len(tokens) - 1
                    yield "data: " + _stream_chunk(
                        chat, ident, created, self.model_id, token, last
                    ) + "\n\n"
                return
            for _ in tokens:
                await self._decode_one_token()
        yield _full_response(chat, ident, created, self.model_id, "".join(tokens), n_tokens)

    async def _decode_one_token(self) -> None:
        if self._token_delay:
            await asyncio.sleep(self._token_delay)

    async def build_asgi_app(self):
        """vLLM's own OpenAI app, with chat/completions/models answered by this engine."""
        from rayllm_auth.testing.vllm_app import build_vllm_app

        return build_vllm_app(self)


def _stream_chunk(chat: bool, ident, created, model, token: str, last: bool) -> str:
    import json

    finish = "length" if last else None
    if chat:
        choice = {"index": 0, "delta": {"role": "assistant", "content": token},
                  "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": token, "finish_reason": finish}
        obj = "text_completion"
    return json.dumps({"id": ident, "object": obj, "created": created, "model": model,
                       "choices": [choice]})


def _full_response(chat: bool, ident, created, model, text: str, n_tokens: int):
    usage = {"prompt_tokens": 1, "completion_tokens": n_tokens, "total_tokens": n_tokens + 1}
    if chat:
        return ChatCompletionResponse.model_validate({
            "id": ident, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": usage,
        })
    return CompletionResponse.model_validate({
        "id": ident, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
        "usage": usage,
    })


def _error(message: str, code: int):
    fields = {"message": message, "type": "BadRequestError", "code": code}
    if "error" in ErrorResponse.model_fields:  # vLLM >= 0.10.2 nests the fields
        return ErrorResponse.model_validate({"error": fields})
    return ErrorResponse.model_validate(fields)
