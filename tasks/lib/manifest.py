"""`manifest.json`: what a stage made (relative file names and their hashes), from which inputs, with which
config, and its headline metrics. The flow writes a stage into `<folder>.partial` and renames it when the
stage has finished, so a folder with a manifest is always complete.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from alignflow.tasks.lib.hashing import sha256_tree

MANIFEST = "manifest.json"

def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json`, adding the hash of every output file it lists and where/when it was made."""
    folder = Path(folder)
    outputs = {name: sha256_tree(folder / name) for name in manifest.get("outputs", [])}
    full = {
        **manifest,
        "outputs": outputs,
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return full

def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())
