"""Step metrics on their way to the stage's MLflow run, never blocking training.

The Trainers' own MLflow callback sends each step's metrics from a background queue (MLflow's async logging),
but a batch that fails (the tracking server restarting, a network blip) is dropped with an error line: a
restart of the server during hours of training leaves holes in the loss curves, and a server that stays away
long enough stops the run. Here the training loop only appends to a bounded buffer; a background thread sends
it with `MlflowClient.log_batch` and, while the server does not answer, keeps the metrics and tries again with
a growing pause. At the end of training the buffer waits up to `ALIGNFLOW_TRACKING_WAIT_S` (default 300 s)
for the server to take what is left; whatever it still has then goes to `unrecorded_metrics.jsonl` in the
stage folder (with each point's original step and time), the stage finishes and keeps its outputs, and the
flow logs that file into the stage's run when the server answers again (the same run, or a later cached one).

Memory is bounded: past `capacity` points, the oldest half goes to the same file on disk (then sent from
there once the server answers): nothing is dropped, whatever the outage's length.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

UNRECORDED = "unrecorded_metrics.jsonl"  # in the stage folder: {"key", "value", "timestamp" (ms), "step"} per line
CAPACITY = 100_000  # points held in memory (~100 bytes each: ~10 MB) before the oldest half spills to disk
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PAUSES = (1.0, 2.0, 5.0, 10.0)  # seconds between attempts while the server does not answer; the last repeats

log = logging.getLogger("alignflow")


def wait_seconds() -> float:
    """How long the end of training waits for an absent tracking server before writing the file instead."""
    return float(os.environ.get("ALIGNFLOW_TRACKING_WAIT_S", "300"))


class MetricBuffer:
    """A bounded, retrying queue of metric points for one MLflow run (see the module's text)."""

    def __init__(self, tracking_uri: str, run_id: str, spill: Path, capacity: int = CAPACITY) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.spill, self.capacity = MlflowClient(tracking_uri), run_id, spill, capacity
        self.points: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step), oldest first
        self.inflight = 0  # points at the head of `points` being sent now (a spill never takes those)
        self.lock, self.wake, self.stopping = threading.Lock(), threading.Event(), False
        self.sent, self.failures, self.down_since = 0, 0, None  # down_since: monotonic s of the first failure
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, name="alignflow-step-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics; returns at once whatever the server does."""
        now = int(time.time() * 1000)
        with self.lock:
            self.points.extend((k, float(v), now, step) for k, v in metrics.items())
            if len(self.points) > self.capacity:  # a long outage: the oldest half waits on disk, not in memory
                # (the order of sending does not matter: each point carries its own step and time)
                half = slice(self.inflight, self.inflight + len(self.points) // 2)
                _append(self.spill, self.points[half])
                del self.points[half]
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopping:
            self.wake.wait()
            self.wake.clear()
            while not self.stopping and self._send_some():
                pass
            if self.failures and not self.stopping:  # the server is away: pause, then try again
                time.sleep(PAUSES[min(self.failures - 1, len(PAUSES) - 1)])
                self.wake.set()

    def _send_some(self) -> bool:
        """Send up to BATCH points from disk first (the oldest), then from memory. True when something was sent
        and more may be waiting; False when nothing is left or the server did not take it."""
        from mlflow.entities import Metric

        from_disk = self.spill.exists()
        with self.lock:
            batch = _read(self.spill)[:BATCH] if from_disk else self.points[:BATCH]
            self.inflight = 0 if from_disk else len(batch)
        if not batch:
            return False
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch])
        except Exception as e:  # requests' ConnectionError, MlflowException (5xx after retries), timeouts
            with self.lock:
                self.inflight = 0
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("the tracking server did not take step metrics (%s); training goes on, metrics are "
                            "kept and sent when it answers", type(e).__name__)
            self.failures += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            return False
        with self.lock:
            if from_disk:
                rest = _read(self.spill)[len(batch):]
                self.spill.unlink()
                if rest:
                    _append(self.spill, rest)
            else:
                del self.points[: len(batch)]
                self.inflight = 0
        if self.down_since is not None:
            log.warning("the tracking server answers again after %.0f s; sending the kept step metrics",
                        time.monotonic() - self.down_since)
        self.sent += len(batch)
        self.failures, self.down_since = 0, None
        return True

    def close(self, wait_s: float) -> dict[str, Any]:
        """Send what is left, waiting up to `wait_s` for an absent server; then keep the rest in the spill file.

        Returns {"sent": points sent, "unrecorded": points left in the file, "keys": their metric names,
        "steps": [first, last] step among them, "file": the file or None}."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with self.lock:
                left = bool(self.points) or self.spill.exists()
            if not left:
                break
            self.wake.set()
            time.sleep(0.2)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=60)  # a log_batch in flight finishes (MLflow's own timeout bounds it)
        with self.lock:
            if self.points:
                _append(self.spill, self.points)
                self.points = []
        rest = _read(self.spill)
        result: dict[str, Any] = {"sent": self.sent, "unrecorded": len(rest), "file": None, "keys": [], "steps": []}
        if rest:
            result.update(file=str(self.spill), keys=sorted({p[0] for p in rest}),
                          steps=[min(p[3] for p in rest), max(p[3] for p in rest)])
        return result


def _append(path: Path, points: list[tuple[str, float, int, int]]) -> None:
    with path.open("a") as f:
        for k, v, t, s in points:
            f.write(json.dumps({"key": k, "value": v, "timestamp": t, "step": s}) + "\n")


def _read(path: Path) -> list[tuple[str, float, int, int]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]


def read_unrecorded(folder: Path) -> list[tuple[str, float, int, int]]:
    """The points a stage could not send, as (key, value, timestamp ms, step); [] when there are none."""
    return _read(Path(folder) / UNRECORDED)


def describe(result: dict[str, Any]) -> str:
    """One line for people: how many points, which metrics, which steps, where they are kept."""
    keys = ", ".join(result["keys"][:6]) + (", …" if len(result["keys"]) > 6 else "")
    return (f"{result['unrecorded']} step metric values ({keys}; steps {result['steps'][0]}–{result['steps'][1]}) "
            f"were not recorded in MLflow: they are kept in {result['file']} and logged into the stage's run "
            "when the flow next records it")


def tracking_callback(report_to: list[str], out: Path) -> list[Any]:
    """The Trainer callback that sends step metrics to the active MLflow run through a MetricBuffer: [] unless the
    stage reports to MLflow. Only the main process sends (launched workers too: their run id comes in
    MLFLOW_RUN_ID). Pass `report_to=["none"]` to the Trainer beside it, so that its own callback stays out."""
    if "mlflow" not in report_to:
        return []
    from transformers import TrainerCallback

    class BufferedMlflow(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.buffer: MetricBuffer | None = None
            self.result: dict[str, Any] | None = None  # the last close()'s

        def open(self) -> MetricBuffer | None:
            import mlflow

            active = mlflow.active_run()
            run_id = active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID")
            return MetricBuffer(mlflow.get_tracking_uri(), run_id, Path(out) / UNRECORDED) if run_id else None

        def close(self) -> None:
            if self.buffer is not None:
                gone = bool(self.result and self.result["unrecorded"])  # waited once already: do not wait again
                self.result = self.buffer.close(0.0 if gone else wait_seconds())
                self.buffer = None
                if self.result["unrecorded"]:
                    log.warning("%s", describe(self.result))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero and self.buffer is None:
                self.buffer = self.open()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            metrics = {}
            for k, v in logs.items():
                if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:  # a one-element tensor
                    v = v.item()
                if isinstance(v, int | float) and not isinstance(v, bool):
                    metrics[re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k)] = float(v)  # MLflow's allowed characters
            if not metrics:
                return
            after_training = self.buffer is None  # trainer.evaluate() after train(): send it the same way, now
            if after_training:
                self.buffer = self.open()
            if self.buffer is not None:
                self.buffer.add(metrics, int(state.global_step))
            if after_training:
                self.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

    return [BufferedMlflow()]
