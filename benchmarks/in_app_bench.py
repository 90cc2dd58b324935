"""In-app benchmark: what each middleware adds to one request inside Ray's real ingress app.

The middleware benchmark calls each middleware around a bare ASGI app; this one puts it where
it runs in production: first in ``user_middleware`` of the FastAPI app that Ray 2.60's
``ingress.init()`` builds (exception handling, CORS, request-id middleware; HTTP metrics
only with RAYLLM_ENABLE_VERBOSE_TELEMETRY), with one trivial route. Variants, all in one
run:

* ``stock``: Ray's app as it is (the baseline);
* ``pass-through``: a pure ASGI middleware that only calls the app;
* ``strip``: removes the ``authorization`` header from the scope, nothing else;
* ``hash-lookup``: SHA-256 of the bearer token and a dict lookup, nothing else;
* ``minimal``: both (strip the header, SHA-256, dict lookup): the least a key check does;
* ``minimal + user id``: ``minimal``, also telling the app whose key it was as rayllm-auth
  does (``request.state.user_id``, the ``user_id`` tag of Ray's HTTP metrics): the least a
  check with rayllm-auth's output does;
* ``minimal + user id, any case``: that, with header names matched in any case as
  rayllm-auth matches them: the least a check does that keeps rayllm-auth's promises on
  header names;
* ``rayllm-auth``: :class:`rayllm_auth.middleware.ApiKeyMiddleware`, as ``protect_app`` adds it;
* ``rayllm-auth (previous)``, with ``--compare CHECKOUT``: another checkout's, the same way.

Each request carries the 17 headers the ``openai`` SDK sends (since 2026-11-30; 6 before,
which understated every variant's header scan). Method: rounds of ``--batch`` requests per
variant, interleaved request by request in a new random order each time, each request timed
on its own; a round's sample for a variant is its median request minus ``stock``'s median
request in the same round (medians: a GC pause hits one request, not the figure).
Reported: the median of the rounds' samples and their 25th-75th percentile. Batches of
requests timed as a whole drift by +-20 us here and swing +-50 us between rounds;
interleaving single requests is what makes a few microseconds repeatable.

    python benchmarks/in_app_bench.py            # 120 rounds x 250 requests, 6 processes (~5 min)
    python benchmarks/in_app_bench.py --quick    # smoke run (seconds, no thresholds)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import write_results  # noqa: E402

KEY = "sk-" + secrets.token_urlsafe(32)
_AUTHORIZATION = b"authorization"


class PassThrough:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


class Strip:
    """Removes the authorization header, checks nothing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope["headers"] = [h for h in scope["headers"] if h[0] != _AUTHORIZATION]
        await self.app(scope, receive, send)


class HashLookup:
    """SHA-256 of the bearer token and a dict lookup, leaves the headers alone."""

    def __init__(self, app):
        self.app = app
        self.digests = {hashlib.sha256(KEY.encode()).digest(): "bench"}

    async def __call__(self, scope, receive, send):
        for name, value in scope["headers"]:
            if name == _AUTHORIZATION:
                if hashlib.sha256(value[7:]).digest() in self.digests:
                    return await self.app(scope, receive, send)
        raise RuntimeError("the benchmark sends a valid key")


class Minimal:
    """Strip the header, SHA-256, dict lookup: the least a key check that hides the key does."""

    sets_user_id = False

    def __init__(self, app):
        self.app = app
        self.digests = {hashlib.sha256(KEY.encode()).digest(): "bench"}

    async def __call__(self, scope, receive, send):
        others, token = [], None
        for header in scope["headers"]:
            if header[0] == _AUTHORIZATION:
                token = header[1][7:]
            else:
                others.append(header)
        key_id = self.digests.get(hashlib.sha256(token).digest()) if token else None
        if key_id is None:
            raise RuntimeError("the benchmark sends a valid key")
        scope["headers"] = others
        if self.sets_user_id:
            scope.setdefault("state", {})["user_id"] = key_id
        await self.app(scope, receive, send)


class MinimalWithUserId(Minimal):
    """``minimal``, and the key's id in the request's state, where rayllm-auth puts it."""

    sets_user_id = True


class MinimalAnyCase(MinimalWithUserId):
    """``minimal + user id``, header names matched in any case, as rayllm-auth matches them
    (an ASGI server need not lower-case them): a lower-case copy of every name."""

    async def __call__(self, scope, receive, send):
        others, token = [], None
        for header in scope["headers"]:
            if header[0].lower() == _AUTHORIZATION:
                token = header[1][7:]
            else:
                others.append(header)
        key_id = self.digests.get(hashlib.sha256(token).digest()) if token else None
        if key_id is None:
            raise RuntimeError("the benchmark sends a valid key")
        scope["headers"] = others
        scope.setdefault("state", {})["user_id"] = key_id
        await self.app(scope, receive, send)


PREVIOUS = None  # another checkout's rayllm_auth (--compare), loaded by main()


def ray_app(middleware=None):
    """Ray's own ingress app with one trivial route, ``middleware`` first."""
    from fastapi.responses import JSONResponse
    from ray.llm._internal.serve.core.ingress import ingress

    from rayllm_auth.protect import protect_app

    app = ingress.init()

    @app.post("/v1/chat/completions")
    async def chat():
        return JSONResponse({"ok": True})

    if middleware == "rayllm-auth":
        return protect_app(app)
    if middleware == "rayllm-auth (previous)":
        return PREVIOUS.protect_app(app)
    if middleware is not None:
        app.user_middleware.insert(0, _as_middleware(middleware))
    return app


def _as_middleware(cls):
    from starlette.middleware import Middleware

    return Middleware(cls)


# What the openai SDK (3.57) sends with a chat request, in its order, names lower-cased as
# uvicorn hands them on: every variant scans as many headers as in production.
SDK_HEADERS = [
    (b"host", b"127.0.0.1:8000"), (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"), (b"authorization", f"Bearer {KEY}".encode()),
    (b"accept", b"application/json"), (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 3.57.0"), (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"3.57.0"), (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"), (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"), (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"), (b"x-stainless-read-timeout", b"600"),
    (b"content-length", b"2"),
]


def scope() -> dict:
    headers = list(SDK_HEADERS)
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def call(app) -> float:
    """Seconds one request takes, with a fresh scope. Raises unless it is answered 200."""
    statuses = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    request = scope()
    start = time.perf_counter()
    await app(request, receive, send)
    elapsed = time.perf_counter() - start
    if statuses != [200]:
        raise RuntimeError(f"unexpected answer {statuses}")
    return elapsed


async def measure(rounds: int, batch: int) -> dict:
    """{variant: [one sample per round]} in this process."""
    os.environ["RAY_LLM_API_KEYS"] = f"bench:{KEY}"
    variants = {"stock": ray_app(), "pass-through": ray_app(PassThrough),
                "strip": ray_app(Strip), "hash-lookup": ray_app(HashLookup),
                "minimal": ray_app(Minimal), "minimal + user id": ray_app(MinimalWithUserId),
                "minimal + user id, any case": ray_app(MinimalAnyCase),
                "rayllm-auth": ray_app("rayllm-auth")}
    if PREVIOUS is not None:
        variants["rayllm-auth (previous)"] = ray_app("rayllm-auth (previous)")
    names = list(variants)
    for _ in range(batch):  # warm-up; builds each middleware stack
        for name in names:
            await call(variants[name])
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        # Interleaved request by request, in a new order each time: drift and noise hit every
        # variant alike. A round's figure is each variant's median request (robust to GC
        # pauses) minus stock's median in the same round.
        times = {name: [] for name in names}
        for _ in range(batch):
            random.shuffle(names)
            for name in names:
                times[name].append(await call(variants[name]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name in variants:
            base = 0.0 if name == "stock" else medians["stock"]
            samples[name].append((medians[name] - base) * 1e6)
    return samples


def report(samples: dict, per_process: dict) -> dict:
    """Median and quartiles of all rounds, and the range of the processes' own medians."""
    rows = []
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        medians = per_process.get(name, [statistics.median(values)])
        rows.append({"variant": name, "median_us": statistics.median(values),
                     "p25_us": q[0], "p75_us": q[-1], "rounds": len(values),
                     "process_medians_us": medians})
        label = "us per request" if name == "stock" else "us added"
        print(f"  {name:<23} {statistics.median(values):8.2f} {label} (p25 {q[0]:.2f}, p75 "
              f"{q[-1]:.2f}; processes {min(medians):.1f} to {max(medians):.1f})", flush=True)
    return {"rows": rows}


def in_processes(args) -> tuple[dict, dict]:
    """The rounds, split over ``--processes`` fresh interpreters, pooled: where code and data
    land in memory differs between processes, and moves a middleware's figure by up to 10 us
    from one process to the next (cold caches, see benchmarks/README.md)."""
    pooled: dict = {}
    per_process: dict = {}
    for _ in range(args.processes):
        command = [sys.executable, __file__, "--worker", "--rounds",
                   str(args.rounds // args.processes), "--batch", str(args.batch)]
        if args.compare:
            command += ["--compare", str(args.compare)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        for name, values in json.loads(out.strip().splitlines()[-1]).items():
            pooled.setdefault(name, []).extend(values)
            per_process.setdefault(name, []).append(statistics.median(values))
    return pooled, per_process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds")
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="also run the rayllm_auth of another checkout (e.g. a worktree "
                             "of the previous commit), as variant 'rayllm-auth (previous)'")
    args = parser.parse_args()
    if args.compare:
        global PREVIOUS
        from benchmarks.previous import load

        PREVIOUS = load(args.compare)
    if args.worker:
        print(json.dumps(asyncio.run(measure(args.rounds, args.batch))))
        return 0
    if args.quick:
        report(asyncio.run(measure(3, 20)), {})
        return 0
    print(f"in-app benchmark (Ray's ingress app): {args.rounds} rounds x {args.batch} requests "
          f"in {args.processes} processes")
    results = report(*in_processes(args))
    write_results("in_app", {"rounds": args.rounds, "batch": args.batch,
                             "processes": args.processes, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
