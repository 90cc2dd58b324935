"""Run code in a fresh interpreter in which rayllm_auth.pth ran as it does at start-up.

Two kinds of fresh interpreter:

- ``run_python``: a new ``python`` process. What a process looks like at start-up (which
  modules the .pth loads, what it arms) can only be checked here.
- ``run_forked``: a child forked from one interpreter per test session that imported vLLM,
  torch and transformers and nothing else (no Ray, no rayllm_auth, no wrapt; checked when it
  starts). Importing Serve LLM then takes about 2 s instead of 15 s, because Serve LLM spends
  13 of its 15 s importing vLLM; everything rayllm-auth does (the .pth, the trigger, the
  patches, the builders) still happens in the child, from the .pth on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import atexit
import tempfile
from pathlib import Path

from rayllm_auth._bootstrap import KEY_SOURCES, KILL_SWITCH, RAY_WORKER_MARKER
from rayllm_auth.middleware import EXEMPT_PATHS_VAR

REPO = Path(__file__).resolve().parent.parent
PTH = REPO / "rayllm_auth.pth"
_CLEARED = (*KEY_SOURCES, RAY_WORKER_MARKER, KILL_SWITCH, EXEMPT_PATHS_VAR)


def _environment(env: dict | None) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    full_env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", **(env or {}))
    return full_env


def _prelude(site_dir: str) -> str:
    # The processing site.py applies at start-up, on a directory holding only the .pth.
    shutil.copy(PTH, site_dir)
    return f"import site; site.addsitedir({site_dir!r})\n"


def run_python(code: str, env: dict | None = None, timeout: float = 240):
    """``code`` runs after ``site.addsitedir`` on a directory holding only rayllm_auth.pth
    (the same processing site.py applies at start-up), with the source tree importable and
    none of the rayllm-auth variables set unless ``env`` sets them."""
    with tempfile.TemporaryDirectory() as site_dir:
        return subprocess.run(
            [sys.executable, "-c", _prelude(site_dir) + code], env=_environment(env),
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )


# The parent imports what Serve LLM spends its time on, proves it imported nothing of Ray,
# rayllm_auth or wrapt, then forks one child per request. A child takes the request's
# environment, sends its output to the request's files and runs the code as __main__; the
# parent answers with the child's exit status. One JSON line in, one out.
_FORK_SERVER = r"""
import atexit, json, os, signal, sys, traceback
answers = os.fdopen(os.dup(1), "w")  # the protocol's channel; what vLLM prints goes to stderr
os.dup2(2, 1)
import vllm.entrypoints.openai.chat_completion.protocol, vllm.entrypoints.openai.completion.protocol
early = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "rayllm_auth", "wrapt"))
assert not early, early
print(json.dumps({"ready": True}), file=answers, flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.alarm(job["timeout"])  # a child that hangs is ended by SIGALRM
        os.environ.clear()
        os.environ.update(job["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the jobs' pipe is the server's alone
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        status = 0
        try:
            exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        atexit._run_exitfuncs()  # what an interpreter's exit runs, e.g. Ray's shutdown
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status)}), file=answers, flush=True)
"""

_server: subprocess.Popen | None = None


def _fork_server() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER], env=_environment(None), cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(_server.stdout.readline()) == {"ready": True}, "fork server failed"
        atexit.register(_stop, _server)
    return _server


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()  # its loop ends, and with it the process
    server.wait(timeout=60)


def run_forked(code: str, env: dict | None = None, timeout: int = 240):
    """What ``run_python`` does, in a child of the session's fork server (see the module's
    docstring); the same result type. A child still running after ``timeout`` seconds is
    ended by SIGALRM (return code -14)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        job = {"code": _prelude(tmp) + code, "env": _environment(env), "timeout": timeout,
               "stdout": str(out), "stderr": str(err)}
        server = _fork_server()
        server.stdin.write(json.dumps(job) + "\n")
        server.stdin.flush()
        returncode = json.loads(server.stdout.readline())["returncode"]
        return subprocess.CompletedProcess(
            [sys.executable, "-c", code], returncode, out.read_text(), err.read_text())


def check(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout
