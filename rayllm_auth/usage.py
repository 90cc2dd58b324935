"""Token accounting: the prompt and completion tokens of each key's requests, per model,
exactly as the engine reports them in ``usage``, counted in
``ray_rayllm_auth_tokens_total{key_id,model,kind}`` (:mod:`rayllm_auth.metrics`).

On for every key with ``RAY_LLM_AUTH_TOKEN_USAGE=1`` (read in the replica), and always for the
requests of a key with ``tpm=``, whose reservations are settled with the usage counted here
(:class:`Settlement`). Counted routes:
``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``; every other
route passes untouched and costs nothing.

* A response that is not streamed: its JSON body's ``usage`` and ``model``.
* A stream: engines report usage in a stream only when the request says
  ``"stream_options": {"include_usage": true}``, as one last event whose ``choices`` is
  empty. A request that did not ask gets it added to its body (its other ``stream_options``
  kept, ``continuous_usage_stats`` off), and exactly that event is taken out of the stream:
  the client receives the events it asked for and nothing else. A request that asked is
  passed on unchanged and counted from the events it receives.

Not counted, because the engine reports nothing: a response that is not a 200, a stream
the client left before its end. A request whose body cannot be read as the app would read
it (not JSON, ``stream`` or ``stream_options`` invalid) is passed on unchanged: the app
refuses it. A body over ``MAX_METERED_BODY_BYTES`` is refused (413), as for a key limited
to some models.

Streams are read one ASGI message at a time, and only a message that holds the bytes
``"usage"`` is looked into (a JSON string cannot hold them: its quotes are escaped).
Ray's ingress and vLLM's server send whole server-sent events in each message (one event,
or a batch of them), so a usage event is never split; a message with usage that does not
end on an event boundary is passed on unchanged and not counted, and that is logged once.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Callable, Mapping, NamedTuple, Optional

from pydantic import TypeAdapter, ValidationError
from starlette._utils import get_route_path

from rayllm_auth import metrics
from rayllm_auth.bodies import read_body, replay
from rayllm_auth.errors import ConfigError
from rayllm_auth.json_fields import FieldNotFound, first_field, last_field
from rayllm_auth.refusals import Refusal

__all__ = ["USAGE_VAR", "METERED_ROUTES", "MAX_METERED_BODY_BYTES", "usage_enabled",
           "prepare", "is_metered", "Settlement"]

logger = logging.getLogger("rayllm_auth")

USAGE_VAR = "RAY_LLM_AUTH_TOKEN_USAGE"
METERED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_STREAMED_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
#: OpenAI's rule of thumb for a prompt's tokens from its size, for a request whose usage
#: never came (:class:`Settlement`).
PROMPT_BYTES_PER_TOKEN = 4
# An image or audio given inline: its bytes say little of its tokens (base64 of a 2 MB image
# would read as 500,000), so it is left out of that estimate. Base64 holds no '"'.
_INLINE_DATA = re.compile(rb'"data:[^"]*"')
#: Largest request body read (as model_scope's).
MAX_METERED_BODY_BYTES = 64 * 1024 * 1024
#: Largest JSON response read for its usage. Its parts are kept by reference (Starlette sends
#: a JSONResponse as one part: no copy), and only the bytes around its usage and model are
#: parsed where engines write them (:mod:`rayllm_auth.json_fields`).
MAX_METERED_RESPONSE_BYTES = 1024 * 1024 * 1024
# vLLM's `stream` is a `bool | None` field of a pydantic model; FastAPI validates it from
# json.loads' output, in lax mode. The same adapter reads it here, so "true", 1 or "yes" mean
# here what they mean to the app.
_FLAG = TypeAdapter(Optional[bool])
_USAGE = b'"usage"'
_EVENT_END = b"\n\n"
_warned = set()  # what was logged once


def usage_enabled(environ: Mapping[str, str]) -> bool:
    """``RAY_LLM_AUTH_TOKEN_USAGE``: "1" (or true/yes/on) counts every key's tokens; unset,
    empty, "0" (or false/no/off) counts none. Raises ConfigError for anything else."""
    value = environ.get(USAGE_VAR, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        try:
            _stream_options()
        except Exception as exc:  # this Ray's request models are not as expected
            raise ConfigError(
                f"{USAGE_VAR}=1 needs Ray Serve LLM's chat request model with its "
                f"stream_options field: {exc!r}") from exc
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{USAGE_VAR} must be 1 (count every key's tokens) or 0, not {value!r}")


class Settlement(NamedTuple):
    """What a response tells a key's tokens-per-minute limit, once (:func:`_settling_send`):
    ``used(tokens)`` (prompt + completion, as the engine reported them) when a response
    reached its end with its usage counted; ``refused()`` when its answer started with a
    4xx other than 408 (the request was refused before the engine worked on it); else
    ``unfinished(prompt_estimate, streamed)``: a client that left before or during the
    answer, an app that failed or timed out (408, 5xx), where the engine may have worked:
    the request body's size over PROMPT_BYTES_PER_TOKEN, and what it is known to have
    generated (the usage counted so far, else the events streamed: one token or more each)."""
    used: Callable[[int], None]
    refused: Callable[[], None]
    unfinished: Callable[[int, int], None]


def is_metered(scope) -> bool:
    """Whether the request is on a route whose tokens are counted."""
    return scope["type"] == "http" and scope["method"] == "POST" \
        and get_route_path(scope) in METERED_ROUTES


async def prepare(key_id: str, scope, receive):
    """Get a request ready to be counted. Returns the (receive, wrap) pair to call the app
    with, ``wrap(send, settlement=None)`` being the ``send`` that counts (None for a route
    not counted); None when the client went away while sending its body; or a Refusal."""
    if not is_metered(scope):
        return receive, None
    route = get_route_path(scope)
    body = await read_body(receive, MAX_METERED_BODY_BYTES)
    if body is None:
        return None
    if len(body) > MAX_METERED_BODY_BYTES:
        return Refusal.BODY_TOO_LARGE
    strip = False
    if route in _STREAMED_ROUTES:
        asking = _asking_for_usage(body)
        if asking is not None:
            body, strip = asking, True
            scope["headers"] = [
                *((k, v) for k, v in scope["headers"] if k.lower() != b"content-length"),
                (b"content-length", str(len(body)).encode()),
            ]
    return replay(body, receive), lambda send, settlement=None: _counting_send(
        send, key_id, strip, settlement, body)


def _asking_for_usage(body: bytes) -> Optional[bytes]:
    """``body`` rewritten to ask for the stream's usage, or None when it needs no rewrite (not
    a stream, or its client asked) or must not get one (the app would refuse it as it is)."""
    if b"stream" not in body and b"\\u" not in body and json.detect_encoding(body) == "utf-8":
        # In UTF-8, a "stream" field can only be written with those bytes or a \u escape
        # (json.loads, as the app uses it, also reads UTF-16 and UTF-32 bodies: those are parsed)
        return None
    try:
        request = json.loads(body)
        if not isinstance(request, dict) or _FLAG.validate_python(request.get("stream")) \
                is not True:
            return None
        options = request.get("stream_options")
        parsed = _stream_options().validate_python(options)  # raises if the app refuses it
        if parsed is not None and parsed.include_usage:
            return None  # its client asked (vLLM before 2026 asks by default): as it is
        options = {**(options or {}), "include_usage": True, "continuous_usage_stats": False}
    except (ValueError, ValidationError, RecursionError):  # what the app refuses too
        return None
    member = b'"stream_options":' + json.dumps(
        options, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return _with_last_member(body, member)


def _with_last_member(body: bytes, member: bytes) -> bytes:
    """``body``, a JSON object with members, with ``member`` added last: JSON keeps the last
    of repeated keys, so it replaces one the client sent. The rest of the body is passed on
    as sent, never parsed and written again (that took twice as long as the app's parse).
    UTF-16 and UTF-32 bodies (and a UTF-8 BOM) are passed on as UTF-8, which the app reads
    the same; "surrogatepass" as json.loads itself decodes bytes."""
    encoding = json.detect_encoding(body)
    if encoding != "utf-8":
        body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    end = len(body.rstrip(b" \t\n\r")) - 1  # the object's "}": only JSON whitespace after it
    view = memoryview(body)
    return b"".join((view[:end], b",", member, view[end:]))


@functools.cache
def _stream_options() -> TypeAdapter:
    """The app's own reading of ``stream_options`` (vLLM's StreamOptions, through Ray's chat
    request model): what it accepts, and whether it then sends usage, decided by the same
    code and defaults as in the app (vLLM changed ``include_usage``'s default in 2026)."""
    try:  # Ray 2.51 and later, then Ray 2.44 to 2.50
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest
    except ImportError:
        from ray.llm._internal.serve.configs.openai_api_models import ChatCompletionRequest
    return TypeAdapter(ChatCompletionRequest.model_fields["stream_options"].annotation)


def _counting_send(send, key_id: str, strip: bool, settlement: Optional[Settlement] = None,
                   body: bytes = b""):
    """A ``send`` that counts the usage a 200 response reports, and takes the usage event
    out of a stream whose client did not ask for it (``strip``); with a ``settlement``, a
    ``send`` that tells it how the response ended, and must be closed once the app has
    returned (:func:`_settling_send`).

    A plain function, not a coroutine and not an object's ``__call__`` (both cost more per
    call): it returns the client's own send's awaitable. Once an event stream has started,
    every message is a body (a server refuses a second start), so a streamed chunk costs this
    call, one dict lookup and one substring search (find(), not ``in``: bytes.__contains__
    first tries its argument as an int, and failing costs more than the search)."""
    counter = _Counter(key_id, strip)
    streaming = False

    def counting_send(message):
        nonlocal streaming
        if streaming:
            body = message.get("body", b"")
            try:
                found = body.find(_USAGE) != -1
            except AttributeError:  # a memoryview, which Starlette's streams pass on as given
                body = bytes(body)
                found = body.find(_USAGE) != -1
            if found:
                message = {**message, "body": counter.read_events(body)}
            return send(message)
        if message["type"] == "http.response.start":
            streaming = counter.start(message)
        elif message["type"] == "http.response.body":
            counter.collect(message)
        return send(message)

    return counting_send if settlement is None else \
        _settling_send(counting_send, counter, settlement, body)


def prompt_estimate(body: bytes) -> int:
    """Tokens a request body's prompt holds at least, roughly: its size over
    PROMPT_BYTES_PER_TOKEN, inline images and audio (``data:`` URIs) left out."""
    inline = sum(len(m) for m in _INLINE_DATA.findall(body)) if b'"data:' in body else 0
    return (len(body) - inline) // PROMPT_BYTES_PER_TOKEN


def _settling_send(counting_send, counter: "_Counter", settlement: Settlement, body: bytes):
    """``counting_send``, telling ``settlement`` once how the response ended: at a start
    that refuses the request, at the last body message (its usage counted by then:
    ``counting_send`` counts a message before it returns), or when the returned send's
    ``close()`` is called (the app returned or failed, the client may have left)."""
    state = {"events": 0, "ended": False, "status": None}

    def end(finished=False):
        if state["ended"]:
            return
        state["ended"] = True
        status = state["status"]
        if status is not None and 400 <= status < 500 and status != 408:
            settlement.refused()
        elif finished and status == 200 and counter.reported:
            settlement.used(counter.total)
        else:  # the engine may have worked (a running total counted, or its events)
            settlement.unfinished(prompt_estimate(body),
                                  counter.total if counter.reported else state["events"])

    def settling_send(message):
        events = 0
        if not state["ended"] and message["type"] == "http.response.body":
            # Before the send is made: nothing may raise once its awaitable exists (a body
            # that is no bytes would leave it never awaited).
            events = bytes(message.get("body", b"")).count(b"data: {")
        sent = counting_send(message)
        if not state["ended"]:
            if message["type"] == "http.response.start":
                state["status"] = message.get("status")
            elif message["type"] == "http.response.body":
                state["events"] += events
                if not message.get("more_body"):
                    end(finished=True)
        return sent

    settling_send.close = end
    return settling_send


class _Counter:
    """What one response reports: its kind (from its start), its JSON body, and the tokens
    counted for it so far."""

    __slots__ = ("_key_id", "_strip", "_json", "_chunks", "_size", "_counted", "reported")

    def __init__(self, key_id: str, strip: bool):
        self._key_id, self._strip = key_id, strip
        self._json = False  # a 200 JSON response, whose body is collected
        self._chunks: list[bytes] = []  # its parts, until its end
        self._size = 0
        self._counted = (0, 0)  # prompt, completion tokens counted for this response
        self.reported = False  # the response reported usage

    @property
    def total(self) -> int:
        """Prompt and completion tokens counted for this response."""
        return self._counted[0] + self._counted[1]

    def start(self, message) -> bool:
        """Read a response's start; True if it begins a 200 event stream."""
        if message.get("status") != 200:
            return False  # the engine refused it: nothing reported
        content_type = next((v for k, v in message.get("headers", ())
                             if k.lower() == b"content-type"), b"")
        if content_type.startswith(b"text/event-stream"):
            return True
        if content_type.startswith(b"application/json"):
            self._json = True
        elif content_type.startswith(b"application/octet-stream"):
            # vLLM's embeddings as bytes: the JSON fields, usage too, in a header.
            self._read_json(next((v for k, v in message.get("headers", ())
                                  if k.lower() == b"metadata"), b""))
        return False

    def collect(self, message) -> None:
        """A JSON response's body: read for its usage once it is whole (if not too large)."""
        if not self._json or self._size > MAX_METERED_RESPONSE_BYTES:
            return
        body = message.get("body", b"")
        self._chunks.append(body)
        self._size += len(body)
        if self._size > MAX_METERED_RESPONSE_BYTES:
            self._chunks = []
            _warn_once("a JSON response over MAX_METERED_RESPONSE_BYTES is not counted")
        elif not message.get("more_body", False):
            self._read_json(b"".join(self._chunks))

    def read_events(self, body: bytes) -> bytes:
        """``body`` (whole server-sent events) counted, the usage event taken out if
        ``strip``."""
        if not body.endswith(_EVENT_END):
            _warn_once("a streamed message with usage did not end on an event boundary; "
                       "its usage is not counted")
            return body
        kept = []
        for event in body[:-len(_EVENT_END)].split(_EVENT_END):
            if _USAGE in event and self._count_event(_event_data(event)) and self._strip:
                continue  # the event this middleware asked for: not the client's
            kept.append(event + _EVENT_END)
        return b"".join(kept)

    def _read_json(self, body: bytes) -> None:
        """Count the usage of a JSON response (read around its fields where engines write
        them, parsed whole otherwise: :mod:`rayllm_auth.json_fields`)."""
        try:
            usage = last_field(body, "usage")
        except FieldNotFound:
            return  # not the app's answer with usage: nothing reported
        try:
            model = first_field(body, "model")
        except FieldNotFound:
            model = None
        self._count(usage, model)

    def _count_event(self, document) -> bool:
        """Count a stream event's usage. True if it is a usage-only event (no choices)."""
        if not isinstance(document, dict) or not self._count(document.get("usage"),
                                                             document.get("model")):
            return False
        return document.get("choices") == []

    def _count(self, usage, model) -> bool:
        """Count ``usage`` as reported (a stream may report a running total: only what is
        new is counted). False if it is not a usage report."""
        if not isinstance(usage, dict):
            return False
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens") or 0
        if not (_is_count(prompt) and _is_count(completion)):
            return False
        counted_prompt, counted_completion = self._counted
        metrics.record_tokens(self._key_id, model if isinstance(model, str) else "",
                              max(0, prompt - counted_prompt),
                              max(0, completion - counted_completion))
        self._counted = (max(prompt, counted_prompt), max(completion, counted_completion))
        self.reported = True
        return True


def _is_count(value) -> bool:
    return value.__class__ is int and value >= 0


def _event_data(event: bytes):
    """The JSON in one server-sent event's ``data:`` lines, or None."""
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n")
             if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines)) if lines else None
    except (ValueError, RecursionError):
        return None  # [DONE], or not JSON


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning("rayllm-auth: %s (this is logged once)", what)
