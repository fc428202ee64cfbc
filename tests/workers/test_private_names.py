"""No module of the worker package uses another module's private names.

Private *modules* (``_http``, ``_lease``, ...) are the package's own and may be imported
anywhere in it; a private *name* (``_backend_breaker``) belongs to its module alone. Checked
on the source: ``from .m import _name`` and ``m._name`` where ``m`` is a module of the package.
(import-linter checks modules, not names: this is the part it cannot see.)
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "backend" / "workers" / "shared"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path, modules: set[str]) -> list[str]:
    """Each use in ``path`` of a private name of another module of the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module is None:  # from . import m
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
        elif node.module != path.stem:
            found += [f"{path.name}:{node.lineno}: from .{node.module} import {a.name}"
                      for a in node.names if _private(a.name)]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _private(node.attr)):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    modules = {path.stem for path in sources}
    found = [use for path in sources for use in private_uses(path, modules)]
    assert found == []


def test_the_check_sees_both_forms(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from . import _http, config\nfrom .health import _now, Public\n"
                      "x = config._cache\ny = _http.preload\n")
    assert private_uses(sample, {"_http", "config", "health"}) == [
        "sample.py:2: from .health import _now", "sample.py:3: config._cache"]
