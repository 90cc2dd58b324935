"""The README's support table, derived from the layout records and the compatibility results.

Rows: every layout record in :data:`rayllm_auth.support.LAYOUTS` (the Ray releases it covers,
what it wraps) with the runs of ``tests/compat/run.py`` recorded in ``results.json`` for
releases it covers, and which release CI runs the whole suite on (the Ray pinned in
``requirements-dev.txt``). ``run.py`` rewrites the README section after each run; a test keeps
it equal to :func:`render`.

    .venv/bin/python tests/compat/support_table.py     # rewrite the README's table
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from packaging.specifiers import SpecifierSet  # noqa: E402

from rayllm_auth.support import LAYOUTS  # noqa: E402
from tests.support.docs import rewrite_marked_section  # noqa: E402

README = REPO / "README.md"
RESULTS_JSON = Path(__file__).resolve().parent / "results.json"
SECTION = "support"


def ci_ray() -> str:
    """The Ray release CI tests on: the pin in requirements-dev.txt."""
    text = (REPO / "requirements-dev.txt").read_text()
    return re.search(r"^ray\[[^\]]*\]==(\S+)", text, re.M)[1]


def render() -> str:
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else []
    ci = ci_ray()
    lines = ["", "| Ray | Layout (patch module) | Verified end to end |", "|---|---|---|"]
    for layout in reversed(LAYOUTS):  # newest first
        spec = SpecifierSet(layout.ray)
        runs = [r for r in results if spec.contains(r["ray"])]
        verified = [f"{r['ray']} with vLLM {r['vllm']}: {r['passed']} of "
                    f"{r['passed'] + r['failed']} ({r['date']})" for r in runs]
        if spec.contains(ci):
            verified.insert(0, f"{ci}: the whole suite, in CI on every change")
        lines.append(f"| {_releases(spec)} | `{layout.name}`: {layout.summary} | "
                     f"{'; '.join(verified) or 'not yet run'} |")
    return "\n".join(lines) + "\n\n"


def _releases(spec: SpecifierSet) -> str:
    low = next(s.version for s in spec if s.operator == ">=")
    high = next(s.version for s in spec if s.operator == "<")
    last = f"{high.split('.')[0]}.{int(high.split('.')[1]) - 1}"
    first = ".".join(low.split(".")[:2])
    return f"{first}.x" if first == last else f"{first}.x to {last}.x"


if __name__ == "__main__":
    rewrite_marked_section(README, SECTION, render())
    print(f"updated the support table in {README}")
