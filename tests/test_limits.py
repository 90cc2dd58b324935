"""Per-key limits at the ASGI level: rpm= and concurrency= in the key file, the 429 the
openai SDK expects, the rate-limit headers, slots held for a stream's whole life, and the
key file's default limits. One process (the ledger in it), the clock moved by the tests;
the ledger shared by replicas is tested in test_quota.py and end to end."""

import asyncio
import hashlib
import json
import logging

import pytest

from rayllm_auth import metrics
from rayllm_auth.errors import ConfigError
from rayllm_auth.keyfile import parse_key_file, read_key_file
from rayllm_auth.keys import KeySet
from rayllm_auth.ledger import COUNTED_S, Ledger
from rayllm_auth.middleware import ApiKeyMiddleware
from rayllm_auth.quota import InProcessLedger, ReplicaQuota
from rayllm_auth.keystore import KeyStore
from tests.conftest import new_key
from tests.ray_app import bearer, build_ray_app, call

KEYS = {"slow": new_key(), "one-at-a-time": new_key(), "free": new_key(), "env": new_key(),
        "both": new_key()}


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def key_file(tmp_path, monkeypatch, no_key_env):
    path = tmp_path / "keys"
    path.write_text(f"slow:{KEYS['slow']} rpm=3\n"
                    f"one-at-a-time:{KEYS['one-at-a-time']} concurrency=1\n"
                    f"both:{KEYS['both']} rpm=2 concurrency=1\n"
                    f"free:{KEYS['free']}\n")
    monkeypatch.setenv("RAY_LLM_API_KEYS_FILE", str(path))
    monkeypatch.setenv("RAY_LLM_API_KEYS", f"env:{KEYS['env']}")
    return path


class Engine:
    """An app that records what reached it; requests to /stream wait until released."""

    def __init__(self):
        self.reached, self.release = [], asyncio.Event()

    async def __call__(self, scope, receive, send):
        self.reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        if scope["path"] == "/stream":
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await self.release.wait()
        await send({"type": "http.response.body", "body": b"done"})


def limited_app(clock, engine=None):
    engine = engine or Engine()
    ledger = InProcessLedger(Ledger(clock))
    app = ApiKeyMiddleware(engine, clock=clock,
                           quota=lambda: ReplicaQuota(ledger, "test", clock))
    return app, engine


async def test_rpm_admits_the_limit_then_answers_openais_429(key_file, clock):
    app, engine = limited_app(clock)
    for remaining in (2, 1, 0):
        reply = await call(app, headers=bearer(KEYS["slow"]))
        assert reply.status == 200
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-remaining-requests"] == str(remaining)
    refused = await call(app, headers=bearer(KEYS["slow"]))
    assert refused.status == 429 and len(engine.reached) == 3
    assert refused.json() == {"error": {
        "message": refused.json()["error"]["message"], "type": "requests", "param": None,
        "code": "rate_limit_exceeded"}}
    assert 1 <= int(refused.headers["retry-after"]) <= COUNTED_S
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Nothing of the key in the answer, its digest included (LiteLLM put the key's SHA-256
    # in its 429 bodies, litellm#27884).
    answer = refused.body.decode() + repr(refused.headers)
    assert KEYS["slow"] not in answer
    assert hashlib.sha256(KEYS["slow"].encode()).hexdigest()[:16] not in answer
    clock.now += COUNTED_S
    assert (await call(app, headers=bearer(KEYS["slow"]))).status == 200


async def test_keys_without_limits_get_no_rate_limit_headers_and_build_no_quota(key_file, clock):
    key_file.write_text(f"free:{KEYS['free']}\n")  # no key with limits: nothing to warm up
    built = []
    app = ApiKeyMiddleware(Engine(), clock=clock, quota=lambda: built.append(1))
    for key in (KEYS["free"], KEYS["env"]):
        for _ in range(10):
            reply = await call(app, headers=bearer(key))
            assert reply.status == 200 and "x-ratelimit-limit-requests" not in reply.headers
    assert built == []


async def test_concurrency_counts_a_stream_until_its_end(key_file, clock):
    app, engine = limited_app(clock)
    stream = asyncio.create_task(call(app, path="/stream", headers=bearer(KEYS["one-at-a-time"])))
    while "/stream" not in engine.reached:
        await asyncio.sleep(0.001)
    second = await call(app, headers=bearer(KEYS["one-at-a-time"]))
    assert second.status == 429 and second.headers["retry-after"] == "1"
    assert "x-ratelimit-limit-requests" not in second.headers  # no rpm: nothing to say
    engine.release.set()
    assert (await stream).status == 200
    assert (await call(app, headers=bearer(KEYS["one-at-a-time"]))).status == 200


async def test_a_client_that_goes_away_gives_its_slot_back(key_file, clock):
    app, engine = limited_app(clock)
    stream = asyncio.create_task(call(app, path="/stream", headers=bearer(KEYS["one-at-a-time"])))
    while "/stream" not in engine.reached:
        await asyncio.sleep(0.001)
    stream.cancel()  # the server cancels the request's task when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await stream
    assert (await call(app, headers=bearer(KEYS["one-at-a-time"]))).status == 200


async def test_an_app_error_gives_the_slot_back(key_file, clock):
    async def failing(scope, receive, send):
        raise RuntimeError("engine failed")

    app, _ = limited_app(clock, failing)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await call(app, headers=bearer(KEYS["one-at-a-time"]))


async def test_rpm_and_concurrency_together(key_file, clock):
    app, _ = limited_app(clock)
    statuses = [(await call(app, headers=bearer(KEYS["both"]))).status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]


async def test_openai_sdk_retries_a_429_after_retry_after(key_file, clock, monkeypatch):
    import anyio
    import httpx2
    import openai

    app, _ = limited_app(clock, build_ray_app([], protect=False))
    sleeps = []

    async def back_off(seconds):  # the SDK's wait before a retry: the window passes meanwhile
        sleeps.append(seconds)
        clock.now += seconds

    sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEYS["slow"],
                             http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app)))
    for _ in range(3):
        await sdk.models.list()
    monkeypatch.setattr(anyio, "sleep", back_off)
    await sdk.models.list()  # the 4th: a 429, then retried after Retry-After, by default
    assert len(sleeps) == 1 and 1 <= sleeps[0] <= COUNTED_S


async def test_exempt_paths_spend_none_of_a_keys_limits(key_file, clock, monkeypatch):
    monkeypatch.setenv("RAY_LLM_AUTH_EXEMPT_PATHS", "/health")
    app, engine = limited_app(clock)
    for _ in range(10):  # what a request without a key gets there
        reply = await call(app, path="/health", headers=bearer(KEYS["slow"]))
        assert reply.status == 200 and "x-ratelimit-limit-requests" not in reply.headers
    statuses = [(await call(app, headers=bearer(KEYS["slow"]))).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_a_request_refused_for_its_model_spends_nothing_and_carries_no_limits(
        key_file, clock):
    # The model check comes first (README, "What counts"): its 404 is given before the
    # limits are asked, so it says nothing of them.
    key = new_key()
    key_file.write_text(f"one-model:{key} models=a rpm=2\n")
    app, engine = limited_app(clock)

    def chat(model):
        return call(app, "POST", "/v1/chat/completions", bearer(key),
                    body=json.dumps({"model": model, "messages": []}).encode())

    for _ in range(3):
        refused = await chat("b")
        assert refused.status == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert not [h for h in refused.headers if h.startswith("x-ratelimit")]
    replies = [await chat("a") for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["1", "0", "0"]
    assert len(engine.reached) == 2


async def next_request_at_last_byte(app, next_app) -> int:
    """A client of the one-at-a-time key that sends its next request, to ``next_app``, at the
    last byte of its request to ``app``: the next request's status."""
    seen_after_last_byte = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body" and not message.get("more_body"):
            seen_after_last_byte.append(
                (await call(next_app, headers=bearer(KEYS["one-at-a-time"]))).status)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "raw_path": b"/v1/models",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {KEYS['one-at-a-time']}".encode())]}
    await app(scope, receive, send)
    (status,) = seen_after_last_byte
    return status


async def test_the_slot_is_free_before_the_clients_last_byte(key_file, clock):
    # A client that sends its next request when the last one ends is never refused.
    app, engine = limited_app(clock)
    assert await next_request_at_last_byte(app, app) == 200


class LaggingLedger(InProcessLedger):
    """Slots given back reach the ledger a few event-loop steps late, as a remote call's do
    (the other replica's next call can be answered first)."""

    async def give_back_slots(self, *args):
        for _ in range(10):
            await asyncio.sleep(0)
        return self._ledger.give_back_slots(*args)


async def test_the_slot_is_back_with_the_ledger_before_the_last_byte(key_file, clock):
    # The client's next request goes to another replica: it must find the slot free there.
    ledger, engine = LaggingLedger(Ledger(clock)), Engine()
    first, second = (ApiKeyMiddleware(engine, clock=clock,
                                      quota=lambda name=name: ReplicaQuota(ledger, name, clock))
                     for name in ("replica-a", "replica-b"))
    for replica in (first, second):  # both have heard the ledger: no call waits on a sync
        assert (await call(replica, headers=bearer(KEYS["slow"]))).status == 200
    assert await next_request_at_last_byte(first, second) == 200


async def test_with_token_accounting_a_key_over_its_limit_gets_429_before_its_body_is_read(
        key_file, clock, monkeypatch):
    # Token accounting reads a generate route's body; the quota decides first, so a key over
    # its limit costs no body read, and gets a 429, not a 413 (review 12, finding 2).
    from rayllm_auth import usage

    monkeypatch.setenv(usage.USAGE_VAR, "1")
    monkeypatch.setattr(usage, "MAX_METERED_BODY_BYTES", 100)
    app, engine = limited_app(clock)
    small, large = b'{"model": "m"}', b'{"model": "' + b"m" * 200 + b'"}'
    for _ in range(3):
        assert (await call(app, "POST", "/v1/chat/completions", bearer(KEYS["slow"]),
                           body=small)).status == 200
    over = await call(app, "POST", "/v1/chat/completions", bearer(KEYS["slow"]), body=large)
    assert over.status == 429 and len(engine.reached) == 3
    # Admitted, then refused for its size: its concurrency slot is given back.
    for _ in range(2):
        too_large = await call(app, "POST", "/v1/chat/completions",
                               bearer(KEYS["one-at-a-time"]), body=large)
        assert too_large.status == 413
    assert (await call(app, "POST", "/v1/chat/completions", bearer(KEYS["one-at-a-time"]),
                       body=small)).status == 200


# -- the key file ---------------------------------------------------------------------------


def test_limits_are_read_with_the_other_options():
    (entry,) = parse_key_file(f"team:{new_key()} models=a rpm=600 concurrency=8\n", "f")
    assert (entry.grant.rpm, entry.grant.concurrency, entry.grant.models) == (600, 8, {"a"})
    assert not entry.grant.plain and entry.grant.rate_limited
    (tokens_only,) = parse_key_file(f"team:{new_key()} tpm=90000\n", "f")
    assert tokens_only.grant.tpm == 90000 and tokens_only.grant.rpm is None
    assert not tokens_only.grant.plain and tokens_only.grant.rate_limited


@pytest.mark.parametrize("option", ["rpm=0", "rpm=-1", "rpm=1.5", "rpm=", "rpm=ten",
                                    "concurrency=0", "rpm=1000000001", "rpm=１", "RPM=5",
                                    "rpm=5 rpm=6", "tpm=0", "tpm=5 tpm=5"])
def test_unreadable_limits_are_errors(option):
    with pytest.raises(ConfigError) as caught:
        parse_key_file(f"team:{new_key()} {option}\n", "f")
    assert "line 1 of f" in str(caught.value)


@pytest.mark.parametrize("comment", ["# rpm=5", "# concurrency: 2", "# (rpm = 5)"])
def test_limits_written_in_a_comment_are_errors(comment):
    with pytest.raises(ConfigError, match="inside its comment"):
        parse_key_file(f"team:{new_key()} {comment}\n", "f")


def test_default_limits_apply_to_keys_without_their_own(key_file, clock):
    key_file.write_text(key_file.read_text() + "*  rpm=100 concurrency=4 tpm=5000\n")
    grants = {g.key_id: (g.rpm, g.concurrency, g.tpm)
              for g in KeyStore(watch=False).current().grants}
    assert grants == {"slow": (3, None, None), "one-at-a-time": (None, 1, None),
                      "both": (2, 1, None), "free": (100, 4, 5000), "env": (100, 4, 5000)}


@pytest.mark.parametrize("line", ["* models=a", "* expires=2030-01-01T00:00:00Z", "*",
                                  "* rpm=5\n* rpm=6", "* tpm=0"])
def test_a_defaults_line_sets_limits_and_nothing_else(tmp_path, line):
    path = tmp_path / "keys"
    path.write_text(f"team:{new_key()}\n{line}\n")
    with pytest.raises(ConfigError):
        read_key_file(str(path))


@pytest.mark.parametrize("first, second", [("rpm=5", "rpm=6"), ("tpm=5", "tpm=6"),
                                           ("tpm=5", "")])
def test_keys_sharing_an_id_must_share_its_limits(first, second):
    with pytest.raises(ConfigError, match="share its limits"):
        KeySet(parse_key_file(f"team:{new_key()} {first}\nteam:{new_key()} {second}\n", "f"),
               ("test",))
    same = KeySet(parse_key_file(f"team:{new_key()} rpm=5\nteam:{new_key()} rpm=5\n", "f"),
                  ("test",))
    assert len(same) == 2


async def test_lowering_a_limit_in_the_key_file_applies_on_reload(key_file, clock, monkeypatch):
    monkeypatch.setenv("RAY_LLM_AUTH_RELOAD_INTERVAL_S", "1")
    app, engine = limited_app(clock)
    assert (await call(app, headers=bearer(KEYS["slow"]))).status == 200
    key_file.write_text(key_file.read_text().replace("rpm=3", "rpm=1"))
    for _ in range(3):  # the reload interval, then the file settles
        clock.now += 1.1
        await call(app, headers=bearer(KEYS["free"]))
    clock.now += 2.1  # the key's lease runs out
    reply = await call(app, headers=bearer(KEYS["slow"]))
    assert reply.status == 429 and reply.headers["x-ratelimit-limit-requests"] == "1"


async def test_a_key_set_with_limits_reaches_the_ledger_before_the_first_request(key_file, clock):
    ledger = Ledger(clock)
    quota = ReplicaQuota(InProcessLedger(ledger), "r", clock)
    ApiKeyMiddleware(Engine(), clock=clock, quota=lambda: quota)
    await asyncio.sleep(0)  # the warm-up's first heartbeat
    assert ledger.replicas() == 1 and quota._incarnation == ledger.incarnation


async def test_limits_a_reload_brings_reach_the_ledger_before_the_first_limited_request(
        key_file, clock, monkeypatch, caplog):
    # Found end to end: the first limited request after the reload created the ledger actor
    # itself, and waited the seconds it takes to start.
    monkeypatch.setenv("RAY_LLM_AUTH_RELOAD_INTERVAL_S", "1")
    limits = key_file.read_text()
    key_file.write_text(f"free:{KEYS['free']}\n")
    ledger = Ledger(clock)
    quota = ReplicaQuota(InProcessLedger(ledger), "r", clock)
    built = []
    app = ApiKeyMiddleware(Engine(), clock=clock, quota=lambda: built.append(1) or quota)
    await asyncio.sleep(0)
    assert built == [] and quota._incarnation is None
    key_file.write_text(limits)
    for _ in range(3):  # the reload interval, then the file settles
        clock.now += 1.1
        assert (await call(app, headers=bearer(KEYS["free"]))).status == 200
    await asyncio.sleep(0)  # the warm-up's first heartbeat
    assert built == [1] and ledger.replicas() == 1 and quota._incarnation == ledger.incarnation
    key_file.write_text(limits + "\n")  # another reload with limits builds nothing more
    with caplog.at_level(logging.INFO, logger="rayllm_auth"):
        caplog.clear()  # only this reload's messages (the first one's may be captured)
        for _ in range(3):
            clock.now += 1.1
            assert (await call(app, headers=bearer(KEYS["free"]))).status == 200
    assert sum("reloaded" in r.getMessage() for r in caplog.records) == 1
    assert built == [1]


async def test_a_failure_acting_on_a_reload_never_fails_the_request_that_found_it(
        key_file, clock, monkeypatch, caplog):
    # Found by review: the reload hook ran outside the reload's own guard, so an error
    # building the quota escaped to whichever request found the file changed (a 500).
    monkeypatch.setenv("RAY_LLM_AUTH_RELOAD_INTERVAL_S", "1")
    limits = key_file.read_text()
    key_file.write_text(f"free:{KEYS['free']}\n")

    def broken_quota():
        raise AttributeError("no such thing")

    app = ApiKeyMiddleware(Engine(), clock=clock, quota=broken_quota)
    key_file.write_text(limits)
    statuses = []
    for _ in range(3):  # the reload interval, then the file settles
        clock.now += 1.1
        statuses.append((await call(app, headers=bearer(KEYS["free"]))).status)
    assert statuses == [200, 200, 200]
    assert "acting on the reloaded key file failed (AttributeError)" in caplog.text


def test_a_limited_keys_counts_left_by_an_ended_event_loop_reach_ray(key_file, clock,
                                                                    monkeypatch, fresh_metrics):
    # A limited key's ok counts schedule their own flush (metrics.record_ok), unlike the
    # unlimited path's bare dict update: counts a loop left pending when it ended are
    # flushed by the next loop's. Found by a review (a faster count had dropped this).
    monkeypatch.setattr(metrics, "FLUSH_INTERVAL_S", 0.05)
    app, _ = limited_app(clock)

    async def serve(requests: int, wait: float) -> int:
        for _ in range(requests):
            assert (await call(app, headers=bearer(KEYS["one-at-a-time"]))).status == 200
        await asyncio.sleep(wait)
        return metrics.pending().get(("rayllm_auth_requests", ("ok", "one-at-a-time")), 0)

    assert asyncio.run(serve(1, 0)) == 1  # this loop ends before its flush is due
    assert asyncio.run(serve(5, 0.3)) == 0  # the next loop's flush takes all six
