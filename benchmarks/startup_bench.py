"""Interpreter start-up cost of rayllm_auth.pth, which every process of the environment pays.

Two throw-away virtualenvs that differ only by the rayllm-auth wheel; each opens this
checkout's full Ray environment (``.venv``) with ``site.addsitedir``, so its ``.pth`` files run
too, as in a Ray image. ``python -c pass`` is timed in interleaved rounds for:

* ``baseline``: no plugin;
* ``plugin, no key``: plugin installed, no key source (the .pth does two dict lookups);
* ``plugin, key set``: RAY_LLM_API_KEYS set (it imports a 140-line module and adds a finder);
* ``plugin, ray worker``: RAY_RAYLET_PID set, no key (report mode: same work as key set);
* ``no plugin, key set``: the control for the measurement itself.

Also reported: ``-X importtime`` for the plugin's own modules, a direct reading of the work
the .pth adds that is not blurred by process start-up noise.

    python benchmarks/startup_bench.py            # full run (about 1 minute)
    python benchmarks/startup_bench.py --quick
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import write_results  # noqa: E402
from tests.support.local_cluster import build_wheel  # noqa: E402

RAY_SITE = Path(sys.executable).resolve().parent.parent / "lib" / (
    f"python{sys.version_info.major}.{sys.version_info.minor}") / "site-packages"
KEY = {"RAY_LLM_API_KEYS": "sk-startup-bench-0123456789abcdefghij"}


def make_env(root: Path, wheel: Path | None) -> Path:
    """A venv that sees the full Ray environment, with or without the plugin installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site_dir = next(root.glob("lib/python*/site-packages"))
    # 'zz' so it runs after rayllm_auth.pth, as a Ray image's own .pth files would.
    (site_dir / "zz_ray_environment.pth").write_text(
        f"import site; site.addsitedir({str(RAY_SITE)!r})\n")
    if wheel is not None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", str(site_dir), str(wheel)], check=True)
    return root / "bin" / "python"


def start_once(python: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], env={"PATH": "/usr/bin:/bin", **env}, check=True)
    return time.perf_counter() - started


def own_import_us(python: Path, env: dict) -> float:
    """Microseconds -X importtime attributes to rayllm_auth's own modules (their self time;
    what they import is already loaded at start-up). They appear nested under `site`."""
    result = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", **env}, check=True)
    total = 0
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \| *(\S+)", line)
        if match and match[2].startswith("rayllm_auth"):
            total += int(match[1])
    return float(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3

    with tempfile.TemporaryDirectory(prefix="rayllm-auth-startup-") as tmp:
        tmp = Path(tmp)
        wheel = build_wheel(tmp / "wheel")
        plain, plugin = make_env(tmp / "plain", None), make_env(tmp / "plugin", wheel)
        variants = {
            "baseline": (plain, {}),
            "plugin, no key": (plugin, {}),
            "plugin, key set": (plugin, KEY),
            "plugin, ray worker": (plugin, {"RAY_RAYLET_PID": "1"}),
            "no plugin, key set": (plain, KEY),
        }
        for python, env in variants.values():  # warm the page cache
            start_once(python, env)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            order = list(variants)
            random.shuffle(order)
            for name in order:
                times[name].append(start_once(*variants[name]))
        importtime = {name: statistics.median(own_import_us(*variants[name]) for _ in range(9))
                      for name in variants}

    base = statistics.median(times["baseline"])
    rows = []
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=4)
        rows.append({"variant": name, "median_ms": statistics.median(samples) * 1e3,
                     "p25_ms": q[0] * 1e3, "p75_ms": q[2] * 1e3,
                     "added_ms": (statistics.median(samples) - base) * 1e3,
                     "rayllm_auth_import_us": importtime[name]})
        print(f"  {name:<20} {rows[-1]['median_ms']:7.2f} ms  (p25 {rows[-1]['p25_ms']:.2f}, "
              f"p75 {rows[-1]['p75_ms']:.2f})  added {rows[-1]['added_ms']:+.2f} ms  "
              f"rayllm_auth imports {importtime[name]:.0f} us", flush=True)
    if not args.quick:
        write_results("startup", {"rounds": args.rounds, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
