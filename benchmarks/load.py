"""Closed-loop load generator for an OpenAI-compatible endpoint (Ray Serve LLM or anything else).

``--concurrency`` clients each send a request, wait for the whole answer, and send the next,
for ``--duration`` seconds. Reports requests/s, generated tokens/s, latency p50/p99, and for
streaming the time to first token (TTFT) p50/p99. Any answer other than 200 counts as an
error (and is reported, never silently dropped).

Run it against your own cluster with the plugin on and off to compare:

    python benchmarks/load.py --base-url https://llm.example.com --model my-model \\
        --api-key "$KEY" --concurrency 32 --duration 60 --stream --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class LoadResult:
    concurrency: int
    stream: bool
    duration_s: float = 0.0
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies_s: list = field(default_factory=list, repr=False)
    ttfts_s: list = field(default_factory=list, repr=False)
    error_samples: list = field(default_factory=list)

    def summary(self) -> dict:
        def pct(values, q):
            return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (
                values[0] if values else None)

        out = {k: v for k, v in asdict(self).items() if k not in ("latencies_s", "ttfts_s")}
        out.update(
            requests_per_s=self.requests / self.duration_s if self.duration_s else 0.0,
            tokens_per_s=self.tokens / self.duration_s if self.duration_s else 0.0,
            latency_p50_s=pct(self.latencies_s, 50), latency_p99_s=pct(self.latencies_s, 99),
            ttft_p50_s=pct(self.ttfts_s, 50), ttft_p99_s=pct(self.ttfts_s, 99),
        )
        return out


async def _one_request(client, url, body, stream, result: LoadResult) -> None:
    started = time.perf_counter()
    if stream:
        first = None
        tokens = 0
        async with client.stream("POST", url, json=body) as reply:
            if reply.status_code != 200:
                await reply.aread()
                raise _HttpError(reply.status_code, reply.text[:200])
            async for line in reply.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += 1
                    if first is None:
                        first = time.perf_counter()
        result.ttfts_s.append((first or time.perf_counter()) - started)
    else:
        reply = await client.post(url, json=body)
        if reply.status_code != 200:
            raise _HttpError(reply.status_code, reply.text[:200])
        tokens = reply.json().get("usage", {}).get("completion_tokens", 0)
    result.latencies_s.append(time.perf_counter() - started)
    result.requests += 1
    result.tokens += tokens


class _HttpError(Exception):
    pass


async def run_load(base_url: str, model: str, api_key: str | None, *, concurrency: int,
                   duration_s: float, stream: bool, max_tokens: int) -> LoadResult:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens, "stream": stream}
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    result = LoadResult(concurrency=concurrency, stream=stream)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=120) as client:
        deadline = time.perf_counter() + duration_s

        async def worker():
            while time.perf_counter() < deadline:
                try:
                    await _one_request(client, url, body, stream, result)
                except (_HttpError, httpx.HTTPError) as exc:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(repr(exc)[:300])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.duration_s = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", help="sent as Authorization: Bearer (omit for an open endpoint)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    result = asyncio.run(run_load(args.base_url, args.model, args.api_key,
                                  concurrency=args.concurrency, duration_s=args.duration,
                                  stream=args.stream, max_tokens=args.max_tokens))
    print(json.dumps(result.summary(), indent=1))
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
