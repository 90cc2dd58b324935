"""The canary's static check of a Ray release (tests/compat/canary.py), on the installed Ray's
source and on sources changed the way a new release could change them."""

import zipfile
from importlib import metadata

from rayllm_auth.support import LAYOUTS, choose_layout
from tests.compat import canary, run
from tests.compat.canary import check_layout, has_attribute, vllm_wanted, wheel_reader


def installed_ray_source(module: str):
    base = module.replace(".", "/")
    for path in (f"{base}.py", f"{base}/__init__.py"):
        file = metadata.distribution("ray").locate_file(path)
        if file.exists():
            return file.read_text()
    return None


def test_the_installed_rays_own_layout_holds_and_an_older_one_does_not():
    layout, _ = choose_layout(metadata.version("ray"), enforce=True)
    reports = {l.name: check_layout(installed_ray_source, l) for l in LAYOUTS}
    assert all(reports[layout.name].values()) and len(reports[layout.name]) >= 4
    # Names alone do not tell every layout apart (2.54's replica-side __init__ still exists
    # in 2.60): the canary reports, the end-to-end run decides. The 2.44-2.49 layout's
    # router module is gone.
    assert not all(reports["router_module_layout"].values())


def test_a_renamed_target_is_reported_missing():
    layout, _ = choose_layout(metadata.version("ray"), enforce=True)
    target = next(t for t in layout.targets if "." in t.attribute)  # Class.method
    cls, method = target.attribute.split(".")

    def renamed(module):
        source = installed_ray_source(module)
        if module == target.module:
            source = source.replace(f"def {method}(", f"def {method}_v2(")
        return source

    report = check_layout(renamed, layout)
    assert [t for t, holds in report.items() if not holds] == [f"{target.module}:{target.attribute}"]


def test_a_replica_target_taking_its_app_under_another_name_is_reported_missing():
    layout, _ = choose_layout(metadata.version("ray"), enforce=True)
    (target,) = [t for t in layout.targets if not t.builder_side]
    argument = layout.replica_app_argument

    def renamed(module):
        source = installed_ray_source(module)
        if module == target.module:
            method = target.attribute.split(".")[-1]
            head, _, rest = source.partition(f"def {method}(")
            signature, close, body = rest.partition(")")
            source = head + f"def {method}(" + signature.replace(argument, "other") + close + body
        return source

    report = check_layout(renamed, layout)
    assert [t for t, holds in report.items() if not holds] == [f"{target.module}:{target.attribute}"]


def test_attribute_paths_are_found_only_where_they_are_defined():
    source = ("import x\nVALUE: int = 1\nalias = x.y\n\nclass A:\n    def m(self):\n"
              "        def inner(): pass\n\nasync def f(): pass\n")
    for name in ("VALUE", "alias", "A", "A.m", "f"):
        assert has_attribute(source, name), name
    for name in ("x", "m", "A.inner", "A.m.inner", "f.g", "B"):
        assert not has_attribute(source, name), name


def test_a_wheels_modules_and_vllm_requirement_are_read_from_the_archive(tmp_path):
    wheel = tmp_path / "ray-9.9.0-cp311-cp311-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("ray/serve/__init__.py", "def run(): pass\n")
        archive.writestr("ray/serve/llm/x.py", "class B: pass\n")
        archive.writestr("ray-9.9.0.dist-info/METADATA", (
            "Name: ray\nRequires-Dist: vllm[audio]>=0.31.0; extra == \"llm\"\n"
            "Requires-Dist: vllm>=0.1; extra == \"other\"\n"))
    read = wheel_reader(wheel)
    assert has_attribute(read("ray.serve"), "run") and has_attribute(read("ray.serve.llm.x"), "B")
    assert read("ray.missing") is None
    assert vllm_wanted(wheel) == "vllm[audio]>=0.31.0"


def fake_ray_wheel(folder, version, llm_extra, sources) -> "Path":
    wheel = folder / f"ray-{version}-cp311-cp311-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for module, source in sources.items():
            archive.writestr(module.replace(".", "/") + ".py", source)
        archive.writestr(f"ray-{version}.dist-info/METADATA",
                         f"Name: ray\nRequires-Dist: {llm_extra}; extra == \"llm\"\n")
    return wheel


def test_newest_release_in_no_row_gets_its_vllm_pin_and_the_escape_hatch(tmp_path, monkeypatch):
    newest = LAYOUTS[-1]
    sources = {module: installed_ray_source(module) for module in newest.required()}
    monkeypatch.setattr(canary, "download_ray", lambda version, into: fake_ray_wheel(
        into, "9.9.0", "vllm[audio]==0.31.0", sources))
    monkeypatch.setattr(run, "PINS", dict(run.PINS))
    assert run.newest_release(tmp_path) == ("9.9.0", {"RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"})
    assert run.PINS["9.9.0"] == "0.31.0"


def test_newest_release_whose_hooks_are_gone_is_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(canary, "download_ray", lambda version, into: fake_ray_wheel(
        into, "9.9.0", "vllm==0.31.0", {"ray.serve.api": "def run(): pass\n"}))
    monkeypatch.setattr(run, "PINS", dict(run.PINS))
    assert run.newest_release(tmp_path) == (None, {})
    assert "9.9.0" not in run.PINS
