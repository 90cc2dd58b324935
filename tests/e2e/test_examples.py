"""examples/rayservice.yaml and examples/serve_config.yaml, deployed as written.

The RayService's serveConfigV2 is extracted and deployed with `serve deploy` (the REST path
KubeRay's operator uses); its Secret becomes the cluster's environment, as envFrom makes it
the pods' environment, with this run's own keys in the Secret's hashed format. Changed,
because this machine forces it: the pip entry becomes the locally built wheel (no package
index), the GPU request a quarter CPU, and Ray's RAYLLM_VLLM_ENGINE_CLS selects the stand-in
engine; each app gets its own name and route so both fit in one Serve config.
"""

import hashlib
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from rayllm_auth.testing.local_cluster import SERVE_URL, LocalCluster
from tests.conftest import new_key

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEYS = {"team-a": new_key(), "team-b": new_key()}


def rayservice_parts():
    docs = list(yaml.safe_load_all((EXAMPLES / "rayservice.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    return by_kind["Secret"], by_kind["RayService"], by_kind["Ingress"]


def runnable_here(app: dict, wheel: Path, name: str, route_prefix: str) -> dict:
    app = yaml.safe_load(yaml.safe_dump(app))
    assert app["runtime_env"]["pip"] == ["rayllm-auth==0.1.0"]
    app["runtime_env"]["pip"] = [str(wheel)]
    app["name"], app["route_prefix"] = name, route_prefix
    for config in app["args"]["llm_configs"]:
        config.pop("accelerator_type", None)
        config["placement_group_config"] = {"bundles": [{"CPU": 0.25}]}
        config.setdefault("deployment_config", {})["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": 1}
    return app


def secret_entries() -> str:
    """RAY_LLM_API_KEYS in the example Secret's format, with this run's keys."""
    return ",".join(f"{kid}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"
                    for kid, key in KEYS.items())


@pytest.fixture(scope="module")
def cluster(wheel):
    secret, rayservice, _ = rayservice_parts()
    assert set(secret["stringData"]) == {"RAY_LLM_API_KEYS"}
    assert secret["stringData"]["RAY_LLM_API_KEYS"].count(":sha256:") == 2
    (service_app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    (plain_app,) = yaml.safe_load((EXAMPLES / "serve_config.yaml").read_text())["applications"]
    cluster = LocalCluster({"RAY_LLM_API_KEYS": secret_entries()}).start()
    try:
        cluster.deploy([runnable_here(service_app, wheel, "rayservice", "/"),
                        runnable_here(plain_app, wheel, "serve-config", "/plain")])
        cluster.wait_for({"rayservice": {"RUNNING"}, "serve-config": {"RUNNING"}})
        yield cluster
    finally:
        cluster.stop()


def test_rayservice_example_gives_every_pod_the_secret_and_uses_tls():
    secret, rayservice, ingress = rayservice_parts()
    spec = rayservice["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    assert "env_vars" not in app["runtime_env"]  # keys never go there
    assert ingress["spec"]["tls"], "keys travel in headers: the example must use TLS"


@pytest.mark.parametrize("prefix", ["", "/plain"], ids=["rayservice", "serve-config"])
def test_examples_refuse_without_a_key_and_serve_with_one(cluster, prefix):
    assert httpx.get(f"{SERVE_URL}{prefix}/v1/models", timeout=60).status_code == 401
    for key_id, key in KEYS.items():
        sdk = openai.OpenAI(base_url=f"{SERVE_URL}{prefix}/v1", api_key=key, max_retries=0)
        model = sdk.models.list().data[0].id
        reply = sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content, key_id
    wrong = openai.OpenAI(base_url=f"{SERVE_URL}{prefix}/v1", api_key=KEYS["team-a"][::-1],
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
