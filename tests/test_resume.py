"""Kill -9 in the middle of SFT, re-run the same command: training resumes from the last complete checkpoint
and the killed process's MLflow runs are marked KILLED instead of staying RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from alignflow.tasks.lib.training import last_complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_half_written_checkpoint_is_never_used(tmp_path: Path) -> None:
    for step, complete in ((10, True), (20, True), (30, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_st')  # cut off mid-write
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    # a run killed after its last step's checkpoint resumes from the one before: the Trainer resumed at max_steps
    # would train a step more
    assert last_complete_checkpoint(tmp_path, below=20) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path, below=10) is None
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_kill_9_during_sft_then_resume(in_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir", str(work),
           "--set", "sft.max_steps=80", "--set", "sft.save_steps=10", "--set", "sft.batch_size=2"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # own process group: the kill takes Prefect's server too
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(last_complete_checkpoint(p) for p in (work / "stages" / "sft").glob("*.partial/checkpoints")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before a checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((work / "stages" / "sft").glob("*/manifest.json"))  # nothing published by the killed run

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    sft_runs = sorted((r for r in runs if r.info.run_name == "sft"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in sft_runs] == ["KILLED", "FINISHED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    resumed_from = int(sft_runs[-1].data.tags["alignflow.resumed_from"])
    assert resumed_from >= 10 and resumed_from % 10 == 0
    assert sft_runs[-1].data.metrics["global_step"] == 80  # finished the schedule, not restarted it
