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
        assert len(finished) == 1, f"{stage}: {finished}"  # one folder per stage: no duplicate or torn work
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
