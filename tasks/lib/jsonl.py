"""JSON Lines reading and writing (UTF-8, one object per line, blank lines skipped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)

_ENCODE = json.JSONEncoder(ensure_ascii=False).encode  # = json.dumps(row, ensure_ascii=False), one encoder for all


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(_ENCODE(row) + "\n")
            n += 1
    return n
