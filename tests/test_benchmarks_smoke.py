"""Quick runs of the benchmarks (seconds, no thresholds): the harness must keep working.
The end-to-end benchmark's smoke run uses the e2e test cluster (tests/e2e/)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, expected", [
    ("middleware_bench.py", ["1000 keys, valid", "added per streamed chunk: rayllm-auth",
                             "key with rpm= and concurrency="]),
    ("startup_bench.py", ["plugin, key set", "rayllm_auth imports"]),
    ("in_app_bench.py", ["stock", "minimal", "rayllm-auth"]),
    ("limits_bench.py", ["rpm ", "concurrency ", "% on the request path"]),
])
def test_quick_run(script, expected):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout
