"""Load another checkout's rayllm_auth next to this one, for side-by-side runs in one process.

``load(checkout)`` imports ``rayllm_auth`` from ``checkout`` (e.g. a ``git worktree`` of the
previous commit), keeps the ApiKeyMiddleware class and protect_app function it needs, and
removes that package from ``sys.modules`` again, so this checkout's ``rayllm_auth`` imports
as usual afterwards. The hot path of either middleware imports nothing at call time, so both
run their own code. For benchmarks only.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def load(checkout: Path) -> types.SimpleNamespace:
    if any(name == "rayllm_auth" or name.startswith("rayllm_auth.") for name in sys.modules):
        raise RuntimeError("load the previous rayllm_auth before this checkout's")
    sys.path.insert(0, str(checkout))
    try:
        middleware = importlib.import_module("rayllm_auth.middleware")
        protect = importlib.import_module("rayllm_auth.protect")
        loaded = types.SimpleNamespace(ApiKeyMiddleware=middleware.ApiKeyMiddleware,
                                       protect_app=protect.protect_app)
    finally:
        sys.path.remove(str(checkout))
        for name in [n for n in sys.modules if n == "rayllm_auth" or n.startswith("rayllm_auth.")]:
            del sys.modules[name]
    return loaded
