"""One test per mistake in ../shared/PEERS.md ("Mistakes peers made"), each named after it,
run against the real app Ray's ingress.init() builds. End-to-end counterparts through the
Serve proxy are in tests/e2e/."""

import hashlib
import logging

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from rayllm_auth.errors import ConfigError
from rayllm_auth.keystore import load_keys as load_key_set
from rayllm_auth.middleware import ApiKeyMiddleware
from tests.conftest import near_miss, new_key
from tests.ray_app import bearer, build_ray_app, call




async def test_01_non_constant_time_comparison(key_env, monkeypatch):
    # vLLM CVE-2025-59425: keys compared byte by byte. Here no configured key is ever
    # compared with what a client sent: the client's value is hashed, and only the digest
    # is looked up.
    from rayllm_auth import keys as keys_module

    keys = load_key_set()
    hashed = []
    real_sha256 = keys_module._request_sha256
    monkeypatch.setattr(keys_module, "_request_sha256",
                        lambda data=b"": hashed.append(data) or real_sha256(data))
    presented = key_env["team-a"].encode()
    assert keys.lookup(presented).key_id == "team-a" and hashed == [presented]
    assert all(isinstance(d, bytes) and len(d) == 32 for d in keys._grants)


async def test_02_guarding_by_path_prefix_leaves_routes_open(app, reached):
    # vLLM guards /v1, /v2, /inference, /cohere only. Here nothing depends on the path.
    for path in ("/invocations", "/pooling", "/score", "/tokenize", "/metrics", "/x/v1/models",
                 "/v2/anything", "/inference/v1/generate", "/cohere/v1/chat"):
        assert (await call(app, "POST", path)).status == 401, path
    assert reached == []


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
async def test_03_auth_check_and_router_disagree_about_the_path(
    monkeypatch, key_env, reached, method, path, root_path, routed_to_exempt_route
):
    # vLLM's root_path removeprefix bypass; LiteLLM's Host-header confusion. The key check
    # reads no path at all; an exemption is decided with the router's own get_route_path,
    # so a request is exempt exactly when the router sends it to the exempt route.
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/v1/models")
    app = build_ray_app(reached)
    reply = await call(app, method, path, root_path=root_path,
                       headers=[("host", "localhost/v1/models")])
    if routed_to_exempt_route:
        assert reply.status == 200 and reached == ["models"]
    else:
        assert reply.status == 401 and reached == []


async def test_04_exemptions_matched_as_prefixes(monkeypatch, key_env, reached):
    # SGLang exempted /health*. Here an exemption is one exact route path.
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/health")
    app = build_ray_app(reached)
    for path in ("/healthz", "/health/", "/health/../v1/models", "/health%2F..%2Fv1",
                 "/health/v1/chat/completions", "/HEALTH"):
        assert (await call(app, "POST", path)).status == 401, path
    assert reached == []


def test_05_websockets_skipped(app, reached):
    # SGLang and LiteLLM checked HTTP only.
    with TestClient(app) as client, pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/v1/realtime"):
            pass
    assert closed.value.code == 1008 and reached == []


async def test_06_case_insensitive_key_match(app, key_env, reached):
    # TGI compared keys case-insensitively, shrinking the key space.
    key = key_env["team-a"]
    for variant in (key.upper(), key.lower(), key.swapcase()):
        assert (await call(app, headers=bearer(variant))).status == 401
    assert reached == []


async def test_07_non_ascii_header_turns_401_into_500(app, reached):
    # SGLang: compare_digest on a non-ASCII str raised TypeError.
    for raw in (b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer \xff\xfe", "Bearer ключ".encode(),
                b"Bearer \x00\x01"):
        assert (await call(app, headers=[("authorization", raw)])).status == 401
    assert reached == []


async def test_08_keys_in_logs_or_error_messages(app, key_env, caplog):
    # SGLang logged keys; error messages echoed them. Nothing here ever prints a key.
    presented = near_miss(key_env["team-a"])
    with caplog.at_level(logging.DEBUG):
        refused = await call(app, headers=bearer(presented))
        accepted = await call(app, headers=bearer(key_env["team-a"]))
    assert refused.status == 401 and accepted.status == 200
    text = caplog.text + refused.body.decode() + str(refused.headers)
    for secret in [presented, *key_env.values()]:
        assert secret not in text and secret[8:24] not in text
    with pytest.raises(ConfigError) as raised:
        load_key_set({"RAY_LLM_API_KEYS": f"{presented},bad key"})
    assert presented not in str(raised.value) and "bad key" not in str(raised.value)


def test_09_precedence_flips_and_comma_lists_silently_cut(reached):
    # vLLM kept only the first key of a comma list in its env var; env and flag fought.
    listed = [new_key() for _ in range(5)]
    single = new_key()
    keys = load_key_set({"RAY_LLM_API_KEYS": ",".join(listed), "VLLM_API_KEY": single})
    assert all(keys.lookup(k.encode()) for k in [*listed, single]) and len(keys) == 6


async def test_10_permissive_cors_and_unreadable_401s(app, key_env, reached):
    # A 401 a browser cannot read; CORS "*" with credentials. Our 401 carries the app's
    # CORS headers, and keys are never ambient (cookies are ignored), so a foreign page
    # cannot spend a user's key through the permissive policy.
    origin = [("origin", "https://evil.example")]
    refused = await call(app, headers=origin)
    assert refused.status == 401 and "access-control-allow-origin" in refused.headers
    cookie = [("cookie", f"api_key={key_env['team-a']}; session={key_env['vllm']}")]
    assert (await call(app, headers=origin + cookie)).status == 401
    assert reached == []


def test_11_insecure_or_surprising_defaults(monkeypatch, no_key_env, reached):
    # Ollama: no auth by default; Ray 2.52: token auth off. Here a key variable that is set
    # but empty is an error, and an app that carries the middleware never runs without keys.
    for variable in ("RAY_LLM_API_KEYS", "VLLM_API_KEY"):
        with pytest.raises(ConfigError, match=variable):
            load_key_set({variable: " "})
    with pytest.raises(ConfigError, match="none of"):
        ApiKeyMiddleware(build_ray_app(reached, protect=False))
