"""Activation in real interpreters: what the .pth does (and does not do) at start-up, the
patches it applies when Serve LLM is imported, idempotency, the kill switch, and failing
closed on an unsupported Ray or a changed layout.

Start-up itself is checked in new interpreters (run_python); everything from importing Serve
LLM on runs in children of a fork server that already imported vLLM (run_forked), which
saves about 12 s per test and changes nothing rayllm-auth does (tests/fresh_python.py)."""

import re

import pytest

from rayllm_auth._bootstrap import KEY_SOURCES, RAY_WORKER_MARKER
from rayllm_auth.support import LAYOUTS
from tests.fresh_python import PTH, check, run_forked, run_python

KEY = {"RAY_LLM_API_KEYS": "sk-activation-test-key-0123456789"}

INSPECT_PATCHES = """
import wrapt
from ray.llm._internal.serve.core.ingress import ingress
from ray.serve._private import http_util
def layers(f):
    n = 0
    while isinstance(f, wrapt.FunctionWrapper):
        n, f = n + 1, f.__wrapped__
    return n
import inspect
print("init", layers(inspect.getattr_static(ingress, "init")))
print("make_fastapi_ingress", layers(inspect.getattr_static(ingress, "make_fastapi_ingress")))
print("set_asgi_app", layers(inspect.getattr_static(http_util.ASGIAppReplicaWrapper, "_set_asgi_app")))
"""


def wrapped_layers(stdout):
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+) (\d+)$", stdout, re.M)}


def test_pth_checks_exactly_the_key_sources_and_the_ray_worker_marker():
    text = PTH.read_text()
    assert text.count("\n") == 1 and text.startswith("import os;")
    assert set(re.findall(r'"([A-Z_]+)" in os.environ', text)) == {*KEY_SOURCES, RAY_WORKER_MARKER}


def test_without_key_source_start_up_does_nothing():
    out = check(run_python(
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rayllm_auth', 'wrapt', 'ray'))))\n"
        "print([type(f).__name__ for f in sys.meta_path])\n"
    ))
    assert out.splitlines()[0] == "[]"
    assert "_ServeLlmTrigger" not in out


def test_with_key_source_start_up_only_arms_a_trigger():
    out = check(run_python(
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.startswith(('rayllm_auth', 'wrapt', 'ray'))))\n"
        "print(type(sys.meta_path[0]).__name__)\n", env=KEY,
    ))
    loaded, first_finder = out.splitlines()
    assert loaded == "['rayllm_auth', 'rayllm_auth._bootstrap']"  # no wrapt, no Ray
    assert first_finder == "_ServeLlmTrigger"


def test_importing_serve_llm_patches_builder_and_replica_exactly_once():
    code = ("import rayllm_auth; rayllm_auth.install(); rayllm_auth.install()\n"
            + INSPECT_PATCHES + "import ray.serve.llm; rayllm_auth.install()\n" + INSPECT_PATCHES)
    out = check(run_python(code, env=KEY))
    assert wrapped_layers(out) == {"init": 1, "make_fastapi_ingress": 1, "set_asgi_app": 1}
    assert out.count("init 1") == 2


def test_app_built_in_a_patched_process_carries_one_middleware():
    out = check(run_forked("""
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress
from rayllm_auth.middleware import ApiKeyMiddleware
app = init()
print("init", [m.cls.__name__ for m in app.user_middleware][:2])
from fastapi import FastAPI
custom = FastAPI()
make_fastapi_ingress(OpenAiIngress, app=custom)
print("custom", [m.cls is ApiKeyMiddleware for m in custom.user_middleware])
""", env=KEY))
    assert "init ['ApiKeyMiddleware', 'SetRequestIdMiddleware']" in out
    assert "custom [True]" in out


def test_kill_switch_turns_auto_patching_off():
    out = check(run_forked("import sys; import ray.llm; print('rayllm_auth.activation' in sys.modules)",
                           env={**KEY, "RAY_LLM_AUTH_DISABLE_AUTOPATCH": "1"}))
    assert out.strip() == "False"


def test_ray_worker_without_keys_only_guards_replicas():
    out = check(run_forked(INSPECT_PATCHES, env={RAY_WORKER_MARKER: "1"}))
    assert wrapped_layers(out) == {"init": 0, "make_fastapi_ingress": 0, "set_asgi_app": 1}


def test_bad_key_variable_fails_the_build_with_its_name():
    result = run_forked(
        "from ray.llm._internal.serve.core.ingress.ingress import init; init()",
        env={"RAY_LLM_API_KEYS": " , "},
    )
    assert result.returncode != 0
    assert "ConfigError: RAY_LLM_API_KEYS is set but holds no key" in result.stderr


FAIL_CLOSED_PROBE = """
import importlib
for attempt in (1, 2):
    for name in ("ray.serve.llm", "ray.llm._internal.serve.core.ingress.ingress"):
        try:
            importlib.import_module(name)
            print("IMPORTED", attempt, name)
        except ImportError as exc:
            print("REFUSED", attempt, name, type(exc).__name__, exc)
"""


def assert_failed_closed(out):
    assert "IMPORTED" not in out, out
    assert out.count("REFUSED") == 4 and out.count("AuthUnavailableError") == 4


def test_unsupported_ray_version_is_refused_on_every_import():
    out = check(run_forked("import ray; ray.__version__ = '2.61.0'\n" + FAIL_CLOSED_PROBE, env=KEY))
    assert_failed_closed(out)
    assert "Ray 2.61.0 is not supported" in out and LAYOUTS[-1].ray in out


def test_unsupported_ray_without_keys_stays_stock():
    out = check(run_forked("import ray; ray.__version__ = '2.61.0'\n" + FAIL_CLOSED_PROBE,
                           env={RAY_WORKER_MARKER: "1"}))
    assert out.count("IMPORTED") == 4


def test_changed_layout_fails_closed_even_on_a_second_import():
    # A hook registered before ours runs first and removes `init`, as a Ray release that
    # renamed it would. wrapt forgets a hook that raised; the block must not depend on it.
    simulate = ("import wrapt\n"
                "wrapt.register_post_import_hook(lambda m: delattr(m, 'init'),"
                " 'ray.llm._internal.serve.core.ingress.ingress')\n")
    out = check(run_forked(simulate + FAIL_CLOSED_PROBE, env=KEY))
    assert_failed_closed(out)
    assert "ingress has no init" in out and "Ray 2.60.0" in out


def test_explicit_builder_is_importable_by_serve():
    out = check(run_forked(
        "from ray.serve._private.utils import import_attr\n"
        "f = import_attr('rayllm_auth:build_openai_app'); print(f.__module__, f.__name__)"))
    assert out.strip() == "rayllm_auth.builders build_openai_app"


# Ray's builders read the driver's runtime_env (`ray.get_runtime_context().runtime_env`, in
# `LLMServer.get_deployment_options`), and that call starts a whole local Ray node in a process
# without one: 10 s of CPU per probe, and under a loaded machine its GCS start can time out (it
# did in CI on 2026-11-29). rayllm-auth never reads the runtime_env, and these probes inspect the
# app the builder froze, so they give the builder what a driver without a runtime_env has.
# Apps built by Ray's builders on a real cluster: tests/e2e.
DRIVER_WITHOUT_RAY_NODE = """
import types, ray
ray.get_runtime_context = lambda: types.SimpleNamespace(runtime_env={})
"""

BUILDERS_PROBE = DRIVER_WITHOUT_RAY_NODE + """
import inspect
from ray.serve.llm import LLMConfig, build_openai_app, build_dp_openai_app, build_pd_openai_app
from ray.llm._internal.serve.core.ingress.dev_ingress import build_dev_openai_app
from rayllm_auth.protect import is_protected

def cfg(**extra):
    return LLMConfig(model_loading_config={"model_id": "m"},
                     placement_group_config={"bundles": [{"CPU": 0.25}]}, **extra)

def frozen_app(application):  # the app serve.ingress() pickled into the ingress deployment
    cls = application._bound_deployment.func_or_class
    return inspect.getclosurevars(cls.__init__).nonlocals["frozen_app_or_func"]

kv = {"kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": "kv_both"}}
builds = {
    "openai": lambda: build_openai_app({"llm_configs": [cfg()]}),
    "custom_ingress_cls": lambda: build_openai_app({"llm_configs": [cfg()], "ingress_cls_config": {
        "ingress_cls": "ray.llm._internal.serve.core.ingress.dev_ingress:DevIngress"}}),
    "dev": lambda: build_dev_openai_app({"llm_configs": [cfg()]}),
    "dp": lambda: build_dp_openai_app({"llm_config": cfg(engine_kwargs={"data_parallel_size": 2})}),
    "pd": lambda: build_pd_openai_app({"prefill_config": cfg(engine_kwargs=kv),
                                       "decode_config": cfg(engine_kwargs=kv)}),
}
print("RESULT", {name: is_protected(frozen_app(build())) for name, build in builds.items()})
print("RAY NODE", ray.is_initialized())
"""


@pytest.mark.parametrize("keys, protected", [(KEY, True), ({}, False)], ids=["keys", "no-keys"])
def test_every_ray_builder_freezes_a_protected_app_only_with_keys(keys, protected):
    out = check(run_forked(BUILDERS_PROBE, env=keys))
    result = eval(re.search(r"^RESULT (.*)$", out, re.M).group(1))
    assert result == dict.fromkeys(["openai", "custom_ingress_cls", "dev", "dp", "pd"], protected)
    assert "RAY NODE False" in out


EXPLICIT_BUILD = DRIVER_WITHOUT_RAY_NODE + """
import inspect, sys
import rayllm_auth
from ray.serve.llm import LLMConfig
from rayllm_auth.protect import is_protected
app = rayllm_auth.build_openai_app({"llm_configs": [LLMConfig(
    model_loading_config={"model_id": "m"}, placement_group_config={"bundles": [{"CPU": 0.25}]})]})
frozen = inspect.getclosurevars(app._bound_deployment.func_or_class.__init__).nonlocals[
    "frozen_app_or_func"]
print("PROTECTED", is_protected(frozen))
print("RAY NODE", ray.is_initialized())
"""


def test_explicit_builder_protects_without_any_auto_activation():
    # Kill switch on, no key in the building process: only the explicit call can protect.
    out = check(run_forked(EXPLICIT_BUILD, env={"RAY_LLM_AUTH_DISABLE_AUTOPATCH": "1"}))
    assert "PROTECTED True" in out and "RAY NODE False" in out


def test_explicit_builder_refuses_direct_streaming_it_cannot_protect():
    result = run_forked(EXPLICIT_BUILD, env={"RAY_LLM_AUTH_DISABLE_AUTOPATCH": "1",
                                             "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"})
    assert result.returncode != 0
    assert "ConfigError: RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING builds the app inside" in result.stderr


def test_escape_hatch_tries_the_nearest_layout_on_an_untested_newer_ray():
    out = check(run_forked("import ray; ray.__version__ = '2.61.0'\n" + INSPECT_PATCHES,
                           env={**KEY, "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}))
    assert wrapped_layers(out) == {"init": 1, "make_fastapi_ingress": 1, "set_asgi_app": 1}


def test_escape_hatch_never_helps_an_older_ray_or_a_changed_layout():
    older = check(run_forked("import ray; ray.__version__ = '2.40.0'\n" + FAIL_CLOSED_PROBE,
                             env={**KEY, "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}))
    assert_failed_closed(older)
    simulate = ("import ray, wrapt; ray.__version__ = '2.61.0'\n"
                "wrapt.register_post_import_hook(lambda m: delattr(m, 'init'),"
                " 'ray.llm._internal.serve.core.ingress.ingress')\n")
    changed = check(run_forked(simulate + FAIL_CLOSED_PROBE,
                               env={**KEY, "RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}))
    assert_failed_closed(changed)
    assert "ingress has no init" in changed
