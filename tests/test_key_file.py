"""The key file: its format, and reloading it while serving (edits, Kubernetes symlink swaps,
corruption, removal), with a controlled clock and real files."""

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import time

import pytest

from rayllm_auth import keystore, metrics
from rayllm_auth.errors import ConfigError
from rayllm_auth.keyfile import parse_key_file
from rayllm_auth.keys import KEY_SOURCES
from rayllm_auth.keystore import load_keys as load_key_set
from rayllm_auth.keystore import SETTLE_S, KeyStore
from rayllm_auth.middleware import ApiKeyMiddleware
from tests.support.secret_mount import SecretMount
from tests.conftest import new_key

# wall_clock: file modification times are real, and the key store compares them with its
# own clock (tests/conftest.py runs these at the default priority under -n 2).
pytestmark = [pytest.mark.usefixtures("fresh_metrics"), pytest.mark.wall_clock]


class Clock:
    """A monotonic clock moved by hand; ``sleep`` moves it too. Wall time stays real, so a
    file written during a test is only ever seconds old: the key store can tell it has
    settled only by looking at it twice, SETTLE_S apart on this clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def store_for(environ, clock):
    return KeyStore(environ, clock, sleep=clock.sleep)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    for name in KEY_SOURCES:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "keys"
    environ = {"RAY_LLM_API_KEYS_FILE": str(path), "RAY_LLM_AUTH_RELOAD_INTERVAL_S": "2"}
    return path, environ


def write_atomically(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reloads():
    return {tags[0]: n for (name, tags), n in metrics.pending().items()
            if name == "rayllm_auth_key_reloads"}


# -- format -----------------------------------------------------------------------------


def test_documented_format_reads_named_hashed_plain_and_models():
    a, b, c = new_key(), new_key(), new_key()
    text = f"""
        # rayllm-auth key file
        team-a:sha256:{sha(a)}   models=llama,qwen   # two models
        ci-bot:{b}
        sha256:{sha(c)}
    """
    entries = parse_key_file(text, "test")
    grants = [e.grant for e in entries]
    assert grants[0].key_id == "team-a" and grants[0].models == {"llama", "qwen"}
    assert grants[1].key_id == "ci-bot" and grants[1].models is None
    assert grants[2].key_id.startswith("key-") and grants[2].models is None


@pytest.mark.parametrize("line", [
    "team:{key} models=",  # empty list
    "team:{key} models=a models=b",  # twice
    "team:{key} model=a",  # unknown field
    "team:{key} extra",  # stray text
    "bad id!:{key}",
])
def test_bad_lines_name_the_line_never_the_text(line):
    key = new_key()
    with pytest.raises(ConfigError) as caught:
        parse_key_file(f"# comment\n\n{line.format(key=key)}\n", "the file")
    assert "line 3 of the file" in str(caught.value)
    assert key not in str(caught.value) and key[8:20] not in str(caught.value)


def test_a_file_without_keys_is_an_error(env):
    path, environ = env
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_key_set(environ)


def test_a_missing_file_refuses_start_naming_the_variable(env):
    _, environ = env
    with pytest.raises(ConfigError, match="RAY_LLM_API_KEYS_FILE .* cannot be read"):
        KeyStore(environ)


def test_file_and_variables_combine(env):
    path, environ = env
    in_file, in_env = new_key(), new_key()
    path.write_text(f"file:{in_file}\n")
    keys = KeyStore({**environ, "RAY_LLM_API_KEYS": f"env:{in_env}"}).current()
    assert keys.lookup(in_file.encode()).key_id == "file"
    assert keys.lookup(in_env.encode()).key_id == "env"
    assert keys.sources == ("RAY_LLM_API_KEYS", "RAY_LLM_API_KEYS_FILE")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "7200"])
def test_bad_reload_interval_is_an_error(env, value):
    path, environ = env
    path.write_text(f"k:{new_key()}\n")
    with pytest.raises(ConfigError, match="RAY_LLM_AUTH_RELOAD_INTERVAL_S"):
        KeyStore({**environ, "RAY_LLM_AUTH_RELOAD_INTERVAL_S": value})


# -- reloading --------------------------------------------------------------------------


def test_edit_is_picked_up_after_the_interval_and_revokes_dropped_keys(env):
    path, environ = env
    kept, dropped, added = new_key(), new_key(), new_key()
    path.write_text(f"kept:{kept}\ndropped:{dropped}\n")
    clock = Clock()
    store = store_for(environ, clock)
    write_atomically(path, f"kept:{kept}\nadded:sha256:{sha(added)}\n")
    clock.now += 1.9  # within the interval: the old set still serves
    assert store.current().lookup(dropped.encode()) and not store.current().lookup(added.encode())
    clock.now += 0.2  # seen, but just written: it must stay unchanged for SETTLE_S first
    assert store.current().lookup(dropped.encode()) and not store.current().lookup(added.encode())
    clock.now += SETTLE_S
    keys = store.current()
    assert keys.lookup(dropped.encode()) is None  # revoked
    assert keys.lookup(kept.encode()).key_id == "kept" and keys.lookup(added.encode()).key_id == "added"
    assert reloads() == {"ok": 1}


def test_a_replica_that_gets_no_request_still_takes_a_change_before_its_next_request(env):
    # Found by the Ray 2.48 run (four ingress replicas, often idle): without a look on a
    # timer, the next request made the first look, found the file unsettled, and was served
    # with the old set, the removed key included, for SETTLE_S more.
    path, environ = env
    kept, dropped = new_key(), new_key()
    path.write_text(f"kept:{kept}\ndropped:{dropped}\n")
    environ = {**environ, "RAY_LLM_AUTH_RELOAD_INTERVAL_S": "0.2"}

    async def idle_then_a_request(key):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        # Built in the replica's event loop, as Starlette builds it; real clocks.
        middleware = ApiKeyMiddleware(app, environ=environ)
        write_atomically(path, f"kept:{kept}\n")
        await asyncio.sleep(0.2 + SETTLE_S + 0.5)  # no request meanwhile
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/models", "root_path": "",
                 "query_string": b"", "headers": [(b"x-api-key", key.encode())]}
        await middleware(scope, receive, send)  # the first request after the change
        return sent[0]["status"]

    assert asyncio.run(idle_then_a_request(dropped)) == 401
    path.write_text(f"kept:{kept}\ndropped:{dropped}\n")
    assert asyncio.run(idle_then_a_request(kept)) == 200


async def ok_app(scope, receive, send):
    if scope["type"] == "lifespan":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def status_of(middleware, key) -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "method": "GET", "path": "/v1/models", "root_path": "",
                      "query_string": b"", "headers": [(b"x-api-key", key.encode())]},
                     receive, send)
    return sent[0]["status"]


def test_a_middleware_built_outside_the_loop_starts_its_timer_at_lifespan_startup(env):
    # Found by review: built outside a running loop (a plain ASGI app wrapped at import),
    # the timer started only at the first due look, so the first change after start met
    # an idle replica's next request with the removed key still valid.
    path, environ = env
    kept, dropped = new_key(), new_key()
    path.write_text(f"kept:{kept}\ndropped:{dropped}\n")
    middleware = ApiKeyMiddleware(ok_app, environ={**environ,
                                                   "RAY_LLM_AUTH_RELOAD_INTERVAL_S": "0.2"})

    async def serve():
        await middleware({"type": "lifespan"}, None, None)  # the server starts the app
        write_atomically(path, f"kept:{kept}\n")
        await asyncio.sleep(0.2 + SETTLE_S + 0.5)  # no request meanwhile
        return await status_of(middleware, dropped)

    assert asyncio.run(serve()) == 401


def test_a_middleware_no_longer_used_stops_looking_at_the_file(env, caplog):
    # Found by review: each middleware's timer kept its store alive and reloading, so a
    # rebuilt stack logged and counted every change once per middleware it had replaced.
    path, environ = env
    kept, added = new_key(), new_key()
    path.write_text(f"kept:{kept}\n")
    environ = {**environ, "RAY_LLM_AUTH_RELOAD_INTERVAL_S": "0.2"}

    async def rebuilt_four_times():
        for _ in range(4):  # each replaced by the next, as a rebuilt middleware stack is
            middleware = ApiKeyMiddleware(ok_app, environ=environ)
            assert await status_of(middleware, kept) == 200
        with caplog.at_level(logging.INFO, logger="rayllm_auth"):
            write_atomically(path, f"kept:{kept}\nadded:{added}\n")
            await asyncio.sleep(0.2 + SETTLE_S + 0.5)
        return await status_of(middleware, added)

    # Without the cycle collector: Ray Serve freezes what exists once a replica has started,
    # so a replaced middleware must go by reference counting alone (found by review: the
    # store's reload hook held its middleware, a cycle that kept every replaced one alive).
    gc.disable()
    try:
        assert asyncio.run(rebuilt_four_times()) == 200
    finally:
        gc.enable()
    assert sum("reloaded" in r.getMessage() for r in caplog.records) == 1
    assert reloads() == {"ok": 1}


def test_unchanged_file_is_not_read_again(env, monkeypatch):
    path, environ = env
    path.write_text(f"k:{new_key()}\n")
    clock = Clock()
    store = store_for(environ, clock)
    reads = []
    monkeypatch.setattr("rayllm_auth.keystore.read_key_file", lambda p: reads.append(p))
    for _ in range(5):
        clock.now += 3
        store.current()
    assert reads == [] and reloads() == {}


def test_kubernetes_symlink_swap_is_picked_up(env, tmp_path):
    old, new = new_key(), new_key()
    mount = SecretMount(tmp_path / "secret")
    mount.update({"keys": f"old:{old}\n"})
    environ = {"RAY_LLM_API_KEYS_FILE": str(mount.path("keys")),
               "RAY_LLM_AUTH_RELOAD_INTERVAL_S": "1"}
    clock = Clock()
    store = store_for(environ, clock)
    assert store.current().lookup(old.encode())

    mount.update({"keys": f"new:{new}\n"})  # a new ..data target; the old one is deleted
    clock.now += 1
    store.current()
    clock.now += SETTLE_S
    keys = store.current()
    assert keys.lookup(new.encode()).key_id == "new" and keys.lookup(old.encode()) is None


@pytest.mark.parametrize("damage", ["garbage", "empty", "removed", "not-utf8"])
def test_broken_file_keeps_the_last_good_set_and_says_so_once(env, caplog, damage):
    path, environ = env
    key = new_key()
    path.write_text(f"team:{key}\n")
    clock = Clock()
    store = store_for(environ, clock)
    if damage == "removed":
        path.unlink()
    else:
        content = {"garbage": b"team:" + key.encode() + b" models=\n", "empty": b"",
                   "not-utf8": b"\xff\xfe\n"}[damage]
        tmp = path.with_name("tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
    with caplog.at_level(logging.ERROR, logger="rayllm_auth"):
        for _ in range(6):
            clock.now += 2
            assert store.current().lookup(key.encode()).key_id == "team"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "last good key set (1 key(s))" in errors[0].getMessage()
    assert key not in caplog.text
    assert reloads() == {"failed": 1}

    fixed = new_key()
    write_atomically(path, f"fixed:{fixed}\n")  # a good file again: taken, and the next
    for _ in range(2):                          # breakage is reported again
        clock.now += 2
        store.current()
    assert store.current().lookup(fixed.encode()).key_id == "fixed"
    assert reloads() == {"failed": 1, "ok": 1}


def test_reload_that_conflicts_with_the_environment_is_refused(env):
    path, environ = env
    shared = new_key()
    environ = {**environ, "RAY_LLM_API_KEYS": f"env:{shared}"}
    path.write_text(f"other:{new_key()}\n")
    clock = Clock()
    store = store_for(environ, clock)
    write_atomically(path, f"file:{shared}\n")  # same key, another id: ambiguous
    for _ in range(2):
        clock.now += 2
        store.current()
    assert store.current().lookup(shared.encode()).key_id == "env"
    assert reloads() == {"failed": 1}


def test_environment_only_never_touches_the_filesystem(monkeypatch):
    calls = []
    monkeypatch.setattr("rayllm_auth.keystore.file_signature", lambda p: calls.append(p))
    store = KeyStore({"RAY_LLM_API_KEYS": new_key()})
    for _ in range(3):
        store.current()
    assert calls == [] and not store.watches_file


# -- what a careless key file must never become (review findings, issue 10) ------------


def test_a_stray_option_line_is_an_error_not_a_key():
    # `models=qwen` on a line of its own would otherwise be a plain key for every model.
    text = f"team-b:sha256:{sha(new_key())}\n    models=qwen\n"
    with pytest.raises(ConfigError, match="line 2 of the file"):
        parse_key_file(text, "the file")


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                                       "\u2028", "\u2029"])
def test_only_newline_ends_a_line_and_other_breaks_are_errors(separator):
    # str.splitlines() ends a line at each of these; a soft line break pasted from a word
    # processor (\x0b) turned the models= option into a key of its own.
    text = f"# keys\nteam-b:sha256:{sha(new_key())}{separator}models=qwen\n"
    with pytest.raises(ConfigError, match="line 2 of the file"):
        parse_key_file(text, "the file")


def test_crlf_line_ends_are_fine():
    a, b = new_key(), new_key()
    grants = [e.grant for e in parse_key_file(f"a:{a} models=x\r\nb:{b}\r\n", "f")]
    assert [(g.key_id, g.models) for g in grants] == [("a", {"x"}), ("b", None)]


@pytest.mark.parametrize("comment", ["# note  models=llama", "# models = llama",
                                     "# (models=llama)", "# models: llama", "#Expires : 2027"])
def test_an_option_hidden_in_a_comment_is_an_error(comment):
    with pytest.raises(ConfigError, match="line 1 of the file"):
        parse_key_file(f"team:{new_key()}   {comment}\n", "the file")


def test_a_comment_without_an_option_is_fine():
    key = new_key()
    (entry,) = parse_key_file(f"team:{key}   # every model (no limit): rotated 2026-11\n", "f")
    assert entry.grant.models is None


def test_a_lora_id_wrapped_onto_its_own_line_is_an_error_not_a_key():
    # base:adapter has the shape of ID:KEY; both are public (GET /v1/models lists them).
    text = (f"team-b:sha256:{sha(new_key())} models=qwen2.5-7b-instruct\n"
            "qwen2.5-7b-instruct:customer-support-adapter-v2\n")
    with pytest.raises(ConfigError, match="line 2 of f.*LoRA id"):
        parse_key_file(text, "f")
    with pytest.raises(ConfigError, match="line 1 of f.*LoRA id"):  # the base alone, too
        parse_key_file("llama:sql-adapter-for-the-finance-team\n"
                       f"team:sha256:{sha(new_key())} models=llama:sql\n", "f")
    # A key whose id names no model is still a key.
    key = new_key()
    entries = parse_key_file(text.replace("qwen2.5-7b-instruct:customer-support-adapter-v2",
                                          f"team-c:{key}"), "f")
    assert [e.grant.key_id for e in entries] == ["team-b", "team-c"]


def test_an_option_in_the_key_list_variable_is_an_error():
    with pytest.raises(ConfigError, match="entry 2 of RAY_LLM_API_KEYS"):
        KeyStore({"RAY_LLM_API_KEYS": f"team-b:{new_key()},models=qwen"})


def test_an_in_place_rewrite_is_never_read_half_written(env):
    # A writer that rewrites the file in place (not write-then-rename) can be looked at
    # between its two writes; that state must never be taken, even though it parses.
    path, environ = env
    clock = Clock()
    with rewritten_in_place(path, environ, clock) as (store, limited):
        clock.now += 2.1  # a request arrives between the writer's two writes
        assert store.current().lookup(limited.encode()) is None


@contextlib.contextmanager
def rewritten_in_place(path, environ, clock):
    """A key file rewritten in place in two writes: inside, its first half is written (a
    key without its models=); after, it is whole and must be taken whole."""
    old, limited = new_key(), new_key()
    path.write_text(f"old:{old}\n")
    store = store_for(environ, clock)
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(f"team:sha256:{sha(limited)}")
        f.flush()
        yield store, limited
        f.write("   models=llama\n")
    for _ in range(5):
        clock.now += 1.1
        grant = store.current().lookup(limited.encode())
        assert grant is None or grant.models == {"llama"}
    assert grant is not None and store.current().lookup(old.encode()) is None


def test_a_stat_that_blocks_never_makes_two_looks_count_as_settled(env, monkeypatch):
    # Found by review: a look's time was taken before its stat, so a stat blocking 0.7 s
    # (a loaded node, a network volume) made a look 0.3 s after it count as SETTLE_S later,
    # and a file between its writer's two writes was taken.
    path, environ = env
    clock = Clock()
    real_stat, blocking = keystore.file_signature, [0.7]

    def stat(name):
        clock.now += blocking.pop() if blocking else 0.0
        return real_stat(name)

    with rewritten_in_place(path, environ, clock) as (store, limited):
        clock.now += 2.1  # the interval has passed: this request looks, its stat blocks
        monkeypatch.setattr(keystore, "file_signature", stat)
        looked = clock.now
        assert store.current().lookup(limited.encode()) is None
        clock.now = looked + SETTLE_S  # 0.3 s after the stat saw the first write
        assert store.current().lookup(limited.encode()) is None


# -- expiry ---------------------------------------------------------------------------------


def test_expires_takes_an_iso_time_with_its_zone():
    key = new_key()
    (entry,) = parse_key_file(f"team:{key} models=a expires=2027-01-31T00:00:00Z\n", "f")
    assert entry.grant.expires == 1801353600.0 and entry.grant.models == {"a"}
    (entry,) = parse_key_file(f"team:{key} expires=2027-01-31T01:00:00+01:00\n", "f")
    assert entry.grant.expires == 1801353600.0


@pytest.mark.parametrize("option", ["expires=2027-01-31", "expires=2027-01-31T00:00:00",
                                    "expires=tomorrow", "expires=", "expires=1 expires=2"])
def test_an_unreadable_or_zoneless_expiry_is_an_error(option):
    key = new_key()
    with pytest.raises(ConfigError, match="line 1 of f") as caught:
        parse_key_file(f"team:{key} {option}\n", "f")
    assert key not in str(caught.value)


def test_expiry_is_published_for_prometheus_and_zeroed_when_gone(env):
    path, environ = env
    kept, dropped, forever = new_key(), new_key(), new_key()
    path.write_text(f"kept:{kept} expires=2027-01-31T00:00:00Z\n"
                    f"dropped:{dropped} expires=2026-12-01T00:00:00Z\nforever:{forever}\n")
    clock = Clock()
    store = store_for(environ, clock)
    assert expiry_gauge() == {"kept": 1801353600.0, "dropped": 1796083200.0}
    write_atomically(path, f"kept:{kept} expires=2027-01-31T00:00:00Z\nforever:{forever}\n")
    for _ in range(3):
        clock.now += 2
        store.current()
    assert expiry_gauge() == {"kept": 1801353600.0, "dropped": 0.0}


def expiry_gauge():
    return {tags[0]: value for (name, tags), value in metrics.pending().items()
            if name == "rayllm_auth_key_expiry_timestamp_seconds"}


# -- stray words never become keys; skewed clocks never hurry a reload (adversarial review) --


@pytest.mark.parametrize("text", [
    "team-b:sha256:{digest}   models=qwen2.5-7b-instruct,\nllama-3.1-8b-instruct\n",
    "team-b:sha256:{digest}   models=qwen\nModels=llama\n",
    "team-b:sha256:{digest}   models=qwen,\nllama:sql-adapter\n",
    "team-b:sha256:{digest}\n{key}\n",  # a plain key without an id: a stray word, or a key?
    "team-b:sha256:{digest}\nteam-c:short-key\n",
])
def test_no_stray_word_is_taken_for_a_key(text):
    # A model id is public: as a key of its own it would open every model to anyone.
    key = new_key()
    with pytest.raises(ConfigError, match="line [12] of f") as caught:
        parse_key_file(text.format(digest=sha(new_key()), key=key), "f")
    assert key not in str(caught.value)


@pytest.mark.parametrize("skew", [0.0, 3.0, -3.0], ids=["same clock", "file clock behind",
                                                        "file clock ahead"])
def test_a_skewed_file_clock_never_hurries_a_half_written_file(env, skew):
    path, environ = env
    old, limited = new_key(), new_key()
    path.write_text(f"old:{old}\n")
    clock = Clock()
    store = KeyStore(environ, clock, sleep=clock.sleep, wall_clock=lambda: time.time() + skew)
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(f"team:{limited}")
        f.flush()
        for _ in range(3):  # looks while the writer is between its two writes
            clock.now += 2.1 if _ == 0 else 0.3
            assert store.current().lookup(limited.encode()) is None
        f.write("   models=llama\n")
    for _ in range(4):
        clock.now += 1.1
        grant = store.current().lookup(limited.encode())
        assert grant is None or grant.models == {"llama"}
    assert grant is not None


def test_a_file_that_never_settles_is_reported_once(env, caplog):
    path, environ = env
    key = new_key()
    path.write_text(f"team:{key}\n")
    clock = Clock()
    store = store_for(environ, clock)
    with caplog.at_level(logging.ERROR, logger="rayllm_auth"):
        for i in range(40):  # rewritten every 0.5 s for 20 s
            path.write_text(f"team:{key}\n# edit {i}\n")
            clock.now += 0.5 if i else 2.1
            assert store.current().lookup(key.encode()).key_id == "team"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "has kept changing for 10 s" in errors[0]
    assert reloads() == {"failed": 1}
