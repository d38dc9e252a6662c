"""Ctrl-C across Prefect subflows.

Prefect 3.8's flow engine drops a KeyboardInterrupt that arrives after a subflow's function has returned, while it
ends the run: `FlowRunEngine.initialize_run` logs "BaseException was raised after user code finished executing" at
debug level and returns normally. The stretch lasts up to a second or two (completion hooks, then joining the
heartbeat thread, which sleeps in 1 s steps). A Ctrl-C there would be lost: a sweep would go on to its next trial,
a pipeline from curate's shards to hours of training. So the flows call their subflows inside
`ctrl_c_remembered()` and look at the event when the subflow returns.

Only the main thread can set a signal handler: a flow run from a thread (a sweep's `--parallel` trials) or by a
worker keeps Python's own handling. A SIGINT the process was started to ignore (a background job of a
non-interactive shell) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ctrl_c_remembered() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered in the event yielded (nested blocks each
    remember it: the inner handler calls the outer one)."""
    seen = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield seen
        return

    def remember(signum: int, frame: Any) -> None:
        seen.set()
        previous(signum, frame)  # Python's default_int_handler (or an outer block's): raises KeyboardInterrupt

    signal.signal(signal.SIGINT, remember)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def stop_after_subflow() -> Iterator[None]:
    """Around one subflow call: a Ctrl-C that Prefect dropped as that subflow ended is raised once it returns."""
    with ctrl_c_remembered() as seen:
        yield
    if seen.is_set():
        raise KeyboardInterrupt
