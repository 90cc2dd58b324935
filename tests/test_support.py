"""The support table: one place (the layout records), and everything derived from it agrees."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from rayllm_auth.layout import Wrap
from rayllm_auth.support import LAYOUTS, choose_layout, supported_specifier
from tests.compat import support_table
from tests.support.docs import marked_section

REPO = Path(__file__).resolve().parent.parent


def test_readme_support_table_is_generated_from_the_records():
    assert marked_section(REPO / "README.md", "support") == support_table.render(), (
        "run: .venv/bin/python tests/compat/support_table.py")


def test_the_ray_extra_publishes_exactly_the_supported_releases():
    text = (REPO / "pyproject.toml").read_text()
    (line,) = re.findall(r'^ray = \["(.*)"\]$', text, re.M)
    assert Requirement(line).specifier == supported_specifier()


def test_ci_tests_a_supported_release():
    assert choose_layout(support_table.ci_ray(), enforce=True).layout is LAYOUTS[-1]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_every_record_has_one_replica_target_and_a_client_facing_ingress(layout):
    assert [t.wrap for t in layout.targets].count(Wrap.REPLICA_APP) == 1
    assert any(t.builder_side for t in layout.targets)
    assert not layout.client_facing[0].serves_one_model  # the ingress comes first
    (ingress_module,) = {t.module for t in layout.targets if t.builder_side}
    assert layout.client_facing[0].name in layout.required()[ingress_module]


def test_rows_do_not_overlap_and_unknown_versions_are_refused():
    for version in ("2.44.1", "2.45.0", "2.46.0", "2.47.1", "2.48.0", "2.49.2", "2.50.1", "2.51.2", "2.52.1", "2.53.0", "2.54.1", "2.55.1", "2.56.1",
                    "2.57.1", "2.58.1", "2.59.0", "2.60.0", "2.60.7"):
        assert sum(SpecifierSet(layout.ray).contains(version) for layout in LAYOUTS) == 1
    for version in ("2.43.0", "2.61.0", "3.0.0", "nonsense", "2.60.0rc1x"):
        assert choose_layout(version, enforce=True) == (None, False)


def test_escape_hatch_picks_the_newest_row_for_a_newer_ray_only_when_asked():
    hatch = {"RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}
    assert choose_layout("2.61.0", enforce=True, environ=hatch) == (LAYOUTS[-1], True)
    assert choose_layout("3.0.0", enforce=True, environ=hatch) == (LAYOUTS[-1], True)
    assert choose_layout("2.61.0", enforce=False, environ=hatch) == (None, False)
    assert choose_layout("2.43.0", enforce=True, environ=hatch) == (None, False)


def test_every_test_the_security_notes_cite_exists():
    cited = set(re.findall(r"`(test_\w+)`", (REPO / "SECURITY.md").read_text()))
    defined = {name for path in (REPO / "tests").rglob("test_*.py")
               for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M)}
    assert len(cited) > 30 and cited <= defined, sorted(cited - defined)



def test_escape_hatch_never_picks_a_row_for_a_ray_between_rows(monkeypatch):
    # An older row there was served open: a release between rows can have a client-facing class
    # the row below it does not name (2.51-2.53's OpenAiIngress was one, before 2.52 and 2.53
    # were verified in a row), so nothing guarded it and nothing failed. The rows are
    # contiguous now: a gap is made by leaving one out.
    from rayllm_auth import support

    (between,) = [l for l in LAYOUTS if l.name == "router_module_init_layout"]
    monkeypatch.setattr(support, "LAYOUTS", tuple(l for l in LAYOUTS if l is not between))
    hatch = {"RAY_LLM_AUTH_ALLOW_UNTESTED_RAY": "1"}
    assert choose_layout("2.50.1", enforce=True, environ=hatch) == (None, False)
