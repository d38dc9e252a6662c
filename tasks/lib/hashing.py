"""Content hashes: of bytes, JSON values, files, folders, Arrow datasets and source code.

A stage's cache key is built from these (see flows/keys.py); a file is hashed once, when the manifest that
lists it is written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20  # 1 MiB read buffer for hashing

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return sha256_bytes(text.encode())

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()

def sha256_tree(path: Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of a file, or of a folder's relative file names and contents (sorted, so order-free)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.split("/")[0] in skip:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()

def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules (e.g. `tasks.sft`): a code change re-runs the stage."""
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot find source of module {name}")
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()
