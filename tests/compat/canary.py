"""The canary for the next Ray release: do the layout records' patch targets still exist in it?

Reads Ray's *source*, never imports it: the newest ``ray`` wheel on the package index is
downloaded (``pip download --no-deps``, about 70 MB, no vLLM, no install), and each module a
layout record names is parsed from the wheel with :mod:`ast`. A target holds when its
attribute path is defined there (``init``, ``ASGIAppReplicaWrapper._set_asgi_app``: a
function, class or assignment at module level, then inside the class). The report also says
which vLLM the release asks for (the lower bound of its ``llm`` extra), the pin rule the
compatibility runner uses.

    .venv/bin/python tests/compat/canary.py               # the newest Ray on the index
    .venv/bin/python tests/compat/canary.py --ray 2.60.0  # a given one

It answers "would rayllm-auth find its hooks?", not "does it work": a release whose targets
all hold still needs its end-to-end run (``tests/compat/run.py``), and a missing target means
a new layout record, not a wider row. Exit status 0 when some layout's targets all hold.
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rayllm_auth.layout import Layout  # noqa: E402
from rayllm_auth.support import LAYOUTS, choose_layout  # noqa: E402


def defined_names(tree: ast.AST) -> dict[str, ast.AST]:
    """Names defined directly in a module or class body (defs, classes, assignments)."""
    names = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def find(source: str, attribute: str):
    """The definition of ``attribute`` (``name`` or ``Class.method``) in ``source``, or None."""
    node: ast.AST = ast.parse(source)
    for part in attribute.split("."):
        if not isinstance(node, (ast.Module, ast.ClassDef)):
            return None  # names inside a function are not attributes
        node = defined_names(node).get(part)
        if node is None:
            return None
    return node


def has_attribute(source: str, attribute: str) -> bool:
    return find(source, attribute) is not None


def check_layout(read_module, layout: Layout) -> dict[str, bool]:
    """{"module:attribute": holds} for every attribute ``layout`` requires; the replica-side
    target must also take its app under the record's argument name (2.44-2.46 call it
    ``app``, later releases ``app_or_func``). ``read_module(name)`` returns a module's
    source, or None when it does not exist."""
    replica_side = {(t.module, t.attribute) for t in layout.targets if not t.builder_side}
    report = {}
    for module, attributes in layout.required().items():
        source = read_module(module)
        for attribute in attributes:
            node = find(source, attribute) if source is not None else None
            if node is not None and (module, attribute) in replica_side:
                arguments = [a.arg for a in getattr(node, "args", ast.arguments()).args]
                if layout.replica_app_argument not in arguments:
                    node = None
            report[f"{module}:{attribute}"] = node is not None
    return report


def wheel_reader(wheel: Path):
    """``read_module`` for a wheel: the module's source from the archive, or None."""
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())

    def read_module(module: str):
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if path in names:
                return archive.read(path).decode("utf-8")
        return None

    return read_module


def vllm_wanted(wheel: Path) -> str:
    """The vLLM requirement of the wheel's ``llm`` extra, as its METADATA states it."""
    archive = zipfile.ZipFile(wheel)
    (metadata,) = [n for n in archive.namelist()  # Ray's own (it vendors other packages)
                   if re.fullmatch(r"ray-[^/]+\.dist-info/METADATA", n)]
    for line in archive.read(metadata).decode().splitlines():
        if line.startswith("Requires-Dist: vllm") and re.search(r"extra\s*==\s*['\"]llm", line):
            return line.split(":", 1)[1].split(";")[0].strip()
    return "none"


def download_ray(version: str | None, into: Path) -> Path:
    spec = f"ray=={version}" if version else "ray"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "-d", str(into), spec], check=True)
    (wheel,) = into.glob("ray-*.whl")
    return wheel


def vllm_pin(wanted: str) -> str | None:
    """The version a ``vllm`` requirement starts at (``vllm[audio]==0.29.0``, ``vllm>=0.10.0``):
    the pin rule of the compatibility runner. None when it names no version."""
    found = re.search(r"(?:==|>=)\s*([0-9][0-9.]*)", wanted)
    return found.group(1) if found else None


def check_wheel(wheel: Path) -> tuple[str, list[str]]:
    """Print which layouts' targets hold in ``wheel``; its Ray version and those layouts'
    names, newest first."""
    version = wheel.name.split("-")[1]
    print(f"Ray {version} ({wheel.name}); its llm extra wants {vllm_wanted(wheel)}")
    read_module = wheel_reader(wheel)
    holding = []
    for layout in reversed(LAYOUTS):  # newest first
        report = check_layout(read_module, layout)
        print(f"  {layout.name} (rows {layout.ray}): "
              f"{sum(report.values())} of {len(report)} targets hold")
        for target, holds in report.items():
            print(f"    {'ok     ' if holds else 'MISSING'} {target}")
        if all(report.values()):
            holding.append(layout.name)
    return version, holding


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ray", help="a Ray version (default: the newest on the index)")
    parser.add_argument("--wheel", type=Path, help="a Ray wheel already downloaded")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayllm-auth-canary-") as tmp:
        version, holding = check_wheel(args.wheel or download_ray(args.ray, Path(tmp)))
    supported, _ = choose_layout(version, enforce=True)
    if supported is not None:
        print(f"Ray {version} is already in the row of {supported.name}")
    if holding:
        if supported is None:
            print(f"every target of {', '.join(holding)} holds: widen the row of "
                  f"{holding[0]} only after `tests/compat/run.py --versions {version}` passes "
                  f"(add its vLLM pin first)")
        return 0
    print("no layout's targets all hold: this release needs a new layout record")
    return 1


if __name__ == "__main__":
    sys.exit(main())
