"""The replica-side guard, called as Serve calls it: which replicas it protects, and how it
refuses to start. Real Ray classes; no cluster, nothing patched globally."""

import inspect
import logging
import types

import pytest
from fastapi import FastAPI

from rayllm_auth.errors import ConfigError
from rayllm_auth.middleware import ApiKeyMiddleware
from rayllm_auth.patches.core_ingress_layout import LAYOUT
from rayllm_auth.patching import replica_guard
from rayllm_auth.protect import is_protected, protect_app


SERVED = "the-served-model"


def instance_of(cls, model_id=SERVED):
    """A Serve replica object, without running its constructor; one-model servers know
    their model from their LLMConfig."""
    instance = object.__new__(cls)
    if model_id is not None:
        instance._llm_config = types.SimpleNamespace(model_id=model_id)
    return instance


@pytest.fixture(scope="module")
def ray_classes():
    from ray.llm._internal.serve.core.ingress.dev_ingress import DevIngress
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
    from ray.llm._internal.serve.core.ingress.router import LLMRouter
    from ray.llm._internal.serve.core.server.llm_server import LLMServer
    from ray.llm._internal.serve.engines.sglang.sglang_engine import SGLangServer
    from ray.llm._internal.serve.serving_patterns.data_parallel.dp_server import DPServer
    from ray.llm._internal.serve.serving_patterns.prefill_decode.pd_server import PDDecodeServer

    client_facing = [OpenAiIngress, DevIngress, LLMServer, DPServer, PDDecodeServer, SGLangServer]
    return client_facing, LLMRouter


def guard(instance, app):
    received = []
    replica_guard(LAYOUT)(lambda a: received.append(a), instance, (app,), {})
    return received[0]


def test_client_facing_replicas_are_protected(key_env, ray_classes):
    client_facing, _ = ray_classes
    for cls in client_facing:
        app = guard(instance_of(type("Deployed", (cls,), {})), FastAPI())
        assert is_protected(app), cls


def served_model(app):
    (entry,) = [m for m in app.user_middleware if m.cls is ApiKeyMiddleware]
    return entry.kwargs["served_model"]


def test_direct_streaming_replicas_tell_the_middleware_their_one_model(key_env, ray_classes):
    # Their app (vLLM's or SGLang's own) serves that model whatever a request names.
    client_facing, _ = ray_classes
    expected = {"OpenAiIngress": None, "DevIngress": None, "LLMServer": SERVED,
                "DPServer": SERVED, "PDDecodeServer": SERVED, "SGLangServer": SERVED}
    for cls in client_facing:
        app = guard(instance_of(type("Deployed", (cls,), {})), FastAPI())
        assert served_model(app) == expected[cls.__name__], cls


def test_a_one_model_replica_that_cannot_name_its_model_refuses_to_start(key_env, ray_classes):
    llm_server = ray_classes[0][2]
    with pytest.raises(ConfigError, match="cannot tell which model"):
        guard(instance_of(llm_server, model_id=None), FastAPI())


def test_a_builder_protected_app_learns_the_served_model(key_env, ray_classes):
    app = protect_app(FastAPI())
    guard(instance_of(ray_classes[0][2]), app)
    assert served_model(app) == SERVED


def test_llm_router_is_never_touched(key_env, ray_classes):
    _, router = ray_classes
    app = FastAPI()
    assert guard(instance_of(router), app) is app and not is_protected(app)


def test_builder_protected_app_is_not_protected_twice(key_env, ray_classes):
    app = protect_app(FastAPI())
    guard(instance_of(ray_classes[0][0]), app)
    assert sum(m.cls is ApiKeyMiddleware for m in app.user_middleware) == 1


def test_bad_key_variable_refuses_to_start(monkeypatch, ray_classes):
    monkeypatch.setenv("VLLM_API_KEY", "  ")
    with pytest.raises(ConfigError, match="VLLM_API_KEY is set but empty"):
        guard(instance_of(ray_classes[0][0]), FastAPI())


def test_protected_app_without_keys_here_refuses_to_start(no_key_env, ray_classes):
    with pytest.raises(ConfigError, match="none of RAY_LLM_API_KEYS, VLLM_API_KEY, RAY_LLM_API_KEYS_FILE is set"):
        guard(instance_of(ray_classes[0][0]), protect_app(FastAPI()))


def test_no_keys_anywhere_is_stock_with_one_log_line(no_key_env, ray_classes, caplog):
    app = FastAPI()
    with caplog.at_level(logging.WARNING, logger="rayllm_auth"):
        assert guard(instance_of(ray_classes[0][0]), app) is app
    assert not is_protected(app)
    assert "API key auth is OFF for OpenAiIngress" in caplog.text


def test_app_passed_by_keyword_is_protected_too(key_env, ray_classes):
    received = []
    replica_guard(LAYOUT)(lambda app: received.append(app), instance_of(ray_classes[0][0]),
                              (), {"app": FastAPI()})
    assert is_protected(received[0])


def test_any_asgi_callable_is_wrapped(key_env, ray_classes):
    async def bare_app(scope, receive, send):
        pass

    wrapped = guard(instance_of(ray_classes[0][2]), bare_app)
    assert isinstance(wrapped, ApiKeyMiddleware) and wrapped.app is bare_app


def test_app_builder_function_gets_its_app_protected(key_env, ray_classes):
    # Ray before 2.60 hands ASGIAppReplicaWrapper.__init__ an app *or a function building it*.
    received = []
    replica_guard(LAYOUT)(lambda app_or_func: received.append(app_or_func),
                              instance_of(ray_classes[0][0]), (lambda: FastAPI(),), {})
    (builder,) = received
    assert inspect.isfunction(builder) and is_protected(builder())
