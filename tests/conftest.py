"""Shared fixtures. Everything runs the real stack (transformers, TRL, Prefect, MLflow) on a tiny model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # each test's work dir holds its own SQLite store
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share the machine's cores: one torch thread per worker (and per process a test starts,
    # which inherits it), not two pools of every core contending. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The slowest files first (seconds of one file alone on 2 cores, `pytest --durations=0`): xdist hands whole files
# to its workers in collection order (`--dist loadfile --no-loadscope-reorder`), so the long ones start at once and
# the short ones fill in at the end. A file not listed runs after these, in name order.
SLOWEST_FIRST = ["test_team.py", "test_registry.py", "test_training_options.py", "test_sweep.py", "test_online_rl.py",
                 "test_cache_keys.py", "test_lifecycle.py", "test_retrain.py", "test_resume.py",
                 "test_tracking_outage.py", "test_cli_server.py", "test_concurrency.py", "test_policy.py",
                 "test_pipeline.py", "test_scale_out.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One throwaway Prefect server (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def in_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the repo root, as the README's commands do (recipes name data/ relative to it)."""
    monkeypatch.chdir(ROOT)
    return ROOT
