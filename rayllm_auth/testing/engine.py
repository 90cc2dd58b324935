"""A CPU stand-in for the vLLM engine behind Ray Serve LLM, for demos, tests and benchmarks.

Selected with Ray's own switch, ``RAYLLM_VLLM_ENGINE_CLS=rayllm_auth.testing.engine:StandInEngine``,
so ``build_openai_app``, the ingress, the router and the Serve proxy all run unchanged; only
the GPU part is replaced. Never use it to serve real traffic: it generates placeholder text.

It answers chat, completions (streaming or not) and embeddings in OpenAI's shape, with the
``usage`` vLLM would report: one token per whitespace-separated word of the prompt, one per
generated word; a stream reports it in a last event without choices when the request's
``stream_options.include_usage`` is true (in every event with ``continuous_usage_stats``).
On Ray 2.44 to 2.48, whose engine protocol is ``generate`` (the engine yields tokens, Ray
builds the OpenAI responses and their usage; from 2.46 after ``prepare_request``, before it
after LLMServer formatted the prompt with a model processor the stand-in provides), it yields
one token per generated word. It records every call it receives, so tests can prove that
refused requests never reach the engine, and every usage it reports, so tests can compare
counts with it:

``RAYLLM_AUTH_STANDIN_CALLS_FILE``
    if set, each call appends one line ``<method> <model> credentials=<forwarded|none>`` to
    this file; ``forwarded`` when the request that reached the engine still carried an
    ``Authorization`` or ``x-api-key`` header.
``RAYLLM_AUTH_STANDIN_USAGE_FILE``
    if set, each usage the engine reports (in a response, or a stream's usage event)
    appends one line ``<method> <model> prompt=<n> completion=<n>`` to this file.
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
import functools
import json
import os
import time
import uuid
from typing import Any, AsyncGenerator, Optional

try:  # Ray 2.51 and later
    from ray.llm._internal.serve.core.configs import openai_api_models as _api
    from ray.llm._internal.serve.core.engine.protocol import LLMEngine
except ImportError:  # Ray 2.44 to 2.49: same protocol, other modules
    from ray.llm._internal.serve.configs import openai_api_models as _api
    try:
        from ray.llm._internal.serve.deployments.llm.llm_engine import LLMEngine
    except ImportError:  # Ray 2.44 and 2.45: no base class, LLMServer calls the methods
        LLMEngine = object

ChatCompletionResponse = _api.ChatCompletionResponse
CompletionResponse = _api.CompletionResponse
ErrorResponse = _api.ErrorResponse
# EmbeddingResponse is read when an embedding is asked for: Ray 2.44-2.46 have none.

__all__ = ["StandInEngine", "CALLS_FILE_VAR", "USAGE_FILE_VAR", "WORDS", "EMBEDDING_SIZE"]

CALLS_FILE_VAR = "RAYLLM_AUTH_STANDIN_CALLS_FILE"
USAGE_FILE_VAR = "RAYLLM_AUTH_STANDIN_USAGE_FILE"
TOKEN_DELAY_VAR = "RAYLLM_AUTH_STANDIN_TOKEN_DELAY_S"
MAX_BATCH_VAR = "RAYLLM_AUTH_STANDIN_MAX_BATCH"
#: The generated text cycles through these words, one word per token.
WORDS = ("hello", "from", "the", "stand-in", "engine")
_DEFAULT_MAX_TOKENS = 16
EMBEDDING_SIZE = 4


class StandInEngine(LLMEngine):
    def __init__(self, llm_config):
        self.llm_config = llm_config
        self.model_id = llm_config.model_id
        self._calls_file = os.environ.get(CALLS_FILE_VAR)
        self._usage_file = os.environ.get(USAGE_FILE_VAR)
        self._token_delay = float(os.environ.get(TOKEN_DELAY_VAR, "0"))
        max_batch = int(os.environ.get(MAX_BATCH_VAR, "0"))
        self._batch = asyncio.Semaphore(max_batch) if max_batch > 0 else None

    async def start(self):
        prompt_format = getattr(self.llm_config, "prompt_format", None)
        if hasattr(prompt_format, "set_processor") and not hasattr(prompt_format, "_processor"):
            # Ray 2.44 and 2.45: LLMServer formats chat prompts with the model's processor,
            # which vLLM's engine loads from the model's files; the stand-in gives its own.
            prompt_format._processor = _StandInChatTemplate()

    async def check_health(self) -> None:
        pass  # healthy (Ray 2.44 and 2.45 have no base class that says so)

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
        inputs = getattr(request, "input", None)
        if inputs is None:  # an EmbeddingChatRequest: one embedding of the conversation
            texts = [_prompt_words(getattr(request, "messages", None))]
        else:
            texts = [_prompt_words(i) for i in (inputs if _is_batch(inputs) else [inputs])]
        prompt_tokens = sum(texts)
        self._report_usage("embeddings", prompt_tokens, 0)
        yield _api.EmbeddingResponse.model_validate({
            "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": self.model_id,
            "data": [{"index": i, "object": "embedding",
                      "embedding": [float(n)] + [0.5] * (EMBEDDING_SIZE - 1)}
                     for i, n in enumerate(texts)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })

    async def transcriptions(self, request, raw_request_info=None):
        self._record("transcriptions", request.model, raw_request_info)
        yield _error("the stand-in engine does not transcribe", 400)

    def _record(self, method: str, model: Optional[str], raw_request_info) -> None:
        if not self._calls_file:
            return
        headers = {h.lower() for h in getattr(raw_request_info, "headers", None) or {}}
        forwarded = "forwarded" if headers & {"authorization", "x-api-key"} else "none"
        _append(self._calls_file, f"{method} {model} credentials={forwarded}")

    def _report_usage(self, method: str, prompt: int, completion: int) -> dict:
        if self._usage_file:
            _append(self._usage_file,
                    f"{method} {self.model_id} prompt={prompt} completion={completion}")
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def _generate(self, method: str, request, raw_request_info) -> AsyncGenerator[Any, None]:
        self._record(method, request.model, raw_request_info)
        if request.max_tokens is not None and request.max_tokens < 1:
            yield _error(f"max_tokens must be at least 1, got {request.max_tokens}", 400)
            return  # as vLLM's sampling parameters refuse it: no usage
        n_tokens = request.max_tokens or _DEFAULT_MAX_TOKENS
        tokens = [WORDS[i % len(WORDS)] + " " for i in range(n_tokens)]
        chat = method == "chat"
        prompt_tokens = _prompt_words(request.messages if chat else request.prompt)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        async with self._batch or contextlib.nullcontext():
            if request.stream:
                options = request.stream_options
                include_usage = bool(options and options.include_usage)
                continuous = include_usage and bool(options.continuous_usage_stats)
                for index, token in enumerate(tokens):
                    await self._decode_one_token()
                    usage = _usage(prompt_tokens, index + 1) if continuous else None
                    yield _event(_stream_chunk(chat, ident, created, self.model_id, token,
                                               index == len(tokens) - 1, usage))
                if include_usage:
                    usage = self._report_usage(method, prompt_tokens, n_tokens)
                    yield _event(_usage_chunk(chat, ident, created, self.model_id, usage))
                return
            for _ in tokens:
                await self._decode_one_token()
        usage = self._report_usage(method, prompt_tokens, n_tokens)
        yield _full_response(chat, ident, created, self.model_id, "".join(tokens), usage)

    # -- Ray 2.44 to 2.48's engine protocol: the engine yields tokens, Ray builds the OpenAI
    # responses (and their usage) from them. Credentials: that protocol passes no headers.

    async def prepare_request(self, request_id: str, prompt, stream: bool,
                              disk_lora_model=None, **kwargs):
        parameters = prompt.parameters or {}
        chat = isinstance(prompt.prompt, list)
        words = _prompt_words([m.model_dump() for m in prompt.prompt] if chat else prompt.prompt)
        return _standin_request_class()(
            prompt=prompt.to_unformatted_string(), request_id=request_id, stream=stream,
            standin={"method": "chat" if chat else "completions",
                     "model": parameters.get("model"), "prompt_tokens": words,
                     "max_tokens": parameters.get("max_tokens")})

    async def generate(self, request, stream: Optional[bool] = None) -> AsyncGenerator[Any, None]:
        """Ray 2.46 to 2.48: ``request`` comes from :meth:`prepare_request`. Ray 2.44 and
        2.45 (which pass ``stream`` too): LLMServer built it around the prompt it formatted
        (chat with :class:`_StandInChatTemplate`)."""
        from ray.llm._internal.serve.configs.server_models import LLMRawResponse

        standin = getattr(request, "standin", None) or _standin_fields(request, self.model_id)
        method, prompt_tokens = standin["method"], standin["prompt_tokens"]
        self._record(method, standin["model"], None)
        max_tokens = standin["max_tokens"]
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        n_tokens = max_tokens or _DEFAULT_MAX_TOKENS
        async with self._batch or contextlib.nullcontext():
            for index in range(n_tokens):
                await self._decode_one_token()
                yield LLMRawResponse(
                    generated_text=WORDS[index % len(WORDS)] + " ",
                    num_input_tokens=prompt_tokens, num_generated_tokens=1,
                    finish_reason="length" if index == n_tokens - 1 else None)
        self._report_usage(method, prompt_tokens, n_tokens)  # Ray reports usage every time

    async def embed(self, request):
        """(embeddings, prompt tokens) of ``request.prompt``: Ray 2.47 and 2.48's call."""
        self._record("embeddings", self.model_id, None)
        inputs = request.prompt
        texts = [_prompt_words(i) for i in (inputs if _is_batch(inputs) else [inputs])]
        self._report_usage("embeddings", sum(texts), 0)
        return [[float(n)] + [0.5] * (EMBEDDING_SIZE - 1) for n in texts], sum(texts)

    async def _decode_one_token(self) -> None:
        if self._token_delay:
            await asyncio.sleep(self._token_delay)

    async def build_asgi_app(self):
        """vLLM's own OpenAI app, with chat/completions/models answered by this engine."""
        from rayllm_auth.testing.vllm_app import build_vllm_app

        return build_vllm_app(self)


@functools.cache
def _standin_request_class():
    """Ray's GenerationRequest with the fields this engine reads in :meth:`generate`. Ray
    hands the object from ``prepare_request`` to ``generate`` in the same process; its own
    ``metadata`` field is new in 2.47 (2.44-2.46 dropped it silently: every request 500)."""
    from ray.llm._internal.serve.configs.server_models import GenerationRequest

    class StandInRequest(GenerationRequest):
        standin: dict

    return StandInRequest


def _stream_chunk(chat: bool, ident, created, model, token: str, last: bool,
                  usage: Optional[dict]) -> dict:
    finish = "length" if last else None
    if chat:
        choice = {"index": 0, "delta": {"role": "assistant", "content": token},
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": token, "finish_reason": finish}
    chunk = _chunk(chat, ident, created, model, [choice])
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _usage_chunk(chat: bool, ident, created, model, usage: dict) -> dict:
    """The last event of a stream whose request asked for usage, as vLLM sends it."""
    return {**_chunk(chat, ident, created, model, []), "usage": usage}


def _chunk(chat: bool, ident, created, model, choices: list) -> dict:
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": choices}


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _full_response(chat: bool, ident, created, model, text: str, usage: dict):
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


_CHAT_MARK = "<stand-in chat>\n"


class _StandInChatTemplate:
    """The model processor Ray 2.44 and 2.45's LLMServer formats chat prompts with: the text
    of each message on a line of its own, after a mark that tells :meth:`StandInEngine.generate`
    the prompt is a chat's."""

    @staticmethod
    def apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) -> str:
        lines = []
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):  # parts: text ones count, images do not
                content = " ".join(part.get("text") or "" for part in content)
            lines.append(content)
        return _CHAT_MARK + "\n".join(lines)


def _standin_fields(request, model_id: str) -> dict:
    """What :meth:`StandInEngine.prepare_request` puts in a request, from a request Ray 2.44
    or 2.45's LLMServer built (the prompt as text, its sampling parameters)."""
    text = request.prompt
    chat = text.startswith(_CHAT_MARK)
    return {"method": "chat" if chat else "completions", "model": model_id,
            "prompt_tokens": _prompt_words(text[len(_CHAT_MARK):] if chat else text),
            "max_tokens": request.sampling_params.max_tokens}


def _is_batch(value) -> bool:
    """A list of prompts (strings or token-id lists), not one prompt of token ids."""
    return isinstance(value, list) and bool(value) and not isinstance(value[0], int)


def _prompt_words(prompt) -> int:
    """The stand-in's tokenizer: one token per whitespace-separated word of the text in a
    prompt (a string, a list of them, chat messages with string or part-list contents), one
    per id of a prompt given as token ids."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, int):
        return 1
    if isinstance(prompt, dict):  # a chat message, or a content part
        if "content" in prompt:
            return _prompt_words(prompt["content"])
        return _prompt_words(prompt.get("text")) if prompt.get("type") == "text" else 0
    if isinstance(prompt, (list, tuple)):
        return sum(_prompt_words(item) for item in prompt)
    return _prompt_words(getattr(prompt, "model_dump", lambda: None)())


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _error(message: str, code: int):
    fields = {"message": message, "type": "BadRequestError", "code": code}
    if "error" in ErrorResponse.model_fields:  # vLLM >= 0.10.2 nests the fields
        return ErrorResponse.model_validate({"error": fields})
    return ErrorResponse.model_validate(fields)
