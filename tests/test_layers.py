"""The house's floors, checked on the package as installed: layers, independent stages, names.

The import-linter contracts live in pyproject.toml; `scripts/lint-layers.sh` runs them by hand.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import REPO

CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]

LOWER_FLOORS = ("core", "pipeline", "trainer", "world")
# Imports a lower floor may make inside a function: optional or heavy dependencies of one code path
# (open_clip and torchvision take seconds; commands that load no CLIP, such as `config show`, skip them).
OPTIONAL_IMPORTS = {"vllm", "transformers", "ray", "open_clip", "torchvision"}


def lint(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--config",
                           str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def test_the_floors_hold(installed, tmp_path):
    r = lint(installed, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, bad_import, contract", [
    ("core/files.py", "import mugcp.trainer.train", "Floors"),  # the core reaching up
    ("pipeline/scp.py", "import mugcp.trainer.methods", "Floors"),  # one stage importing the other
    ("world/synth.py", "import mugcp.cli", "Floors"),  # a fixture importing the command
    ("trainer/report.py", "import typer", "Only the top floor"),  # the CLI library below the top floor
])
def test_a_violation_is_caught(installed, tmp_path, module, bad_import, contract):
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    target = site / "mugcp" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # injected\n")
    r = lint(site, tmp_path)
    assert r.returncode != 0 and "broken." in r.stdout and " 0 broken" not in r.stdout, r.stdout[-3000:]
    summary = " ".join(r.stdout.split("Contracts:")[0].split())  # names wrap across lines
    name = next(c["name"] for c in CONTRACTS if c["name"].startswith(contract))
    assert f"{name} BROKEN" in summary, summary
    broken = r.stdout.split("Broken contracts")[1]
    importer = "mugcp." + module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {bad_import.split()[-1]}" in broken, broken


def test_only_mugcp_is_installed(installed):
    top = sorted(p.name for p in installed.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["mugcp"], top
    for floor in LOWER_FLOORS:
        assert (installed / "mugcp" / floor / "__init__.py").is_file()
    assert (installed / "mugcp" / "world" / "build-vllm-cpu-env.sh").is_file()  # package data travels


def test_no_module_shadows_a_package(installed, tmp_path):
    """No file is named like an importable package (run from its folder, it would hide that package)."""
    stems = {p.stem for p in (installed / "mugcp").rglob("*.py") if not p.stem.startswith("__")}
    stems |= {p.name for p in (installed / "mugcp").rglob("*") if p.is_dir() and p.name != "__pycache__"}
    known = {"clip", "datasets", "evaluate", "vllm", "ray", "dassl", "mugcp", "open_clip", "torch", "typer"}
    code = "import importlib.util, json, sys; print(json.dumps([s for s in sys.argv[1:] if importlib.util.find_spec(s)]))"
    r = subprocess.run([sys.executable, "-c", code, *sorted(stems)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    found = set(json.loads(r.stdout)) | (stems & known) | (stems & set(sys.stdlib_module_names))
    assert not found, f"modules named like packages: {sorted(found)}"


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    out += [(inner.lineno, a.name) for a in inner.names]
                elif isinstance(inner, ast.ImportFrom) and inner.module:
                    out.append((inner.lineno, inner.module))
    return out


@pytest.mark.parametrize("floor", LOWER_FLOORS)
def test_lower_floors_import_at_module_level(floor):
    """Below the top floor, imports sit at module level (visible to the contracts), bar optional dependencies."""
    hidden = [f"{p.relative_to(REPO)}:{line} {name}" for p in sorted((REPO / floor).rglob("*.py"))
              for line, name in function_level_imports(p) if name.split(".")[0] not in OPTIONAL_IMPORTS]
    assert not hidden, hidden


def test_function_level_import_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import mugcp.trainer\n    from vllm import LLM\n")
    assert function_level_imports(probe) == [(2, "mugcp.trainer"), (3, "vllm")]


def test_installed_copy_imports_without_the_checkout(installed, tmp_path):
    """The wheel layout works on its own: every floor imports from the installed copy, not from this checkout."""
    code = ("import mugcp.cli, mugcp.core.scp_cache, mugcp.pipeline.backends, mugcp.trainer.methods, "
            "mugcp.world.synth; print(mugcp.cli.__file__)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                            "PYTHONNOUSERSITE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(str(installed)), r.stdout
    assert importlib.util.find_spec("mugcp") is not None


def test_the_code_is_clean():
    """ruff (pyflakes, pycodestyle, import order) over the whole repository, as configured in pyproject."""
    r = subprocess.run([str(Path(sys.executable).with_name("ruff")), "check", "--no-cache", str(REPO)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:]
