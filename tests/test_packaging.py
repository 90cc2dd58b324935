"""The distribution: what the wheel holds, what installs where, and that both a regular and
an editable install activate from the .pth."""

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rayllm_auth import __version__
from rayllm_auth.support import supported_specifier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                    "--outdir", str(out), str(REPO)], check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    # And a wheel built from the sdist, as pip does when it only finds the sdist.
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpacked, filter="data")
    from_sdist = tmp_path_factory.mktemp("from-sdist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir",
                    str(from_sdist), str(next(unpacked.iterdir()))], check=True, capture_output=True)
    return wheel, next(from_sdist.glob("*.whl"))


def names(wheel):
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_layout(dist):
    wheel, _ = dist
    files = names(wheel)
    assert "rayllm_auth.pth" in files
    assert "rayllm_auth/patches/core_ingress_layout.py" in files
    assert not any(f.startswith(("patches/", "tests/", "benchmarks/")) for f in files)
    tops = {f.split("/")[0] for f in files}
    assert tops == {"rayllm_auth", "rayllm_auth.pth", f"rayllm_auth-{__version__}.dist-info"}


def test_wheel_from_sdist_is_the_same(dist):
    wheel, from_sdist = dist
    assert names(wheel) == names(from_sdist)


def test_pth_is_one_line_and_identical_to_the_source(dist):
    wheel, _ = dist
    shipped = zipfile.ZipFile(wheel).read("rayllm_auth.pth").decode()
    assert shipped == (REPO / "rayllm_auth.pth").read_text() and shipped.count("\n") == 1


def test_metadata_requires_no_ray_and_publishes_the_supported_range(dist):
    wheel, _ = dist
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(
        f"rayllm_auth-{__version__}.dist-info/METADATA").decode())
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    assert sorted(r.name for r in requires if r.marker is None) == ["packaging", "wrapt"]
    (ray,) = [r for r in requires if r.name == "ray"]
    assert ray.marker.evaluate({"extra": "ray"}) and not ray.marker.evaluate({"extra": ""})
    assert ray.specifier == supported_specifier()


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def install_offline(python, wheel):
    """Install one wheel with the venv's bundled pip and no index: the test needs no network.
    Its dependencies (wrapt, packaging) are not installed; the metadata test checks them, and
    what is probed here (the .pth and the CLI's hash command) imports neither."""
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    str(wheel)], check=True, capture_output=True)


def build_editable(outdir: Path) -> Path:
    """The PEP 660 wheel ``pip install -e`` would install, built with this environment's
    hatchling (pip would fetch hatchling into an isolated build environment)."""
    subprocess.run([sys.executable, "-c", "import sys; from hatchling.build import "
                    "build_editable; build_editable(sys.argv[1])", str(outdir)],
                   cwd=REPO, check=True, capture_output=True)
    (wheel,) = outdir.glob("*.whl")
    return wheel


PROBE = """
import importlib.util, sys
print("loaded", sorted(m for m in sys.modules if m.startswith("rayllm")))
print("first finder", type(sys.meta_path[0]).__name__)
print("patches", importlib.util.find_spec("rayllm_auth.patches").origin)
print("top-level patches", importlib.util.find_spec("patches"))
"""


def probe(python, cwd, **env):
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True,
                            cwd=cwd, env={"PATH": "/usr/bin:/bin", **env}, check=True)
    return result.stdout


def test_regular_install_into_a_fresh_venv_activates_from_the_pth(dist, tmp_path):
    wheel, _ = dist
    python = make_venv(tmp_path / "venv")
    install_offline(python, wheel)
    keyed = probe(python, tmp_path, RAY_LLM_API_KEYS="sk-packaging-0123456789abcdef")
    assert "loaded ['rayllm_auth', 'rayllm_auth._bootstrap']" in keyed
    assert "first finder _ServeLlmTrigger" in keyed
    assert "site-packages/rayllm_auth/patches/__init__.py" in keyed
    assert "top-level patches None" in keyed
    assert "loaded []" in probe(python, tmp_path)  # no key source: nothing at all
    # The key file variable alone is a key source too.
    assert "first finder _ServeLlmTrigger" in probe(python, tmp_path, RAY_LLM_API_KEYS_FILE="/k")
    hashed = subprocess.run([str(python.parent / "rayllm-auth"), "hash", "-"], input="sk-x" * 8,
                            capture_output=True, text=True, check=True).stdout
    assert hashed.startswith("sha256:") and len(hashed.strip()) == 7 + 64  # the console script


def test_editable_install_reads_the_source_tree(tmp_path):
    python = make_venv(tmp_path / "venv")
    install_offline(python, build_editable(tmp_path / "editable"))
    keyed = probe(python, tmp_path, RAY_LLM_API_KEYS="sk-packaging-0123456789abcdef")
    assert "first finder _ServeLlmTrigger" in keyed
    assert f"patches {REPO}/rayllm_auth/patches/__init__.py" in keyed
