"""A real local Ray cluster for the demo, end-to-end tests and benchmarks, driven the way
KubeRay drives a RayService.

``ray start --head`` with a given environment (what a RayService pod's env would hold) and
an interpreter laid out like a Ray image's (``image_python``),
``serve deploy`` of a Serve config through the dashboard's REST API (the path KubeRay's
operator uses), status read from ``/api/serve/applications/``. The Serve proxy listens on
127.0.0.1:8000. The only stand-in is the engine, through Ray's own ``RAYLLM_VLLM_ENGINE_CLS``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import yaml

BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"
SERVE_URL = "http://127.0.0.1:8000"
#: In the environment of every process of a LocalCluster: its directory (see LocalCluster.stop).
CLUSTER_MARKER = "RAYLLM_AUTH_TEST_CLUSTER"
#: Between two looks at what the cluster reports (an app's status, its metrics). Each look
#: costs the dashboard or the metrics agent little; a longer pause is waited out for nothing.
POLL_S = 1.0
MODEL = "stand-in-model"
STANDIN_ENGINE = "rayllm_auth.testing.engine:StandInEngine"
CHECKOUT = Path(__file__).resolve().parents[2]
#: Not passed on to the cluster: PYTHONDONTWRITEBYTECODE is set machine-wide here, and a
#: pod writes the bytecode of what its runtime_env installs.
WITHHELD_FROM_CLUSTER = {"PYTHONDONTWRITEBYTECODE"}


#: Every route of Ray's OpenAI ingress app (2.60), plus methods and paths it does not serve:
#: without a key, each must be refused before routing.
OPENAI_ROUTES = [
    ("GET", "/v1/models"), ("GET", f"/v1/models/{MODEL}"), ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/score"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/"), ("GET", "/health"),
    ("GET", "/metrics"), ("DELETE", "/v1/models"), ("PUT", "/v1/chat/completions"),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_python(root: Path) -> Path:
    """An interpreter under ``root`` that is this one's, with this environment's packages as
    its own site-packages, but is no virtualenv: what a Ray image's Python is (Ray installed
    in it, no venv). Ray builds a runtime_env's ``pip`` from the interpreter it runs on: from a
    virtualenv it copies the whole virtualenv (here 6 GB, without its bytecode, so every
    cluster compiled Ray, vLLM and torch again: about 80 s per cluster on this machine); from
    an image's Python it makes a small ``virtualenv --system-site-packages``, as on a pod.
    Made of links (the standard library, site-packages, libpython) and a copy of the
    executable, which finds its prefix from its own location (a link would find the real
    one's)."""
    if sys.prefix == sys.base_prefix:
        return Path(sys.executable)  # already an image's interpreter
    stdlib = Path(os.__file__).parent
    lib = root / "lib" / stdlib.name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    (lib / "site-packages").symlink_to(sysconfig.get_paths()["purelib"])
    for library in (Path(sys.base_prefix) / "lib").glob("libpython*"):
        (root / "lib" / library.name).symlink_to(library)  # for a `$ORIGIN/../lib` runpath
    executable = root / "bin" / Path(sys._base_executable).name
    executable.parent.mkdir()
    shutil.copy2(os.path.realpath(sys._base_executable), executable)
    return executable


def build_wheel(out_dir: Path) -> Path:
    """The rayllm-auth wheel, built from the source checkout this module belongs to."""
    if not (CHECKOUT / "pyproject.toml").exists():
        raise RuntimeError(f"build_wheel needs a rayllm-auth source checkout, not {CHECKOUT}")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(CHECKOUT), "-w", str(out_dir)],
        check=True,
    )
    (wheel,) = out_dir.glob("rayllm_auth-*.whl")
    return wheel


def cpu_only(config: dict) -> dict:
    """``config`` (an LLMConfig as a dict) made to run on a quarter CPU, no accelerator, with
    the field the installed Ray uses for it (``resources_per_bundle`` before Ray 2.51; on
    Ray 2.44, which asks one GPU per engine worker, Ray's own test resource that skips them)."""
    from ray.serve.llm import LLMConfig

    config.pop("accelerator_type", None)
    fields = LLMConfig.model_fields
    if "placement_group_config" not in fields and "resources_per_bundle" in fields:
        config["resources_per_bundle"] = {"CPU": 0.25}  # Ray 2.45 to 2.50
        return config
    if "placement_group_config" not in fields:  # Ray 2.44
        # server_models.py: "resources.mock_resource is a special key we used in tests to
        # skip placement group on the gpu nodes"; a zero amount needs no such resource.
        options = config.setdefault("deployment_config", {}).setdefault("ray_actor_options", {})
        options.setdefault("num_cpus", 0.25)
        options.setdefault("resources", {})["mock_resource"] = 0
        return config
    bundle = {"CPU": 0.25}
    try:  # Ray 2.5x validates bundles with a model whose GPU count defaults to 1
        from ray.llm._internal.serve.engines.vllm.vllm_models import BundleConfig

        if BundleConfig.model_fields["GPU"].default:
            bundle["GPU"] = 0.0
    except ImportError:
        pass  # Ray 2.60: plain dict bundles, nothing implied
    config["placement_group_config"] = {"bundles": [bundle]}
    return config


def llm_config(model_id: str = MODEL, **extra) -> dict:
    """A CPU-only LLMConfig: one LLMServer replica with a quarter CPU, no accelerator."""
    return cpu_only({
        "model_loading_config": {"model_id": model_id},
        "deployment_config": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        **extra,
    })


def application(name, route_prefix, *, import_path="ray.serve.llm:build_openai_app",
                 runtime_env=None, **args) -> dict:
    args.setdefault("llm_configs", [llm_config()])
    app = {"name": name, "route_prefix": route_prefix, "import_path": import_path, "args": args}
    if runtime_env:
        app["runtime_env"] = runtime_env
    return app


class LocalCluster:
    """One head node in a private temp dir; ``stop()`` ends every process it started."""

    def __init__(self, env: dict[str, str], *, num_cpus: int = 16):
        self.root = Path(tempfile.mkdtemp(prefix="rlt-", dir="/tmp"))
        self.calls_file = self.root / "engine-calls.log"
        self.usage_file = self.root / "engine-usage.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))
               and k not in WITHHELD_FROM_CLUSTER},
            # the compatibility runner's canary sets it for a release in no row
            **{k: v for k, v in os.environ.items() if k == "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY"},
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            CLUSTER_MARKER: str(self.root),  # how stop() finds the cluster's processes
            "RAY_AUTH_MODE": "disabled",  # Ray's cluster token auth; Serve HTTP is ours to guard
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAYLLM_VLLM_ENGINE_CLS": STANDIN_ENGINE,
            "RAYLLM_AUTH_STANDIN_CALLS_FILE": str(self.calls_file),
            "RAYLLM_AUTH_STANDIN_USAGE_FILE": str(self.usage_file),
            "VLLM_TARGET_DEVICE": "cpu",
            **env,
        }
        self.num_cpus = num_cpus
        self.metrics_port = _free_port()
        self.python = image_python(self.root / "python")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        # Every Ray process, and so every worker without a runtime_env, runs on the
        # interpreter `ray start` ran on: the image's.
        self._run(self.python, "-m", "ray.scripts.scripts", "start", "--head",
                  f"--num-cpus={self.num_cpus}", f"--temp-dir={self.root / 'ray'}",
                  "--dashboard-host=127.0.0.1", f"--metrics-export-port={self.metrics_port}",
                  "--disable-usage-stats")
        return self

    def stop(self, *, remove_dir: bool = True) -> None:
        """Stop the cluster: every process it started, by pid; then (unless ``remove_dir`` is
        False, e.g. for a restart) delete its directory: Ray's logs, the runtime_env
        virtualenvs, the image's interpreter. RAYLLM_AUTH_KEEP_CLUSTER_DIR=1 keeps it for
        debugging. Raises RuntimeError if a process of the cluster outlives 60 s of SIGKILLs."""
        # Not `ray stop`: it ends every Ray process on the machine, whichever cluster it
        # belongs to, and waits about 2 s for each of its three groups of processes to be
        # reaped (7 s a cluster here). Every process of this cluster (Ray's own, workers,
        # the HAProxy Serve starts for direct streaming) inherits CLUSTER_MARKER.
        deadline = time.monotonic() + 60
        while pids := self._pids():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the cluster in {self.root} outlived "
                                   f"SIGKILL: {pids}")
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass  # already gone
            time.sleep(0.05)  # a killed raylet may have started a worker meanwhile: look again
        if remove_dir and os.environ.get("RAYLLM_AUTH_KEEP_CLUSTER_DIR") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    def _pids(self) -> list[int]:
        """This cluster's live processes: those whose environment holds its CLUSTER_MARKER
        (a process that has exited, a zombie included, has none)."""
        marker = f"{CLUSTER_MARKER}={self.root}\0".encode()
        pids = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    with open(f"/proc/{entry.name}/environ", "rb") as environ:
                        if marker in environ.read():
                            pids.append(int(entry.name))
                except OSError:
                    pass  # gone, or not ours to read
        return pids

    def _run(self, program, *args, check=True, env=None, timeout=600):
        """``program`` (a path, or a name in this environment's bin) with ``args``."""
        # cwd: Ray puts the starting directory on every worker's sys.path; a checkout of
        # this repository there would let workers import rayllm_auth without the wheel.
        result = subprocess.run(
            [str(program if isinstance(program, Path) else BIN / program), *map(str, args)],
            env={**self.env, **(env or {})},
            capture_output=True, text=True, timeout=timeout, cwd=self.root,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(map(str, args))} failed:\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        return result

    @property
    def session_dir(self) -> Path:
        return (self.root / "ray" / "session_latest").resolve()

    # -- Serve -------------------------------------------------------------------------------

    def deploy(self, applications: list[dict]) -> None:
        """``serve deploy`` of one config holding ``applications`` (replaces earlier ones)."""
        config = {"http_options": {"host": "127.0.0.1", "port": 8000},
                  "applications": applications}
        path = self.root / "serve-config.yaml"
        path.write_text(yaml.safe_dump(config))
        self._run("serve", "deploy", str(path), "-a", DASHBOARD)

    def run_python(self, code: str, env: dict | None = None, timeout=600):
        """A Python driver connected to this cluster (e.g. one calling serve.run)."""
        return subprocess.run([sys.executable, "-c", code], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def applications(self) -> dict:
        reply = httpx.get(f"{DASHBOARD}/api/serve/applications/", timeout=30)
        reply.raise_for_status()
        return reply.json().get("applications", {})

    def wait_for(self, expected: dict[str, set[str]], timeout: float = 900) -> dict:
        """Wait until each app's status is in its expected set; return all applications.
        Fails at once when an app settles (running, or failed) where it was not expected to."""
        deadline = time.monotonic() + timeout
        while True:
            apps = self.applications()
            status = {name: apps.get(name, {}).get("status") for name in expected}
            if all(status[name] in ok for name, ok in expected.items()):
                return apps
            stuck = [n for n, s in status.items()
                     if s in ("RUNNING", "DEPLOY_FAILED") and s not in expected[n]]
            if stuck or time.monotonic() > deadline:
                summary = {n: (a.get("status"), a.get("message", "")[-1500:])
                           for n, a in apps.items() if n in stuck or not stuck}
                raise RuntimeError(f"applications not ready: {json.dumps(summary, indent=1)}")
            time.sleep(POLL_S)

    def engine_calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    def engine_usage(self) -> list[str]:
        """Every usage the stand-in engine reported: ``<method> <model> prompt=N completion=N``."""
        return self.usage_file.read_text().splitlines() if self.usage_file.exists() else []

    def wait_for_tokens_counted(self, key_id: str, expected: dict, timeout: float = 60) -> None:
        """Wait until ray_rayllm_auth_tokens_total for ``key_id`` is exactly ``expected``
        ({(model, kind): tokens}); fail with both if it is not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while (counted := tokens_counted(self.metrics(), key_id)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"tokens counted for {key_id}: {counted}, "
                                     f"the engine reported {expected}")
            time.sleep(POLL_S)

    def metrics(self) -> str:
        """Ray's Prometheus endpoint (the node's metrics agent)."""
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text

    def log_files(self):
        return [p for p in (self.session_dir / "logs").rglob("*") if p.is_file()]

    def places_holding(self, secrets: list[str]) -> list[str]:
        """Where any of ``secrets`` appears: Ray's log files, Serve's status and config
        API, the metrics endpoint. For leak audits: the answer should be []."""
        raw = [s.encode() for s in secrets]
        places = [str(p) for p in self.log_files() if any(s in p.read_bytes() for s in raw)]
        outputs = {
            "serve status API": json.dumps(self.applications()),
            "serve config": self._run("serve", "config", "-a", DASHBOARD).stdout,
            "metrics endpoint": self.metrics(),
        }
        places += [name for name, text in outputs.items() if any(s in text for s in secrets)]
        return places


def token_totals(usage_lines: list[str]) -> dict:
    """{(model, kind): tokens} from the stand-in engine's usage lines."""
    totals = {}
    for line in usage_lines:
        _method, model, *counts = line.split()
        for kind, count in (c.split("=") for c in counts):
            if int(count):
                totals[(model, kind)] = totals.get((model, kind), 0) + int(count)
    return totals


def tokens_counted(metrics: str, key_id: str) -> dict:
    """{(model, kind): tokens} of ray_rayllm_auth_tokens_total for ``key_id``."""
    counted = {}
    for labels, value in re.findall(r"^ray_rayllm_auth_tokens_total\{([^}]*)\} (\S+)$",
                                    metrics, re.M):
        tags = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if tags.get("key_id") == key_id:
            label = (tags["model"], tags["kind"])
            counted[label] = counted.get(label, 0) + int(float(value))
    return counted


#: The ingress deployment's class name: OpenAiIngress from Ray 2.51, LLMRouter before.
INGRESS_CLASSES = (":OpenAiIngress", ":LLMRouter")


def ingress_pids() -> dict[str, int]:
    """{application name: pid of an ingress replica}, from Ray's state API."""
    return {app: pids[-1] for app, pids in every_ingress_pid().items()}


def every_ingress_pid() -> dict[str, list[int]]:
    """{application name: pids of all its ingress replicas} (Ray 2.44 to 2.49 start two
    LLMRouter replicas per model), from Ray's state API."""
    reply = httpx.get(f"{DASHBOARD}/api/v0/actors", timeout=30, params={
        "detail": "1", "limit": "10000", "filter_keys": "state", "filter_predicates": "=",
        "filter_values": "ALIVE"})
    reply.raise_for_status()
    pids = {}
    for actor in reply.json()["data"]["result"]["result"]:
        name = actor.get("class_name", "")  # ServeReplica:<app>:OpenAiIngress
        if name.endswith(INGRESS_CLASSES):
            pids.setdefault(name.split(":")[1], []).append(actor["pid"])
    return pids
