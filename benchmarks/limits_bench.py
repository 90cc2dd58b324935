"""How often a limited key's request leaves the replica: ledger calls per request.

A replica admits a key's requests from leases (:mod:`rayllm_auth.quota`); only a spent
lease, a first slot or the last slot's return calls the ledger. This counts those calls for
one replica receiving one key's requests at a steady rate (100 requests/s by default), in
simulated time: the replica's real :class:`~rayllm_auth.quota.ReplicaQuota` and the real
:class:`~rayllm_auth.ledger.Ledger`, driven by a clock that jumps from one event (a request
arriving, a request ending, the 2 s upkeep) to the next. The count does not depend on how a
call travels (the Ray actor adds its own latency per call, measured elsewhere), so no Ray
cluster is needed and a 10-minute load takes a second.

Limits are twice the load (configured, not reached): ``rpm`` = 2 x rate x 60 and
``concurrency`` = 2 x the requests in flight (at least 2). Request durations: 5 ms (no two
requests overlap, the worst case for ``concurrency``), 100 ms, 1 s and 10 s (LLM streams).

    python benchmarks/limits_bench.py            # 10 simulated minutes per case
    python benchmarks/limits_bench.py --quick    # smoke run for CI
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import write_results  # noqa: E402

DURATIONS_S = (0.005, 0.1, 1.0, 10.0)
LIMITS = ("rpm", "concurrency", "rpm+concurrency")


class CountingLedger:
    """The real Ledger behind the calls a replica makes, each call counted by method and by
    where it came from (the request path, or upkeep off it)."""

    def __init__(self, clock):
        from rayllm_auth.ledger import Ledger

        self._ledger = Ledger(clock)
        self.calls = Counter()
        self.context = "request"

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        bound = getattr(self._ledger, method)

        async def call(*args):
            self.calls[self.context, method] += 1
            return bound(*args)

        return call


async def simulate(rate: float, duration_s: float, limit: str, minutes: float) -> dict:
    """One replica, one key, ``rate`` requests/s each lasting ``duration_s``, for
    ``minutes`` of simulated time."""
    from rayllm_auth.quota import SYNC_S, ReplicaQuota

    now = [0.0]
    ledger = CountingLedger(lambda: now[0])
    quota = ReplicaQuota(ledger, "replica-1", lambda: now[0], heartbeat=False)
    rpm = int(2 * rate * 60) if "rpm" in limit else None
    concurrency = max(2, math.ceil(2 * rate * duration_s)) if "concurrency" in limit else None
    total = int(rate * 60 * minutes)
    events = [(i / rate, 0, "arrive") for i in range(total)]
    events += [(k * SYNC_S, 1, "upkeep") for k in range(1, int(total / rate / SYNC_S) + 1)]
    heapq.heapify(events)
    admitted = refused = 0
    while events:
        now[0], _, kind = heapq.heappop(events)
        if kind == "upkeep":
            ledger.context = "upkeep"
            await quota.upkeep()
            ledger.context = "request"
        elif kind == "end":
            await quota.release("key")
        else:
            verdict = await quota.admit("key", rpm, concurrency)
            if verdict.refused:
                refused += 1
            else:
                admitted += 1
                if concurrency is not None:
                    heapq.heappush(events, (now[0] + duration_s, 0, "end"))
    on_path = sum(n for (where, _), n in ledger.calls.items() if where == "request")
    off_path = sum(n for (where, _), n in ledger.calls.items() if where == "upkeep")
    return {
        "limit": limit, "rate": rate, "duration_s": duration_s, "rpm": rpm,
        "concurrency": concurrency, "requests": total, "admitted": admitted,
        "refused": refused, "calls_on_request_path": on_path, "calls_in_upkeep": off_path,
        "calls_per_request_pct": 100 * on_path / total,
        "all_calls_per_request_pct": 100 * (on_path + off_path) / total,
        "calls": {f"{where}:{method}": n for (where, method), n in sorted(ledger.calls.items())},
    }


async def run(rate: float, minutes: float) -> list[dict]:
    rows = []
    for limit in LIMITS:
        for duration in DURATIONS_S:
            if limit == "rpm" and duration != DURATIONS_S[0]:
                continue  # without concurrency= a request's duration changes nothing
            row = await simulate(rate, duration, limit, minutes)
            rows.append(row)
            print(f"  {limit:<16} {duration * 1000:>6.0f} ms requests: "
                  f"{row['calls_per_request_pct']:.2f} % on the request path, "
                  f"{row['all_calls_per_request_pct']:.2f} % with upkeep, "
                  f"{row['refused']} refused of {row['requests']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 simulated minute")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s per replica")
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes per case")
    args = parser.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    print(f"ledger calls per limited request: {args.rate:g} requests/s, {minutes:g} simulated "
          f"minutes per case, limits twice the load")
    rows = asyncio.run(run(args.rate, minutes))
    if not args.quick:
        write_results("limits", {"rate": args.rate, "minutes": minutes, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
