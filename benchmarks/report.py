"""Charts and the results table from benchmarks/results/*.json.

Writes ``results/e2e.png`` (throughput and latency, plugin vs stock, per profile,
concurrency and mode), ``results/middleware.png`` (cost per request against the number of
configured keys) and rewrites the part of ``benchmarks/README.md`` between the
``results:start`` and ``results:end`` markers.

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
README = HERE / "README.md"

sys.path.insert(0, str(HERE.parent))
from tests.support.docs import rewrite_marked_section  # noqa: E402


def load(name: str):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fmt_ratio(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['median']:.3f} ({entry['min']:.3f}-{entry['max']:.3f})"


def e2e_table(e2e: dict) -> list[str]:
    lines = ["| profile | conc. | mode | compared | req/s | tokens/s | p50 latency | p99 latency "
             "| TTFT p50 | ingress CPU/request | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in e2e["groups"] + e2e["controls"]:
        r = g["ratio"]
        compared = g["compared"] + (" (A/A control)" if "stock2" in g["compared"] else "")
        lines.append(
            f"| {g['profile']} | {g['concurrency']} | {'stream' if g['stream'] else 'full'} "
            f"| {compared} | {fmt_ratio(r.get('requests_per_s'))} "
            f"| {fmt_ratio(r.get('tokens_per_s'))} | {fmt_ratio(r.get('latency_p50_s'))} "
            f"| {fmt_ratio(r.get('latency_p99_s'))} | {fmt_ratio(r.get('ttft_p50_s'))} "
            f"| {fmt_ratio(r.get('ingress_cpu_ms_per_request'))} | {g['errors']} |")
    p = e2e["profile"]
    lines += ["", f"py-spy on the plugin's ingress replica under load (fast profile, full "
              f"responses): rayllm-auth's own code is the innermost frame in "
              f"**{p['rayllm_auth_self_samples']} of {p['samples']} samples "
              f"({p['share_percent']:.2f} %)**."]
    return lines


def middleware_table(mw: dict) -> list[str]:
    rows = [r for r in mw["per_request_us"] if r["variant"] != "none"]
    variants = sorted({r["variant"] for r in rows})
    lines = ["| keys | case | " + " | ".join(variants) + " |",
             "|---|---|" + "---|" * len(variants)]
    keyed = {(r["keys"], r["case"], r["variant"]): r for r in rows}
    for keys in sorted({r["keys"] for r in rows}):
        for case in ("valid", "invalid", "missing"):
            cells = [keyed.get((keys, case, v)) for v in variants]
            lines.append(f"| {keys:,} | {case} | " + " | ".join(
                f"{c['median']:.2f} ({c['p25']:.2f}-{c['p75']:.2f})" if c else "-"
                for c in cells) + " |")
    chunk = {r["variant"]: r for r in mw["per_chunk_us"] if r["variant"] != "none"}
    lines += ["", "Added per streamed chunk (256-chunk SSE response, valid key), nanoseconds:",
              "", "| " + " | ".join(variants) + " |", "|" + "---|" * len(variants),
              "| " + " | ".join(f"{chunk[v]['median'] * 1000:.1f}" for v in variants) + " |"]
    limited = mw.get("limited_key_us", [])
    if limited:
        lines += ["", f"Valid key on a {limited[0]['body_bytes']:,}-byte chat request, same key "
                      "file, all keys in the same rounds, microseconds: added over the bare "
                      "app, and over the unlimited key (paired round by round):", "",
                  "| key | added | over the unlimited key |", "|---|---|---|"]
        lines += [f"| {r['variant']} | {_figure(r)} | "
                  + (_figure(r["over_unlimited"]) if r.get("over_unlimited") else "-") + " |"
                  for r in limited]
    return lines


def _figure(stats: dict) -> str:
    return f"{stats['median']:.2f} ({stats['p25']:.2f}-{stats['p75']:.2f})"


def in_app_table(in_app: dict) -> list[str]:
    lines = ["| variant | added over stock, us: median (p25-p75) | processes' own medians |",
             "|---|---|---|"]
    for r in in_app["rows"]:
        medians = r.get("process_medians_us") or [r["median_us"]]
        figure = f"{r['median_us']:.2f} ({r['p25_us']:.2f}-{r['p75_us']:.2f})"
        if r["variant"] == "stock":
            figure = f"{r['median_us']:.0f} us per request (the baseline)"
        lines.append(f"| {r['variant']} | {figure} | {min(medians):.1f} to {max(medians):.1f} |")
    return lines


def limits_table(limits: dict) -> list[str]:
    lines = ["| limits | request lasts | ledger calls on the request path | with upkeep | "
             "refused |", "|---|---|---|---|---|"]
    for r in limits["rows"]:
        lines.append(f"| {r['limit']} | {r['duration_s'] * 1000:g} ms | "
                     f"{r['calls_per_request_pct']:.2f} % | {r['all_calls_per_request_pct']:.2f} % | "
                     f"{r['refused']} of {r['requests']:,} |")
    return lines


def startup_table(st: dict) -> list[str]:
    lines = ["| variant | python -c pass, median ms (p25-p75) | added vs baseline | "
             "rayllm_auth imports (-X importtime) |", "|---|---|---|---|"]
    for r in st["results"]:
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f}) "
                     f"| {r['added_ms']:+.2f} ms | {r['rayllm_auth_import_us']:.0f} us |")
    return lines


def machine_line(report: dict) -> str:
    m = report["machine"]
    return (f"_{m['date']}, {m['cpu']}, {m['cores']} cores, load {m['load_average'][0]:.2f}, "
            f"Python {m['python']}, Ray {m['versions']['ray']}, vLLM {m['versions']['vllm']}._")


def charts(e2e, mw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if e2e:
        groups = e2e["groups"]
        labels = [f"{g['profile']}\nc={g['concurrency']}\n{'stream' if g['stream'] else 'full'}"
                  for g in groups]
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, field, title in ((axes[0], "requests_per_s", "requests/s (median of rounds)"),
                                 (axes[1], "latency_p50_s", "p50 latency, s (median of rounds)")):
            for offset, stack in ((-0.2, "stock"), (0.2, "plugin")):
                values = [sorted(r[stack][field] for r in g["rounds"])[len(g["rounds"]) // 2]
                          for g in groups]
                ax.bar([i + offset for i in range(len(groups))], values, width=0.4, label=stack)
            ax.set_xticks(range(len(groups)), labels, fontsize=8)
            ax.set_title(title)
            ax.legend()
        fig.suptitle("Ray Serve LLM end to end: stock vs rayllm-auth (same cluster, A/B rounds)")
        fig.tight_layout()
        fig.savefig(RESULTS / "e2e.png", dpi=110)
        plt.close(fig)
    if mw:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in sorted({r["variant"] for r in mw["per_request_us"]} - {"none"}):
            rows = sorted((r for r in mw["per_request_us"]
                           if r["variant"] == variant and r["case"] == "valid"),
                          key=lambda r: r["keys"])
            ax.errorbar([r["keys"] for r in rows], [r["median"] for r in rows],
                        yerr=[[r["median"] - r["p25"] for r in rows],
                              [r["p75"] - r["median"] for r in rows]],
                        marker="o", capsize=3, label=variant)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("configured keys")
        ax.set_ylabel("added per request, us (valid key)")
        ax.set_title("Auth middleware cost over a bare ASGI app")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "middleware.png", dpi=110)
        plt.close(fig)


def main() -> int:
    e2e, mw, st, in_app = load("e2e"), load("middleware"), load("startup"), load("in_app")
    limits = load("limits")
    charts(e2e, mw)
    out = [""]
    if e2e:
        out += ["### End to end: plugin / stock (median of rounds, min-max)", "",
                machine_line(e2e), "", *e2e_table(e2e), "", "![end to end](results/e2e.png)", ""]
    if mw:
        out += ["### Middleware: microseconds added per request over a bare ASGI app "
                "(median, p25-p75)", "", machine_line(mw), "", *middleware_table(mw), "",
                "![middleware](results/middleware.png)", ""]
    if in_app:
        out += ["### In Ray's ingress app: microseconds added per request over the stock app",
                "", machine_line(in_app), "", *in_app_table(in_app), ""]
    if limits:
        out += [f"### Limited keys: ledger calls per request ({limits['rate']:g} requests/s on "
                f"one replica, {limits['minutes']:g} simulated minutes, limits twice the load)",
                "", machine_line(limits), "", *limits_table(limits), ""]
    if st:
        out += ["### Interpreter start-up", "", machine_line(st), "", *startup_table(st), ""]
    rewrite_marked_section(README, "results", "\n".join(out) + "\n")
    print(f"updated {README} and charts in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
