"""Cross-process coordination on one host: folder locks and liveness of a pid.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on `<folder>.lock` (flock: released when the process exits, however it exits).

    Two runs sharing a work dir take turns building the same stage or base-model folder instead of both
    writing its `.partial` copy at once.
    """
    import fcntl

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield

def pid_alive(pid: int | None) -> bool:
    """Is process `pid` running on this host? A zombie (exited, not yet reaped by its parent) counts as gone."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:  # no /proc (macOS): os.kill said it exists
        return True
