"""Two pipeline runs at once on one work dir: the per-stage lock makes one wait for the other instead of both
writing the same stage folder; both finish, and each parent run shows the whole chain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from alignflow.recipe import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_two_runs_at_once_share_a_work_dir_safely(in_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir", str(work)]
    # Prefect's own home database is created on first use; start from one that exists, as a team's server does.
    warm = subprocess.run([*cmd[:-1], str(tmp_path / "warm-up"), "--until", "curate"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-2000:]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for stage in STAGES:
        finished = list((work / "stages" / stage).glob("*/manifest.json"))
        # one folder per stage: no duplicate or torn work; register, a side effect, acts in each run (its own folder)
        assert len(finished) == (2 if stage == "register" else 1), f"{stage}: {finished}"
        assert not list((work / "stages" / stage).glob("*.partial"))
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string="tags.`alignflow.recipe_hash` != ''")
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    for parent in parents:
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == sorted(STAGES)
    assert len(client.search_model_versions("name='smoke-assistant'")) == 1  # the same adapter, registered once
    # the run that lost the race to promote it found its own version champion: no challenger, no failed gate
    assert client.get_registered_model("smoke-assistant").aliases == {"champion": 1}
    assert client.get_model_version("smoke-assistant", "1").tags["alignflow.gate"] == "passed"


def test_a_stage_that_waited_for_another_runs_lock_reports_the_wait_apart(prefect_server: None, in_root: Path,
                                                                          tmp_path: Path) -> None:
    import shutil
    import threading
    import time

    from alignflow.flows.pipeline import pipeline
    from alignflow.recipe import load_recipe
    from alignflow.tasks.lib.processes import folder_lock

    smoke = load_recipe(ROOT / "configs" / "smoke.yaml")
    work = tmp_path / "w"
    first = pipeline(recipe=smoke, work_dir=str(work), until="curate")
    folder = Path(first["stages"]["curate"]["folder"])
    kept = tmp_path / "kept-curate"
    shutil.copytree(folder, kept)
    shutil.rmtree(folder)
    held, hold_s = threading.Event(), 5.0

    def other_run_building_it() -> None:  # as a concurrent run would: holds the lock, then publishes the folder
        with folder_lock(folder):
            held.set()
            time.sleep(hold_s)
            shutil.copytree(kept, folder)

    thread = threading.Thread(target=other_run_building_it)
    thread.start()
    held.wait(10)
    second = pipeline(recipe=smoke, work_dir=str(work), until="curate")
    thread.join()
    info = second["stages"]["curate"]
    assert info["cached"] is True
    assert info["waited_seconds"] >= hold_s - 1.0  # the wait is reported as a wait ...
    assert info["seconds"] < info["waited_seconds"]  # ... and not as the cached stage's own seconds
    client = MlflowClient(second["tracking_uri"])
    runs = client.search_runs([second["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{second['parent_run_id']}'")
    metrics = {r.info.run_name: r.data.metrics for r in runs}["curate"]
    assert metrics["lock_wait_seconds"] >= hold_s - 1.0 and metrics["stage_seconds"] < metrics["lock_wait_seconds"]
