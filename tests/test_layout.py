"""The layout is a promise: flows/, tasks/ and metrics/ install under the alignflow name, every package folder is in
the wheel, and stages never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from alignflow.flows.keys import STAGES

ROOT = Path(__file__).resolve().parents[1]
STAGE_MODULES = {*STAGES, "export"}


def test_generic_names_are_not_importable_outside_the_checkout(tmp_path: Path) -> None:
    for name in ("tasks", "flows", "metrics"):
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name
    proc = subprocess.run([sys.executable, "-c", "import alignflow.tasks.sft, alignflow.flows.keys, alignflow.metrics"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_package_folder_is_in_the_wheel() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for top, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([top, *rel.parts])
            assert name in listed, f"{init.parent} is a package but pyproject.toml's packages list lacks {name}"


def _imported(path: Path) -> set[str]:
    """Modules a file imports (anywhere in it, imports inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_stages_do_not_import_each_other() -> None:
    stage_modules = {f"alignflow.tasks.{s}" for s in STAGE_MODULES}
    for stage in STAGE_MODULES:
        others = _imported(ROOT / "tasks" / f"{stage}.py") & (stage_modules - {f"alignflow.tasks.{stage}"})
        assert not others, f"tasks/{stage}.py imports the stage(s) {others}"
    for shared in [*(ROOT / "tasks" / "lib").glob("*.py"), *(ROOT / "tasks" / "records").glob("*.py")]:
        assert not _imported(shared) & stage_modules, f"{shared} imports a stage"
