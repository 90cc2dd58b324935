"""Shared fixtures. Keys are random per run, so a leak audit can search for them."""

import json
import os
import secrets
import sys

import pytest

# vLLM picks its platform once, at first use; this machine has no GPU (the engine is never run,
# but vLLM's own app is built for direct-streaming tests).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

from rayllm_auth.keys import KEY_SOURCES


def new_key() -> str:
    return "sk-test-" + secrets.token_urlsafe(32)


def near_miss(key: str) -> str:
    """``key`` with its last character changed: never equal to it (a fixed replacement
    would be, for one key in 64)."""
    return key[:-1] + ("Y" if key.endswith("Z") else "Z")


@pytest.fixture
def key_env(monkeypatch):
    """Three keys: two in RAY_LLM_API_KEYS (one named), one in VLLM_API_KEY."""
    keys = {"team-a": new_key(), "unnamed": new_key(), "vllm": new_key()}
    for name in KEY_SOURCES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_LLM_API_KEYS", f"team-a:{keys['team-a']}, {keys['unnamed']}")
    monkeypatch.setenv("VLLM_API_KEY", keys["vllm"])
    monkeypatch.delenv("RAY_LLM_AUTH_EXEMPT_PATHS", raising=False)
    return keys


@pytest.fixture
def no_key_env(monkeypatch):
    for name in KEY_SOURCES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def reached():
    """Names of the handlers a request reached, filled by tests.ray_app's handlers."""
    return []


@pytest.fixture
def app(key_env, reached):
    """Ray's own ingress app (ingress.init() and its routes), protected, keys from key_env."""
    from tests.ray_app import build_ray_app

    return build_ray_app(reached)


@pytest.fixture
def fresh_metrics():
    """Counts recorded by this test only: rayllm_auth.metrics' pending counts start empty."""
    from rayllm_auth import metrics

    metrics.flush()
    metrics._expiries.clear()  # as in a fresh replica process
    yield
    metrics.flush()


def _hostile_counts() -> dict:
    """How many hostile inputs this process's property tests generated."""
    # The module can be imported twice (as collected, and as tests.test_hostile_inputs by the
    # modules that reuse its strategies): add up every copy's counts.
    counts = {"requests": 0, "websockets": 0}
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] == "test_hostile_inputs":
            for kind in counts:
                counts[kind] += getattr(module, "GENERATED", {}).get(kind, 0)
    return counts


E2E_DIR = "tests/e2e/"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: every end-to-end test on one worker, in file order, the unit tests
    spread over the others. Local clusters use fixed ports (8000, 8265), so only one may run
    at a time. (xdist's ``loadgroup`` marks groups by renaming node ids, which pytest 9.2
    ignores; choosing the scope here does not depend on that.)"""
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return E2E_DIR if nodeid.startswith(E2E_DIR) else nodeid

    return EndToEndOnOneWorker(config, log)


#: Unit tests yield the CPU to the end-to-end worker: under -n 2 the clusters' start-up
#: competes with them (a cluster's setup took 211 s instead of 108), while the clusters
#: leave about a quarter of both cores idle, which the unit tests fill at the lowest priority.
UNIT_TEST_NICENESS = 19


def _can_restore_priority() -> bool:
    """Only root may lower a process's niceness again (after a unit test, for a test marked
    ``wall_clock`` or an end-to-end test): elsewhere every test keeps the default."""
    return hasattr(os, "setpriority") and os.geteuid() == 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a unit test (fixtures included) runs at the lowest priority unless
    marked ``wall_clock``; every other test, and anything without xdist, at the default."""
    lowered = (os.environ.get("PYTEST_XDIST_WORKER") is not None
               and not item.nodeid.startswith(E2E_DIR)
               and item.get_closest_marker("wall_clock") is None
               and _can_restore_priority())
    if lowered:
        os.setpriority(os.PRIO_PROCESS, 0, UNIT_TEST_NICENESS)
    try:
        yield
    finally:
        if lowered:
            os.setpriority(os.PRIO_PROCESS, 0, 0)


_from_workers = {"requests": 0, "websockets": 0}  # pytest-xdist: what each worker reported


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: report to the controller
        session.config.workeroutput["hostile_counts"] = json.dumps(_hostile_counts())


def pytest_testnodedown(node, error):  # pytest-xdist hook, in the controller
    for kind, n in json.loads(node.workeroutput.get("hostile_counts", "{}")).items():
        _from_workers[kind] += n


_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown time, summed per test file (also for xdist workers' reports)."""
    path = report.nodeid.split("::")[0]
    _seconds_per_file[path] = _seconds_per_file.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Say how many hostile inputs the property tests generated in this run, and where the
    time went, file by file (where a faster suite has to start)."""
    counts = {kind: n + _from_workers[kind] for kind, n in _hostile_counts().items()}
    if any(counts.values()):
        terminalreporter.write_line(
            f"hostile inputs generated: {counts['requests']:,} HTTP requests and "
            f"{counts['websockets']:,} WebSocket handshakes, none let through"
        )
    if _seconds_per_file:
        slowest = sorted(_seconds_per_file.items(), key=lambda item: -item[1])
        terminalreporter.write_line("seconds per test file: " + ", ".join(
            f"{path} {seconds:.0f}" for path, seconds in slowest))
