"""Team mode's pieces that need no servers: the worker's job template and refusals, the environment `up` hands
on, the home's file modes, the process identity `down` checks, an MLflow answer that is not JSON.

The servers themselves (PostgreSQL, Prefect, MLflow, the worker) are exercised in tests/test_team.py.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

ROOT = Path(__file__).resolve().parents[1]
ATTACK = {"command": "touch /tmp/pwned", "env": {"ALIGNFLOW_HOME": "/"}, "working_dir": "/"}


def _configuration(template: dict[str, Any], values: dict[str, Any]) -> Any:
    """Prefect's own merge of a pool template with job variables (`from_template_and_values`), as the worker
    does it. The client is never called: neither template references blocks or variables."""
    from prefect.client.orchestration import PrefectClient

    from alignflow.worker import TeamJobConfiguration

    async def merge() -> Any:
        client = PrefectClient(api="http://127.0.0.1:9/api")
        return await TeamJobConfiguration.from_template_and_values(template, values, client=client)

    return asyncio.run(merge())


def test_the_worker_template_takes_no_command_env_or_directory_from_job_variables() -> None:
    from prefect.workers.process import ProcessWorker

    from alignflow.worker import PROCESS_TEMPLATE

    # Prefect's default process template: the job variables become the run's command, environment, directory
    default = _configuration(ProcessWorker.get_default_base_job_template(), ATTACK)
    assert (default.command, default.env, str(default.working_dir)) == (
        "touch /tmp/pwned", {"ALIGNFLOW_HOME": "/"}, "/")
    # the team worker's: none of them reaches the configuration (the engine's command, the worker's env)
    ours = _configuration(PROCESS_TEMPLATE, ATTACK)
    assert (ours.command, ours.env, ours.working_dir) == (None, {}, None)
    # and the server is told to refuse them when a run is created
    assert PROCESS_TEMPLATE["variables"]["additionalProperties"] is False
    assert not {"command", "env", "working_dir"} & set(PROCESS_TEMPLATE["variables"]["properties"])


def _deployment(**change: Any) -> Any:
    from prefect.client.schemas.responses import DeploymentResponse

    fields: dict[str, Any] = {
        "name": "pipeline", "flow_id": uuid4(), "entrypoint": "flows/pipeline.py:pipeline", "job_variables": {},
        "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ALIGNFLOW_HOME }}"}}]}
    return DeploymentResponse(id=uuid4(), **{**fields, **change})


@pytest.mark.parametrize(("flow_run_vars", "change", "why"), [
    ({"command": "touch /tmp/pwned"}, {}, "the flow run sets job variables command"),
    ({"env": {"ALIGNFLOW_HOME": "/"}}, {}, "the flow run sets job variables env"),
    ({"working_dir": "/"}, {}, "the flow run sets job variables working_dir"),
    ({}, {"job_variables": {"command": "sh x.sh"}}, "the deployment sets job variables command"),
    ({}, {"entrypoint": "../../tmp/x.py:flow"}, "entrypoint '../../tmp/x.py:flow' is not one of alignflow's flows"),
    ({}, {"pull_steps": [{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]}, "pull steps must be"),
    ({}, {"pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": "/tmp"}}]},
     "pull steps must be"),
    ({}, {"pull_steps": [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $ALIGNFLOW_HOME }}"}},
        {"prefect.deployments.steps.pip_install_requirements": {"requirements_file": "r.txt"}}]},
     "pull steps must be"),
])
def test_the_worker_refuses_runs_that_choose_their_own_code(flow_run_vars: dict[str, Any], change: dict[str, Any],
                                                            why: str) -> None:
    from alignflow.worker import refusal

    assert refusal({}, _deployment(), "/srv/alignflow") is None  # deployments/prefect.yaml's, as deployed
    assert refusal({"stream_output": False}, _deployment(), "/srv/alignflow") is None
    said = refusal(flow_run_vars, _deployment(**change), "/srv/alignflow")
    assert said is not None and why in said


def test_the_worker_refuses_a_run_without_a_deployment() -> None:
    from alignflow.worker import refusal

    assert "has no deployment" in (refusal({}, None, "/srv/alignflow") or "")


@pytest.fixture()
def recording_api() -> Iterator[tuple[str, list[str]]]:
    """A stand-in Prefect API that answers GET /api/flows/<id> (the one read the worker's job building makes besides
    the deployment it is handed) and records every request path."""
    import json

    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.path)
            if self.command == "GET" and self.path.startswith("/api/flows/"):
                body = json.dumps({"id": self.path.rsplit("/", 1)[1], "name": "alignflow-pipeline", "labels": {},
                                   "created": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z"}).encode()
                self.send_response(200)
            else:
                body = b'{"detail": "not here"}'
                self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api", seen
    server.shutdown()


def _job(api: str, template: dict[str, Any], deployment: Any, flow_run_vars: dict[str, Any] | None = None) -> Any:
    """The job configuration the team worker builds for a run of `deployment` from a pool holding `template`."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool

    from alignflow.worker import TeamJobConfiguration

    flow_run = FlowRun(id=uuid4(), name="r", flow_id=deployment.flow_id, deployment_id=deployment.id,
                       job_variables=flow_run_vars or {})
    pool = WorkPool(name="alignflow", type="process", base_job_template=template)

    async def build() -> Any:
        async with PrefectClient(api=api) as client:
            return await TeamJobConfiguration.resolve_for_flow_run(flow_run, client=client, work_pool=pool,
                                                                   worker_name="w", deployment=deployment)

    return asyncio.run(build())


def test_the_worker_fixes_command_directory_and_entrypoint_and_reads_no_deployment_again(
        recording_api: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27 finding 1: Prefect's workspace supervisor read the deployment again after the worker's check and ran
    that copy's pull steps (and entrypoint). The job the worker builds must carry the engine's command, the project
    dir and the checked entrypoint, so the started process never needs the deployment. The pool on the server
    hard-codes another command, environment and directory (a Prefect user may edit it): none of that reaches the
    job either."""
    import copy
    import shlex

    from prefect.workers.process import ProcessWorker

    api, seen = recording_api
    monkeypatch.setenv("ALIGNFLOW_HOME", str(ROOT))
    monkeypatch.delenv("PREFECT__FLOW_ENTRYPOINT", raising=False)
    hostile = copy.deepcopy(ProcessWorker.get_default_base_job_template())
    hostile["job_configuration"].update(command="touch /tmp/pwned", env={"EVIL": "1"}, working_dir="/tmp")
    for entry in ("flows/pipeline.py:pipeline", "flows/retrain.py:retrain"):
        job = _job(api, hostile, _deployment(entrypoint=entry), {"stream_output": False})
        # ProcessWorker.run starts the engine directly (EngineCommandStarter) only for a configured command; without
        # one it starts the workspace supervisor, which reads the deployment and runs its pull steps
        assert job._command_configured is True
        assert shlex.split(job.command)[1:] == ["-m", "prefect.engine"]
        assert Path(job.working_dir) == ROOT
        assert job.env["PREFECT__FLOW_ENTRYPOINT"] == entry and job.env["ALIGNFLOW_HOME"] == str(ROOT)
        assert "EVIL" not in job.env and job.stream_output is False
    # building it read the flow, never the deployment (the worker hands over the copy it checked)
    assert seen and all(path.startswith("/api/flows/") for path in seen), seen
    # a run the check refuses gets no job at all
    from alignflow.worker import RefusedRun

    with pytest.raises(RefusedRun, match="pull steps must be"):
        _job(api, hostile, _deployment(pull_steps=[{"prefect.deployments.steps.run_shell_script": {"script": "id"}}]))
    monkeypatch.delenv("ALIGNFLOW_HOME")
    with pytest.raises(RefusedRun, match="no ALIGNFLOW_HOME"):
        _job(api, hostile, _deployment())


def test_the_flow_and_its_hooks_load_from_the_fixed_entrypoint_without_the_api(
        recording_api: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What the started engine does with that job (flow_engine.load_flow, in the job's directory and environment)
    and what the worker does for on_crashed/on_cancellation hooks (its resolver): both load the checked
    entrypoint's flow and make no API call, so no later copy of the deployment is read or its pull steps run."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.flow_engine import load_flow

    from alignflow.worker import fixed_flow_resolver

    api, seen = recording_api
    monkeypatch.setenv("ALIGNFLOW_HOME", str(ROOT))
    job = _job(api, {"job_configuration": {}, "variables": {}}, _deployment(entrypoint="flows/retrain.py:retrain"))
    seen.clear()
    monkeypatch.setenv("PREFECT_API_URL", api)  # any API call the loaders made would land here
    flow_run = FlowRun(id=uuid4(), name="r", flow_id=uuid4(), deployment_id=uuid4())
    monkeypatch.chdir(job.working_dir)
    monkeypatch.setenv("PREFECT__FLOW_ENTRYPOINT", job.env["PREFECT__FLOW_ENTRYPOINT"])
    assert load_flow(flow_run).name == "alignflow-retrain"
    monkeypatch.chdir("/")  # the resolver does not depend on the worker's directory
    assert asyncio.run(fixed_flow_resolver(job)(flow_run)).name == "alignflow-retrain"
    assert seen == []


def test_the_worker_gets_allowed_secrets_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from alignflow.server import State, _base_env, worker_secret_allow, worker_secret_env

    for name, value in {"AWS_SECRET_ACCESS_KEY": "canary-aws", "OPENAI_API_KEY": "sk-allowed",
                        "SOME_TOKEN": "canary-other", "PGPASSWORD": "canary-pg", "MLFLOW_TRACKING_PASSWORD": "admin",
                        "DB_API_KEY": "canary-db", "ALIGNFLOW_DATA_ROOTS": "/data",
                        "OTHER_SERVICE_API_KEY": "canary-other-api"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ALIGNFLOW_SECRET_ENV_ALLOW", raising=False)
    state = State(home=str(tmp_path), project_dir=str(ROOT))
    base = _base_env(state)
    assert not {"AWS_SECRET_ACCESS_KEY", "OPENAI_API_KEY", "SOME_TOKEN", "PGPASSWORD", "MLFLOW_TRACKING_PASSWORD",
                "DB_API_KEY"} & set(base)
    assert base["ALIGNFLOW_DATA_ROOTS"] == "/data" and base["PATH"] == os.environ["PATH"]
    # the worker's default allow list is OPENAI_API_KEY alone (issue 27 finding 7: `*_API_KEY` handed every
    # *_API_KEY of the operator's shell to every flow run), whatever the recipe default says
    assert worker_secret_env() == {"OPENAI_API_KEY": "sk-allowed"}
    assert worker_secret_allow() == "OPENAI_API_KEY" and "ALIGNFLOW_SECRET_ENV_ALLOW" not in os.environ
    monkeypatch.setenv("ALIGNFLOW_SECRET_ENV_ALLOW", "OPENAI_API_KEY,*_API_KEY")  # the operator opts in
    assert worker_secret_env() == {"OPENAI_API_KEY": "sk-allowed", "OTHER_SERVICE_API_KEY": "canary-other-api"}
    monkeypatch.setenv("ALIGNFLOW_SECRET_ENV_ALLOW", "")
    assert worker_secret_env() == {}
    monkeypatch.setenv("ALIGNFLOW_SECRET_ENV_ALLOW", "*")  # even "everything" keeps the servers' credentials out
    wide = set(worker_secret_env())
    assert {"OPENAI_API_KEY", "SOME_TOKEN"} <= wide
    assert not {"AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "MLFLOW_TRACKING_PASSWORD", "DB_API_KEY",
                "ALIGNFLOW_SECRET_ENV_ALLOW"} & wide


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="--worker-user needs root and runuser")
def test_worker_user_that_can_write_the_code_is_refused() -> None:
    """Issue 27 finding 7: --worker-user checked that the user could read the checkout, not that it could not write
    it; a flow run could then edit alignflow/*.py, which root imports on the next `up`."""
    import tempfile

    from alignflow.server import ServerError, State, _prepare_worker_user, _writable_code

    project = Path(tempfile.mkdtemp(prefix="alignflow-wu-", dir="/tmp"))  # reachable by nobody, unlike tmp_path
    try:
        for sub in ("alignflow/tasks", "flows"):
            (project / sub).mkdir(parents=True)
            (project / sub / "x.py").write_text("")
        for path in [project, *project.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert _writable_code("nobody", project) is None  # root's, read-only for nobody (and so is this venv)
        (project / "alignflow" / "tasks" / "x.py").chmod(0o666)  # deep inside the package
        assert _writable_code("nobody", project) == str(project / "alignflow" / "tasks" / "x.py")
        (project / "alignflow" / "tasks" / "x.py").chmod(0o644)
        (project / "flows").chmod(0o777)
        assert _writable_code("nobody", project) == str(project / "flows")
        (project / "flows").chmod(0o755)
        project.chmod(0o777)  # the top folder: a planted module shadows any import of `python -m` from there
        assert _writable_code("nobody", project) == str(project)
        with pytest.raises(ServerError, match=f"--worker-user nobody can write {project}: "):
            _prepare_worker_user(State(home=str(project / "home"), project_dir=str(project), worker_os_user="nobody"))
    finally:
        shutil.rmtree(project)


def test_make_private_takes_group_and_other_bits_off_but_not_the_cluster(tmp_path: Path) -> None:
    from alignflow.server import _make_private

    home = tmp_path / "home"
    (home / "mlflow-artifacts" / "1" / "abc").mkdir(parents=True)
    (home / "postgres").mkdir()
    files = [home / "mlflow-auth.db", home / "logs.log", home / "mlflow-artifacts" / "1" / "abc" / "model.bin"]
    for f in files:
        f.write_text("x")
        f.chmod(0o644)
    (home / "postgres" / "PG_VERSION").write_text("15")
    (home / "postgres").chmod(0o750)
    for d in (home, home / "mlflow-artifacts", home / "mlflow-artifacts" / "1"):
        d.chmod(0o755)
    _make_private(home, skip=home / "postgres")
    for path in [home, *home.rglob("*")]:
        if home / "postgres" in (path, *path.parents):
            continue
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o600"}
    assert (home / "mlflow-artifacts").stat().st_mode & 0o777 == 0o700
    assert (home / "postgres").stat().st_mode & 0o777 == 0o750  # PostgreSQL's own rules


def test_down_stops_what_up_started_after_the_wall_clock_moved(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil's create_time() is the start in ticks since boot plus the boot time the kernel reports now; a wall
    clock step (NTP, a VM's clock sync) moves the latter, so the same process seems to have started 2 s later.
    `down` must still stop it (it used to say "pid N is now another process" and leave it running)."""
    import psutil

    from alignflow.server import State, _ours, _spawn, down
    from alignflow.tasks.lib.processes import pid_alive

    state = State(home=str(tmp_path), project_dir=str(ROOT))
    pid = _spawn("prefect-worker", ["sleep", "60"], {"PATH": os.environ["PATH"]}, state, tmp_path)
    try:
        _exec_done(pid, ["sleep", "60"])
        boot = psutil.boot_time()
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 2.0)
        assert psutil.Process(pid).create_time() != state.procs["prefect-worker"]["started"]
        assert _ours(state, "prefect-worker") == pid
        said: list[str] = []
        assert down(tmp_path, say=said.append)
        assert any(f"prefect-worker  stopped (pid {pid})" in line for line in said), said
        time.sleep(0.2)
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)


def test_the_identity_check_still_tells_another_process_apart(tmp_path: Path) -> None:
    import subprocess

    from alignflow.server import State, _ours, _spawn

    state = State(home=str(tmp_path), project_dir=str(ROOT))
    pid = _spawn("mlflow-server", ["sleep", "60"], {"PATH": os.environ["PATH"]}, state, tmp_path)
    time.sleep(0.1)  # ten clock ticks later: a pid is never freed and reused faster than that
    later = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _exec_done(pid, ["sleep", "60"])
        _exec_done(later.pid, ["sleep", "60"])
        assert _ours(state, "mlflow-server") == pid
        rec = state.procs["mlflow-server"]
        state.pids["mlflow-server"] = rec["pid"] = later.pid  # same command line, another start: a reused pid
        assert _ours(state, "mlflow-server") is None
        rec["boot_id"] = "another-boot"  # after a reboot nothing `up` recorded is ours
        state.pids["mlflow-server"] = rec["pid"] = pid
        assert _ours(state, "mlflow-server") is None
    finally:
        later.kill()
        later.wait()
        os.kill(pid, 9)


def _exec_done(pid: int, argv: list[str]) -> None:
    """Wait until the child runs `argv`: right after the fork it still shows this process's command line."""
    import psutil

    deadline = time.monotonic() + 10
    while psutil.Process(pid).cmdline() != argv and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture()
def html_404() -> Iterator[str]:
    """A server answering every request with an HTML 404 page, as MLflow without the auth app does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!doctype html><title>404 Not Found</title>")

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_html_answer_from_mlflow_is_an_error_not_a_crash(html_404: str, tmp_path: Path) -> None:
    from alignflow.server import ServerError, State, _ensure_worker_user, _mlflow_call

    state = State(home=str(tmp_path), project_dir=str(ROOT), mlflow_port=int(html_404.rsplit(":", 1)[1]))
    status, answer = _mlflow_call(state, ("admin", "pw"), "POST", "/api/2.0/mlflow/users/create", {})
    assert status == 404 and "404 Not Found" in answer["message"]
    with pytest.raises(ServerError, match="could not create the MLflow user alignflow-worker for the worker: HTTP 404"):
        _ensure_worker_user(state, ("admin", "pw"))


def test_down_also_stops_the_workers_flow_runs_in_their_own_session(tmp_path: Path) -> None:
    """Prefect's process worker starts each flow run in a new session; `down` signalled the worker's process group
    only, and a running pipeline trained on after `down`."""
    import sys

    import psutil

    from alignflow.server import State, _spawn, down

    state = State(home=str(tmp_path), project_dir=str(ROOT))
    code = ("import subprocess, time\n"
            "subprocess.Popen(['sleep', '61'], start_new_session=True)\n"
            "time.sleep(60)\n")
    argv = [sys.executable, "-c", code]
    pid = _spawn("prefect-worker", argv, {"PATH": os.environ["PATH"]}, state, tmp_path)
    _exec_done(pid, argv)
    deadline = time.monotonic() + 20
    while not psutil.Process(pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    (run,) = psutil.Process(pid).children()
    assert os.getsid(run.pid) != os.getsid(pid)  # like a flow run: outside the worker's session and group
    try:
        assert down(tmp_path, say=lambda line: None)
        assert not run.is_running() or run.status() == psutil.STATUS_ZOMBIE
    finally:
        for proc in (run, psutil.Process(pid)):
            if proc.is_running():
                proc.kill()
