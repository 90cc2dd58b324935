"""The patch modules for older Ray layouts, on stand-ins of the Ray modules they patch (the
installed Ray is 2.60; tests/compat/run.py runs the real end-to-end suite on each older Ray).

Each stand-in module has exactly the names the layout record requires, shaped as in that Ray
release: Ray 2.44-2.49 create ``fastapi_router_app`` while ``router.py`` is imported, and Ray
before 2.60 hands a replica its app (or a function building it) in
``ASGIAppReplicaWrapper.__init__(app_or_func)``."""

import sys
import types

import pytest
from fastapi import FastAPI
from ray.serve.exceptions import RayServeException

from rayllm_auth.errors import ConfigError
from rayllm_auth.patches import (core_ingress_init_layout, router_module_app_layout,
                                 router_module_init_layout, router_module_layout)
from rayllm_auth.patching import LayoutMismatch, apply
from rayllm_auth.protect import is_protected
from rayllm_auth.support import choose_layout

ROUTER = router_module_layout.LAYOUT


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def http_util(monkeypatch):
    class ASGIAppReplicaWrapper:
        def __init__(self, app_or_func):
            self._asgi_app = app_or_func() if isinstance(app_or_func, types.FunctionType) \
                else app_or_func

    return fake_module(monkeypatch, "ray.serve._private.http_util",
                       ASGIAppReplicaWrapper=ASGIAppReplicaWrapper)


def replica(http_util, client_class, app_or_func):
    """What serve.ingress does in the replica: a class deriving from the user's class and
    ASGIAppReplicaWrapper, whose __init__ hands over the frozen app."""
    class Replica(client_class, http_util.ASGIAppReplicaWrapper):
        def __init__(self):
            http_util.ASGIAppReplicaWrapper.__init__(self, app_or_func)

    return Replica()


def test_versions_select_these_records():
    for version in ("2.44.1", "2.45.0", "2.46.0"):
        assert choose_layout(version, enforce=True).layout is router_module_app_layout.LAYOUT
    assert choose_layout("2.47.1", enforce=True).layout is ROUTER
    assert choose_layout("2.48.0", enforce=True).layout is ROUTER
    assert choose_layout("2.49.2", enforce=True).layout is ROUTER
    for version in ("2.50.0", "2.50.1"):
        assert choose_layout(version, enforce=True).layout is router_module_init_layout.LAYOUT
    assert choose_layout("2.54.1", enforce=True).layout is core_ingress_init_layout.LAYOUT


@pytest.mark.parametrize("by_keyword", [False, True], ids=["positional", "app="])
def test_the_2_46_record_guards_a_replica_handed_its_frozen_app_as_app(
        key_env, monkeypatch, by_keyword):
    class ASGIAppReplicaWrapper:  # Ray 2.44-2.46: a frozen app only, named app
        def __init__(self, app):
            self._asgi_app = app

    http_util = fake_module(monkeypatch, "ray.serve._private.http_util",
                            ASGIAppReplicaWrapper=ASGIAppReplicaWrapper)
    layout = router_module_app_layout.LAYOUT
    (cls,) = layout.client_facing
    client_facing = type(cls.name, (), {})
    fake_module(monkeypatch, cls.module, **{cls.name: client_facing})
    apply(layout, http_util, builder_side=False)

    class Replica(client_facing, http_util.ASGIAppReplicaWrapper):
        def __init__(self, app):
            if by_keyword:
                http_util.ASGIAppReplicaWrapper.__init__(self, app=app)
            else:
                http_util.ASGIAppReplicaWrapper.__init__(self, app)

    assert is_protected(Replica(FastAPI())._asgi_app)


def test_router_layout_protects_the_module_level_app_once(key_env, monkeypatch):
    class LLMRouter:
        pass

    router = fake_module(monkeypatch, router_module_layout.ROUTER_MODULE,
                         fastapi_router_app=FastAPI(), LLMRouter=LLMRouter)
    apply(ROUTER, router, builder_side=True)
    apply(ROUTER, router, builder_side=True)
    assert is_protected(router.fastapi_router_app)
    names = [m.cls.__name__ for m in router.fastapi_router_app.user_middleware]
    assert names.count("ApiKeyMiddleware") == 1 and names[0] == "ApiKeyMiddleware"


def test_router_layout_fails_closed_when_the_app_moved(key_env, monkeypatch):
    router = fake_module(monkeypatch, router_module_layout.ROUTER_MODULE, LLMRouter=object)
    with pytest.raises(LayoutMismatch, match="has no fastapi_router_app"):
        apply(ROUTER, router, builder_side=True)


def test_router_layout_refuses_an_unusable_key_variable(monkeypatch):
    monkeypatch.setenv("RAY_LLM_API_KEYS", " , ")
    router = fake_module(monkeypatch, router_module_layout.ROUTER_MODULE,
                         fastapi_router_app=FastAPI(), LLMRouter=object)
    with pytest.raises(ConfigError, match="RAY_LLM_API_KEYS is set but holds no key") as raised:
        apply(ROUTER, router, builder_side=True)
    # Serve's own exception type too: its build task reports that one at once, without the
    # three retries it gives any other exception (tests/e2e/test_serve_cluster.py counts them).
    assert isinstance(raised.value, RayServeException)


@pytest.mark.parametrize("layout", [ROUTER, router_module_init_layout.LAYOUT,
                                    core_ingress_init_layout.LAYOUT], ids=lambda l: l.name)
@pytest.mark.parametrize("built_in_replica", [False, True], ids=["frozen app", "app builder"])
def test_replica_side_protects_client_facing_replicas_only(key_env, monkeypatch, http_util,
                                                          layout, built_in_replica):
    (cls,) = layout.client_facing
    client_facing = type(cls.name, (), {})
    fake_module(monkeypatch, cls.module, **{cls.name: client_facing})
    apply(layout, http_util, builder_side=False)
    apply(layout, http_util, builder_side=True)  # idempotent; the builder side is elsewhere

    def app_or_func():
        return FastAPI()

    given = app_or_func if built_in_replica else FastAPI()
    protected = replica(http_util, client_facing, given)._asgi_app
    assert is_protected(protected)
    assert [m.cls.__name__ for m in protected.user_middleware].count("ApiKeyMiddleware") == 1
    other = replica(http_util, type("Internal", (), {}), FastAPI())._asgi_app
    assert not is_protected(other)


def test_replica_side_without_keys_refuses_an_app_built_to_be_protected(
        no_key_env, monkeypatch, http_util):
    client_facing = type("LLMRouter", (), {})
    fake_module(monkeypatch, router_module_layout.ROUTER_MODULE, LLMRouter=client_facing)
    apply(ROUTER, http_util, builder_side=False)
    from rayllm_auth.protect import protect_app

    monkeypatch.setenv("RAY_LLM_API_KEYS", "sk-only-to-build-0123456789abcdef")
    built = protect_app(FastAPI())
    monkeypatch.delenv("RAY_LLM_API_KEYS")
    with pytest.raises(ConfigError, match="none of RAY_LLM_API_KEYS"):
        replica(http_util, client_facing, built)


def test_the_2_50_record_protects_init_and_the_app_make_fastapi_ingress_is_given(
        key_env, monkeypatch):
    frozen = []

    def make_fastapi_ingress(cls, *, endpoint_map=None, app=None):  # 2.50's signature
        frozen.append(app if app is not None else router.init())
        return cls

    router = fake_module(monkeypatch, router_module_layout.ROUTER_MODULE, init=FastAPI,
                         make_fastapi_ingress=make_fastapi_ingress, OpenAiIngress=object)
    layout = router_module_init_layout.LAYOUT
    apply(layout, router, builder_side=True)
    router.make_fastapi_ingress(object)
    router.make_fastapi_ingress(object, app=FastAPI())
    assert len(frozen) == 2 and all(is_protected(app) for app in frozen)


def raw_response_model():
    """The fields of Ray 2.44 to 2.48's LLMRawResponse the stand-in engine fills."""
    from typing import Optional

    from pydantic import BaseModel

    class LLMRawResponse(BaseModel):
        generated_text: str
        num_input_tokens: int
        num_generated_tokens: int
        finish_reason: Optional[str] = None

    return LLMRawResponse


def test_the_stand_in_engine_serves_ray_2_44_to_2_48s_protocol_on_their_generation_request(
        monkeypatch):
    # Ray 2.46.0 passed 14 of 25 end-to-end tests: every generation request was a 500,
    # because the stand-in carried its fields in GenerationRequest.metadata, a field 2.44 to
    # 2.46 do not have (pydantic dropped it). These are 2.46's fields.
    import asyncio
    from typing import List, Union

    from pydantic import BaseModel

    from rayllm_auth.testing import engine

    class GenerationRequest(BaseModel):
        prompt: Union[str, List[int], List[str]]
        request_id: Union[str, List[str]]
        stream: bool = False

    fake_module(monkeypatch, "ray.llm._internal.serve.configs.server_models",
                GenerationRequest=GenerationRequest, LLMRawResponse=raw_response_model())
    engine._standin_request_class.cache_clear()

    class Prompt:  # what LLMServer._predict hands the engine
        prompt = "three prompt words"
        parameters = {"model": "m", "max_tokens": 3}

        def to_unformatted_string(self):
            return self.prompt

    async def generate():
        stand_in = engine.StandInEngine(types.SimpleNamespace(model_id="m"))
        request = await stand_in.prepare_request("id-1", Prompt(), stream=False)
        return [r async for r in stand_in.generate(request)]

    try:
        responses = asyncio.run(generate())
    finally:
        engine._standin_request_class.cache_clear()
    assert [r.generated_text for r in responses] == [w + " " for w in engine.WORDS[:3]]
    assert {r.num_input_tokens for r in responses} == {3}
    assert [r.finish_reason for r in responses] == [None, None, "length"]


def test_the_stand_in_engine_serves_ray_2_44_and_2_45s_prompts_formatted_by_llmserver(
        monkeypatch, tmp_path):
    # Ray 2.45.0 passed 14 of 25 end-to-end tests: LLMServer formats chat prompts itself there,
    # with the model's processor (HuggingFacePromptFormat: "processor is not set" without
    # vLLM's engine), and calls generate(request, stream) on a request holding the formatted
    # text and the sampling parameters.
    import asyncio

    from rayllm_auth.testing import engine

    fake_module(monkeypatch, "ray.llm._internal.serve.configs.server_models",
                LLMRawResponse=raw_response_model())
    monkeypatch.setenv(engine.CALLS_FILE_VAR, str(tmp_path / "calls"))

    class PromptFormat:  # 2.45's HuggingFacePromptFormat: the processor set by the engine
        def set_processor(self, model_id_or_path, trust_remote_code=False):
            raise AssertionError("would load the model's files")

        def generate_prompt(self, messages):
            conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
            return self._processor.apply_chat_template(
                conversation=conversation, tokenize=False, add_generation_prompt=True)

    config = types.SimpleNamespace(model_id="m", prompt_format=PromptFormat())
    chat = config.prompt_format.generate_prompt  # raises until the engine has started

    async def generate(text, max_tokens):
        request = types.SimpleNamespace(
            prompt=text, sampling_params=types.SimpleNamespace(max_tokens=max_tokens))
        return [r async for r in stand_in.generate(request, True)]

    stand_in = engine.StandInEngine(config)
    with pytest.raises(AttributeError):
        chat([{"role": "user", "content": "hi"}])
    asyncio.run(stand_in.start())
    text = chat([{"role": "system", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": "two words"},
                                              {"type": "image"}]}])
    chatted = asyncio.run(generate(text, 2))
    completed = asyncio.run(generate("one two three four", None))
    assert [r.generated_text for r in chatted] == [w + " " for w in engine.WORDS[:2]]
    assert {r.num_input_tokens for r in chatted} == {4}  # "be brief", "two words"
    assert len(completed) == engine._DEFAULT_MAX_TOKENS
    assert {r.num_input_tokens for r in completed} == {4}
    assert (tmp_path / "calls").read_text().split("\n")[:2] == [
        "chat m credentials=none", "completions m credentials=none"]
