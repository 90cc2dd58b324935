"""Fixtures shared by the end-to-end modules: one wheel per run, random keys per run."""

from pathlib import Path

import pytest

from tests.conftest import new_key
from tests.support.local_cluster import build_wheel


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def cluster_keys() -> dict:
    """Given to the cluster through the process environment (a RayService pod's env from a
    Kubernetes Secret): the recommended channel, which Ray never logs."""
    return {"team-a": new_key(), "unnamed": new_key(), "vllm": new_key()}


@pytest.fixture(scope="session")
def cluster_key_env(cluster_keys) -> dict:
    return {
        "RAY_LLM_API_KEYS": f"team-a:{cluster_keys['team-a']},{cluster_keys['unnamed']}",
        "VLLM_API_KEY": cluster_keys["vllm"],
    }
