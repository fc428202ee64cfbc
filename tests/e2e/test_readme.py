"""The module README stays true of the code: every setting, variable, public name and endpoint."""

from __future__ import annotations

import re

from tests.e2e.harness import REPO_ROOT

README = (REPO_ROOT / "backend" / "workers" / "shared" / "README.md").read_text()
# What the README shows for a default the code computes rather than states.
COMPUTED_DEFAULTS = {"CELERY_BROKER_URL": "filesystem://"}


def configuration_table() -> dict[str, str]:
    """Variable -> its Default cell, from the README's configuration reference table."""
    section = README.split("### Environment Variables", 1)[1].split("\n## ", 1)[0]
    table: dict[str, str] = {}
    for row in re.findall(r"^\|(.+)\|$", section, re.M):
        cells = [c.strip() for c in row.split("|")]
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        if not names:
            continue
        defaults = [d.strip() for d in cells[1].split(" / ")] if len(names) > 1 else [cells[1]]
        table.update(zip(names, defaults, strict=True))
    return table


def shown(default: object) -> str:
    """How the README's table writes a default value."""
    if default is None or default == []:
        return "*none*"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def test_every_setting_is_in_the_table_with_its_default() -> None:
    from pydantic_core import PydanticUndefined

    from backend.workers.shared.config import WorkerConfig

    table = configuration_table()
    wrong = {}
    for name, field in WorkerConfig.model_fields.items():
        variable = name.upper()
        if field.default is PydanticUndefined and field.default_factory is None:
            expected = "*required*"
        elif variable in COMPUTED_DEFAULTS:
            expected = f"`{COMPUTED_DEFAULTS[variable]}`"
        else:
            default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
            expected = shown(default)
        cell = table.get(variable, "missing from the table")
        if not cell.startswith(expected):
            wrong[variable] = f"{cell!r}, the code says {expected}"
    assert wrong == {}


def test_every_public_name_is_documented() -> None:
    import backend.workers.shared as shared

    assert sorted(n for n in shared.__all__ if not re.search(rf"\b{n}\b", README)) == []


def test_every_example_worker_variable_is_documented() -> None:
    source = (REPO_ROOT / "backend" / "workers" / "shared" / "example_worker.py").read_text()
    used = set(re.findall(r'"(EXAMPLE_[A-Z_]+)"', source))
    assert used, "the example worker reads no EXAMPLE_ variable?"
    assert sorted(v for v in used if f"`{v}`" not in README) == []


def test_every_health_endpoint_is_documented() -> None:
    source = (REPO_ROOT / "backend" / "workers" / "shared" / "_health_server.py").read_text()
    routes = set(re.findall(r'^\s+"(/[a-z/]+)": \(_Handler', source, re.M))
    assert routes, "no routes found in _health_server.py"
    assert sorted(r for r in routes if f"`GET {r}`" not in README) == []
