"""Middleware micro-benchmark: what each way of checking API keys adds to one request.

No network, no server: each variant is called as an ASGI app, in one event loop, with a
fresh scope per request. Variants:

* ``none``: the bare ASGI app (the baseline);
* ``rayllm-auth``: :class:`rayllm_auth.middleware.ApiKeyMiddleware`, keys from
  ``RAY_LLM_API_KEYS``;
* ``rayllm-auth-file``: the same keys from a key file (``RAY_LLM_API_KEYS_FILE``), which the
  middleware watches for changes;
* ``vllm``: vLLM's own ``AuthenticationMiddleware`` from the installed vLLM (on a /v1 path,
  the only paths it checks);
* ``forum``: the approach from the forum thread, a ``BaseHTTPMiddleware`` whose dispatch
  compares the header with a set of accepted values;
* ``rayllm-auth (previous)``, with ``--compare CHECKOUT``: another checkout's middleware (e.g.
  a ``git worktree`` of the previous commit), measured in the same rounds.

Cases: a valid, an invalid and a missing key, with 1, 16, 1,000 and 10,000 configured keys;
a valid key on a 256-chunk SSE response, to get the cost per streamed chunk; and keys with
limits on a 1 KB chat request against an unlimited key on the same request: limited to one
model (``models=``: the middleware reads the body to find the model), with ``rpm=``
and ``concurrency=`` (configured, not reached: admission from local leases), and with
``tpm=`` (a reservation from local leases, the body and the response read for the usage that
settles it), next to an unlimited key with token accounting on (the same reading, no limit).

Method: rounds of ``--batch`` requests per variant, variants in a new random order every
round (interleaved, so drift on a shared machine hits all alike). For each round the
variant's time per request minus the baseline's in the same round is one sample of what it
adds; reported as the median and the 25th-75th percentile of those samples.

    python benchmarks/middleware_bench.py            # full run (about 3 minutes)
    python benchmarks/middleware_bench.py --quick    # smoke run for CI (seconds, no thresholds)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import random
import secrets
import shutil
import json
import logging
import statistics
import sys
import tempfile
import time
from typing import Optional
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import write_results  # noqa: E402

KEY_COUNTS = (1, 16, 1_000, 10_000)
CASES = ("valid", "invalid", "missing")
CHUNKS = 256


# -- the apps --------------------------------------------------------------------------------

async def bare_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


async def streaming_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    for _ in range(CHUNKS):
        await send({"type": "http.response.body", "body": b'data: {"t":"x"}\n\n',
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def usage_app(scope, receive, send):
    """A chat completion's answer as engines write it: usage last, model first."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"id":"c","model":"llama","choices":'
                b'[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":'
                b'{"prompt_tokens":230,"completion_tokens":64,"total_tokens":294}}'})


def middleware_from_file(inner, lines: list[str], middleware=None, **environ):
    """An ApiKeyMiddleware (or ``middleware``, another checkout's) whose keys come from a key
    file holding ``lines``; ``environ``: more variables for it."""
    from rayllm_auth.middleware import ApiKeyMiddleware

    middleware = middleware or ApiKeyMiddleware
    folder = tempfile.mkdtemp(prefix="rayllm-auth-bench-")
    atexit.register(shutil.rmtree, folder, True)  # the middleware watches it until then
    path = Path(folder) / "keys"
    path.write_text("\n".join(lines) + "\n")
    saved = os.environ.pop("RAY_LLM_API_KEYS", None)
    os.environ["RAY_LLM_API_KEYS_FILE"] = str(path)
    try:
        return middleware(inner, environ={**os.environ, **environ})
    finally:
        del os.environ["RAY_LLM_API_KEYS_FILE"]
        if saved is not None:
            os.environ["RAY_LLM_API_KEYS"] = saved


PREVIOUS = None  # another checkout's rayllm_auth (--compare), loaded by main()


def make_variants(inner, keys: list[str]) -> dict:
    os.environ.pop("VLLM_API_KEY", None)
    os.environ.pop("RAY_LLM_API_KEYS_FILE", None)
    os.environ["RAY_LLM_API_KEYS"] = ",".join(keys)
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    from rayllm_auth.middleware import ApiKeyMiddleware

    accepted = {f"Bearer {k}" for k in keys}

    async def forum_dispatch(request, call_next):
        if request.headers.get("authorization") not in accepted:
            return JSONResponse({"detail": "Invalid or missing API key"}, status_code=401)
        return await call_next(request)

    previous = {} if PREVIOUS is None else {
        "rayllm-auth (previous)": PREVIOUS.ApiKeyMiddleware(inner)}
    return {
        "none": inner,
        "rayllm-auth": ApiKeyMiddleware(inner),
        **previous,
        # Token accounting on: the request body read, the response read for its usage.
        "rayllm-auth, token usage on": ApiKeyMiddleware(
            inner, environ={**os.environ, "RAY_LLM_AUTH_TOKEN_USAGE": "1"}),
        "rayllm-auth-file": middleware_from_file(inner, [f"k{i}:{k}" for i, k in enumerate(keys)]),
        "vllm": AuthenticationMiddleware(inner, tokens=keys),
        "forum": BaseHTTPMiddleware(inner, dispatch=forum_dispatch),
    }


def scope_for(case: str, keys: list[str]) -> dict:
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"OpenAI/Python 1.x"),
               (b"content-type", b"application/json"), (b"accept", b"application/json")]
    if case == "valid":
        headers.append((b"authorization", f"Bearer {keys[-1]}".encode()))
    elif case == "invalid":
        headers.append((b"authorization", f"Bearer {keys[-1][:-1]}X".encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


# -- timing ----------------------------------------------------------------------------------

async def time_batch(app, scope: dict, batch: int, body: bytes = b"{}") -> float:
    """Seconds per request over ``batch`` requests."""
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    start = time.perf_counter()
    for _ in range(batch):
        await app(dict(scope), receive, send)
    return (time.perf_counter() - start) / batch


async def measure(variants: dict, scope: dict, rounds: int, batch: int,
                  body: bytes = b"{}", scopes: Optional[dict] = None) -> dict:
    """{variant: [seconds per request it adds over ``none`` in the same round, ...]}, plus
    ``none`` itself: the baseline's own seconds per request. ``scopes`` gives some variants
    a request of their own (another key), ``scope`` is everyone else's."""
    scopes = {name: (scopes or {}).get(name, scope) for name in variants}
    for name, app in variants.items():  # warm-up
        await time_batch(app, scopes[name], max(10, batch // 10), body)
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        per_request = {name: await time_batch(variants[name], scopes[name], batch, body)
                       for name in order}
        for name in variants:
            base = 0.0 if name == "none" else per_request["none"]
            samples[name].append(per_request[name] - base)
    return samples


def summary(samples: list[float], scale: float = 1e6) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples) * scale, "p25": q[0] * scale,
            "p75": q[-1] * scale, "rounds": len(samples)}


async def run(rounds: int, batch: int, key_counts, quick: bool) -> dict:
    results = {"per_request_us": [], "per_chunk_us": []}
    for count in key_counts:
        keys = ["sk-" + secrets.token_urlsafe(32) for _ in range(count)]
        variants = make_variants(bare_app, keys)
        for case in CASES:
            added = await measure(variants, scope_for(case, keys), rounds, batch)
            for name, samples in added.items():
                results["per_request_us"].append(
                    {"variant": name, "keys": count, "case": case, **summary(samples)})
            print(f"  {count:>6} keys, {case:<7}: " + ", ".join(
                f"{n} +{summary(s)['median']:.2f}" for n, s in added.items() if n != "none"
            ) + f" us (bare app {summary(added['none'])['median']:.2f} us)", flush=True)
    # Work per chunk: what a variant adds to a streamed request minus what it adds to a plain
    # one, over the chunks (each against its own bare app, in the same rounds): zero for a
    # middleware that never touches the response body.
    keys = ["sk-" + secrets.token_urlsafe(32)]
    streamed, plain = make_variants(streaming_app, keys), make_variants(bare_app, keys)
    variants = {**streamed, **{f"{n} (plain)": app for n, app in plain.items()}}
    added = await measure(variants, scope_for("valid", keys), rounds, max(10, batch // 40))
    plain_base = added["none (plain)"]  # plain bare app minus streamed bare app, per round
    for name in streamed:
        if name == "none":
            continue
        per_chunk = [(s - (p - b)) / CHUNKS
                     for s, p, b in zip(added[name], added[f"{name} (plain)"], plain_base)]
        results["per_chunk_us"].append({"variant": name, "chunks": CHUNKS, **summary(per_chunk)})
    print("  added per streamed chunk: " + ", ".join(
        f"{r['variant']} {r['median'] * 1000:+.1f} ns" for r in results["per_chunk_us"]),
        flush=True)
    results["limited_key_us"] = await limited_key_cost(rounds, batch)
    return results


#: Keys of one key file, by what the limited-key rows call them. The rate limits are far
#: above what the benchmark sends (limits configured, not reached): the rows measure the
#: admission from local leases, with the ledger in this process (how often a replica calls
#: its ledger is measured by limits_bench.py).
LIMITED_KEYS = {
    "unlimited key": "",
    "key limited to its model": "models=llama",
    "key with rpm=": "rpm=1000000000",
    "key with concurrency=": "concurrency=1000",
    "key with rpm= and concurrency=": "rpm=1000000000 concurrency=1000",
    "key with tpm=": "tpm=1000000000",
}


async def limited_key_cost(rounds: int, batch: int) -> list[dict]:
    """Limited keys against an unlimited key, same key file, same 1 KB chat request and the
    same answer (with its usage), all in the same rounds: what reading the body for its
    model adds, what admission under rate limits adds, and the same unlimited key with token
    accounting on. Each row also gives its key's cost over the unlimited key, paired round
    by round (the rounds drift more than the difference: rows timed in separate runs differ
    by a microsecond or two)."""
    keys = {name: "sk-" + secrets.token_urlsafe(32) for name in LIMITED_KEYS}
    lines = [f"k{i}:{keys[name]} {options}".strip()
             for i, (name, options) in enumerate(LIMITED_KEYS.items())]
    app = middleware_from_file(usage_app, lines)
    counting = middleware_from_file(usage_app, lines, RAY_LLM_AUTH_TOKEN_USAGE="1")
    # The previous checkout (--compare) on the keys it knows, in the same rounds.
    previous = PREVIOUS and middleware_from_file(
        usage_app, [line for line in lines if "tpm=" not in line], PREVIOUS.ApiKeyMiddleware)
    body = json.dumps({"model": "llama", "max_tokens": 64, "stream": True, "messages": [
        {"role": "user", "content": "x" * 900}]}).encode()
    # One request of each concurrency-limited key stays in flight, as under load: the measured
    # requests then take and free slots held here (a key whose requests never overlap returns
    # its slots after each one: two ledger calls, counted by limits_bench.py).
    for i, (name, options) in enumerate(LIMITED_KEYS.items()):
        if "concurrency=" in options:
            for middleware in (app, previous) if previous else (app,):
                await middleware._quota.admit(f"k{i}", None, 1000)
    variants, scopes, baselines = {"none": usage_app}, {}, {}
    for name, key in [*keys.items(), ("unlimited key, token usage on", keys["unlimited key"])]:
        variants[name] = counting if name.endswith("token usage on") else app
        scopes[name] = scope_for("valid", [key])
        baselines[name] = "unlimited key"
        if previous and "tpm=" not in LIMITED_KEYS.get(name, "tpm="):
            variants[f"{name} (previous)"] = previous
            scopes[f"{name} (previous)"] = scopes[name]
            baselines[f"{name} (previous)"] = "unlimited key (previous)"
    added = await measure(variants, scopes["unlimited key"], rounds, batch, body, scopes)
    rows = []
    for variant in variants:
        if variant == "none":
            continue
        over = [a - b for a, b in zip(added[variant], added[baselines[variant]])]
        rows.append({"variant": variant, "body_bytes": len(body), **summary(added[variant]),
                     "over_unlimited": summary(over) if variant != baselines[variant] else None})
    print("  1 KB chat request: " + ", ".join(
        f"{r['variant']} +{r['median']:.2f} us" + (
            f" (+{r['over_unlimited']['median']:.2f} over the unlimited key)"
            if r["over_unlimited"] else "") for r in rows), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds, no file")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run the rayllm_auth of another checkout (e.g. a worktree "
                             "of the previous commit), as variant 'rayllm-auth (previous)'")
    args = parser.parse_args()
    if args.compare:
        global PREVIOUS
        from benchmarks.previous import load

        PREVIOUS = load(args.compare)
    if args.quick:
        args.rounds, args.batch = 3, 50
    key_counts = (1, 1_000) if args.quick else KEY_COUNTS
    print(f"middleware micro-benchmark: {args.rounds} rounds x {args.batch} requests")
    # Refusals are logged (rate-limited); measure that work, but do not print the lines.
    logging.getLogger("rayllm_auth").addHandler(logging.NullHandler())
    logging.getLogger("rayllm_auth").propagate = False
    results = asyncio.run(run(args.rounds, args.batch, key_counts, args.quick))
    if not args.quick:
        write_results("middleware", {"rounds": args.rounds, "batch": args.batch, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
