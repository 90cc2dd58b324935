"""Local demo: Ray Serve LLM behind API keys on this machine, no GPU.

What it does, in the order it prints:

1. builds the rayllm-auth wheel from this checkout;
2. starts a one-node Ray cluster whose environment holds one API key (as a RayService pod
   would get it from a Kubernetes Secret), with Ray's own RAYLLM_VLLM_ENGINE_CLS switch
   pointing at a CPU stand-in engine instead of vLLM;
3. deploys Ray's unchanged ``ray.serve.llm:build_openai_app`` with ``serve deploy``, the
   plugin only in ``runtime_env.pip``, exactly as in a RayService ``serveConfigV2``;
4. sends requests through the Serve proxy on 127.0.0.1:8000 with the ``openai`` SDK:
   without a key (refused), with a wrong key (refused), with the key (chat and streaming);
5. stops the cluster and removes the wheel (``--keep-running`` leaves both, for your own
   curl/openai calls: a replica Ray restarts installs the wheel again).

Takes about 75 seconds here, most of it Ray creating the runtime_env and starting replicas.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.local_cluster import (  # noqa: E402
    MODEL,
    SERVE_URL,
    LocalCluster,
    application,
    build_wheel,
)


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the cluster running at the end (stop it with `ray stop`)")
    args = parser.parse_args()

    key = "sk-demo-" + secrets.token_urlsafe(32)
    step("building the rayllm-auth wheel")
    wheel = build_wheel(Path(tempfile.mkdtemp(prefix="rayllm-auth-wheel-")))
    print(f"    {wheel}")

    step("starting a local Ray cluster; its environment holds RAY_LLM_API_KEYS=demo:<key>")
    cluster = LocalCluster({"RAY_LLM_API_KEYS": f"demo:{key}"}).start()
    try:
        app = application("demo", "/", runtime_env={"pip": [str(wheel)]})
        step("serve deploy of this application (Ray's own builder, the plugin only in pip):")
        print("    " + yaml.safe_dump(app, sort_keys=False).replace("\n", "\n    "))
        started = time.monotonic()
        cluster.deploy([app])
        cluster.wait_for({"demo": {"RUNNING"}})
        print(f"    RUNNING after {time.monotonic() - started:.0f} s")

        demo_requests(key)
        if args.keep_running:
            step("the cluster keeps running; try it yourself:")
            print(f"    curl {SERVE_URL}/v1/models -H 'Authorization: Bearer {key}'")
            print("    stop it with: .venv/bin/ray stop")
            cluster = None
    finally:
        if cluster is not None:
            step("stopping the cluster")
            cluster.stop()
            shutil.rmtree(wheel.parent, ignore_errors=True)
    return 0


def demo_requests(key: str) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}],
            "max_tokens": 8}

    step("1. no key: a plain HTTP request")
    reply = httpx.post(f"{SERVE_URL}/v1/chat/completions", json=chat, timeout=60)
    print(f"    {reply.status_code} {reply.reason_phrase}, "
          f"WWW-Authenticate: {reply.headers.get('www-authenticate')}")
    print(f"    {reply.text}")

    step("2. a wrong key, with the openai SDK")
    wrong = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key="sk-not-the-key", max_retries=0)
    try:
        wrong.chat.completions.create(**chat)
        raise SystemExit("the wrong key was accepted: this must never happen")
    except openai.AuthenticationError as refused:
        print(f"    openai.AuthenticationError: {refused.message}")

    step("3. the right key, with the openai SDK")
    sdk = openai.OpenAI(base_url=f"{SERVE_URL}/v1", api_key=key, max_retries=0)
    answer = sdk.chat.completions.create(**chat)
    print(f"    chat:      {answer.choices[0].message.content!r}")
    stream = sdk.chat.completions.create(**chat, stream=True)
    print("    streaming: " + "|".join(c.choices[0].delta.content or "" for c in stream))
    print(f"    models:    {[m.id for m in sdk.models.list()]}")


if __name__ == "__main__":
    sys.exit(main())
