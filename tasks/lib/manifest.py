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

from alignflow.tasks.lib.hashing import sha256_tree, sha256_weights

MANIFEST = "manifest.json"
# A training stage's weights folder: hashed by what it computes (sha256_weights), not by its bytes, so the
# same weights made in two work dirs give the same hash and the stages after them the same keys.
WEIGHTS_OUTPUTS = frozenset({"adapter", "model"})

def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json`, adding the hash of every output file it lists and where/when it was made.

    Each output is hashed here, once; later runs trust the recorded hash, guarded by the output's size and
    modification time (`output_stats`, see `changed_outputs`)."""
    folder = Path(folder)
    outputs = {name: (sha256_weights if name in WEIGHTS_OUTPUTS else sha256_tree)(folder / name)
               for name in manifest.get("outputs", [])}
    full = {
        **manifest,
        "outputs": outputs,
        "output_stats": {name: file_stats(folder / name) for name in outputs},
        "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return full

def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())

def file_stats(path: Path) -> dict[str, list[int]]:
    """{relative file name: [bytes, modification time in ns]} of a file or of a folder's files: a cheap guard that
    the content a manifest hashed is still what lies there (no re-hashing of weights on every run)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return {"": [st.st_size, st.st_mtime_ns]}
    return {f.relative_to(path).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(path.rglob("*")) if f.is_file()}

def changed_outputs(folder: Path) -> list[str]:
    """The outputs of a finished stage folder whose recorded files changed size or modification time, or vanished,
    since its manifest hashed them. Files added later are not the stage's content and are ignored (`datasets`
    writes its map caches, and their temporary files, beside a saved dataset a Trainer reads). Manifests written
    before the guard existed have no stats and are trusted."""
    manifest = read_manifest(folder)
    changed = []
    for name, recorded in manifest.get("output_stats", {}).items():
        if not isinstance(recorded, dict):
            continue
        root = Path(folder) / name
        for rel, stats in recorded.items():
            f = root / rel if rel else root
            try:
                st = f.stat()
            except OSError:
                changed.append(name)
                break
            if [st.st_size, st.st_mtime_ns] != stats:
                changed.append(name)
                break
    return changed
