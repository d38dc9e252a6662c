"""Step metrics on their way to the stage's MLflow run, never blocking training.

The Trainers' own MLflow callback sends each step's metrics from MLflow's async queue, which drops a batch that
fails (the tracking server restarting, a network blip) with an error line: a restart of the server during hours
of training leaves holes in the loss curves. Here the training loop only appends to a buffer; a background
thread sends it with `MlflowClient.log_batch`. While the server does not answer (a 2 s probe of its `/health`
after a failure, so that no request waits through MLflow's retries), the points are kept and sent when it
answers again. At the end of training the buffer waits up to `ALIGNFLOW_TRACKING_WAIT_S` (default 120 s) for
the server to take what is left; whatever it still has then goes to `unrecorded_metrics.jsonl` in the stage
folder (each point with its run, step and time), the stage finishes and keeps its outputs, and the flow logs
that file into the run that trained when the server answers again.

Memory is bounded: past `capacity` points, the oldest half goes to a segment file on disk (written once,
atomically, then sent from there and deleted): nothing is dropped, whatever the outage's length, and sending a
long backlog never rewrites a file or holds the lock the training loop takes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

UNRECORDED = "unrecorded_metrics.jsonl"  # in the stage folder: {"run_id", "key", "value", "timestamp" (ms), "step"}
CAPACITY = 100_000  # points held in memory (~100 bytes each: ~10 MB) before the oldest half goes to disk
BATCH = 1000  # MLflow's limit on metrics per log_batch call
PAUSES = (1.0, 2.0, 5.0, 10.0)  # seconds between attempts while the server does not answer; the last repeats

Point = tuple[str, float, int, int]  # (key, value, timestamp ms, step)
log = logging.getLogger("alignflow")


def wait_seconds() -> float:
    """How long the end of training waits for an absent tracking server before writing the file instead (keep it
    under the Trainer's `ddp_timeout`, 1800 s: in a launched run the other processes wait for the main one)."""
    return float(os.environ.get("ALIGNFLOW_TRACKING_WAIT_S", "120"))


def server_answers(tracking_uri: str, timeout: float = 2.0) -> bool:
    """False when an HTTP tracking server does not answer its `/health` within `timeout` seconds (any HTTP answer,
    401 included, counts: the server is there). True for every other store (SQLite, files, Databricks), whose
    errors are not outages."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, reset, timed out, no route
        return False
    return True


@contextmanager
def without_retries() -> Iterator[None]:
    """MLflow requests in this block fail at once (no retries, 2 s timeout): for calls made while the server is
    known to be away, whose failure is handled. (MLflow reads these variables on every request.)"""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MetricBuffer:
    """A bounded, retrying queue of metric points for one MLflow run (see the module's text)."""

    def __init__(self, tracking_uri: str, run_id: str, out: Path, capacity: int = CAPACITY) -> None:
        from mlflow import MlflowClient

        self.client, self.tracking_uri, self.run_id = MlflowClient(tracking_uri), tracking_uri, run_id
        self.out, self.capacity = Path(out), capacity
        self.spill = self.out / f".metrics-spill-{run_id}"  # segments 00000001.jsonl, ...: oldest first
        self.points: list[Point] = []  # in memory, oldest first
        self.inflight = 0  # points at the head of `points` being sent now (a spill never takes those)
        self.segments = 0
        self.current: tuple[Path, list[Point], int] | None = None  # the segment being sent: file, points, offset
        self.lock, self.wake, self.stopping = threading.Lock(), threading.Event(), threading.Event()
        self.closed = False  # set by close(): a request still in flight then changes nothing
        self.sent, self.failures, self.down_since = 0, 0, None  # down_since: monotonic s of the first failure
        self.thread = threading.Thread(target=self._loop, name="alignflow-step-metrics", daemon=True)
        self.thread.start()

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics; returns at once whatever the server does (past `capacity` points, after
        writing the oldest half to a segment file)."""
        now = int(time.time() * 1000)
        overflow: list[Point] = []
        with self.lock:
            self.points.extend((k, float(v), now, step) for k, v in metrics.items())
            if len(self.points) > self.capacity:  # a long outage: the oldest half waits on disk, not in memory
                # (the order of sending does not matter: each point carries its own step and time)
                half = slice(self.inflight, self.inflight + len(self.points) // 2)
                overflow = self.points[half]
                del self.points[half]
                self.segments += 1
                segment = self.spill / f"{self.segments:08d}.jsonl"
        if overflow:
            _write(segment, [(self.run_id, *p) for p in overflow])
        self.wake.set()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait()
            self.wake.clear()
            while not self.stopping.is_set() and self._send_some():
                pass
            if self.failures and not self.stopping.is_set():  # the server is away: pause, then try again
                self.stopping.wait(PAUSES[min(self.failures - 1, len(PAUSES) - 1)])
                self.wake.set()

    def _next(self) -> tuple[list[Point], bool]:
        """Up to BATCH points to send: from the oldest segment on disk first, then from memory."""
        if self.current is None:
            files = sorted(self.spill.glob("*.jsonl")) if self.spill.exists() else []
            if files:
                self.current = (files[0], [p[1:] for p in _read(files[0])], 0)
        if self.current is not None:
            _, points, offset = self.current
            return points[offset : offset + BATCH], True
        with self.lock:
            batch = self.points[:BATCH]
            self.inflight = len(batch)
        return batch, False

    def _send_some(self) -> bool:
        """Send one batch. True when it went and more may be waiting; False when nothing is left or the server
        did not take it."""
        from mlflow.entities import Metric

        if self.failures and not server_answers(self.tracking_uri):  # still away: do not wait through retries
            self._failed("no answer from /health")
            return False
        batch, from_disk = self._next()
        if not batch:
            return False
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch])
        except Exception as e:  # requests' ConnectionError, MlflowException (5xx after retries), timeouts
            with self.lock:
                self.inflight = 0
            self._failed(type(e).__name__)
            return False
        with self.lock:
            if self.closed:  # close() gave up waiting for this request and kept its points: leave them be
                return False
            if from_disk:
                path, points, offset = self.current  # type: ignore[misc]
                self.current = (path, points, offset + len(batch))
                if offset + len(batch) >= len(points):
                    with suppress(FileNotFoundError):
                        path.unlink()
                    self.current = None
            else:
                del self.points[: len(batch)]
                self.inflight = 0
        if self.down_since is not None:
            log.warning("the tracking server answers again after %.0f s; sending the kept step metrics",
                        time.monotonic() - self.down_since)
        self.sent += len(batch)
        self.failures, self.down_since = 0, None
        return True

    def _failed(self, why: str) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("the tracking server did not take step metrics (%s); training goes on, the metrics are "
                        "kept and sent when it answers", why)
        self.failures += 1

    def _pending(self) -> bool:
        with self.lock:
            return bool(self.points) or self.current is not None or (
                self.spill.exists() and any(self.spill.glob("*.jsonl")))

    def close(self, wait_s: float) -> dict[str, Any]:
        """Send what is left, waiting up to `wait_s` for an absent server; then keep the rest in the stage folder.

        Returns {"sent": points sent, "unrecorded": points kept in the file, "keys": their metric names,
        "steps": [first, last] step among them, "file": the file or None}."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and self._pending():
            self.wake.set()
            time.sleep(0.2)
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=10)  # a request in flight: its points are kept below (sent twice at worst)
        with self.lock:
            self.closed = True
            rest = list(self.points)
            self.points = []
            if self.current is not None:
                path, points, offset = self.current
                rest += points[offset:]
                with suppress(FileNotFoundError):
                    path.unlink()
        if self.spill.exists():
            for segment in sorted(self.spill.glob("*.jsonl")):
                rest += [p[1:] for p in _read(segment)]
            shutil.rmtree(self.spill, ignore_errors=True)
        result: dict[str, Any] = {"sent": self.sent, "unrecorded": len(rest), "file": None, "keys": [], "steps": []}
        if rest:
            file = self.out / UNRECORDED
            earlier = [(r, *p) for r, p in read_unrecorded(self.out)]  # a crashed attempt's, for its own run
            _write(file, earlier + [(self.run_id, *p) for p in rest])
            result.update(file=str(file), keys=sorted({p[0] for p in rest}),
                          steps=[min(p[3] for p in rest), max(p[3] for p in rest)])
        return result


def _write(path: Path, rows: list[tuple[str, str, float, int, int]]) -> None:
    """(run_id, key, value, timestamp, step) rows as JSON lines, atomically (a crash leaves the old file or the
    new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r, k, v, t, s in rows:
            f.write(json.dumps({"run_id": r, "key": k, "value": v, "timestamp": t, "step": s}) + "\n")
    os.replace(tmp, path)


def _read(path: Path) -> list[tuple[str, str, float, int, int]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            rows.append((str(r.get("run_id", "")), str(r["key"]), float(r["value"]), int(r["timestamp"]),
                         int(r["step"])))
        except (ValueError, KeyError, TypeError, AttributeError):  # a damaged line: skip it, keep the rest
            if line.strip():
                log.warning("%s: skipped a damaged line", path)
    return rows


def read_unrecorded(folder: Path) -> list[tuple[str, Point]]:
    """The points a stage could not send, as (run_id, (key, value, timestamp ms, step)); [] when none."""
    path = Path(folder) / UNRECORDED
    return [(r, (k, v, t, s)) for r, k, v, t, s in _read(path)] if path.exists() else []


def describe(points: list[tuple[str, Point]]) -> str:
    """For people: how many values, of which metrics, at which steps."""
    keys = sorted({p[0] for _, p in points})
    names = ", ".join(keys[:8]) + (", …" if len(keys) > 8 else "")
    steps = [p[3] for _, p in points]
    return f"{len(points)} step metric values ({names}; steps {min(steps)}–{max(steps)})"


def tracking_callback(report_to: list[str], out: Path) -> list[Any]:
    """The Trainer callback that sends step metrics to the active MLflow run through a MetricBuffer: [] unless the
    stage reports to MLflow. Only the main process sends (a launched one finds its run in MLFLOW_RUN_ID). Pass
    `report_to=["none"]` to the Trainer beside it, so that its own MLflow callback stays out."""
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
            return MetricBuffer(mlflow.get_tracking_uri(), run_id, Path(out)) if run_id else None

        def close(self) -> None:
            if self.buffer is not None:
                gone = bool(self.result and self.result["unrecorded"])  # waited once already: do not wait again
                self.result = self.buffer.close(0.0 if gone else wait_seconds())
                self.buffer = None
                if self.result["unrecorded"]:
                    log.warning("%s were not recorded in MLflow: they are kept in %s and logged into the stage's "
                                "run when the flow next records it", describe(read_unrecorded(Path(out))),
                                self.result["file"])

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
            after_training = self.buffer is None  # trainer.evaluate() after train(): sent the same way, now
            if after_training:
                self.buffer = self.open()
            if self.buffer is not None:
                self.buffer.add(metrics, int(state.global_step))
            if after_training:
                self.close()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

    return [BufferedMlflow()]
