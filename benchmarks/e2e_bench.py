"""End-to-end benchmark: Ray Serve LLM with and without rayllm-auth, side by side, one cluster.

One local Ray cluster (keys in its environment), four applications built by Ray's unchanged
``build_openai_app`` with the CPU stand-in engine, which differ only in what is compared:

* ``plugin-*``: rayllm-auth in ``runtime_env.pip``, active (every request carries a key);
* ``stock-*``: the same wheel with ``RAY_LLM_AUTH_DISABLE_AUTOPATCH=1``: Ray as shipped
  (the wheel is only there because it carries the stand-in engine);

each with two engine profiles:

* ``fast``: no decode delay, so the ingress/router path is the bottleneck (worst case for
  any per-request cost);
* ``gpu``: a GPU-like decode, ``--token-delay`` seconds per token and at most
  ``--max-batch`` sequences at once.

The closed-loop generator (``benchmarks/load.py``) drives one application at a time; for each
profile, concurrency and streaming mode it runs ``--rounds`` A/B pairs in a new random order
each round. Besides throughput and latency it reads the CPU time (utime + stime from
``/proc``) of each ingress replica process around every run.

Two controls, because two replica processes on a shared 2-core machine differ by several
percent whatever they run: an A/A pair (``stock-fast`` against an identical ``stock2-fast``,
same method) gives the noise floor of the ratios, and a py-spy profile of the plugin's
ingress under load gives the share of its CPU samples spent in rayllm-auth's own code (the
innermost frame is in the package), which no run-to-run noise can blur.

    python benchmarks/e2e_bench.py            # full run (about 8 minutes)
    python benchmarks/e2e_bench.py --quick    # smoke run for CI (no thresholds)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.load import run_load  # noqa: E402
from benchmarks.machine import write_results  # noqa: E402
from tests.support.local_cluster import (  # noqa: E402
    MODEL,
    SERVE_URL,
    LocalCluster,
    application,
    build_wheel,
    ingress_pids,
)

STACKS = ("stock", "plugin")


def deploy(cluster: LocalCluster, wheel: Path, token_delay: float, max_batch: int) -> None:
    profiles = {"fast": {}, "gpu": {"RAYLLM_AUTH_STANDIN_TOKEN_DELAY_S": str(token_delay),
                                   "RAYLLM_AUTH_STANDIN_MAX_BATCH": str(max_batch)}}
    apps = []
    for profile, engine_env in profiles.items():
        for stack in (*STACKS, "stock2") if profile == "fast" else STACKS:
            env = dict(engine_env)
            if stack.startswith("stock"):
                env["RAY_LLM_AUTH_DISABLE_AUTOPATCH"] = "1"
            apps.append(application(f"{stack}-{profile}", f"/{stack}-{profile}",
                                    runtime_env={"pip": [str(wheel)], "env_vars": env}))
    cluster.deploy(apps)
    cluster.wait_for({a["name"]: {"RUNNING"} for a in apps})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def one_run(route_prefix: str, pid: int, key: str, concurrency: int, stream: bool,
                  duration: float, max_tokens: int) -> dict:
    """One closed-loop run against the app at ``route_prefix`` whose ingress runs as ``pid``."""
    cpu_before = cpu_seconds(pid)
    result = await run_load(SERVE_URL + route_prefix, MODEL, key, concurrency=concurrency,
                            duration_s=duration, stream=stream, max_tokens=max_tokens)
    summary = result.summary()
    summary["ingress_cpu_s"] = cpu_seconds(pid) - cpu_before
    summary["ingress_cpu_ms_per_request"] = (
        1000 * summary["ingress_cpu_s"] / result.requests if result.requests else None)
    return summary


RATIO_FIELDS = ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s",
                "ttft_p50_s", "ttft_p99_s", "ingress_cpu_ms_per_request")


def ratios(pairs: list[tuple[dict, dict]]) -> dict:
    """Median and range over rounds of plugin/stock for each field."""
    out = {}
    for name in RATIO_FIELDS:
        values = [p[name] / s[name] for s, p in pairs if p.get(name) and s.get(name)]
        if values:
            out[name] = {"median": statistics.median(values), "min": min(values),
                         "max": max(values)}
    return out


async def ab_group(key, pids, args, profile, concurrency, stream, a="stock", b="plugin"):
    """``args.rounds`` pairs of runs of apps ``a`` and ``b``, order shuffled each round."""
    pairs = []
    for _ in range(args.rounds):
        order = [a, b]
        random.shuffle(order)
        runs = {}
        for stack in order:
            app = f"{stack}-{profile}"
            runs[stack] = await one_run(f"/{app}", pids[app], key, concurrency, stream,
                                        args.duration, args.max_tokens)
        pairs.append((runs[a], runs[b]))
    group = {"profile": profile, "concurrency": concurrency, "stream": stream,
             "compared": f"{b}/{a}", "rounds": [{a: x, b: y} for x, y in pairs],
             "ratio": ratios(pairs), "errors": sum(x["errors"] + y["errors"] for x, y in pairs)}
    r = group["ratio"]
    print(f"  {profile:4} c={concurrency:<3} {'stream' if stream else 'full  '} {b}/{a}: "
          f"req/s x{r['requests_per_s']['median']:.3f} "
          f"[{r['requests_per_s']['min']:.3f}-{r['requests_per_s']['max']:.3f}]  "
          f"p50 x{r['latency_p50_s']['median']:.3f}  p99 x{r['latency_p99_s']['median']:.3f}  "
          f"cpu/req x{r['ingress_cpu_ms_per_request']['median']:.3f}  errors {group['errors']}",
          flush=True)
    return group


async def campaign(key: str, pids: dict, args) -> tuple[list[dict], list[dict]]:
    groups, controls = [], []
    for profile in ("fast", "gpu"):
        for concurrency in args.concurrency:
            for stream in (False, True):
                groups.append(await ab_group(key, pids, args, profile, concurrency, stream))
    for stream in (False, True):  # the noise floor of the same method
        controls.append(await ab_group(key, pids, args, "fast", args.concurrency[0], stream,
                                       a="stock", b="stock2"))
    return groups, controls


async def profile_share(key: str, pid: int, args) -> dict:
    """Share of the plugin ingress's CPU samples whose innermost frame is rayllm-auth code."""
    out = Path(tempfile.mkdtemp()) / "profile.txt"
    spy = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "250",
        "--duration", str(int(args.duration) + 2), "--format", "raw", "--nonblocking",
        "-o", str(out), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(1)
    await run_load(f"{SERVE_URL}/plugin-fast", MODEL, key, concurrency=args.concurrency[0],
                   duration_s=args.duration, stream=False, max_tokens=args.max_tokens)
    await spy.wait()
    total = own = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        if "rayllm_auth/" in stack.rsplit(";", 1)[-1]:
            own += int(count)
    return {"samples": total, "rayllm_auth_self_samples": own,
            "share_percent": 100 * own / total if total else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny, no file")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-delay", type=float, default=0.01, help="gpu profile, s/token")
    parser.add_argument("--max-batch", type=int, default=16, help="gpu profile batch size")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.rounds, args.duration = [4], 1, 2.0

    key = "sk-bench-" + secrets.token_urlsafe(32)
    wheel = build_wheel(Path(tempfile.mkdtemp(prefix="rayllm-auth-bench-")))
    cluster = LocalCluster({"RAY_LLM_API_KEYS": f"bench:{key}"}).start()
    try:
        started = time.monotonic()
        deploy(cluster, wheel, args.token_delay, args.max_batch)
        print(f"deployed 5 applications in {time.monotonic() - started:.0f} s")
        pids = ingress_pids()
        groups, controls = asyncio.run(campaign(key, pids, args))
        profile = asyncio.run(profile_share(key, pids["plugin-fast"], args))
        print(f"  rayllm-auth's own code: {profile['share_percent']:.2f} % of the plugin "
              f"ingress's CPU samples ({profile['rayllm_auth_self_samples']} of "
              f"{profile['samples']})", flush=True)
    finally:
        cluster.stop()
    if not args.quick:
        write_results("e2e", {"settings": vars(args), "groups": groups, "controls": controls,
                              "profile": profile})
    return 1 if any(g["errors"] for g in groups + controls) else 0


if __name__ == "__main__":
    sys.exit(main())
