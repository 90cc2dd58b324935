"""Run code in a fresh interpreter in which rayllm_auth.pth ran as it does at start-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rayllm_auth._bootstrap import KEY_SOURCES, KILL_SWITCH, RAY_WORKER_MARKER
from rayllm_auth.middleware import EXEMPT_PATHS_VAR

REPO = Path(__file__).resolve().parent.parent
PTH = REPO / "rayllm_auth.pth"
_CLEARED = (*KEY_SOURCES, RAY_WORKER_MARKER, KILL_SWITCH, EXEMPT_PATHS_VAR)


def run_python(code: str, env: dict | None = None, timeout: float = 240):
    """``code`` runs after ``site.addsitedir`` on a directory holding only rayllm_auth.pth
    (the same processing site.py applies at start-up), with the source tree importable and
    none of the rayllm-auth variables set unless ``env`` sets them."""
    with tempfile.TemporaryDirectory() as site_dir:
        shutil.copy(PTH, site_dir)
        full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        full_env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", **(env or {}))
        prelude = f"import site; site.addsitedir({site_dir!r})\n"
        return subprocess.run(
            [sys.executable, "-c", prelude + code], env=full_env, capture_output=True,
            text=True, timeout=timeout, cwd=REPO,
        )


def check(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    return result.stdout
