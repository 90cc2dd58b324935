"""What the middleware counts and logs about each decision: outcome counters per key id, and
rate-limited warning lines for refusals that never carry key material. The counters' export
through a live Ray cluster's metrics endpoint is in tests/e2e/test_rayservice.py."""

import asyncio
import logging

import pytest

from rayllm_auth import audit, metrics
from tests.conftest import new_key
from tests.ray_app import bearer, call


pytestmark = pytest.mark.usefixtures("fresh_metrics")


def outcomes():
    return {tags: n for (name, tags), n in metrics.pending().items()
            if name == "rayllm_auth_requests"}


async def test_each_decision_is_counted_by_outcome_and_key_id(app, key_env, monkeypatch):
    await call(app, headers=bearer(key_env["team-a"]))
    await call(app, headers=bearer(key_env["team-a"]))
    await call(app)
    await call(app, headers=bearer(new_key()))
    await call(app, headers=[("authorization", "Basic abc")])
    await call(app, headers=bearer(key_env["team-a"]) + [("x-api-key", key_env["vllm"])])
    assert outcomes() == {("ok", "team-a"): 2, ("missing", ""): 1, ("invalid", ""): 1,
                          ("malformed", ""): 1, ("conflicting", ""): 1}


async def test_counts_reach_ray_within_a_second_of_traffic(app, key_env, monkeypatch):
    handed = []

    class FakeCounter:  # stands in for ray.util.metrics.Counter: what would Ray have received?
        def inc(self, value, tags):
            handed.append((value, tags))

    monkeypatch.setattr(metrics, "_metrics", {"rayllm_auth_requests": FakeCounter()})
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL_S", 0.05)
    for _ in range(3):
        await call(app, headers=bearer(key_env["team-a"]))
    await asyncio.sleep(0.2)
    assert handed == [(3, {"outcome": "ok", "key_id": "team-a"})] and outcomes() == {}


def test_ray_metrics_api_is_what_gets_called():
    metrics.record_request("ok", "unit-test")
    metrics.flush()
    from ray.util.metrics import Counter

    assert isinstance(metrics._metrics["rayllm_auth_requests"], Counter)


async def test_refusals_are_logged_rate_limited_without_key_material(app, key_env, caplog, monkeypatch):
    clock = [0.0]
    from rayllm_auth.middleware import ApiKeyMiddleware
    from tests.ray_app import build_ray_app

    app = build_ray_app([], protect=False)
    app.add_middleware(ApiKeyMiddleware, clock=lambda: clock[0])  # a clock of its own
    presented = new_key()
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        for _ in range(50):
            await call(app, "GET", "/v1/models", bearer(presented))
        clock[0] += audit.WINDOW_S
        path = f"/v1/x/{key_env['team-a']}/y"  # a client put a key in the URL
        await call(app, "GET", path)
    lines = [r.getMessage() for r in caplog.records if "rayllm-auth: refused" in r.getMessage()]
    assert len(lines) == audit.LINES_PER_WINDOW + 1
    assert lines[0] == "rayllm-auth: refused invalid: GET /v1/models key_id=- client=127.0.0.1"
    assert lines[-1] == (f"rayllm-auth: refused missing: GET <other path, {len(path)} "
                         f"characters> key_id=- client=127.0.0.1")
    assert f"{50 - audit.LINES_PER_WINDOW} more refused request(s) were not logged" in caplog.text
    assert presented not in caplog.text and key_env["team-a"] not in caplog.text


async def test_log_lines_cannot_be_forged_through_the_path(app, caplog):
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        await call(app, "GET", "/v1/models\nrayllm-auth: refused nothing" + "x" * 500)
    (line,) = [r.getMessage() for r in caplog.records if "refused missing" in r.getMessage()]
    assert "\n" not in line and "refused nothing" not in line and len(line) < 300


async def test_no_method_or_client_address_a_client_writes_puts_a_key_in_the_log(app, key_env,
                                                                                 caplog):
    # curl -X "$KEY" sends the key as the method; a forwarding header the server trusts
    # (X-Forwarded-For behind a proxy) becomes the scope's client address.
    key = key_env["team-a"]
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        await call(app, key, "/v1/models")
        await call(app, "GET", "/v1/models", client=(key, 0))
        await call(app, "GET", "/v1/models", client=("::1", 0))
    lines = [r.getMessage() for r in caplog.records if "rayllm-auth: refused" in r.getMessage()]
    assert lines == [
        "rayllm-auth: refused missing: <other method> /v1/models key_id=- client=127.0.0.1",
        "rayllm-auth: refused missing: GET /v1/models key_id=- client=<not an IP address>",
        "rayllm-auth: refused missing: GET /v1/models key_id=- client=::1"]


@pytest.mark.parametrize("where", ["/v1/models/{key}", "/v1/{key}/chat", "/v1/x{key}y",
                                   "/v1/Bearer {key}", "/{key}"])
async def test_no_path_a_client_writes_puts_a_key_in_the_log(app, key_env, caplog, where):
    # A key may hold '/' (standard base64) or sit inside a segment: only known routes are
    # logged, so no part of any key can be.
    key = "Ab/Ip" + key_env["team-a"][8:]
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        await call(app, "GET", where.format(key=key))
        await call(app, "POST", "/llm/v1/chat/completions", root_path="/llm")
    lines = [r.getMessage() for r in caplog.records if "rayllm-auth: refused" in r.getMessage()]
    assert len(lines) == 2 and not any(part in "".join(lines) for part in key.split("/"))
    assert "GET /v1/models/<id>" in lines[0] or "<other path" in lines[0]
    assert "POST /llm/v1/chat/completions key_id=-" in lines[1]


async def test_the_expiry_gauge_is_handed_to_ray_again_while_idle(monkeypatch, fresh_metrics):
    # Ray 2.60 drops a gauge series that has not been set for two export intervals.
    from rayllm_auth.keys import Entry, Grant, KeySet

    handed = []

    class FakeGauge:  # stands in for ray.util.metrics.Gauge
        def set(self, value, tags):
            handed.append((value, tags))

    monkeypatch.setattr(metrics, "_metrics", {
        "rayllm_auth_key_expiry_timestamp_seconds": FakeGauge()})
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL_S", 0.02)
    metrics.publish_expiries(KeySet([Entry(b"x" * 32, Grant("k", None, 2e9))], ("file",)))
    await asyncio.sleep(0.3)  # no traffic at all
    assert len(handed) >= 5 and set(handed[0][1].items()) == {("key_id", "k")}
    assert {value for value, _ in handed} == {2e9}


def test_a_count_left_pending_by_an_ended_event_loop_is_flushed_by_the_next(monkeypatch,
                                                                           fresh_metrics):
    # A limited key's counts (record_ok) reach Ray also when the loop that scheduled their
    # flush ended before it, as the counts made outside any loop do.
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL_S", 0.05)
    metrics.record_ok("limited")  # outside a loop: no flush scheduled

    async def serve(requests: int, wait: float):
        for _ in range(requests):
            metrics.record_ok("limited")
        await asyncio.sleep(wait)
        return metrics.pending().get(("rayllm_auth_requests", ("ok", "limited")), 0)

    assert asyncio.run(serve(1, 0)) == 2  # this loop ends before its flush is due
    assert asyncio.run(serve(5, 0.3)) == 0  # the next loop's flush takes all seven
