"""Compatibility runner: the end-to-end auth suite against each supported Ray release.

For every Ray version in :data:`PINS` it makes (or reuses) an isolated virtualenv holding
that Ray with its vLLM pin and the test tools, applies the CPU-only fix (no torchvision,
torchaudio or torchcodec), runs the version-independent end-to-end modules in it (real local
Ray cluster, unchanged ``build_openai_app``, the plugin from ``runtime_env.pip``, the stand-in
engine) and writes ``tests/compat/RESULTS.md`` and ``results.json``.

    .venv/bin/python tests/compat/run.py                      # every version not yet run
    .venv/bin/python tests/compat/run.py --versions 2.49.2    # some of them
    .venv/bin/python tests/compat/run.py --redo --keep        # again, keeping environments
    .venv/bin/python tests/compat/run.py --versions 2.47.1 --smoke   # the quick subset
    .venv/bin/python tests/compat/run.py --versions newest    # the canary for the next release

``--smoke`` runs only the tests marked ``smoke`` (the cluster, the examples, a limited key,
the models list, a driver without the plugin, the leak audit: a few minutes) and records
nothing: only a whole-module run verifies a release. ``--versions newest`` takes the newest Ray
on the package index, reports which layout records' patch targets hold in its wheel (no
cluster; :mod:`canary`), then runs the smoke subset on it. A release outside every row gets the
vLLM its ``llm`` extra starts at and runs with ``RAY_LLM_AUTH_ALLOW_UNTESTED_RAY=1``: the
newest row's hooks, as an operator who set the escape hatch would get them.

Resumable: a version with a row in ``results.json`` and no failure is skipped unless
``--redo``. Each version's virtualenv and wheels are removed after its run unless ``--keep``
(disk stays bounded: about 15 GB per version while it runs).

Cache (``--cache``, default ``/tmp/rayllm-auth-compat``): per version, the downloaded wheels
(4-5 GB) and a virtualenv (8-11 GB: vLLM and a CUDA build of torch, which imports fine
without a GPU). A rerun with an unchanged environment skips the install; a new environment
for a version already downloaded installs offline. Time on a 2-core machine: a few minutes per install, then
about 12 minutes of tests per version. The version installed in ``.venv`` (the one CI tests
on every run) is run from ``.venv`` itself.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent

#: Ray release -> the vLLM it is tested with: the lower bound of that release's own ``llm``
#: extra, i.e. the vLLM it was developed against (newer vLLMs change the APIs Ray imports).
PINS = {
    "2.44.1": "0.7.2",
    # 0.8.2 (its extra's lower bound) needs xgrammar==0.1.16, which the package index does
    # not have; 0.8.5 is within that extra too (2.46's lower bound).
    "2.45.0": "0.8.5",
    "2.46.0": "0.8.5",
    "2.47.1": "0.8.5",
    "2.48.0": "0.9.2",
    "2.49.2": "0.10.0",
    "2.50.1": "0.10.2",
    "2.51.2": "0.11.0",
    "2.52.1": "0.11.0",
    "2.53.0": "0.12.0",
    "2.54.1": "0.15.0",
    "2.55.1": "0.18.0",
    "2.56.1": "0.22.0",
    "2.57.1": "0.25.1",
    "2.58.1": "0.26.0",
    "2.59.0": "0.27.0",
    "2.60.0": "0.29.0",
}

#: Extras beyond serve,llm that a release needs: Ray 2.48's and 2.49's ``ray.serve.llm``
#: imports ``ray.rllib`` (for a deprecation helper), whose dependencies its ``rllib`` extra
#: brings, as the ray-llm images do; the other releases before 2.51 get it too, unchecked.
EXTRAS = {version: ["rllib"] for version in
          ("2.44.1", "2.45.0", "2.46.0", "2.47.1", "2.48.0", "2.49.2", "2.50.1")}

#: The pins 2.54.1 needed (below), given to 2.51 to 2.53 as well.
_CORE_INGRESS_INIT_PINS = ["fastapi==0.136.3", "boto3", "protobuf==6.33.6",
                           "grpcio-reflection==1.76.0"]

#: What a ray-llm image of the time has and a bare ``pip install`` today does not:
#: - serve.ingress pickles the FastAPI app, and today's FastAPI holds a lock (in its
#:   telemetry object) that cannot be pickled, so stock Ray 2.49 and 2.54 to 2.56 fail
#:   ("Failed to serialize the ASGI app", "cannot pickle '_thread.lock' object") unless
#:   FastAPI is one of their time (for 2.49 then prometheus-fastapi-instrumentator must
#:   predate Starlette 1.0 too; 2.54 to 2.56 get the FastAPI that Ray 2.60's environment
#:   resolves to; 2.57 on pickle it as it is);
#: - Ray 2.54's Serve LLM imports boto3 unconditionally (its cloud filesystem helpers; 2.55
#:   gets the same pins as 2.54, unchecked one by one);
#: - protobuf 7 removed ``FieldDescriptor.label``, which Serve's config code of 2.49 and 2.54
#:   reads (and vLLM 0.15's grpcio-reflection must then be one that accepts protobuf 6).
_ROUTER_MODULE_PINS = ["fastapi==0.116.1", "prometheus-fastapi-instrumentator==7.1.0",
                       "protobuf==6.33.6"]
CONSTRAINTS = {
    # 2.49.2's pins but protobuf (vLLM 0.7-0.8's OpenTelemetry pins want protobuf < 5,
    # which still has the field: pinning 6 made pip's resolver give up), boto3 (their Serve
    # LLM imports botocore unconditionally, as 2.54's does), and the transformers of each
    # vLLM's time (see 2.48.0's).
    "2.44.1": [*_ROUTER_MODULE_PINS[:2], "boto3", "transformers==4.48.3",
               "pyarrow<20",  # vLLM 0.7.2 pins NumPy 1; the newest pyarrow needs NumPy 2
               "protobuf<7"],  # vLLM 0.7.2 leaves it free: protobuf 7 without `label`
    "2.45.0": [*_ROUTER_MODULE_PINS[:2], "boto3", "transformers==4.51.3"],
    "2.46.0": [*_ROUTER_MODULE_PINS[:2], "boto3", "transformers==4.51.3"],
    "2.47.1": [*_ROUTER_MODULE_PINS[:2], "boto3", "transformers==4.51.3"],
    # 2.49.2's pins, and a transformers of vLLM 0.9.2's time: 4.54 added its own "aimv2"
    # config, which vLLM 0.9's ovis config then fails to register ("already used").
    "2.48.0": [*_ROUTER_MODULE_PINS, "transformers==4.53.3"],
    "2.49.2": _ROUTER_MODULE_PINS,
    # 2.51's pins (the same code at the older path), and vLLM 0.10.2's transformers.
    "2.50.1": [*_CORE_INGRESS_INIT_PINS, "transformers==4.56.2"],
    "2.51.2": _CORE_INGRESS_INIT_PINS,
    "2.52.1": _CORE_INGRESS_INIT_PINS,
    "2.53.0": _CORE_INGRESS_INIT_PINS,
    "2.54.1": _CORE_INGRESS_INIT_PINS,
    "2.55.1": ["fastapi==0.136.3", "boto3", "protobuf==6.33.6"],
    "2.56.1": ["fastapi==0.136.3"],
}

#: The end-to-end module that uses only what every supported Ray has: ``serve deploy`` of
#: ``build_openai_app`` configs, a Python driver without the plugin, the openai SDK.
SUITE = ["tests/e2e/test_rayservice.py"]

_CPU_ONLY_REMOVALS = ["torchvision", "torchaudio", "torchcodec"]


def test_requirements() -> list[str]:
    """requirements-dev.txt without its Ray line: the tools every environment needs."""
    lines = [line.split("#")[0].strip()  # comments, whole-line or after a requirement
             for line in (REPO / "requirements-dev.txt").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("ray[")]


def environment(version: str, cache: Path) -> Path:
    """The Python of an environment with Ray ``version``; created or reused."""
    dev_python = REPO / ".venv" / "bin" / "python"
    if dev_python.exists() and installed_ray(dev_python) == version:
        return dev_python
    venv = cache / f"ray-{version}"
    python = venv / "bin" / "python"
    wanted = wanted_packages(version)
    stamp = venv / ".rayllm-auth-compat"
    digest = hashlib.sha256("\n".join(wanted).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"==> installing Ray {version} with vLLM {PINS[version]} into {venv}", flush=True)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    wheels = cache / f"wheels-{version}"  # kept: a rerun installs without downloading
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), *wanted],
                   check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index",
                    "--find-links", str(wheels), *wanted], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", *_CPU_ONLY_REMOVALS],
                   check=True)
    stamp.write_text(digest)
    print(f"    installed in {time.monotonic() - started:.0f} s", flush=True)
    return python


def wanted_packages(version: str) -> list[str]:
    extras = ",".join(["serve", "llm", *EXTRAS.get(version, [])])
    return [f"ray[{extras}]=={version}", f"vllm=={PINS[version]}",
            *CONSTRAINTS.get(version, []), *test_requirements()]


def installed_ray(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                          "print(m.version('ray'))"], capture_output=True, text=True)
    return out.stdout.strip()


def run_suite(python: Path, version: str, log: Path, *, smoke: bool = False,
              env: Optional[dict] = None) -> dict:
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run([str(python), "-m", "pytest", "-p", "no:cacheprovider", *SUITE,
                                 *(["-m", "smoke"] if smoke else [])],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    tail = log.read_text(errors="replace")[-3000:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|error|errors|skipped)",
                                                     tail.splitlines()[-1] if tail else "")}
    return {"ray": version, "vllm": PINS[version], "returncode": result.returncode,
            "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
            "seconds": round(time.monotonic() - started), "log": str(log),
            "date": datetime.date.today().isoformat()}


def write_tables(rows: list[dict]) -> None:
    previous = {r["ray"]: r for r in previous_rows()}
    previous.update({r["ray"]: r for r in rows})
    merged = [previous[v] for v in sorted(previous, key=lambda v: tuple(map(int, v.split("."))))]
    (RESULTS / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    lines = ["# Compatibility runs", "",
             f"Written by `tests/compat/run.py`; suite: {', '.join(f'`{s}`' for s in SUITE)}.", "",
             "| Ray | vLLM | passed | failed | minutes | date |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['ray']} | {r['vllm']} | {r['passed']} | {r['failed']} | "
              f"{r['seconds'] / 60:.1f} | {r['date']} |" for r in merged]
    (RESULTS / "RESULTS.md").write_text("\n".join(lines) + "\n")


def newest_release(cache: Path) -> tuple[Optional[str], dict]:
    """The canary: the newest Ray on the index, whether some layout's targets hold in it
    (printed), and the environment its smoke run needs. (None, {}) when none hold."""
    if str(REPO) not in sys.path:  # run as a script: only this directory is on the path
        sys.path.insert(0, str(REPO))
    from tests.compat import canary

    with tempfile.TemporaryDirectory(prefix="rayllm-auth-canary-", dir=cache) as tmp:
        wheel = canary.download_ray(None, Path(tmp))
        version, holding = canary.check_wheel(wheel)
        wanted = canary.vllm_wanted(wheel)
    if not holding:
        print(f"==> Ray {version}: no layout's targets all hold; it needs a new layout record")
        return None, {}
    if version in PINS:
        return version, {}
    pin = canary.vllm_pin(wanted)
    if pin is None:
        print(f"==> Ray {version}: its llm extra names no vLLM version ({wanted})")
        return None, {}
    PINS[version] = pin
    print(f"==> Ray {version} is in no row: smoke run with vLLM {pin} and the escape hatch")
    return version, {"RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default=",".join(PINS),
                        help="comma-separated Ray versions from PINS (default: all), or newest")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rayllm-auth-compat"))
    parser.add_argument("--redo", action="store_true", help="run versions that passed before")
    parser.add_argument("--keep", action="store_true",
                        help="keep each version's virtualenv and wheels after its run")
    parser.add_argument("--smoke", action="store_true",
                        help="only the tests marked smoke; nothing is recorded")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    env = {}
    if args.versions == "newest":
        newest, env = newest_release(args.cache)
        if newest is None:
            return 1
        versions, args.smoke = [newest], True
    else:
        versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    unknown = [v for v in versions if v not in PINS]
    if unknown:
        parser.error(f"no vLLM pin for Ray {', '.join(unknown)}; known: {', '.join(PINS)}")
    passed_before = {r["ray"] for r in previous_rows() if r["failed"] == 0 and r["passed"]}
    rows, not_installed = [], []
    for number, version in enumerate(versions, start=1):
        if version in passed_before and not (args.redo or args.smoke):
            print(f"==> [{number}/{len(versions)}] Ray {version}: passed before, skipped "
                  f"(--redo runs it again)", flush=True)
            continue
        try:
            python = environment(version, args.cache)
        except subprocess.CalledProcessError as failed:  # e.g. pip's resolver gave up
            print(f"==> [{number}/{len(versions)}] Ray {version}: could not install "
                  f"({failed}); going on with the next", flush=True)
            not_installed.append(version)
            continue
        what = "the smoke subset of " if args.smoke else ""
        print(f"==> [{number}/{len(versions)}] Ray {version}: running {what}{' '.join(SUITE)}",
              flush=True)
        log = args.cache / f"ray-{version}{'-smoke' if args.smoke else ''}.log"
        row = run_suite(python, version, log, smoke=args.smoke, env=env)
        print(f"    Ray {version} (vLLM {row['vllm']}): {row['passed']} passed, "
              f"{row['failed']} failed in {row['seconds'] / 60:.1f} min ({log})", flush=True)
        rows.append(row)
        if not args.smoke:
            write_tables(rows)
            subprocess.run([sys.executable, str(RESULTS / "support_table.py")], check=True)
        if not args.keep and python.parent.parent.parent == args.cache:
            for leftover in (python.parent.parent, args.cache / f"wheels-{version}"):
                shutil.rmtree(leftover, ignore_errors=True)
    if not_installed:
        print(f"==> not installed: {', '.join(not_installed)}", flush=True)
    return 0 if all(r["returncode"] == 0 for r in rows) and not not_installed else 1


def previous_rows() -> list[dict]:
    path = RESULTS / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


if __name__ == "__main__":
    sys.exit(main())
