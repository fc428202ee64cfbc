"""The module README stays true of the code: every setting, variable and endpoint in it."""

from __future__ import annotations

import re

from tests.e2e.harness import REPO_ROOT

README = (REPO_ROOT / "backend" / "workers" / "shared" / "README.md").read_text()


def test_every_setting_is_in_the_configuration_reference() -> None:
    from backend.workers.shared.config import WorkerConfig

    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", README))
    missing = [name.upper() for name in WorkerConfig.model_fields
               if name.upper() not in documented]
    assert missing == []


def test_every_example_worker_variable_is_documented() -> None:
    source = (REPO_ROOT / "backend" / "workers" / "shared" / "example_worker.py").read_text()
    used = set(re.findall(r'"(EXAMPLE_[A-Z_]+)"', source))
    assert used, "the example worker reads no EXAMPLE_ variable?"
    assert sorted(v for v in used if f"`{v}`" not in README) == []


def test_every_health_endpoint_is_documented() -> None:
    source = (REPO_ROOT / "backend" / "workers" / "shared" / "health.py").read_text()
    routes = set(re.findall(r'^\s+"(/[a-z/]+)": _Handler', source, re.M))
    assert routes, "no routes found in health.py"
    assert sorted(r for r in routes if f"`GET {r}`" not in README) == []
