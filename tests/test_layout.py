"""The house's rule: arrows point down. Stages never import each other; the core imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_FLOOR = {"mugcp/cli.py", "mugcp/demo.py", "mugcp/sweep.py"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [("pipeline", {"trainer"}), ("trainer", {"pipeline"}),
                                                ("mugcp", {"pipeline", "trainer"})])
def test_imports_point_down(package, forbidden):
    for path in sorted((REPO / package).glob("*.py")):
        if str(path.relative_to(REPO)) in TOP_FLOOR:
            continue
        assert not imported_packages(path) & forbidden, f"{path.relative_to(REPO)} imports {forbidden}"
