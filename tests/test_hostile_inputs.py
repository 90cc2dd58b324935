"""Property-based hostile inputs against the real app Ray's ingress.init() builds (no cluster).

Requests are generated from building blocks whose verdict is known by construction: clean
credential forms of one configured key (the only way in), and hostile material (other
schemes, near-miss keys, control and non-ASCII bytes, duplicates and conflicts, huge values,
path games under any root_path, every method, WebSocket handshakes). Invariants:

* a request not built to be valid never reaches a handler, and gets 401 (or a CORS preflight
  answer, or a WebSocket close before accept);
* a request built to be valid is never refused;
* nothing answers 5xx; no response contains a configured key or what the client sent.

The number of generated cases is printed at the end of the run (at least 10,000 in CI).
"""

from __future__ import annotations

import asyncio
import random
import secrets

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.ray_app import build_ray_app

CASES = 10_000
KEYS = ["sk-" + secrets.token_urlsafe(32) for _ in range(3)]
GENERATED = {"requests": 0, "websockets": 0}

# -- building blocks ------------------------------------------------------------------------

# Strategies are built once, here, not inside the composites: hypothesis validates each
# strategy it is handed, and building them per draw made generation most of this module's
# time (the cases drawn are the same).
ows = st.sampled_from(["", " ", "  ", "\t", " \t"])
bearer_scheme = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"])
spaces_after_scheme = st.sampled_from(["", " ", "  "])
any_key = st.sampled_from(KEYS)


@st.composite
def clean_credential(draw, key: str):
    """A header carrying ``key`` in an accepted form."""
    if draw(st.booleans()):
        value = f"{draw(ows)}{draw(bearer_scheme)} {draw(spaces_after_scheme)}{key}{draw(ows)}"
        return (b"authorization", value.encode())
    return (b"x-api-key", f"{draw(ows)}{key}{draw(ows)}".encode())


@st.composite
def near_miss(draw, key: str) -> str:
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "case", "prefix", "other"]))
    if kind == "flip":
        i = draw(st.integers(0, len(key) - 1))
        replacement = draw(st.characters(codec="ascii", exclude_characters=key[i]))
        return key[:i] + replacement + key[i + 1:]
    if kind == "truncate":
        return key[: draw(st.integers(0, len(key) - 1))]
    if kind == "extend":
        return key + draw(st.text(min_size=1, max_size=4))
    if kind == "case":
        return key.swapcase()
    if kind == "prefix":
        return key[: len(key) // 2]
    return "sk-" + secrets.token_urlsafe(32)


hostile_bytes = st.one_of(
    st.binary(max_size=64),
    # Long values: their bytes matter less than their length, and hypothesis draws long
    # binaries (and st.randoms) in milliseconds per case; a drawn seed fills them at once.
    st.builds(lambda seed, size: random.Random(seed).randbytes(size), st.integers(0, 2**32),
              st.integers(600, 20_000)),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.sampled_from([b"\x00", b"\xff\xfe", b"\r\n", "ключ".encode(), b"%00", b"null", b"*"]),
)


credential_names = st.sampled_from(["authorization", "x-api-key", "Authorization", "X-Api-Key",
                                    "x_api_key", "api-key", "cookie", "proxy-authorization"])
hostile_tokens = {key: st.one_of(near_miss(key).map(str.encode), hostile_bytes) for key in KEYS}
credential_shapes = st.sampled_from(["bearer", "basic", "bare", "bearer-no-space", "quoted"])


@st.composite
def hostile_credential(draw):
    """A header that must never count as a valid credential."""
    key = draw(any_key)
    name = draw(credential_names)
    token = draw(hostile_tokens[key])
    shape = draw(credential_shapes)
    value = {
        "bearer": b"Bearer " + token, "basic": b"Basic " + token, "bare": token,
        "bearer-no-space": b"Bearer" + token, "quoted": b'Bearer "' + token + b'"',
    }[shape]
    if name.lower() in ("authorization", "x-api-key") and shape in ("bearer", "bare"):
        stripped = token.strip(b" \t")
        if stripped in {k.encode() for k in KEYS}:
            value = b"Bearer " + token + b"x"  # the mutation happened to rebuild a key
    # Raw ASGI names; servers lower-case them, this one may not: names match in any case.
    return (name.encode(), value)


def route_paths():
    paths = [
        r.replace("{model:path}", "m")
        for r in ("/v1/models", "/v1/models/{model:path}", "/v1/completions",
                  "/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions",
                  "/v1/score", "/tokenize", "/detokenize", "/docs", "/redoc", "/openapi.json")
    ]
    return paths + ["/sleep", "/wakeup", "/collective_rpc", "/reset_prefix_cache", "/"]


ROUTE_PATHS = route_paths()
route_bases = st.sampled_from(ROUTE_PATHS)
path_games = st.sampled_from(["none", "double", "dot", "dotdot", "encoded", "case", "trailing",
                              "junk"])
path_junk = st.text(max_size=12)
roots = {base: st.sampled_from(["", "", "/llm", "/v1", base]) for base in ROUTE_PATHS}


@st.composite
def path_and_root(draw):
    base = draw(route_bases)
    game = draw(path_games)
    path = {
        "none": base, "double": "/" + base, "dot": "/." + base,
        "dotdot": "/x/.." + base, "encoded": base.replace("/", "%2F"), "case": base.upper(),
        "trailing": base + "/", "junk": base + "/" + draw(path_junk),
    }[game]
    root = draw(roots[base])
    if root and draw(st.booleans()):
        path = root + path
    return path, root


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE",
                           "CONNECT", "FOO"])
noise_headers = st.lists(st.tuples(
    st.sampled_from([b"host", b"origin", b"user-agent", b"x-forwarded-for", b"content-type",
                     b"x-request-id", b"access-control-request-method"]),
    hostile_bytes), max_size=3)


paths_and_roots = path_and_root()
clean_credentials = {key: st.lists(clean_credential(key), max_size=3) for key in KEYS}
hostile_credentials = st.lists(hostile_credential(), max_size=2)
randoms = st.randoms()


@st.composite
def request(draw):
    """(method, path, root_path, headers, expect_pass)."""
    method = draw(methods)
    path, root = draw(paths_and_roots)
    headers = list(draw(noise_headers))
    key = draw(any_key)
    clean = draw(clean_credentials[key])
    hostile = draw(hostile_credentials)
    credentials = clean + hostile
    draw(randoms).shuffle(credentials)
    expect_pass = bool(clean) and not any(
        h[0].lower() in (b"authorization", b"x-api-key") for h in hostile)
    return method, path, root, headers + credentials, expect_pass


# -- the property --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loop():
    """One event loop for every generated case: a new one per case cost more than the case."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def hostile_app(loop):
    import os

    reached = []
    previous = {k: os.environ.get(k) for k in ("RAY_LLM_API_KEYS", "VLLM_API_KEY")}
    os.environ["RAY_LLM_API_KEYS"] = ",".join(KEYS)
    os.environ.pop("VLLM_API_KEY", None)
    app = build_ray_app(reached)
    loop.run_until_complete(_call(app, "GET", "/", "", []))  # builds the stack with these keys
    yield app, reached
    for k, v in previous.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


async def _call(app, method, path, root, headers):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": root, "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    sent = []
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent)


def hits_ray_request_id_bug(headers) -> bool:
    """Ray 2.60's SetRequestIdMiddleware decodes x-request-id as UTF-8 and raises otherwise:
    a 500 for an authenticated client, in Ray's code (rayllm-auth runs before it, so an
    unauthenticated client never gets that far)."""
    for name, value in headers:
        if name == b"x-request-id" and value:
            try:
                value.decode()
            except UnicodeDecodeError:
                return True
            return False
    return False


def is_preflight(method, headers):
    names = {h[0] for h in headers}
    return method == "OPTIONS" and b"origin" in names and b"access-control-request-method" in names


def generated(examples: int):
    """Hypothesis settings for these tests: a fixed count, no deadline, no example database
    (every run draws fresh cases), slow or large examples allowed."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


@generated(CASES)
@given(req=request())
@example(req=("GET", "/v1/models", "", [(b"host", b"invalid_api_")], False))  # own words
def test_hostile_http_requests(hostile_app, loop, req):
    app, reached = hostile_app
    method, path, root, headers, expect_pass = req
    reached.clear()
    GENERATED["requests"] += 1
    if expect_pass and hits_ray_request_id_bug(headers):
        with pytest.raises(UnicodeDecodeError):  # fails once Ray fixes it: then drop this
            loop.run_until_complete(_call(app, method, path, root, headers))
        return
    status, body = loop.run_until_complete(_call(app, method, path, root, headers))
    assert status < 500, (status, req)
    assert not any(k.encode() in body for k in KEYS)
    for name, value in headers:
        if len(value) >= 12 and value in body:
            # An echo, unless the answer holds those bytes whatever was sent (its own words:
            # a generated b"invalid_api_" is in every 401's code): ask again without them.
            other = [(n, b"~" * len(v)) if (n, v) == (name, value) else (n, v)
                     for n, v in headers]
            _, other_body = loop.run_until_complete(_call(app, method, path, root, other))
            assert value in other_body, ("echoed", value, req)
    if expect_pass:
        assert status != 401, req
    elif is_preflight(method, headers):
        assert reached == [] and status in (200, 400), (status, req)
    else:
        assert status == 401 and reached == [], (status, reached, req)


@generated(CASES // 10)
@given(req=request())
def test_hostile_websocket_handshakes(hostile_app, loop, req):
    app, reached = hostile_app
    _, path, root, headers, expect_pass = req
    reached.clear()
    GENERATED["websockets"] += 1
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
             "raw_path": path.encode(), "root_path": root, "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80),
             "subprotocols": []}
    sent = []

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    loop.run_until_complete(app(scope, receive, send))
    if not expect_pass:
        assert sent[0] == {"type": "websocket.close", "code": 1008, "reason": ""}, sent
        assert reached == []

