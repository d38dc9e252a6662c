"""A registered version's requirements.txt installs elsewhere: public versions only (no `+cpu` build label, which
no package index serves), every library the loader imports, and `gguf` where the base is read from a GGUF file."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from alignflow.tasks.register import requirements


def _third_party_imports() -> set[str]:
    """Top-level modules tasks/lib/served_model.py imports (the code a registered version loads through)."""
    spec = importlib.util.find_spec("alignflow.tasks.lib.served_model")
    assert spec is not None and spec.origin
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}


def test_requirements_are_public_versions_of_what_the_loader_imports() -> None:
    distributions = importlib.metadata.packages_distributions()
    for kind in ("embedded", "hub", "artifact"):
        lines = requirements({"kind": kind})
        parsed = [Requirement(line) for line in lines]
        for req in parsed:
            (spec,) = req.specifier
            assert spec.operator == "==" and Version(spec.version).local is None, (kind, str(req))
            installed = Version(importlib.metadata.version(req.name))
            assert Version(spec.version) == Version(installed.public), (kind, str(req))  # this machine's release
        pinned = {req.name.lower().replace("_", "-") for req in parsed}
        for module in _third_party_imports():
            needed = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
            assert needed & pinned, f"{kind}: served_model imports {module}, which no requirement installs"
        # transformers reads a GGUF file through the gguf package: an embedded base cannot load without it
        assert ("gguf" in pinned) == (kind == "embedded"), (kind, lines)
