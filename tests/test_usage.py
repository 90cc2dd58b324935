"""Token accounting (RAY_LLM_AUTH_TOKEN_USAGE=1) at the ASGI level: Ray's own ingress app and
stream wrapper around the stand-in engine, which writes every usage it reports to a file.
That file is the oracle: the counted tokens must equal it exactly, and a stream's client
must receive exactly what the same request gets from the app without rayllm-auth."""

import asyncio
import json
import types

import pytest

from rayllm_auth import metrics, usage
from rayllm_auth.errors import ConfigError
from rayllm_auth.testing.engine import USAGE_FILE_VAR, StandInEngine
from tests.engine_app import build_engine_app
from tests.ray_app import bearer, call

MODEL = "usage-model"
PROMPT = "one two three four five"  # five tokens to the stand-in's tokenizer


@pytest.fixture
def engine(monkeypatch, tmp_path):
    usage_file = tmp_path / "usage"
    monkeypatch.setenv(USAGE_FILE_VAR, str(usage_file))
    engine = StandInEngine(types.SimpleNamespace(model_id=MODEL))
    engine.reported = lambda: [line.split() for line in usage_file.read_text().splitlines()] \
        if usage_file.exists() else []
    return engine


@pytest.fixture
def counting(monkeypatch, key_env, fresh_metrics):
    monkeypatch.setenv(usage.USAGE_VAR, "1")
    return key_env


def counted() -> dict:
    """{(key_id, model, kind): tokens} counted so far."""
    return {label: n for (name, label), n in metrics.pending().items()
            if name == "rayllm_auth_tokens"}


def engine_totals(engine) -> dict:
    """The same shape as counted(), from the engine's own reports, for key team-a."""
    totals = {}
    for _method, model, prompt, completion in engine.reported():
        for kind, field in (("prompt", prompt), ("completion", completion)):
            n = int(field.split("=")[1])
            if n:
                totals[("team-a", model, kind)] = totals.get(("team-a", model, kind), 0) + n
    return totals


def post(app, path, body, key, *, raw=None):
    headers = [*bearer(key), ("content-type", "application/json")]
    return asyncio.run(call(app, "POST", path, headers,
                            body=raw if raw is not None else json.dumps(body).encode()))


def events(reply) -> list:
    """A stream's events as JSON (ids and times removed, as they differ per request)."""
    assert reply.headers["content-type"].startswith("text/event-stream")
    found = []
    for event in reply.body.split(b"\n\n"):
        data = event.removeprefix(b"data: ")
        if data and data != b"[DONE]":
            chunk = json.loads(data)
            chunk.pop("id"), chunk.pop("created")
            found.append(chunk)
    assert reply.body.endswith(b"data: [DONE]\n\n")
    return found


def chat(stream=False, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3,
            "stream": stream, **extra}


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_a_stream_that_did_not_ask_is_counted_and_gets_exactly_the_stock_events(
        engine, counting, batch):
    stock = post(build_engine_app(engine, batch=batch, protect=False), "/v1/chat/completions",
                 chat(True), counting["team-a"])
    assert engine.reported() == []  # the stock request asked for no usage: none reported
    reply = post(build_engine_app(engine, batch=batch), "/v1/chat/completions", chat(True),
                 counting["team-a"])
    assert reply.status == 200
    assert events(reply) == events(stock)  # the usage event asked for here is taken out
    assert all("usage" not in e for e in events(reply))
    assert engine.reported() == [["chat", MODEL, "prompt=5", "completion=3"]]
    assert counted() == engine_totals(engine) == {
        ("team-a", MODEL, "prompt"): 5, ("team-a", MODEL, "completion"): 3}


@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": "true"},
                                     {"include_usage": True, "continuous_usage_stats": True}])
def test_a_stream_that_asked_for_usage_gets_it_and_is_counted_once(engine, counting, options):
    body = chat(True, stream_options=options)
    stock = post(build_engine_app(engine, batch=2, protect=False), "/v1/chat/completions",
                 body, counting["team-a"])
    reply = post(build_engine_app(engine, batch=2), "/v1/chat/completions", body,
                 counting["team-a"])
    assert events(reply) == events(stock)
    assert events(reply)[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                          "total_tokens": 8}
    # Two requests reported (stock and protected); only the protected one is counted, once
    # (with continuous_usage_stats every event carries the running total).
    assert counted() == {("team-a", MODEL, "prompt"): 5, ("team-a", MODEL, "completion"): 3}


def test_non_streamed_chat_completions_and_embeddings_are_counted_exactly(engine, counting):
    app = build_engine_app(engine)
    key = counting["team-a"]
    assert post(app, "/v1/chat/completions", chat(max_tokens=7), key).json()["usage"][
        "completion_tokens"] == 7
    assert post(app, "/v1/completions", {"model": MODEL, "prompt": ["a b", "c"],
                                         "max_tokens": 2}, key).status == 200
    stream = post(app, "/v1/completions", {"model": MODEL, "prompt": "x y", "max_tokens": 4,
                                           "stream": True}, key)
    assert all("usage" not in e for e in events(stream))
    embedded = post(app, "/v1/embeddings", {"model": MODEL, "input": ["a b c", "d"]}, key)
    assert embedded.json()["usage"]["prompt_tokens"] == 4
    assert [m for m, *_ in engine.reported()] == ["chat", "completions", "completions",
                                                  "embeddings"]
    assert counted() == engine_totals(engine) == {
        ("team-a", MODEL, "prompt"): 5 + 3 + 2 + 4, ("team-a", MODEL, "completion"): 7 + 2 + 4}


def test_each_key_is_counted_under_its_own_id(engine, counting):
    app = build_engine_app(engine)
    post(app, "/v1/chat/completions", chat(), counting["team-a"])
    post(app, "/v1/chat/completions", chat(True), counting["vllm"])
    (vllm_id,) = {key_id for key_id, _, _ in counted()} - {"team-a"}
    assert vllm_id.startswith("key-")
    assert counted() == {("team-a", MODEL, "prompt"): 5, ("team-a", MODEL, "completion"): 3,
                         (vllm_id, MODEL, "prompt"): 5, (vllm_id, MODEL, "completion"): 3}


def test_accounting_off_changes_nothing_and_counts_nothing(engine, key_env, fresh_metrics):
    app = build_engine_app(engine)
    reply = post(app, "/v1/chat/completions", chat(True), key_env["team-a"])
    assert reply.status == 200 and all("usage" not in e for e in events(reply))
    assert engine.reported() == []  # the request reached the engine unchanged
    post(app, "/v1/chat/completions", chat(), key_env["team-a"])
    assert counted() == {}


@pytest.mark.parametrize("raw", [
    b"{not json", b"[1, 2]", json.dumps(chat(True, stream_options="yes")).encode(),
    json.dumps(chat(True, stream_options={"include_usage": "maybe"})).encode(),
    json.dumps(chat(True, stream_options={"continuous_usage_stats": "maybe"})).encode(),
    json.dumps(chat("maybe")).encode(),
])
def test_a_body_the_app_refuses_is_passed_on_unchanged_and_counts_nothing(
        engine, counting, raw):
    stock = post(build_engine_app(engine, protect=False), "/v1/chat/completions", None,
                 counting["team-a"], raw=raw)
    reply = post(build_engine_app(engine), "/v1/chat/completions", None, counting["team-a"],
                 raw=raw)
    assert stock.status == reply.status == 400
    assert reply.json() == stock.json()
    assert counted() == {} and engine.reported() == []


def test_stream_given_as_a_string_is_read_as_the_app_reads_it(engine, counting):
    reply = post(build_engine_app(engine), "/v1/chat/completions", chat("true"),
                 counting["team-a"])
    assert all("usage" not in e for e in events(reply))
    assert counted() == engine_totals(engine) != {}


def test_an_engine_error_counts_nothing(engine, counting):
    reply = post(build_engine_app(engine), "/v1/chat/completions",
                 chat(True, max_tokens=-1), counting["team-a"])
    assert reply.status == 400 and counted() == {}


def test_a_body_over_the_limit_is_refused(engine, counting, monkeypatch):
    monkeypatch.setattr(usage, "MAX_METERED_BODY_BYTES", 100)
    reply = post(build_engine_app(engine), "/v1/chat/completions",
                 chat(messages=[{"role": "user", "content": "x" * 200}]), counting["team-a"])
    assert reply.status == 413 and engine.reported() == []


def test_other_routes_are_not_read(counting, reached):
    from tests.ray_app import build_ray_app

    reply = post(build_ray_app(reached), "/tokenize", {"model": MODEL, "prompt": "a"},
                 counting["team-a"])
    assert reply.status == 200 and reached == ["tokenize"] and counted() == {}


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False),
                                       ("off", False)])
def test_the_switch(value, on):
    assert usage.usage_enabled({usage.USAGE_VAR: value}) is on


def test_a_misspelt_switch_stops_the_replica():
    with pytest.raises(ConfigError, match=usage.USAGE_VAR):
        usage.usage_enabled({usage.USAGE_VAR: "maybe"})


def test_a_stream_field_written_with_escapes_is_still_read(engine, counting):
    # The body is only parsed when it holds b"stream" or a \u escape: this one has no
    # b"stream" at all, and must still be counted with its usage event taken out.
    raw = json.dumps(chat(True)).replace('"stream"', '"\\u0073tream"').encode()
    assert b"stream" not in raw
    reply = post(build_engine_app(engine), "/v1/chat/completions", None, counting["team-a"],
                 raw=raw)
    assert all("usage" not in e for e in events(reply))
    assert counted() == engine_totals(engine) != {}


def test_messages_hold_the_batches_asked_for(engine):
    # The harness itself: batch=1 must send one event per message (review finding 9).
    import asyncio as aio

    async def sizes(batch):
        app = build_engine_app(engine, batch=batch, protect=False)
        messages = []

        bodies = [{"type": "http.request", "body": json.dumps(chat(True)).encode()}]

        async def receive():
            if bodies:
                return bodies.pop()
            await aio.sleep(3600)  # no disconnect while the stream is sent

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                messages.append(message["body"].count(b"data: "))

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
                 "scheme": "http", "client": ("127.0.0.1", 1), "server": ("t", 80),
                 "asgi": {"version": "3.0"}}
        await app(scope, receive, send)
        return messages

    assert aio.run(sizes(1)) == [1, 1, 1, 1]  # three chunks, then [DONE]
    assert aio.run(sizes(3)) == [3, 1]


def test_a_client_asking_by_an_older_vllms_default_is_left_as_it_is(engine, counting,
                                                                    monkeypatch):
    # vLLM before 2026 sends usage for "stream_options": {} (include_usage defaulted to true):
    # the app's own model decides, so such a request is not rewritten, and nothing is taken
    # out of its stream (review finding 6).
    from typing import Optional

    from pydantic import BaseModel, TypeAdapter

    class OlderStreamOptions(BaseModel):
        include_usage: Optional[bool] = True
        continuous_usage_stats: Optional[bool] = False

    monkeypatch.setattr(usage, "_stream_options",
                        lambda: TypeAdapter(Optional[OlderStreamOptions]))
    assert usage._asking_for_usage(json.dumps(chat(True, stream_options={})).encode()) is None
    assert usage._asking_for_usage(json.dumps(chat(True)).encode()) is not None


def test_the_rewrite_stays_the_size_of_the_body(counting):
    # json.dumps' default escapes every non-ASCII character as \uXXXX: up to 3 times the bytes
    # the client sent (review finding 8).
    body = json.dumps(chat(True, messages=[{"role": "user", "content": "é" * 1000}]),
                      ensure_ascii=False).encode()
    rewritten = usage._asking_for_usage(body)
    assert json.loads(rewritten)["messages"] == json.loads(body)["messages"]
    assert len(rewritten) < len(body) + 100
    # A lone surrogate has no UTF-8 form: written as json.loads reads it back, not escaped
    # (an ASCII fallback changed every other character too; review 12, finding 4).
    surrogate = json.dumps(chat(True, messages=[{"role": "user", "content": "\ud800" + "é" * 100}]),
                           ensure_ascii=False).encode("utf-8", "surrogatepass")
    rewritten = usage._asking_for_usage(surrogate)
    assert json.loads(rewritten)["messages"] == json.loads(surrogate)["messages"]
    assert len(rewritten) < len(surrogate) + 100


def test_a_body_over_the_limit_is_refused_as_too_large_not_as_a_model_refusal(
        engine, counting, monkeypatch):
    monkeypatch.setattr(usage, "MAX_METERED_BODY_BYTES", 100)
    reply = post(build_engine_app(engine), "/v1/chat/completions",
                 chat(messages=[{"role": "user", "content": "x" * 200}]), counting["team-a"])
    assert reply.status == 413 and "token accounting" in reply.json()["error"]["message"]
    assert metrics.pending()[("rayllm_auth_requests", ("too_large", "team-a"))] == 1


def test_a_response_larger_than_the_request_limit_is_still_counted(engine, counting,
                                                                   monkeypatch):
    # The client chooses the response's size (max_tokens, many inputs): it must not choose
    # to go uncounted (review finding 3).
    monkeypatch.setattr(usage, "MAX_METERED_BODY_BYTES", 1000)
    reply = post(build_engine_app(engine), "/v1/completions",
                 {"model": MODEL, "prompt": "a", "max_tokens": 500}, counting["team-a"])
    assert len(reply.body) > 1000
    assert counted() == engine_totals(engine) == {("team-a", MODEL, "prompt"): 1,
                                                  ("team-a", MODEL, "completion"): 500}


def test_embeddings_as_bytes_are_counted_from_vllms_metadata_header(counting):
    # vLLM answers encoding_format "bytes" with the JSON fields in a `metadata` header
    # (review finding 4).
    from rayllm_auth.protect import protect_app

    async def bytes_app(scope, receive, send):
        await receive()
        metadata = json.dumps({"model": MODEL, "usage": {"prompt_tokens": 9,
                                                          "total_tokens": 9}})
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"), (b"metadata", metadata.encode())]})
        await send({"type": "http.response.body", "body": b"\x00" * 64})

    reply = post(protect_app(bytes_app), "/v1/embeddings",
                 {"model": MODEL, "input": "x", "encoding_format": "bytes"}, counting["team-a"])
    assert reply.status == 200 and counted() == {("team-a", MODEL, "prompt"): 9}


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-16"])
def test_a_stream_asked_for_in_utf16_or_utf32_is_counted(engine, counting, encoding):
    # json.loads, which the app reads bodies with, takes UTF-16 and UTF-32: such a body holds
    # no b"stream" and must not skip the parse (review 12, finding 1).
    raw = json.dumps(chat(True)).encode(encoding)
    assert b"stream" not in raw
    stock = post(build_engine_app(engine, protect=False), "/v1/chat/completions", None,
                 counting["team-a"], raw=raw)
    reply = post(build_engine_app(engine), "/v1/chat/completions", None, counting["team-a"],
                 raw=raw)
    assert stock.status == reply.status == 200
    assert events(reply) == events(stock)
    assert counted() == engine_totals(engine) == {
        ("team-a", MODEL, "prompt"): 5, ("team-a", MODEL, "completion"): 3}


def test_a_ray_whose_request_model_differs_stops_the_replica(monkeypatch):
    # Any failure to read the app's stream_options model is a configuration error, not an
    # AttributeError from inside the middleware's constructor (review 12, finding 5).
    def changed():
        raise AttributeError("'ChatCompletionRequest' has no attribute 'model_fields'")

    monkeypatch.setattr(usage, "_stream_options", changed)
    with pytest.raises(ConfigError, match="stream_options"):
        usage.usage_enabled({usage.USAGE_VAR: "1"})


def test_a_usage_key_inside_a_responses_content_is_not_counted(counting):
    # A JSON response is read around its own usage and model, never a nested object's
    # (rayllm_auth.json_fields): what a client puts in content cannot change the count.
    from rayllm_auth.protect import protect_app

    answer = {"id": "x", "model": MODEL, "choices": [
        {"message": {"content": '{"usage": {"prompt_tokens": 999}}', "model": "other"},
         "logprobs": {"top_logprobs": [{"usage": -0.1, "model": -0.2}]}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2}, "kv": {"usage": {"x": 1}}}

    async def json_app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    reply = post(protect_app(json_app), "/v1/chat/completions", chat(), counting["team-a"])
    assert reply.status == 200
    assert counted() == {("team-a", MODEL, "prompt"): 4, ("team-a", MODEL, "completion"): 2}


@pytest.mark.parametrize("raw", [
    b'{"stream": true, "messages": [], "stream_options": {"include_usage": false}}  \n',
    b'{"stream_options": {"x": 1}, "stream": 1, "stream_options": null}',  # repeated: last
    '{"stream": true, "m": "\u00e9\ud800"}'.encode("utf-16-le", "surrogatepass"),
    b'\xef\xbb\xbf{"stream": "true", "n": [1.5, NaN, 1e400]}',
])
def test_the_rewrite_is_the_body_as_sent_with_stream_options_added_last(raw):
    # Review 13, finding 2: the body is no longer parsed and written again (twice the app's
    # own parse); the app reads exactly the client's request with its stream_options merged.
    rewritten = usage._asking_for_usage(raw)
    sent = json.loads(raw)
    expected = {**sent, "stream_options": {**(sent.get("stream_options") or {}),
                                           "include_usage": True,
                                           "continuous_usage_stats": False}}
    assert repr(json.loads(rewritten)) == repr(expected)  # repr: NaN is not equal to itself
    assert len(rewritten) <= len(raw) + 80  # the member added, nothing else


def test_a_stream_of_memoryviews_is_passed_on_and_counted(counting):
    # Starlette's StreamingResponse passes memoryview chunks on as an app yields them; they
    # have no find() (review 14: the stream was cut after its start, in the code before too).
    sent = []
    send = usage._counting_send(lambda message: sent.append(message), "team-a", strip=True)
    send({"type": "http.response.start", "status": 200,
          "headers": [(b"content-type", b"text/event-stream")]})
    content = b'data: {"model": "%s", "choices": [{"text": "x"}]}\n\n' % MODEL.encode()
    final = (b'data: {"model": "%s", "choices": [], "usage": {"prompt_tokens": 2, '
             b'"completion_tokens": 1}}\n\n' % MODEL.encode())
    send({"type": "http.response.body", "body": memoryview(content), "more_body": True})
    send({"type": "http.response.body", "body": memoryview(final), "more_body": True})
    send({"type": "http.response.body", "body": memoryview(b"data: [DONE]\n\n")})
    assert b"".join(bytes(m.get("body", b"")) for m in sent) == content + b"data: [DONE]\n\n"
    assert counted() == {("team-a", MODEL, "prompt"): 2, ("team-a", MODEL, "completion"): 1}
