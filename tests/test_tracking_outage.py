"""Training survives the tracking server: a real `mlflow server` stopped for 20 s during sft and started again,
a server that never comes back, and the bounded buffer in between (tasks/lib/step_metrics.py)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alignflow.tasks.lib.step_metrics import UNRECORDED, MetricBuffer

ROOT = Path(__file__).resolve().parents[1]
SFT_STEPS = 40  # long enough that the server goes away while sft still has steps to log
GONE_STEPS = 40  # the server gone for good right after sft's first logged step: 39 steps are left to keep (20 left too
# small a margin on a loaded machine: the poll and three HTTP calls happen while sft goes on)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`mlflow server` on SQLite in a folder; stop() and start() keep its data, as a restart does."""

    def __init__(self, home: Path) -> None:
        self.home, self.port, self.proc = home, _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}", "--artifacts-destination",
                str(self.home / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start in 120 s")

    def stop(self) -> None:
        """Gone at once, as in a crash (a graceful stop can take seconds, while sft may be nearly done)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "mlflow")
    s.home.mkdir()
    s.start()
    yield s
    if s.proc is not None:
        s.stop()


def _session_prefect() -> dict[str, str]:
    """The session's Prefect server for a CLI run (no temporary one started, with a fresh database, per command)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": str(PREFECT_API_URL.value())}


def test_sft_trains_through_a_20_s_server_outage_and_every_step_metric_arrives(server: Server, prefect_server: None,
                                                                             tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # MLflow's own retries would ride out 20 s by waiting (and a blocking logger with them): one retry here, so
    # that the run survives only if the buffer keeps the points and sends them later
    env.update(MLFLOW_TRACKING_URI=server.url, PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", **_session_prefect())
    cmd = [sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir", str(tmp_path / "w"),
           "--set", f"sft.max_steps={SFT_STEPS}", "--set", "sft.save_steps=20"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(server.url)
    try:
        sft_run_id = None
        deadline = time.monotonic() + 400
        while sft_run_id is None and time.monotonic() < deadline and run.poll() is None:  # sft's first step lands
            time.sleep(0.3)
            experiments = [e.experiment_id for e in client.search_experiments()]
            for r in client.search_runs(experiments, filter_string="attributes.run_name = 'sft'"):
                if client.get_metric_history(r.info.run_id, "loss"):
                    sft_run_id = r.info.run_id
        assert sft_run_id is not None, "sft never logged a step"
        stopped = time.time() * 1000
        server.stop()
        time.sleep(20)
        restarted = time.time() * 1000
        server.start()
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]

    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 10  # the pipeline's run and its nine stages
    assert {r.info.run_name.split("-")[0]: r.info.status for r in runs if r.info.status != "FINISHED"} == {}
    history = client.get_metric_history(sft_run_id, "loss")
    assert sorted(h.step for h in history) == list(range(1, SFT_STEPS + 1))  # complete: no hole, no duplicate
    for name in ("learning_rate", "grad_norm", "tokens_per_s"):  # (step 0: the stage's summary, if it has one)
        steps = sorted(h.step for h in client.get_metric_history(sft_run_id, name) if h.step > 0)
        assert steps == list(range(1, SFT_STEPS + 1)), name
    # training did not wait for the server: steps were taken (their times stamped) while it was away, and no two
    # steps lie as far apart as the outage (a logger that blocked until the server came back would show that gap)
    stamps = [h.timestamp for h in sorted(history, key=lambda h: h.step)]
    during = [t for t in stamps if stopped < t < restarted]
    assert during, (stopped, restarted, stamps)
    assert max(b - a for a, b in itertools.pairwise(stamps)) < 10_000, stamps  # ms
    assert "did not take step metrics" in out and "answers again" in out, out[-4000:]  # the buffer's work
    folder = Path(client.get_run(sft_run_id).data.tags["alignflow.stage_dir"])
    assert not (folder / UNRECORDED).exists()


def _dead() -> str:
    return f"http://127.0.0.1:{_free_port()}"  # nothing listens there


def test_a_server_that_never_returns_leaves_the_metrics_on_disk_then_a_rerun_logs_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer to a dead address: add() returns at once, memory stays bounded (the oldest half goes to a
    segment file), close() keeps every point in the stage folder; then the flow's tracker logs the file into the
    run that trained."""
    from mlflow.entities import RunStatus

    from alignflow.flows.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    stage = tmp_path / "stage"
    stage.mkdir()
    buffer = MetricBuffer(_dead(), "a" * 32, stage, capacity=10)
    for step in range(1, 16):
        buffer.add({"loss": 1.0 / step, "learning_rate": 0.001}, step)  # 30 points: 20 go to disk
        assert len(buffer.points) <= 12
    result = buffer.close(wait_s=1.0)
    assert result["unrecorded"] == 30 and result["sent"] == 0
    assert result["keys"] == ["learning_rate", "loss"] and result["steps"] == [1, 15]
    assert not list(stage.glob(".metrics-spill-*"))  # the segments went into the one file
    rows = [json.loads(line) for line in (stage / UNRECORDED).read_text().splitlines()]
    assert sorted((r["key"], r["step"]) for r in rows) == sorted((k, s) for s in range(1, 16)
                                                                 for k in ("loss", "learning_rate"))
    assert {r["run_id"] for r in rows} == {"a" * 32}

    # the server is back (here: a local store): recording the stage logs the kept points into the run that trained
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("outage")
    producer = client.create_run(experiment).info.run_id
    cached = client.create_run(experiment).info.run_id
    rows = [{**r, "run_id": producer} for r in rows]
    (stage / UNRECORDED).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "loss", "val')  # torn
    tracker = Tracker(client, experiment, producer)
    manifest = {"produced_by": {"mlflow_run_id": producer}, "metrics": {}}
    (stage / "manifest.json").write_text(json.dumps(manifest))
    tracker.record_stage(cached, "sft", {}, manifest, stage, cached=True, seconds=0.0)
    assert sorted(h.step for h in client.get_metric_history(producer, "loss")) == list(range(1, 16))
    assert client.get_metric_history(cached, "loss") == []
    assert not (stage / UNRECORDED).exists() and (stage / (UNRECORDED + ".sent")).exists()  # logged once
    assert client.get_run(cached).info.status == RunStatus.to_string(RunStatus.FINISHED)


def test_a_long_backlog_drains_once_the_server_answers_while_training_goes_on(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Points kept on disk and in memory during an outage all arrive, exactly once, when the server is back, while
    add() keeps being called."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the first failure at once, not after MLflow's
    stage = tmp_path / "stage"
    stage.mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("drain")).info.run_id
    buffer = MetricBuffer(_dead(), run_id, stage, capacity=500)
    for step in range(1, 1201):  # 2,400 points: several segments on disk, the rest in memory
        buffer.add({"loss": float(step), "grad_norm": 1.0}, step)
    time.sleep(1.5)  # the thread has failed at least once by now
    assert buffer.failures >= 1 and len(list(buffer.spill.glob("*.jsonl"))) >= 2
    buffer.client, buffer.tracking_uri = client, f"sqlite:///{tmp_path / 'mlflow.db'}"  # the server is back
    for step in range(1201, 1501):  # training goes on while the backlog drains
        buffer.add({"loss": float(step), "grad_norm": 1.0}, step)
    result = buffer.close(wait_s=120.0)
    assert result["unrecorded"] == 0 and result["sent"] == 3000 and not (stage / UNRECORDED).exists()
    for key in ("loss", "grad_norm"):
        steps = sorted(h.step for h in client.get_metric_history(run_id, key))
        assert steps == list(range(1, 1501)), key  # each once: no hole, no duplicate
    assert not buffer.spill.exists()


def test_a_server_gone_for_good_ends_the_run_with_the_stage_kept_then_a_rerun_records_it(server: Server,
                                                                                         prefect_server: None,
                                                                                         tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=server.url, PREFECT_HOME=str(tmp_path / "prefect"),
               ALIGNFLOW_TRACKING_WAIT_S="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", **_session_prefect())
    cmd = [sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir", str(tmp_path / "w"),
           "--until", "sft", "--set", f"sft.max_steps={GONE_STEPS}", "--set", "sft.save_steps=10"]
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(server.url)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and run.poll() is None:
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, filter_string="attributes.run_name = 'sft'")
            if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
                sft_run_id = runs[0].info.run_id
                break
            time.sleep(0.3)
        else:
            raise AssertionError("sft never logged a step")
        server.stop()
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    text = " ".join(out.split())
    assert run.returncode == 1, out[-4000:]
    assert "sft finished and its outputs are kept in" in text and "Traceback" not in out, out[-4000:]
    assert "step metric values (" in text and "loss" in text and "could not be sent and are kept in" in text, \
        out[-4000:]
    folder = next((tmp_path / "w" / "stages" / "sft").glob("*/manifest.json")).parent  # published, not .partial
    kept = [json.loads(line) for line in (folder / UNRECORDED).read_text().splitlines()]
    assert kept and {r["key"] for r in kept} >= {"loss", "learning_rate"}

    server.start()  # back: the same command reuses the finished stages and records what was kept
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    loss = client.get_metric_history(sft_run_id, "loss")
    assert sorted(h.step for h in loss) == list(range(1, GONE_STEPS + 1))
    assert not (folder / UNRECORDED).exists()
    sft_runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                  filter_string="attributes.run_name = 'sft'")
    assert {r.data.tags["alignflow.cached"] for r in sft_runs if r.info.run_id != sft_run_id} == {"true"}
