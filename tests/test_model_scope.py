"""Keys limited to some models, on the real app Ray's ingress.init() builds and on vLLM's own
app (no cluster); the same rules on live clusters are in tests/e2e/test_rayservice.py,
test_serve_cluster.py (DevIngress) and test_direct_streaming.py."""

import asyncio
import json

import pytest
from fastapi import Request
from fastapi.responses import JSONResponse
from hypothesis import given
from hypothesis import strategies as st
# The oracle: the function Ray routes a request by (text before ':' names the base model).
from ray.llm._internal.common.utils.lora_utils import get_base_model_id

from rayllm_auth import model_scope
from rayllm_auth.keys import KEY_SOURCES
from tests.conftest import new_key
from tests.ray_app import bearer, build_ray_app, call
from tests.test_hostile_inputs import generated

LISTING = {"object": "list", "data": [
    {"id": m, "object": "model"} for m in ("llama", "llama:sql-adapter", "qwen", "mistral")]}


@pytest.fixture
def keys(tmp_path, monkeypatch):
    for name in KEY_SOURCES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_LLM_AUTH_EXEMPT_PATHS", raising=False)
    keys = {"llama-only": new_key(), "two": new_key(), "all": new_key(),
            "org-slash": new_key(), "org-dashes": new_key()}
    path = tmp_path / "keys"
    path.write_text(f"llama-only:{keys['llama-only']} models=llama\n"
                    f"two:{keys['two']} models=qwen,mistral\n"
                    f"all:{keys['all']}\n"
                    f"org-slash:{keys['org-slash']} models=org/m\n"
                    f"org-dashes:{keys['org-dashes']} models=org--m\n")
    monkeypatch.setenv("RAY_LLM_API_KEYS_FILE", str(path))
    return keys


@pytest.fixture
def scoped_app(keys, reached):
    return build_scoped_app(reached)


def build_scoped_app(reached):
    """Ray's ingress app with its real routes; the chat route also echoes the model it got
    (proof the body reached it intact), /v1/models answers with LISTING."""
    app = build_ray_app(reached, protect=False)
    app.router.routes = [r for r in app.router.routes
                         if getattr(r, "path", "") not in ("/v1/models", "/v1/chat/completions")]

    @app.get("/v1/models")
    async def models():
        reached.append("models")
        return JSONResponse(LISTING)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        reached.append("chat")
        form_or_json = (await request.form() if "form" in request.headers.get("content-type", "")
                        else await request.json())
        return JSONResponse({"model": form_or_json["model"]})

    from rayllm_auth.protect import protect_app

    return protect_app(app)


def chat_body(model, **extra):
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], **extra}).encode()


def assert_not_found(reply, reached):
    assert reply.status == 404, reply
    assert reply.json() == {"error": {
        "message": "The model does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert reached == []


async def test_allowed_model_reaches_the_app_with_its_body_intact(scoped_app, keys, reached):
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body("llama", stream=True))
    assert reply.status == 200 and reply.json() == {"model": "llama"} and reached == ["chat"]


@pytest.mark.parametrize("model", ["qwen", "no-such-model", "", "LLAMA", "llama2", "qwen:sql-adapter"])
async def test_other_and_unknown_models_get_the_same_404(scoped_app, keys, reached, model):
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body(model))
    assert_not_found(reply, reached)


async def test_lora_id_follows_its_base_model(scoped_app, keys, reached):
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body("llama:sql-adapter"))
    assert reply.status == 200 and reply.json() == {"model": "llama:sql-adapter"}


async def test_models_list_shows_only_the_keys_models(scoped_app, keys):
    listed = {}
    for name, key in keys.items():
        reply = await call(scoped_app, "GET", "/v1/models", bearer(key))
        assert reply.status == 200 and int(reply.headers["content-length"]) == len(reply.body)
        listed[name] = [m["id"] for m in reply.json()["data"]]
    assert listed == {"llama-only": ["llama", "llama:sql-adapter"], "two": ["qwen", "mistral"],
                      "all": ["llama", "llama:sql-adapter", "qwen", "mistral"],
                      "org-slash": [], "org-dashes": []}


@pytest.mark.parametrize(("model", "allowed"), [("llama", True), ("llama:sql-adapter", True),
                                                ("qwen", False), ("nope", False), ("", False)])
async def test_model_data_route_checks_the_id(scoped_app, keys, reached, model, allowed):
    reply = await call(scoped_app, "GET", f"/v1/models/{model}", bearer(keys["llama-only"]))
    if allowed:
        assert reply.status == 200 and reached == ["model_data"]
    else:
        assert_not_found(reply, reached)


async def test_route_prefix_does_not_bypass_the_check(scoped_app, keys, reached):
    reply = await call(scoped_app, "GET", "/llm/v1/models/qwen", bearer(keys["llama-only"]),
                       root_path="/llm")
    assert_not_found(reply, reached)


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions", "/v1/embeddings", "/v1/score",
                                  "/sleep", "/reset_prefix_cache"])
async def test_every_body_route_is_checked(scoped_app, keys, reached, path):
    reply = await call(scoped_app, "POST", path, bearer(keys["llama-only"]),
                       body=json.dumps({"model": "qwen", "prompt": "x"}).encode())
    assert_not_found(reply, reached)
    allowed = await call(scoped_app, "POST", path, bearer(keys["llama-only"]),
                         body=json.dumps({"model": "llama", "prompt": "x"}).encode())
    assert allowed.status != 404 and reached != []


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"model": 7}', b'{"messages": []}',
                                  b"\xff\xfe", b'{"model": null}'])
async def test_a_body_without_a_readable_model_gets_400(scoped_app, keys, reached, body):
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=body)
    assert reply.status == 400 and reply.json()["error"]["code"] == "model_required"
    assert reached == []


async def test_multipart_uploads_name_their_model(scoped_app, keys, reached):
    boundary = "b0undary"

    def upload(model):
        return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
                f"Content-Type: audio/wav\r\n\r\n").encode() + b"\x00RIFF" * 50_000 + (
                f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
                f"{model}\r\n--{boundary}--\r\n").encode()

    headers = bearer(keys["two"]) + [("content-type", f"multipart/form-data; boundary={boundary}")]
    denied = await call(scoped_app, "POST", "/v1/chat/completions", headers, body=upload("llama"))
    assert_not_found(denied, reached)
    allowed = await call(scoped_app, "POST", "/v1/chat/completions", headers, body=upload("qwen"))
    assert allowed.status == 200 and allowed.json() == {"model": "qwen"}


async def test_urlencoded_form_names_its_model(scoped_app, keys, reached):
    headers = bearer(keys["two"]) + [("content-type", "application/x-www-form-urlencoded")]
    reply = await call(scoped_app, "POST", "/v1/chat/completions", headers, body=b"model=llama")
    assert_not_found(reply, reached)


async def test_oversized_body_is_refused_not_buffered_forever(scoped_app, keys, reached, monkeypatch):
    monkeypatch.setattr(model_scope, "MAX_SCOPED_BODY_BYTES", 1000)
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body("llama", padding="x" * 2000))
    assert reply.status == 413 and reached == []


async def test_bodyless_routes_pass_and_unlimited_keys_are_untouched(scoped_app, keys, reached):
    assert (await call(scoped_app, "GET", "/openapi.json", bearer(keys["llama-only"]))).status == 200
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["all"]),
                       body=chat_body("anything"))
    assert reply.status == 200 and reply.json() == {"model": "anything"}


async def test_limited_keys_cannot_open_websockets(scoped_app, keys, reached):
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    with pytest.raises(WebSocketDisconnect) as closed:
        with TestClient(scoped_app).websocket_connect(
                "/v1/realtime", headers={"authorization": f"Bearer {keys['two']}"}):
            pass
    assert closed.value.code == 1008 and reached == []


async def test_denials_answer_browsers_with_the_apps_cors_headers(scoped_app, keys):
    headers = bearer(keys["two"]) + [("origin", "https://app.example")]
    reply = await call(scoped_app, "POST", "/v1/chat/completions", headers, body=chat_body("llama"))
    assert reply.status == 404 and reply.headers["access-control-allow-origin"]


def test_plain_ray_app_untouched_by_this_fixture(reached):
    # build_ray_app itself still serves Ray's route table (guards the fixture's route surgery)
    assert any(getattr(r, "path", "") == "/v1/models" for r in build_ray_app(reached).router.routes)


# -- hostile bodies ------------------------------------------------------------------------

content_types = st.sampled_from([None, "application/json", "multipart/form-data; boundary=b",
                                 "multipart/form-data", "application/x-www-form-urlencoded",
                                 "text/plain", "application/json; charset=latin-1"])
model_values = st.one_of(st.sampled_from(["llama", "qwen", "llama:x", "LLAMA", " llama", "llama\x00"]),
                         st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=5)))
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, extra: json.dumps({"model": m, **extra}).encode(), model_values,
              st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    st.builds(lambda m: f"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n--b--\r\n".encode(),
              st.text(max_size=20)),
    st.builds(lambda m: f"model={m}".encode(), st.text(max_size=20)),
    st.sampled_from([b'{"model": "llama", "model": "qwen"}', b'{"model": "qwen", "model": "llama"}',
                     b'{"model": "llama"}garbage', b'\xef\xbb\xbf{"model": "llama"}']),
)


@generated(400)
@given(content_type=content_types, body=bodies, path=st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/models/qwen", "/sleep"]))
def test_hostile_bodies_never_pass_a_limited_key_to_another_model(scoped_app, keys, reached,
                                                                  content_type, body, path):
    reached.clear()
    headers = bearer(keys["llama-only"]) + ([("content-type", content_type)] if content_type else [])
    reply = asyncio.run(call(scoped_app, "POST", path, headers, body=body))
    assert reply.status < 500, reply
    if reached == ["chat"]:  # it got through: Ray must route what the app read to llama
        model = reply.json()["model"]
        assert isinstance(model, str) and get_base_model_id(model) == "llama", reply
    elif not reached:
        assert reply.status in (400, 403, 404, 413), reply


# -- every way a route receives a model (review findings, issue 10) -----------------------


@pytest.mark.parametrize("query", ["model=qwen", "model=no-such-model", "model=llama&model=qwen",
                                   "model=qwen&model=llama", "mod%65l=qwen", ""])
@pytest.mark.parametrize("path", ["/is_sleeping", "/is_paused"])
async def test_query_string_models_are_checked(scoped_app, keys, reached, path, query):
    # DevIngress broadcasts GET /is_sleeping?model=B to model B's replicas, and its 404 for
    # an unknown model quotes the name back: a key limited to llama must reach neither.
    reply = await call(scoped_app, "GET", f"{path}?{query}", bearer(keys["llama-only"]))
    assert reply.status in (400, 404) and reached == [], reply
    assert reply.json()["error"]["code"] in ("model_not_found", "model_required")


async def test_query_string_model_the_key_may_use_passes(scoped_app, keys, reached):
    reply = await call(scoped_app, "GET", "/is_sleeping?model=llama", bearer(keys["llama-only"]))
    assert reply.status == 200 and reached == ["is_sleeping"]


async def test_a_query_model_never_outweighs_the_body(scoped_app, keys, reached):
    reply = await call(scoped_app, "POST", "/v1/chat/completions?model=llama",
                       bearer(keys["llama-only"]), body=chat_body("qwen"))
    assert_not_found(reply, reached)
    reply = await call(scoped_app, "POST", "/v1/chat/completions?model=qwen",
                       bearer(keys["llama-only"]), body=chat_body("llama"))
    assert_not_found(reply, reached)


@pytest.mark.parametrize("body", [b'{"model": "llama", "model": "qwen"}',
                                  b'{"model": "qwen", "model": "llama"}'])
async def test_a_repeated_model_field_must_be_allowed_every_time(scoped_app, keys, reached, body):
    reply = await call(scoped_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=body)
    assert_not_found(reply, reached)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/responses/resp_123"), ("POST", "/v1/responses/resp_123/cancel"),
    ("GET", "/metrics"), ("GET", "/load"), ("POST", "/server_info"), ("GET", "/is_scaling"),
    ("POST", "/v1/load_lora_adapter"), ("DELETE", "/v1/models/llama"), ("HEAD", "/v1/models"),
    ("POST", "/v1/models"), ("PUT", "/v1/chat/completions"), ("GET", "/v1/chat/completions/"),
])
async def test_routes_not_known_to_name_a_model_are_refused_to_limited_keys(
        scoped_app, keys, reached, method, path):
    reply = await call(scoped_app, method, path, bearer(keys["llama-only"]),
                       body=chat_body("llama"))
    assert reply.status == 403 and reached == [], reply
    assert reply.json()["error"]["code"] == "permission_denied"
    everything = await call(scoped_app, method, path, bearer(keys["all"]), body=chat_body("llama"))
    assert everything.status != 403  # an unlimited key is never asked


async def test_a_limited_key_on_an_exempt_path_gets_what_a_request_without_a_key_gets(
        keys, reached, monkeypatch):
    # Not less (a 403 where anyone gets in), and not more: the path is public.
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/v1/models,/metrics")
    app = build_scoped_app(reached)
    for path in ("/v1/models", "/metrics"):
        anonymous = await call(app, "GET", path)
        limited = await call(app, "GET", path, bearer(keys["llama-only"]))
        assert (limited.status, limited.body) == (anonymous.status, anonymous.body), path
        assert limited.status != 403
    assert (await call(app, "GET", "/v1/models")).json() == LISTING
    # Elsewhere the limit holds as before.
    assert (await call(app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body("qwen"))).status == 404


@pytest.mark.parametrize(("key", "path", "allowed"), [
    ("org-slash", "/v1/models/org--m", True),  # Ray serves org/m's card for org--m
    ("org-slash", "/v1/models/org/m", True),
    ("org-dashes", "/v1/models/org--m", False),  # ... so a key for org--m may not read it
    ("org-dashes", "/v1/models/org/m", False),
    ("llama-only", "/v1/models/llama--x", False),
])
async def test_model_card_ids_are_checked_as_ray_maps_them(scoped_app, keys, reached, key, path,
                                                           allowed):
    reply = await call(scoped_app, "GET", path, bearer(keys[key]))
    if allowed:
        assert reply.status == 200 and reached == ["model_data"], reply
    else:
        assert_not_found(reply, reached)


# -- direct streaming: vLLM's own app serves one model, whatever a request names -----------


@pytest.fixture
def vllm_app(keys, reached):
    """vLLM's real OpenAI app (as the stand-in engine builds it for direct streaming),
    guarded the way an LLMServer replica serving llama guards it, with one route of our own
    that vLLM does not have and that records it was reached."""
    import types

    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from rayllm_auth.patches.core_ingress_layout import LAYOUT
    from rayllm_auth.patching import replica_guard
    from rayllm_auth.testing.vllm_app import build_vllm_app

    app = build_vllm_app(types.SimpleNamespace(model_id="llama"))

    @app.get("/probe/{anything}")
    async def probe(anything: str):
        reached.append("probe")
        return JSONResponse({"reached": "probe"})

    server = object.__new__(LLMServer)
    server._llm_config = types.SimpleNamespace(model_id="llama")
    received = []
    replica_guard(LAYOUT)(received.append, server, (app,), {})
    return received[0]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/probe/x"), ("GET", "/metrics"), ("GET", "/v1/responses/resp_1"),
    ("GET", "/v1/models/llama"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
])
async def test_direct_streaming_keys_must_be_allowed_the_served_model(vllm_app, keys, reached,
                                                                      method, path):
    # A key limited to qwen and mistral names llama, or nothing, or qwen: vLLM would serve
    # llama in every case (some of its routes never look at the name), so none may pass.
    for body in (chat_body("qwen"), chat_body("llama"), b""):
        reply = await call(vllm_app, method, path, bearer(keys["two"]), body=body)
        assert_not_found(reply, reached)


async def test_direct_streaming_allowed_key_reaches_every_route(vllm_app, keys, reached):
    reply = await call(vllm_app, "GET", "/probe/x", bearer(keys["llama-only"]))
    assert reply.status == 200 and reached == ["probe"]  # outside the table: llama it is
    reply = await call(vllm_app, "GET", "/v1/models", bearer(keys["llama-only"]))
    assert [m["id"] for m in reply.json()["data"]] == ["llama"]
    reached.clear()
    reply = await call(vllm_app, "POST", "/v1/chat/completions", bearer(keys["llama-only"]),
                       body=chat_body("qwen"))  # the table's rules still hold
    assert_not_found(reply, reached)


async def test_direct_streaming_docs_and_list_stay_open_to_other_keys(vllm_app, keys, reached):
    assert (await call(vllm_app, "GET", "/version", bearer(keys["two"]))).status == 200
    reply = await call(vllm_app, "GET", "/v1/models", bearer(keys["two"]))
    assert reply.status == 200 and reply.json()["data"] == []
