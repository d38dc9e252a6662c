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
    """Write `manifest.json`, adding the hash of every output file it lists and where/when it was made.

    Each output is hashed here, once; later runs trust the recorded hash, guarded by the output's size and
    modification time (`output_stats`, see `changed_outputs`)."""
    folder = Path(folder)
    outputs = {name: sha256_tree(folder / name) for name in manifest.get("outputs", [])}
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

def file_stats(path: Path) -> list[int]:
    """[files, total bytes, newest modification time in ns] of a file or a folder's files: a cheap guard that the
    content a manifest hashed is still what lies there (no re-hashing of weights on every run)."""
    path = Path(path)
    # `datasets` writes its map() caches (cache-<fingerprint>.arrow) beside a saved dataset that a Trainer reads:
    # they are the reader's, not the stage's content
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                           and not (p.name.startswith("cache-") and p.suffix == ".arrow")]
    stats = [f.stat() for f in files]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]

def changed_outputs(folder: Path) -> list[str]:
    """The outputs of a finished stage folder whose files changed (or vanished) since its manifest hashed them.
    Manifests written before the guard existed have no stats and are trusted."""
    manifest = read_manifest(folder)
    recorded = manifest.get("output_stats", {})
    return [name for name, stats in recorded.items() if file_stats(Path(folder) / name) != stats]
