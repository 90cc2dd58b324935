"""Direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1) on a real cluster behind HAProxy:
the LLMServer replica serves vLLM's own app, built inside the replica, so only the
replica-side patch can protect it. Also: a replica with the plugin but no keys stays stock
and says so."""

import hashlib

import httpx
import openai
import pytest

from tests.conftest import new_key
from tests.support.local_cluster import (
    MODEL,
    SERVE_URL,
    LocalCluster,
    application,
    token_totals,
)

pytestmark = pytest.mark.e2e

HASHED_KEY = new_key()  # configured only as its SHA-256 digest
VLLM_KEY = new_key()  # configured in plain text, in runtime_env.env_vars (a channel Ray logs)
ALLOWED_KEY, OTHER_MODEL_KEY = new_key(), new_key()  # in a key file, limited to some models

# Every route of vLLM 0.29's app, most of them outside vLLM's own /v1 guard.
VLLM_ROUTES = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
    ("GET", f"/v1/models/{MODEL}"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("POST", "/invocations"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/health"),
    ("GET", "/load"), ("GET", "/version"), ("GET", "/metrics"), ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/responses"),
    ("POST", "/v1/chat/completions/batch"), ("POST", "/v1/chat/completions/render"),
    ("POST", "/generative_scoring"), ("POST", "/scale_elastic_ep"),
    ("POST", "/is_scaling_elastic_ep"), ("POST", "/inference/v1/generate"),
    ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/"),
]


@pytest.fixture(scope="module")
def cluster(wheel, tmp_path_factory):
    # HAProxy must be enabled in the Ray processes themselves (the Serve controller).
    cluster = LocalCluster({"RAY_SERVE_ENABLE_HA_PROXY": "1"}).start()
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"allowed:{ALLOWED_KEY} models={MODEL}\n"
                        f"other:{OTHER_MODEL_KEY} models=some-other-model\n")
    try:
        pip = [str(wheel)]
        digest = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
        cluster.deploy([
            application("ds", "/", runtime_env={"pip": pip, "env_vars": {
                "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
                "RAY_LLM_API_KEYS": f"ds-client:sha256:{digest}",
                "VLLM_API_KEY": VLLM_KEY,
                "RAY_LLM_API_KEYS_FILE": str(key_file),
                "RAY_LLM_AUTH_TOKEN_USAGE": "1",
            }}),
            application("off", "/off", runtime_env={"pip": pip}),
        ])
        cluster.apps = cluster.wait_for({"ds": {"RUNNING"}, "off": {"RUNNING"}})
        yield cluster
    finally:
        cluster.stop()


def request(method, path, headers=None):
    return httpx.request(method, f"{SERVE_URL}{path}", headers=headers, timeout=60, json={})


def test_direct_streaming_really_serves_vllms_app(cluster):
    deployments = cluster.apps["ds"]["deployments"]
    assert "OpenAiIngress" not in deployments  # the LLMServer replica is the ingress
    reply = request("GET", "/version", {"x-api-key": VLLM_KEY})
    assert reply.status_code == 200 and "version" in reply.json()


@pytest.mark.parametrize("method, path", VLLM_ROUTES)
def test_every_vllm_route_needs_a_key(cluster, method, path):
    reply = request(method, path)
    assert reply.status_code == 401, reply.text[:300]
    assert reply.json()["error"]["code"] == "invalid_api_key"


def test_token_metrics_equal_what_vllms_app_reported(cluster):
    # vLLM's own app in the LLMServer replica; the key is limited to the model, so its body
    # is read twice (model check, then usage).
    before = len(cluster.engine_usage())
    sdk = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=ALLOWED_KEY, max_retries=0)
    chunks = list(sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "three words here"}], max_tokens=3,
        stream=True))
    assert all(c.choices for c in chunks)  # the usage event asked for here is taken out
    assert sdk.completions.create(model=MODEL, prompt="a b", max_tokens=2).usage.prompt_tokens == 2
    reported = cluster.engine_usage()[before:]
    assert len(reported) == 2, reported
    cluster.wait_for_tokens_counted("allowed", token_totals(reported))


def test_model_limits_hold_on_vllms_own_app(cluster):
    # The same middleware rule as on Ray's ingress: vLLM's app behind direct streaming.
    allowed = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=ALLOWED_KEY, max_retries=0)
    assert [m.id for m in allowed.models.list().data] == [MODEL]
    chunks = list(allowed.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    assert chunks and chunks[0].model == MODEL
    other = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=OTHER_MODEL_KEY, max_retries=0)
    assert other.models.list().data == []
    with pytest.raises(openai.NotFoundError) as caught:
        other.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert caught.value.code == "model_not_found"


def test_model_limits_hold_on_routes_that_name_no_model(cluster):
    # vLLM's app serves one model whatever a request names: a key not allowed that model
    # reaches none of its routes (docs and health aside); an allowed key reaches them all.
    for method, path in (("GET", "/load"), ("GET", "/metrics"), ("GET", "/v1/responses/r1"),
                         ("POST", "/tokenize"), ("GET", f"/v1/models/{MODEL}")):
        reply = request(method, path, {"x-api-key": OTHER_MODEL_KEY})
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert request("GET", "/metrics", {"x-api-key": ALLOWED_KEY}).status_code == 200
    assert request("GET", "/version", {"x-api-key": OTHER_MODEL_KEY}).status_code == 200


def test_hashed_key_and_x_api_key_work_where_vllms_own_check_would_refuse(cluster):
    # vLLM's middleware accepts only `Authorization: Bearer <VLLM_API_KEY>`: these two
    # succeed only because rayllm-auth replaced it.
    sdk = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=HASHED_KEY, max_retries=0)
    reply = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert reply.choices[0].message.content.startswith("hello")
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "hello from the "
    assert request("GET", "/v1/models", {"x-api-key": VLLM_KEY}).status_code == 200


def test_vllms_handlers_never_see_the_key(cluster):
    before = len(cluster.engine_calls())
    sdk = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=HASHED_KEY, max_retries=0)
    sdk.completions.create(model=MODEL, prompt="x", max_tokens=2)
    (line,) = cluster.engine_calls()[before:]
    assert line.endswith("credentials=none")


def test_sdk_with_a_wrong_key_gets_authentication_error(cluster):
    sdk = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=HASHED_KEY[:-2], max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.completions.create(model=MODEL, prompt="x", max_tokens=2)


def test_refused_requests_never_reach_the_engine(cluster):
    before = len(cluster.engine_calls())
    for headers in ({}, {"authorization": "Bearer " + "z" * 40}, {"x-api-key": HASHED_KEY[:-1]}):
        for path in ("/v1/chat/completions", "/v1/completions", "/invocations"):
            assert httpx.post(f"{SERVE_URL}{path}", headers=headers, timeout=60, json={
                "model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}],
            }).status_code == 401
    assert len(cluster.engine_calls()) == before


def test_replica_with_plugin_but_no_keys_is_stock_and_says_so(cluster):
    assert request("GET", "/off/v1/models").status_code == 200
    logs = "".join(p.read_text(errors="replace") for p in cluster.log_files()
                   if p.name.startswith("worker-") or "replica" in p.name)
    assert "API key auth is OFF for OpenAiIngress" in logs


def test_zz_hashed_key_never_appears_but_ray_logs_env_vars(cluster):
    """A hashed entry keeps the plaintext out of everything; a key in runtime_env.env_vars
    is written to Ray's logs by Ray itself, which is why the README advises against it."""
    texts = [p.read_bytes() for p in cluster.log_files()]
    assert not any(HASHED_KEY.encode() in t for t in texts)
    assert any(VLLM_KEY.encode() in t for t in texts), "Ray no longer logs env_vars: update README"
