"""Shared fixtures. Everything runs the real stack (transformers, TRL, Prefect, MLflow) on a tiny model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
# Measured 2026-12-07 with -n0 on a shared 2-core machine: registry 569 s, cache_keys 389 s (with the smoke seed's
# run, which a session pays once: tests/conftest.py smoke_seed), tracking_outage 296 s, lifecycle about 250 s,
# training_options 156 s; team, sweep and online_rl as before (unmeasured here). Team's worker makes no seed; the
# other one makes it during registry, before cache_keys, lifecycle and the others that copy it are handed out.
SLOWEST_FIRST = ["test_team.py", "test_registry.py", "test_cache_keys.py", "test_sweep.py", "test_online_rl.py",
                 "test_tracking_outage.py", "test_lifecycle.py", "test_training_options.py", "test_retrain.py",
                 "test_resume.py", "test_cli_server.py", "test_concurrency.py", "test_policy.py",
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


# What a warm copy of the smoke seed holds: the stage folders, the built tiny base, the answers / reference
# log-prob caches and Prefect's cache records. Not mlflow.db nor mlartifacts: each copy starts with an empty
# MLflow store and registry of its own.
WARM_PARTS = ("stages", "base", "cache", ".prefect-results")


@pytest.fixture(scope="session")
def smoke_seed(prefect_server: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One cold run of configs/smoke.yaml per test session (about 60 s of CPU), for the tests whose check starts
    after a first plain smoke run: `warm_copy` gives each its own work dir in which that run's stages come back
    from the cache (their keys are content hashes, not paths), so only register runs.

    Under xdist the workers share it: the first worker to need it runs it, holding a lock in the session's
    common temporary folder; the others wait for it, then read it. The run's work dir is renamed to `snapshot`
    afterwards, so that a copy that still read a path of the seed (rather than its own) fails instead of passing
    on the seed's files. `result` is the cold run's result, its folders under `snapshot`."""
    import json

    import mlflow
    from filelock import FileLock  # (a dependency of torch)

    from alignflow.flows.pipeline import pipeline
    from alignflow.recipe import load_recipe

    # the session's own folder: with xdist, the parent of the worker's (pytest-N/popen-gwK); never an older run's
    common = tmp_path_factory.getbasetemp()
    common = common.parent if os.environ.get("PYTEST_XDIST_WORKER") else common
    root = common / "smoke-seed"
    # a seed that hangs must not hold the other worker forever (a cold smoke run takes about a minute)
    with FileLock(str(common / "smoke-seed.lock"), timeout=1800):
        if (root / "failed.txt").exists():  # the other worker's seed failed: its error, not a second (warm) try
            pytest.fail(f"the session's smoke seed failed in another worker:\n{(root / 'failed.txt').read_text()}")
        if not (root / "result.json").exists():
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            try:
                with pytest.MonkeyPatch.context() as monkeypatch:
                    monkeypatch.chdir(ROOT)  # the recipe names data/ relative to the repository
                    result = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"),
                                      work_dir=str(root / "work"))
            except BaseException:
                import traceback

                root.mkdir(parents=True, exist_ok=True)
                (root / "failed.txt").write_text(traceback.format_exc())
                raise
            finally:
                mlflow.set_tracking_uri(uri)  # the run pointed this process (and its children) at the seed's store
            (root / "work").rename(root / "snapshot")
            for info in result["stages"].values():
                info["folder"] = str(root / "snapshot" / Path(info["folder"]).relative_to(root / "work"))
            (root / "result.json").write_text(json.dumps(result))
    return {"snapshot": root / "snapshot", "result": json.loads((root / "result.json").read_text())}


def warm_copy(seed: dict[str, Any], work: Path) -> Path:
    """A new work dir holding the smoke seed's stages and caches (WARM_PARTS) and nothing of its MLflow store."""
    for part in WARM_PARTS:
        shutil.copytree(seed["snapshot"] / part, work / part, symlinks=True)
    return work
