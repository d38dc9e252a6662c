"""How far a stage is (0..1), shown in the Prefect UI as a progress artifact.

The pipeline flow installs a reporter; without one (a plain `run()` call, a launched worker process) reporting
is a no-op.
"""

from __future__ import annotations

import time
from typing import Any

# --- progress ------------------------------------------------------------------------------------------------
# A stage reports how far it is (0..1); the pipeline flow installs a reporter that shows it in the Prefect UI
# as a progress artifact. Without one (a plain `run()` call, a launched worker process) this is a no-op.
_progress_reporter: Any = None

def set_progress_reporter(reporter: Any) -> None:
    global _progress_reporter
    _progress_reporter = reporter

def report_progress(fraction: float, detail: str | None = None) -> None:
    """`detail`: a line for people (rate, ETA); the pipeline shows it in the artifact's description and logs it."""
    if _progress_reporter is not None:
        _progress_reporter(min(max(fraction, 0.0), 1.0), detail)


REPORT_EVERY = 5.0  # seconds between two reports of a RecordMeter (each is an API call and a log line)


class RecordMeter:
    """Counts records through a long loop and reports, at most every REPORT_EVERY seconds, the fraction done
    with records/s and an ETA (`what`: e.g. "curate"); `total` is an estimate (0: unknown, no ETA)."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.every = what, total, REPORT_EVERY
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            report_progress(*self.status(now))

    def status(self, now: float) -> tuple[float, str]:
        rate = self.done / max(now - self.started, 1e-9)
        total = max(self.total, self.done)
        text = f"{self.what}: {self.done:,} of ~{total:,} records, {rate:,.0f} records/s"
        if rate > 0 and self.total:
            text += f", ETA {_clock((total - self.done) / rate)}"
        return (self.done / total if self.total else 0.0), text  # no estimate (not JSON Lines): no fraction


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{s:02d}s"

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
