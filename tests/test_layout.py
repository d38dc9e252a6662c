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


def _stage_files(stage: str) -> list[Path]:
    """A stage's source files: tasks/<stage>.py, or every module of the package tasks/<stage>/."""
    single = ROOT / "tasks" / f"{stage}.py"
    return [single] if single.is_file() else sorted((ROOT / "tasks" / stage).glob("*.py"))


def test_stages_do_not_import_each_other() -> None:
    stage_modules = {f"alignflow.tasks.{s}" for s in STAGE_MODULES}
    for stage in STAGE_MODULES:
        files = _stage_files(stage)
        assert files, f"tasks/{stage}.py or tasks/{stage}/ holds no stage {stage}"
        for path in files:
            others = _imported(path) & (stage_modules - {f"alignflow.tasks.{stage}"})
            assert not others, f"{path.relative_to(ROOT)} imports the stage(s) {others}"
    for shared in [*(ROOT / "tasks" / "lib").glob("*.py"), *(ROOT / "tasks" / "records").glob("*.py")]:
        assert not _imported(shared) & stage_modules, f"{shared} imports a stage"


def test_every_module_of_a_stage_package_is_in_its_cache_key() -> None:
    """A stage's code hash (flows/keys.py) follows its absolute imports of alignflow.tasks modules: a family module
    of tasks/dpo/ it did not reach (a relative import, which the walk skips) would change training and leave
    yesterday's dpo folder served from the cache."""
    from alignflow.tasks.lib.hashing import package_modules

    packages = [s for s in STAGE_MODULES if (ROOT / "tasks" / s / "__init__.py").is_file()]
    assert "dpo" in packages
    for stage in packages:
        hashed = {p.resolve() for p in package_modules(f"alignflow.tasks.{stage}").values()}
        missing = [p.name for p in (ROOT / "tasks" / stage).glob("*.py") if p.resolve() not in hashed]
        assert not missing, f"tasks/{stage}/ modules outside {stage}'s cache key: {missing}"
