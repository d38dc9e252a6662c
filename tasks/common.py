"""Small helpers every stage uses: content hashes, manifests, JSONL I/O, seeding.

A stage folder always holds `manifest.json`: what the stage made (relative file names and their hashes),
from which inputs (their cache keys / hashes), with which config, and its headline metrics. The flow writes
a stage into `<folder>.partial` and renames it when the stage has finished, so a folder with a manifest is
always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
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


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageError(Exception):
    """A problem the user can fix (bad data, a gate, a missing file): shown as a message, not a traceback."""


def plot_curves(path: Path, history: list[dict[str, Any]], keys: list[str], title: str) -> list[str]:
    """Plot the given Trainer `log_history` keys against step into one PNG; returns the keys found."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    found = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, max(len(found), 1), figsize=(4 * max(len(found), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], found, strict=False):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return found


def trainer_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Headline numbers from a Trainer's `log_history`: the last value of each logged scalar."""
    last: dict[str, float] = {}
    for entry in history:
        for k, v in entry.items():
            if isinstance(v, int | float) and k not in ("epoch",):
                last[k] = float(v)
    return last


def last_complete_checkpoint(folder: Path) -> str | None:
    """Newest `checkpoint-N` the Trainer finished writing, or None.

    The Trainer writes a checkpoint's model, optimizer, scheduler and RNG state first and `trainer_state.json`
    last, so a checkpoint whose state file is missing or unreadable was cut short (a kill -9 mid-save) and is
    skipped, never resumed from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in candidates:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(ckpt)
    return None


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


# --- progress ------------------------------------------------------------------------------------------------
# A stage reports how far it is (0..1); the pipeline flow installs a reporter that shows it in the Prefect UI
# as a progress artifact. Without one (a plain `run()` call, a launched worker process) this is a no-op.
_progress_reporter: Any = None


def set_progress_reporter(reporter: Any) -> None:
    global _progress_reporter
    _progress_reporter = reporter


def report_progress(fraction: float) -> None:
    if _progress_reporter is not None:
        _progress_reporter(min(max(fraction, 0.0), 1.0))


def progress_callback() -> Any:
    """A Trainer callback that reports global_step / max_steps, at most every 2 s (each report is an API call)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        last = 0.0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and state.max_steps and (
                    time.monotonic() - self.last > 2.0 or state.global_step == state.max_steps):
                self.last = time.monotonic()
                report_progress(state.global_step / state.max_steps)

    return Progress()


def add_step_metrics(trainer: Any) -> None:
    """Add `tokens_per_s` (non-padding tokens since the previous log) and `peak_memory_bytes` to every step log.

    The callback goes first in the Trainer's list: the logs dict it extends is then the one the MLflow callback
    logs to the stage's child run; the copy already kept in `state.log_history` gets the same values.
    """
    from transformers import TrainerCallback

    from tasks.modeling import peak_memory_bytes

    class StepMetrics(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.last: tuple[float, int] | None = None  # (monotonic seconds, tokens seen) at the previous log

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = (time.monotonic(), int(state.num_input_tokens_seen or 0))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs is None or "loss" not in logs:  # the end-of-training summary has its own figures
                return
            now, tokens = time.monotonic(), int(state.num_input_tokens_seen or 0)
            extra: dict[str, float] = {"peak_memory_bytes": float(peak_memory_bytes())}
            if self.last is not None and now > self.last[0] and tokens > self.last[1]:
                extra["tokens_per_s"] = round((tokens - self.last[1]) / (now - self.last[0]), 2)
            self.last = (now, tokens)
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    trainer.callback_handler.callbacks.insert(0, StepMetrics())
