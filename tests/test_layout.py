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


def test_stages_do_not_import_each_other() -> None:
    for stage in STAGE_MODULES:
        tree = ast.parse((ROOT / "tasks" / f"{stage}.py").read_text())
        for node in ast.walk(tree):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "alignflow.tasks":
                names = [f"alignflow.tasks.{a.name}" for a in node.names]
            for name in names:
                other = name.removeprefix("alignflow.tasks.").split(".")[0]
                assert not (name.startswith("alignflow.tasks.") and other in STAGE_MODULES and other != stage), \
                    f"tasks/{stage}.py imports the stage {other}"
    for lib in (ROOT / "tasks" / "lib").glob("*.py"):
        text = lib.read_text()
        for stage in STAGE_MODULES:
            assert f"alignflow.tasks.{stage} " not in text and f"alignflow.tasks.{stage}\n" not in text, \
                f"{lib.name} imports the stage {stage}"
