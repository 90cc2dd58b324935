"""End to end on a real local Ray cluster: Ray's unchanged build_openai_app behind the real
Serve proxy on 127.0.0.1:8000, the real openai SDK, rayllm-auth only in runtime_env.pip,
keys only in the cluster's environment. The only stand-in is the engine, which records
every call it receives."""

import http.client
import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.local_cluster import (
    MODEL,
    OPENAI_ROUTES,
    POLL_S,
    SERVE_URL,
    LocalCluster,
    application,
    llm_config,
    token_totals,
)
from tests.conftest import new_key

pytestmark = pytest.mark.e2e

# In a key file beside the environment's keys: one key limited to the served model, one to
# a model this cluster does not serve.
LIMITED = {"served-only": new_key(), "elsewhere": new_key()}
# Used by the token accounting test only, so its counts start at zero.
METERED = new_key()

EXTRAS = Path(__file__).parent / "rlt_extras"  # a user's own ingress class

@pytest.fixture(scope="module")
def cluster(wheel, cluster_key_env, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"served-only:{LIMITED['served-only']} models={MODEL}\n"
                        f"elsewhere:{LIMITED['elsewhere']} models=another-model\n"
                        f"metered:{METERED}\n")
    # rlt_extras on PYTHONPATH: the user's own code baked into the image, as Serve's docs advise.
    cluster = LocalCluster({**cluster_key_env, "PYTHONPATH": str(EXTRAS.parent),
                            "RAY_LLM_API_KEYS_FILE": str(key_file)}).start()
    try:
        pip = {"pip": [str(wheel)]}
        cluster.deploy([
            # What a RayService's serveConfigV2 holds: Ray's import path, the plugin in pip.
            # Token accounting on here: every test of this app also runs through it.
            application("main", "/", runtime_env={**pip, "env_vars": {
                "RAYLLM_ENABLE_VERBOSE_TELEMETRY": "1", "RAY_LLM_AUTH_TOKEN_USAGE": "1"}}),
            application("dev", "/dev", runtime_env=pip, import_path=(
                "ray.llm._internal.serve.core.ingress.dev_ingress:build_dev_openai_app")),
            application("custom", "/custom", runtime_env=pip,
                        ingress_cls_config={"ingress_cls": "rlt_extras.custom_ingress:MarkedIngress"}),
            # The control: plugin installed (it carries the stand-in engine) but switched off.
            application("stock", "/stock", runtime_env={
                **pip, "env_vars": {"RAY_LLM_AUTH_DISABLE_AUTOPATCH": "1"}}),
            application("badkeys", "/badkeys", runtime_env={
                **pip, "env_vars": {"RAY_LLM_API_KEYS": " , "}}),
            # A runtime_env given to the ingress deployment in code replaces the app's pip:
            # list the plugin there too. First with a key variable broken for that replica...
            application("badreplica", "/badreplica", runtime_env=pip, **failing_ingress({
                "runtime_env": {**pip, "env_vars": {"VLLM_API_KEY": ""}}})),
            # ...then forgetting it: the app was built protected, the replica cannot load the
            # middleware, so it must not start.
            application("noplugin", "/noplugin", runtime_env=pip, **failing_ingress({
                "runtime_env": {"env_vars": {"SOME_SETTING": "1"}}})),
        ])
        # The misconfigured apps are waited for by their own tests (failed_deploy).
        cluster.wait_for({name: {"RUNNING"} for name in ("main", "dev", "custom", "stock")})
        yield cluster
    finally:
        cluster.stop()


def failed_deploy(cluster, name: str) -> dict:
    """App ``name`` once its deploy has failed. Not waited for by the fixture: these apps
    fail after the others run (a replica that refuses to start; Serve's build task retried
    a failed build three times, before a build-time ConfigError became a RayServeException),
    and the tests before these need not wait for them."""
    return cluster.wait_for({name: {"DEPLOY_FAILED"}})[name]


def failing_ingress(ray_actor_options: dict) -> dict:
    """Builder arguments for an app whose ingress replica must fail to start: one try, and
    no LLMServer replica (it would start for nothing: about 25 s of CPU on this machine).
    Ray 2.60's builder gives the ingress the LLM deployments' autoscaling unless it has its
    own, so the ingress's one replica is set here explicitly."""
    return {
        "llm_configs": [llm_config(deployment_config={"autoscaling_config": {
            "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}})],
        "ingress_deployment_config": {
            "max_constructor_retry_count": 1, "ray_actor_options": ray_actor_options,
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1}},
    }


@pytest.fixture(scope="module")
def keys(cluster_keys):
    return cluster_keys


def client(api_key, prefix=""):
    return openai.OpenAI(base_url=f"{SERVE_URL}{prefix}/v1", api_key=api_key, max_retries=0)


def get(path, headers=None, method="GET"):
    return httpx.request(method, f"{SERVE_URL}{path}", headers=headers, timeout=60)


def chat_body(stream=False):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": stream}


# -- the openai SDK ------------------------------------------------------------------------


def test_sdk_without_a_valid_key_gets_authentication_error(cluster, keys):
    for api_key in ("sk-wrong-" + "x" * 30, keys["team-a"].upper(), keys["vllm"][:-1]):
        with pytest.raises(openai.AuthenticationError) as refused:
            client(api_key).chat.completions.create(**chat_body())
        assert refused.value.code == "invalid_api_key"
        assert api_key not in str(refused.value.body)


def test_sdk_with_each_key_chats_streams_and_lists_models(cluster, keys):
    for api_key in keys.values():
        sdk = client(api_key)
        reply = sdk.chat.completions.create(**chat_body())
        assert reply.choices[0].message.content.startswith("hello from")
        chunks = [c.choices[0].delta.content for c in sdk.chat.completions.create(**chat_body(True))]
        assert "".join(filter(None, chunks)) == "hello from the stand-in "
        assert [m.id for m in sdk.models.list()] == [MODEL]
        assert sdk.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].text


def test_x_api_key_header_works_through_the_proxy(cluster, keys):
    reply = httpx.post(f"{SERVE_URL}/v1/chat/completions", json=chat_body(),
                       headers={"x-api-key": keys["unnamed"]}, timeout=60)
    assert reply.status_code == 200


# -- refused requests never reach the engine -------------------------------------------------


def test_refused_requests_never_reach_the_engine(cluster, keys):
    before = len(cluster.engine_calls())
    refused = [
        {}, {"authorization": "Bearer nope-" + "y" * 30}, {"authorization": "Basic abc"},
        {"x-api-key": keys["vllm"], "authorization": f"Bearer {keys['team-a']}"},
        {"authorization": f"Bearer {keys['vllm']} extra"}, {"x-api-key": ""},
    ]
    for headers in refused * 5:
        for path in ("/v1/chat/completions", "/v1/completions", "/custom/v1/chat/completions",
                     "/dev/v1/chat/completions"):
            reply = httpx.post(f"{SERVE_URL}{path}", json=chat_body(), headers=headers, timeout=60)
            assert reply.status_code == 401, (path, headers, reply.text)
    assert len(cluster.engine_calls()) == before
    for path in ("/v1", "/custom/v1", "/dev/v1"):
        client(keys["team-a"], path.removesuffix("/v1")).chat.completions.create(**chat_body())
    assert len(cluster.engine_calls()) == before + 3


def test_the_key_goes_no_further_than_the_ingress(cluster, keys):
    # Ray copies every request header into what it pickles to the LLMServer replica; with the
    # plugin the credential headers are gone before that. The kill-switch app is the control.
    for prefix, expected in (("/stock", "credentials=forwarded"), ("", "credentials=none")):
        client(keys["team-a"], prefix).chat.completions.create(**chat_body())
        assert cluster.engine_calls()[-1].endswith(expected), prefix


# -- every route, every spelling ------------------------------------------------------------

DEV_ADMIN = [("POST", "/sleep"), ("POST", "/wakeup"), ("GET", "/is_sleeping"),
             ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"),
             ("POST", "/reset_prefix_cache"), ("POST", "/collective_rpc")]


@pytest.mark.parametrize("prefix", ["", "/custom", "/dev"])
def test_every_route_needs_a_key(cluster, prefix):
    routes = OPENAI_ROUTES + (DEV_ADMIN if prefix == "/dev" else [])
    statuses = {(m, p): get(prefix + p, method=m).status_code for m, p in routes}
    assert set(statuses.values()) == {401}, statuses


def test_admin_routes_work_with_a_key(cluster, keys):
    reply = get(f"/dev/is_sleeping?model={MODEL}", headers={"authorization": f"Bearer {keys['team-a']}"})
    assert reply.status_code == 200


@pytest.mark.parametrize("query", [f"model={MODEL}", "model=no-such-model", ""])
def test_limited_key_reaches_admin_routes_only_for_its_models(cluster, query):
    # DevIngress broadcasts GET /is_sleeping?model=M to M's replicas; Ray's own 404 for an
    # unknown M quotes it back. Neither may happen for a key not allowed M.
    before = len(cluster.engine_calls())
    reply = get(f"/dev/is_sleeping?{query}", {"x-api-key": LIMITED["elsewhere"]})
    assert reply.status_code in (400, 404), reply.text
    assert reply.json()["error"]["code"] in ("model_not_found", "model_required")
    assert "no-such-model" not in reply.text and len(cluster.engine_calls()) == before
    allowed = get(f"/dev/is_sleeping?model={MODEL}", {"x-api-key": LIMITED["served-only"]})
    assert allowed.status_code == 200, allowed.text


def test_limited_key_is_refused_routes_that_name_no_model(cluster):
    for method, path in (("GET", "/metrics"), ("DELETE", "/v1/models"), ("GET", "/dev/x")):
        reply = get(path, {"x-api-key": LIMITED["served-only"]}, method=method)
        assert reply.status_code == 403 and reply.json()["error"]["code"] == "permission_denied"
    assert get("/docs", {"x-api-key": LIMITED["served-only"]}).status_code == 200


def raw_request(path, headers=()):
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=60)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


@pytest.mark.parametrize("path", [
    "//v1/models", "/v1//models", "/v1/models/", "/v1%2Fmodels", "/./v1/models",
    "/v1/../v1/models", "/V1/MODELS", "/dev/../v1/models", "/custom//v1/models",
    "/custom/./v1/models", "/v1/models?x=/health", "/v1/models#frag", "/%2e/v1/models",
])
def test_path_spellings_never_bypass_the_check(cluster, path):
    status, body = raw_request(path)
    assert status == 401, (path, status, body[:200])


@pytest.mark.parametrize("headers", [
    [("Authorization", b"Bearer \xc3\xa9\xff")], [("X-Api-Key", b"\xe2\x82\xac" * 10)],
    [("Authorization", "Bearer " + "k" * 8000)], [("Authorization", "bearer")],
    [("Authorization", "Bearer a\tb")], [("Host", "evil.example")],
])
def test_hostile_headers_get_a_4xx_never_a_5xx_or_a_pass(cluster, headers):
    status, _ = raw_request("/v1/models", headers)
    assert 400 <= status < 500 and status != 404, status


# -- browsers --------------------------------------------------------------------------------


def test_preflight_passes_and_401_is_readable_by_a_browser(cluster):
    preflight = get("/v1/chat/completions", method="OPTIONS", headers={
        "origin": "https://chat.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert preflight.status_code == 200
    refused = get("/v1/models", headers={"origin": "https://chat.example"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] in ("*", "https://chat.example")


# -- who protected what ------------------------------------------------------------------------


def test_custom_ingress_class_is_served_and_protected(cluster, keys):
    reply = get("/custom/v1/models", {"authorization": f"Bearer {keys['unnamed']}"})
    assert reply.status_code == 200 and reply.json()["served_by"] == "MarkedIngress"


def test_kill_switch_gives_stock_ray_an_open_app(cluster):
    # The control for every 401 above: the same app with the plugin switched off is open.
    assert get("/stock/v1/models").status_code == 200


# -- misconfiguration: refuse to start, never serve open ------------------------------------


def test_bad_key_variable_fails_the_deploy_naming_it(cluster):
    app = failed_deploy(cluster, "badkeys")
    assert "RAY_LLM_API_KEYS is set but holds no key" in app["message"]
    assert get("/badkeys/v1/models").status_code == 401  # falls through to "/", which refuses
    # Built once: Serve retries a failed build three times, each in a new process, except
    # for its own RayServeException, which a build-time ConfigError also is. Each try logs
    # to its own file (serve/controller_build_<app>_<pid>.log).
    tries = [p.name for p in cluster.log_files()
             if p.name.startswith("controller_build_badkeys_")]
    assert len(tries) == 1, tries


def test_replica_with_bad_keys_refuses_to_start_naming_it(cluster):
    app = failed_deploy(cluster, "badreplica")
    message = app["deployments"]["OpenAiIngress"]["message"]
    assert "ConfigError: VLLM_API_KEY is set but empty" in message
    assert get("/badreplica/v1/models").status_code == 503  # the route exists, no replica


def test_replica_without_the_plugin_cannot_serve_a_protected_app(cluster):
    app = failed_deploy(cluster, "noplugin")
    assert "No module named 'rayllm_auth'" in app["deployments"]["OpenAiIngress"]["message"]


# -- observability -----------------------------------------------------------------------------


def models_requests_by(user_id: str, metrics: str) -> float:
    """Ray's ray_http_requests_total for GET /v1/models tagged with ``user_id``."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("ray_http_requests_total{") and f'user_id="{user_id}"' in line
        and 'handler="/v1/models"' in line and 'code="200"' in line
    )


def test_key_id_reaches_ray_http_metrics_as_user_id(cluster, keys):
    before = models_requests_by("team-a", cluster.metrics())
    for _ in range(3):
        assert get("/v1/models", {"authorization": f"Bearer {keys['team-a']}"}).status_code == 200
    deadline = time.monotonic() + 60
    while models_requests_by("team-a", cluster.metrics()) < before + 3:
        assert time.monotonic() < deadline, "user_id=team-a not counted in ray_http_requests_total"
        time.sleep(POLL_S)


def test_token_metrics_equal_what_the_engine_reported(cluster):
    before = len(cluster.engine_usage())
    sdk = client(METERED)
    sdk.chat.completions.create(**chat_body())
    chunks = list(sdk.chat.completions.create(**chat_body(stream=True)))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    asked = list(sdk.chat.completions.create(**chat_body(stream=True),
                                             stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 4
    sdk.completions.create(model=MODEL, prompt="count these four words", max_tokens=3)
    assert all(c.choices for c in sdk.completions.create(
        model=MODEL, prompt=["two words", "three more words"], max_tokens=2, stream=True))
    assert len(sdk.embeddings.create(model=MODEL, input=["a b", "c d e"]).data) == 2
    reported = cluster.engine_usage()[before:]
    assert len(reported) == 6, reported  # every request's usage, the streams' included
    cluster.wait_for_tokens_counted("metered", token_totals(reported))


def test_zz_no_key_appears_in_ray_logs_status_or_metrics(cluster, keys):
    """Last in the module: after all the traffic above, search everything Ray wrote."""
    assert cluster.places_holding([*keys.values(), *LIMITED.values(), METERED]) == []


BENCHMARK_SMOKE = """
import asyncio, json, os, sys
sys.path.insert(0, os.environ["REPO"])  # this checkout's benchmarks/, whatever else is installed
from benchmarks.e2e_bench import one_run, ratios
from tests.support.local_cluster import ingress_pids
pids, key = ingress_pids(), os.environ["KEY"]
runs = {app: asyncio.run(one_run(prefix, pids[app], key, 2, stream, 1.0, 4))
        for app, prefix, stream in (("stock", "/stock", True), ("main", "", False))}
print(json.dumps({"runs": runs, "ratios": ratios([(runs["stock"], runs["main"])])}))
"""


def test_e2e_benchmark_harness_runs_against_this_cluster(cluster, keys):
    """Smoke run of benchmarks/e2e_bench.py's pieces (no thresholds): same request, stock
    (kill switch) and plugin app, ingress pids and CPU time from Ray's state API and /proc.
    In its own interpreter: the benchmarks package is never imported by the test process."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", BENCHMARK_SMOKE], capture_output=True,
                            text=True, timeout=300, cwd=repo,
                            env={**os.environ, "REPO": str(repo), "KEY": keys["team-a"]})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runs = report["runs"]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in runs.values()), runs
    assert all(r["ingress_cpu_s"] > 0 for r in runs.values())
    assert "requests_per_s" in report["ratios"]
