"""The check, on the real app Ray's ingress.init() builds (no cluster): who gets in, what the
others receive, and that refused requests never reach a handler."""

import hashlib
import logging

import cloudpickle
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from rayllm_auth.errors import ConfigError
from rayllm_auth.middleware import ApiKeyMiddleware
from rayllm_auth.protect import protect_app
from tests.conftest import near_miss, new_key
from tests.ray_app import bearer, build_ray_app, call, ray_route_table

pytestmark = pytest.mark.usefixtures("key_env")




def assert_refused(reply, reached, code="invalid_api_key"):
    assert reply.status == 401, reply
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"} and error["param"] is None
    assert reply.headers["www-authenticate"].startswith("Bearer")
    assert reached == [], "a refused request reached a handler"


# -- who gets in ------------------------------------------------------------------------


async def test_each_configured_key_is_accepted_and_tags_user_id(app, key_env, reached):
    def unnamed_id(key):  # the documented derivation, written out here as the oracle
        digest = hashlib.sha256(key.encode()).digest()
        return "key-" + hashlib.sha256(b"rayllm-auth key id\x00" + digest).hexdigest()[:12]

    expected_ids = {"team-a": "team-a", "vllm": unnamed_id(key_env["vllm"]),
                    "unnamed": unnamed_id(key_env["unnamed"])}
    assert len(set(expected_ids.values())) == 3
    for name, key in key_env.items():
        reply = await call(app, headers=bearer(key))
        assert reply.status == 200, name
        assert reply.json()["user_id"] == expected_ids[name], name
    assert reached == ["models"] * 3


async def test_the_key_goes_no_further_than_the_middleware(app, key_env):
    headers = [("authorization", f"Bearer {key_env['team-a']}"),
               ("x-api-key", key_env["team-a"]), ("x-request-id", "abc")]
    reply = await call(app, headers=headers)
    assert reply.status == 200 and reply.json()["credential_headers"] == []


async def test_header_names_are_matched_in_any_case(app, key_env, reached):
    # ASGI servers must lower-case header names (uvicorn does); one that does not must
    # neither slip a second credential past the check nor carry a key on to the app.
    valid, other = key_env["team-a"], key_env["unnamed"]
    for name in (b"Authorization", b"AUTHORIZATION", b"X-Api-Key"):
        value = (b"Bearer " if name[0] in b"aA" else b"") + valid.encode()
        reply = await call(app, headers=[(name, value)])
        assert reply.status == 200 and reply.json()["credential_headers"] == [], name
        reached.clear()
        reply = await call(app, headers=bearer(other) + [(name, value)])
        assert_refused(reply, reached)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(app, key_env, scheme):
    reply = await call(app, headers=[("authorization", f"{scheme} {key_env['team-a']}")])
    assert reply.status == 200


async def test_x_api_key_header_is_accepted(app, key_env):
    assert (await call(app, headers=[("x-api-key", key_env["vllm"])])).status == 200


async def test_same_key_in_both_headers_is_accepted(app, key_env):
    key = key_env["unnamed"]
    headers = [("authorization", f"Bearer {key}"), ("x-api-key", key), ("x-api-key", key)]
    assert (await call(app, headers=headers)).status == 200


# -- who does not, and what they receive ---------------------------------------------


async def test_missing_key_says_how_to_send_one(app, reached):
    reply = await call(app)
    assert_refused(reply, reached)
    assert "Authorization: Bearer" in reply.json()["error"]["message"]
    assert reply.headers["www-authenticate"] == "Bearer"


async def test_wrong_key_is_refused_and_never_echoed_or_logged(app, key_env, reached, caplog):
    # Peer mistake 8 (SGLang logged keys; error messages echoed them).
    wrong = near_miss(key_env["team-a"])
    with caplog.at_level(logging.DEBUG):
        reply = await call(app, headers=bearer(wrong))
        assert (await call(app, headers=bearer(key_env["team-a"]))).status == 200
    reached.clear()
    assert_refused(reply, reached)
    assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    seen = caplog.text + reply.body.decode() + str(reply.headers)
    for secret in [wrong, *key_env.values()]:
        assert secret not in seen and secret[8:24] not in seen and secret[-12:] not in seen


@pytest.mark.parametrize(
    "headers",
    [
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer a b")],
        [("authorization", "Token abc")],
        [("authorization", "")],
        [("x-api-key", "")],
        [("authorization", b"Bearer \xff\xfe\x00key")],
        [("authorization", "Bearer ключ".encode())],  # peer mistake 7: non-ASCII made a 500
        [("authorization", b"Bearer \xc3\xa9t\xc3\xa9")],
        [("authorization", b"Bearer \x00\x01")],
        [("x-api-key", b"caf\xc3\xa9-key")],
        [("authorization", "Bearer " + "k" * 10_000)],
        [("x-api-key", "a\x01b")],
    ],
    ids=lambda h: repr(h)[:40],
)
async def test_malformed_credentials_get_401_never_500(app, reached, headers):
    reply = await call(app, headers=headers)
    assert_refused(reply, reached)


async def test_a_header_value_of_a_type_asgi_does_not_allow_gets_401_never_500(
        app, key_env, reached):
    # ASGI's header values are bytes; a server that handed on a bytearray made the key a
    # bytearray, which the refusal path took for a Refusal (a 500). Found by a review.
    reply = await call(app, headers=[("x-api-key", bytearray(key_env["team-a"].encode()))])
    assert_refused(reply, reached)


async def test_a_key_in_another_case_is_another_key(app, key_env, reached):
    # Peer mistake 6 (TGI matched keys case-insensitively, shrinking the key space).
    key = key_env["team-a"]
    for variant in (key.upper(), key.lower(), key.swapcase()):
        assert_refused(await call(app, headers=bearer(variant)), reached)


async def test_conflicting_keys_are_refused_even_if_one_is_valid(app, key_env, reached):
    headers = [("authorization", f"Bearer {key_env['team-a']}"), ("x-api-key", key_env["vllm"])]
    reply = await call(app, headers=headers)
    assert_refused(reply, reached)
    assert "more than one" in reply.json()["error"]["message"]


async def test_valid_key_beside_a_malformed_header_is_refused(app, key_env, reached):
    headers = [("authorization", "Basic abc"), ("x-api-key", key_env["vllm"])]
    assert_refused(await call(app, headers=headers), reached)


async def test_key_in_cookie_or_query_is_ignored(app, key_env, reached):
    key = key_env["team-a"]
    assert_refused(await call(app, headers=[("cookie", f"api_key={key}")]), reached)
    assert_refused(await call(app, path=f"/v1/models?api_key={key}"), reached)


# -- deny by default, whatever the path ---------------------------------------------------


def every_route_and_method():
    from fastapi import FastAPI

    probe = FastAPI()
    for route in ray_route_table().values():
        route(probe)(lambda: None)
    cases = [(m, r.path.replace("{model:path}", "some/model")) for r in probe.routes
             for m in sorted(r.methods)]
    cases += [("GET", p) for p in ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")]
    cases += [(m, "/v1/models") for m in ("POST", "PUT", "DELETE", "PATCH", "TRACE", "HEAD")]
    cases += [("GET", "/"), ("GET", "/no/such/route"), ("POST", "/internal/route")]
    # Peer mistake 2: vLLM guarded /v1, /v2, /inference and /cohere only.
    cases += [("POST", p) for p in ("/invocations", "/pooling", "/score", "/metrics",
                                    "/x/v1/models", "/v2/anything", "/inference/v1/generate")]
    return cases


@pytest.mark.parametrize("method, path", every_route_and_method())
async def test_every_route_and_method_needs_a_key(app, reached, method, path):
    assert_refused(await call(app, method, path), reached)


@pytest.mark.parametrize(
    "path, root_path",
    [
        ("//v1/models", ""), ("/v1/models/", ""), ("/v1//models", ""), ("/V1/MODELS", ""),
        ("/v1/./models", ""), ("/v1/x/../models", ""), ("/v1%2Fmodels", ""),
        ("/llm/v1/models", "/llm"), ("/v1/models", "/llm"), ("/llm", "/llm"), ("", ""),
    ],
)
async def test_path_spelling_and_root_path_never_skip_the_check(app, reached, path, root_path):
    assert_refused(await call(app, "GET", path, root_path=root_path), reached)


async def test_host_header_does_not_matter(app, reached):
    for host in ("localhost", "internal", "127.0.0.1:8000", "evil.example/health"):
        assert_refused(await call(app, headers=[("host", host)]), reached)


# -- exemptions: exact route paths only --------------------------------------------------


@pytest.fixture
def exempt_app(monkeypatch, key_env, reached):
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", " /v1/models , /tokenize")
    return build_ray_app(reached)


async def test_exempt_path_is_open_and_only_exactly(exempt_app, reached):
    assert (await call(exempt_app, "GET", "/v1/models")).status == 200
    assert (await call(exempt_app, "POST", "/tokenize", body=b"{}")).status != 401
    for path in ("/v1/models/", "/v1/models/some-model", "//v1/models", "/v1/modelsx"):
        reached.clear()
        assert_refused(await call(exempt_app, "GET", path), reached)


async def test_the_key_stops_at_the_ingress_on_exempt_paths_too(exempt_app, key_env):
    for headers in (bearer(key_env["team-a"]), [("x-api-key", "not-a-configured-key")]):
        reply = await call(exempt_app, "GET", "/v1/models", headers)
        assert reply.status == 200 and reply.json()["credential_headers"] == []


async def test_exemption_follows_the_router_under_a_root_path(exempt_app, reached):
    # Under route prefix /llm the router serves /llm/v1/models as /v1/models: exempt too.
    reply = await call(exempt_app, "GET", "/llm/v1/models", root_path="/llm")
    assert reply.status == 200 and reached == ["models"]
    reached.clear()
    assert_refused(await call(exempt_app, "GET", "/llm/v1/models/x", root_path="/llm"), reached)


@pytest.mark.parametrize(
    "method, path, root_path, routed_to_exempt_route",
    [
        ("GET", "/v1/v1/models", "/v1", True),  # the router serves /v1/models: exempt
        ("GET", "/v1/models/x", "/v1/models", False),  # the router sees /x
        ("GET", "/v1/models", "/v1/models", False),  # the router sees an empty path
        ("POST", "/v1/chat/completions", "/v1", False),  # vLLM's removeprefix bypass
        ("POST", "/v1/chat/completions", "/v1/chat/completions", False),
    ],
)
async def test_exempt_exactly_when_the_router_sends_the_request_to_the_exempt_route(
    monkeypatch, key_env, reached, method, path, root_path, routed_to_exempt_route
):
    # Peer mistake 3 (vLLM's --root-path removeprefix bypass; LiteLLM's Host header made the
    # check see another route): the exemption is decided with the router's own path.
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/v1/models")
    app = build_ray_app(reached)
    reply = await call(app, method, path, root_path=root_path,
                       headers=[("host", "localhost/v1/models")])
    if routed_to_exempt_route:
        assert reply.status == 200 and reached == ["models"]
    else:
        assert_refused(reply, reached)


async def test_an_exemption_is_one_route_never_a_prefix(monkeypatch, key_env, reached):
    # Peer mistake 4 (SGLang exempted /health*).
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/health")
    app = build_ray_app(reached)
    for path in ("/healthz", "/health/", "/health/../v1/models", "/health%2F..%2Fv1",
                 "/health/v1/chat/completions", "/HEALTH"):
        assert_refused(await call(app, "POST", path), reached)


def test_exemption_list_rejects_patterns(monkeypatch, key_env, reached):
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/health*")
    with pytest.raises(ConfigError, match="RAY_LLM_AUTH_EXEMPT_PATHS"):
        ApiKeyMiddleware(build_ray_app(reached, protect=False))


# -- browsers -----------------------------------------------------------------------------


async def test_cors_preflight_passes_without_key_and_reaches_no_handler(app, reached):
    reply = await call(app, "OPTIONS", "/v1/chat/completions", headers=[
        ("origin", "https://chat.example"), ("access-control-request-method", "POST"),
        ("access-control-request-headers", "authorization, content-type"),
    ])
    assert reply.status == 200 and reached == []
    assert reply.headers["access-control-allow-origin"] in ("*", "https://chat.example")
    assert "authorization" in reply.headers["access-control-allow-headers"].lower()


async def test_refusals_stay_the_same_whatever_earlier_clients_sent(app):
    # Every refusal of a reason is answered from one prepared answer: the app's own CORS
    # policy, which adds its headers to each answer, must never change that one for the next.
    first = await call(app)
    for n in range(20):
        refused = await call(app, headers=[("origin", f"https://site-{n}.example")])
        assert refused.status == 401
        assert refused.headers["access-control-allow-origin"] == f"https://site-{n}.example"
        assert refused.headers["vary"] == "Origin"  # not one ", Origin" more per refusal
    later = await call(app)  # another client, sending no Origin
    assert later.status == 401 and later.headers == first.headers
    assert "access-control-allow-origin" not in later.headers


async def test_401_carries_the_same_cors_headers_as_a_success(app, key_env, reached):
    origin = [("origin", "https://chat.example")]
    refused = await call(app, headers=origin)
    accepted = await call(app, headers=origin + bearer(key_env["vllm"]))
    cors = {k: v for k, v in accepted.headers.items() if k.startswith("access-control-")}
    assert accepted.status == 200 and cors
    assert refused.status == 401
    assert {k: refused.headers.get(k) for k in cors} == cors


async def test_options_without_preflight_headers_still_needs_a_key(app, reached):
    assert_refused(await call(app, "OPTIONS", "/v1/models"), reached)


# -- websockets -----------------------------------------------------------------------------


def test_websocket_without_key_is_closed_before_accept(app, reached):
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as closed:
            with client.websocket_connect("/v1/realtime"):
                pass
    assert closed.value.code == 1008 and reached == []


def test_websocket_with_wrong_key_is_closed(app, key_env, reached):
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect):
            with client.websocket_connect("/v1/realtime", headers={"x-api-key": "nope" * 8}):
                pass
    assert reached == []


def test_websocket_with_key_is_accepted(app, key_env, reached):
    with TestClient(app) as client:
        with client.websocket_connect(
            "/v1/realtime", headers={"authorization": f"Bearer {key_env['team-a']}"}
        ) as ws:
            assert ws.receive_json() == {"user_id": "team-a"}
    assert reached == ["websocket"]


def test_lifespan_passes_through(app):
    with TestClient(app) as client:  # runs Ray's metrics_lifespan startup and shutdown
        assert client.get("/v1/models").status_code == 401


# -- configuration ------------------------------------------------------------------------------


def test_no_keys_in_the_replica_refuses_to_build(no_key_env, monkeypatch, reached):
    monkeypatch.delenv("RAY_LLM_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="none of RAY_LLM_API_KEYS, VLLM_API_KEY, RAY_LLM_API_KEYS_FILE is set"):
        ApiKeyMiddleware(build_ray_app(reached, protect=False))


def test_empty_key_variable_refuses_to_build(monkeypatch, reached):
    monkeypatch.setenv("RAY_LLM_API_KEYS", " , ")
    with pytest.raises(ConfigError, match="RAY_LLM_API_KEYS is set but holds no key"):
        ApiKeyMiddleware(build_ray_app(reached, protect=False))


def test_start_up_log_names_ids_and_sources_but_no_key(app, key_env, caplog):
    with caplog.at_level(logging.INFO, logger="rayllm_auth"):
        with TestClient(app):
            pass
    assert "API key required on every route" in caplog.text and "team-a" in caplog.text
    assert "RAY_LLM_API_KEYS, VLLM_API_KEY" in caplog.text
    assert not any(key in caplog.text for key in key_env.values())


# -- what travels with the app -------------------------------------------------------------


def test_protecting_twice_gives_one_layer(app):
    assert protect_app(protect_app(app)) is app
    assert sum(m.cls is ApiKeyMiddleware for m in app.user_middleware) == 1
    assert app.user_middleware[0].cls is ApiKeyMiddleware  # outermost


async def test_middleware_added_after_protection_is_put_behind_the_check_again(key_env, reached):
    # Starlette's add_middleware inserts in front: custom ingress code that adds one after
    # init() would see refused requests, keys included. Protecting again (the replica side
    # does) puts the check first again, with the app's CORS policy as it now is.
    from starlette.middleware.cors import CORSMiddleware

    seen = []

    class Spy:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    app = build_ray_app(reached)
    app.add_middleware(Spy)
    app.add_middleware(CORSMiddleware, allow_origins=["https://chat.example"])
    assert protect_app(app) is app
    assert [m.cls for m in app.user_middleware][:3] == [ApiKeyMiddleware, CORSMiddleware, Spy]
    assert app.user_middleware[0].kwargs["cors"]["allow_origins"] == ["https://chat.example"]
    refused = await call(app, headers=bearer(near_miss(key_env["team-a"])))
    assert refused.status == 401 and seen == [] and reached == []
    assert (await call(app, headers=bearer(key_env["team-a"]))).status == 200
    assert seen == ["/v1/models"]


def test_pickled_app_holds_no_key_material(app, key_env):
    from ray._common.serialization import pickle_dumps
    from ray.serve._private.utils import ensure_serialization_context

    ensure_serialization_context()  # exactly what serve.ingress(app) does to freeze the app
    blob = pickle_dumps(app, error_msg="cannot pickle")
    assert not any(k.encode() in blob for k in key_env.values())
    entry = app.user_middleware[0]
    assert set(entry.kwargs) == {"cors", "served_model"} and entry.args == ()
    assert cloudpickle.loads(blob).user_middleware[0].cls is ApiKeyMiddleware


def test_vllm_own_auth_middleware_is_replaced(key_env):
    from fastapi import FastAPI
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    vllm_like = FastAPI()
    vllm_like.add_middleware(AuthenticationMiddleware, tokens=[key_env["vllm"]])
    protect_app(vllm_like)
    assert [m.cls for m in vllm_like.user_middleware] == [ApiKeyMiddleware]


# -- expiry ---------------------------------------------------------------------------------


async def test_a_key_is_refused_from_its_expiry_time_on_without_a_reload(tmp_path, reached,
                                                                        fresh_metrics):
    from rayllm_auth import metrics

    key, forever = new_key(), new_key()
    path = tmp_path / "keys"
    path.write_text(f"soon:{key} expires=2030-01-01T00:00:00Z\nforever:{forever}\n")
    now = [1893455999.0]  # one second before 2030-01-01T00:00:00Z
    app = build_ray_app(reached, protect=False)
    app.add_middleware(ApiKeyMiddleware, environ={"RAY_LLM_API_KEYS_FILE": str(path)},
                       wall_clock=lambda: now[0])
    assert (await call(app, headers=bearer(key))).status == 200
    now[0] += 1
    reached.clear()
    reply = await call(app, headers=bearer(key))
    assert_refused(reply, reached)
    assert reply.json()["error"]["message"] == "This API key has expired."
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    assert (await call(app, headers=bearer(forever))).status == 200
    counts = {tags: n for (name, tags), n in metrics.pending().items()
              if name == "rayllm_auth_requests"}
    assert counts == {("ok", "soon"): 1, ("expired", "soon"): 1, ("ok", "forever"): 1}
    assert not any(name == "rayllm_auth_key_reloads" for name, _ in metrics.pending())
