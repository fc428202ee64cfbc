"""The top README's account of ``make demo`` matches what ``scripts/demo.py`` does."""

from __future__ import annotations

import importlib.util
import re
from types import ModuleType

from tests.e2e.harness import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def demo_script() -> ModuleType:
    """``scripts/demo.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_errors_on_purpose_are_described_as_they_happen() -> None:
    demo = demo_script()
    rate = float(demo.DEMO_WORK["EXAMPLE_FAILURE_RATE"])
    text = " ".join(README.split())
    claim = re.search(
        r"invalid with a (\d+)% chance .*? about (\d+) of the (\d+) on average, "
        r"and about one run in (\d+) has none",
        text,
    )
    assert claim, "the README should say how often the demo's executions end ERROR"
    percent, expected, total, one_in = (int(g) for g in claim.groups())
    assert percent == round(rate * 100)
    assert total == demo.EXECUTIONS
    assert expected == round(rate * demo.EXECUTIONS)
    assert one_in == round(1 / (1 - rate) ** demo.EXECUTIONS)
