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
