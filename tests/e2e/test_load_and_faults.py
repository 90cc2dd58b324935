"""Under load and under faults, on a real cluster: mixed credentials at high concurrency, a
property-based sample through the Serve proxy, an app built by a Python driver that lacks the
plugin, an ingress replica killed mid-stream, and the whole cluster restarted. Figures are
printed (run with -s to see them) and asserted exactly. Everything here uses only what every
supported Ray release has, so tests/compat/run.py runs this module against each of them.

The mixed-key load sends 5,000 requests by default, to keep the suite within its time budget;
the full run is one command away:

    RAYLLM_AUTH_LOAD_REQUESTS=20000 ./dev test tests/e2e/test_load_and_faults.py -s
"""

import asyncio
import http.client
import os
import random
import signal
import time

import httpx
import pytest
from hypothesis import given

from benchmarks.e2e_bench import ingress_pids
from rayllm_auth.testing.local_cluster import (
    MODEL,
    SERVE_URL,
    LocalCluster,
    application,
    llm_config,
)
from tests.conftest import new_key
from tests.test_hostile_inputs import generated, is_preflight
from tests.test_hostile_inputs import request as hostile_request

pytestmark = pytest.mark.e2e

KEY = new_key()
LOAD_REQUESTS = int(os.environ.get("RAYLLM_AUTH_LOAD_REQUESTS", "5000"))
PROXY_CASES = int(os.environ.get("RAYLLM_AUTH_PROXY_CASES", "300"))
FIGURES = {}


def deploy_apps(cluster, wheel):
    pip = [str(wheel)]
    cluster.deploy([
        application("fast", "/", runtime_env={"pip": pip}),
        # Slow decode, so a stream is still running when its replica is killed.
        application("slow", "/slow", runtime_env={"pip": pip, "env_vars": {
            "RAYLLM_AUTH_STANDIN_TOKEN_DELAY_S": "0.05"}}),
    ])
    cluster.wait_for({"fast": {"RUNNING"}, "slow": {"RUNNING"}})


@pytest.fixture(scope="module")
def cluster(wheel):
    cluster = LocalCluster({"RAY_LLM_API_KEYS": f"load:{KEY}"}).start()
    try:
        deploy_apps(cluster, wheel)
        yield cluster
    finally:
        cluster.stop()
        if FIGURES:
            print("\nload and fault figures:", FIGURES)


CREDENTIALS = {
    "valid": {"authorization": f"Bearer {KEY}"},
    "valid-x-api-key": {"x-api-key": KEY},
    "invalid": {"authorization": f"Bearer {KEY[:-1]}Z"},
    "missing": {},
    "malformed": {"authorization": f"Basic {KEY}"},
    "conflicting": {"authorization": f"Bearer {KEY}", "x-api-key": new_key()},
}


async def mixed_load(total: int, concurrency: int):
    kinds = random.Random(7).choices(list(CREDENTIALS), k=total)
    streams = random.Random(8).choices([False, True], k=total)
    outcomes = {}
    queue = list(zip(kinds, streams))

    async def worker(client):
        while queue:
            kind, stream = queue.pop()
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 2, "stream": stream}
            try:
                reply = await client.post("/v1/chat/completions", json=body,
                                          headers=CREDENTIALS[kind])
                await reply.aread()
                outcome = reply.status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            outcomes[(kind, outcome)] = outcomes.get((kind, outcome), 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=SERVE_URL, limits=limits, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return kinds, outcomes


def test_mixed_credentials_under_load(cluster):
    before = len(cluster.engine_calls())
    started = time.monotonic()
    kinds, outcomes = asyncio.run(mixed_load(LOAD_REQUESTS, 64))
    elapsed = time.monotonic() - started
    valid = sum(k.startswith("valid") for k in kinds)
    expected = {}
    for kind in CREDENTIALS:
        count = kinds.count(kind)
        if count:
            expected[(kind, 200 if kind.startswith("valid") else 401)] = count
    FIGURES["mixed_load"] = {"requests": LOAD_REQUESTS, "concurrency": 64, "valid": valid,
                             "refused": LOAD_REQUESTS - valid, "seconds": round(elapsed, 1),
                             "engine_calls": len(cluster.engine_calls()) - before}
    assert outcomes == expected  # every request answered as its credentials say, 0 errors
    assert len(cluster.engine_calls()) - before == valid  # exactly the valid ones got there


@generated(PROXY_CASES)
@given(req=hostile_request())
def test_hostile_sample_through_the_proxy(cluster, req):
    # The generator's keys are not this cluster's: every request must be refused here.
    method, path, _, headers, _ = req
    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name.decode("latin-1"), value)
        conn.endheaders()
        reply = conn.getresponse()
        status, body = reply.status, reply.read()
    except (http.client.HTTPException, ValueError, OSError):
        return  # the client library refused to send it: nothing reached the server
    finally:
        conn.close()
    FIGURES["proxy_sample"] = FIGURES.get("proxy_sample", 0) + 1
    assert KEY.encode() not in body
    if breaks_ray_proxy(headers):
        # Ray 2.60's Serve proxy decodes every x-request-id as UTF-8 while routing, before any
        # replica (and so rayllm-auth) sees the request: its own 500, for every Serve app.
        # Fails once Ray fixes it: then drop this.
        assert status == 500, (status, req)
        FIGURES["ray_proxy_500"] = FIGURES.get("ray_proxy_500", 0) + 1
        return
    if is_preflight(method, headers):
        assert status in (200, 400), (status, req)
    else:  # 400: the HTTP parser refused the bytes before Serve saw them
        assert status in (400, 401), (status, req)


DRIVER = """
import ray
from ray import serve
from ray.serve.llm import build_openai_app
try:
    import rayllm_auth
    raise SystemExit("the driver must not have the plugin")
except ImportError:
    pass
ray.init(address="auto", runtime_env={"pip": [WHEEL]})
serve.run(build_openai_app({"llm_configs": [LLM_CONFIG]}), name="driver",
          route_prefix="/driver", blocking=False)
"""


def test_app_built_by_a_driver_without_the_plugin_is_protected_by_its_replicas(cluster, wheel):
    # serve.run(build_openai_app(...)) from a process without rayllm-auth builds an open app;
    # the replicas get the plugin from runtime_env.pip and must protect it themselves.
    driver = cluster.run_python(DRIVER.replace("WHEEL", repr(str(wheel)))
                                .replace("LLM_CONFIG", repr(llm_config())))
    assert driver.returncode == 0, driver.stderr[-3000:]
    cluster.wait_for({"driver": {"RUNNING"}})
    assert httpx.get(f"{SERVE_URL}/driver/v1/models", timeout=60).status_code == 401
    ok = httpx.get(f"{SERVE_URL}/driver/v1/models", headers={"x-api-key": KEY}, timeout=60)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL


def breaks_ray_proxy(headers) -> bool:
    for name, value in headers:
        if name == b"x-request-id":
            try:
                value.decode()
            except UnicodeDecodeError:
                return True
    return False


def test_replica_killed_mid_stream_comes_back_enforcing(cluster):
    (pid,) = [p for app, p in ingress_pids().items() if app == "slow"]
    with httpx.stream("POST", f"{SERVE_URL}/slow/v1/chat/completions", timeout=120,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                            "max_tokens": 400, "stream": True}) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is under way
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    answers = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = httpx.get(f"{SERVE_URL}/slow/v1/models", timeout=60).status_code
        answers.append(status)
        if status not in (500, 502, 503, 504):
            break
        time.sleep(0.5)
    FIGURES["after_kill"] = {"probes": len(answers), "first_answer": answers[-1]}
    assert answers[-1] == 401  # the replacement's very first answer without a key
    assert set(answers[:-1]) <= {500, 502, 503, 504}  # never a 200 in between
    assert ingress_pids()["slow"] != pid
    ok = httpx.get(f"{SERVE_URL}/slow/v1/models", headers={"x-api-key": KEY}, timeout=60)
    assert ok.status_code == 200


def test_zz_cluster_restart_still_enforces(cluster, wheel):
    cluster.stop(remove_dir=False)
    cluster.start()
    deploy_apps(cluster, wheel)
    assert httpx.get(f"{SERVE_URL}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{SERVE_URL}/v1/models", headers={"x-api-key": KEY},
                     timeout=60).status_code == 200
    FIGURES["restart"] = "enforced"
