"""Team mode against the real servers: PostgreSQL, a Prefect server + worker, an MLflow server with basic auth.

`alignflow server up` starts them (twice: the second call must change nothing), `prefect deploy` deploys
deployments/prefect.yaml, two smoke pipelines run at once through the worker into one work dir, and the
MLflow server must then hold both run trees and the registry versions. A canary password must not appear in
any store, and headless Chromium looks at the flow run in the Prefect UI.

Needs PostgreSQL's server and Chromium (`bash deployments/system-packages.sh` installs both from Debian's
packages). Under CI they are required; elsewhere the module is skipped without them.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignflow.recipe import load_recipe
from alignflow.server import State, find_pg_bin, load_state
from alignflow.tasks.lib.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _missing() -> str | None:
    try:
        find_pg_bin()
    except RuntimeError as e:
        return str(e)
    return None if CHROMIUM else "chromium not found: bash deployments/system-packages.sh"


if _missing() and not os.environ.get("CI"):
    pytest.skip(f"team mode needs system packages: {_missing()}", allow_module_level=True)


class Team:
    def __init__(self, home: Path, work: Path, state: State, env: dict[str, str], password: str,
                 prefect_auth: str = "") -> None:
        self.home, self.work, self.state, self.env, self.password = home, work, state, env, password
        self.prefect_auth = prefect_auth  # PREFECT_API_AUTH_STRING: user:password
        self.flow_runs: list[dict[str, Any]] = []
        self.first_up = ""  # what the first `server up` printed
        self.shell_canary = ""  # a secret in the environment of the shell that ran `server up`

    def cli(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "alignflow.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def mlflow(self) -> Any:
        """A client on the team's MLflow server, with the credentials in this process's environment."""
        from mlflow import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=self.password)
        return MlflowClient(self.state.mlflow_url)


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    assert _missing() is None, _missing()
    home, work = tmp_path_factory.mktemp("team-home"), tmp_path_factory.mktemp("team-work")
    password = "canary-" + secrets.token_hex(12)  # must never be written anywhere
    prefect_auth = "team:prefect-canary-" + secrets.token_hex(12)  # nor this one
    shell_canary = "shell-canary-" + secrets.token_hex(12)  # in the shell that runs `up`: must reach no server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password,
               PREFECT_API_AUTH_STRING=prefect_auth, AWS_SECRET_ACCESS_KEY=shell_canary, TEAM_SHELL_CANARY=shell_canary,
               # the test's work dir lies outside the checkout: the operator allows it for deployment runs
               ALIGNFLOW_DATA_ROOTS=str(work),
               PREFECT_HOME=str(home / "client-prefect"), DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    ports = {"--pg-port": free_port(), "--prefect-port": free_port(), "--mlflow-port": free_port()}
    argv = ["server", "up", "--home", str(home), "--auth", *[x for kv in ports.items() for x in map(str, kv)]]
    t = Team(home, work, State(home=str(home), project_dir=str(ROOT)), env, password, prefect_auth)
    t.shell_canary = shell_canary
    first = t.cli(*argv)
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        state = load_state(home)
        assert state is not None
        t.state = state
        t.env.update(state.client_env())
        t.first_up = first.stdout
        yield t
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        t.cli("server", "down", "--home", str(home), "--purge", timeout=120)


def test_server_up_is_idempotent_and_prints_the_environment(team: Team) -> None:
    assert f"export PREFECT_API_URL=http://127.0.0.1:{team.state.prefect_port}/api" in team.first_up
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{team.state.mlflow_port}" in team.first_up
    pids = dict(team.state.pids)
    again = team.cli("server", "up", "--home", str(team.home), "--auth", "--pg-port", str(team.state.pg_port),
                     "--prefect-port", str(team.state.prefect_port), "--mlflow-port", str(team.state.mlflow_port))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 4, again.stdout
    state = load_state(team.home)
    assert state is not None and state.pids == pids
    # basic auth is on: no credentials, no access
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{team.state.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert e.value.code == 401
    # and so is the Prefect API's: an unauthenticated POST is refused, the team's credentials are let in
    request = urllib.request.Request(f"{team.state.prefect_api_url}/flows/filter", method="POST", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 401
    assert isinstance(_api(team, "/flows/filter", {}), list)


def _run_deployment(team: Team, params: dict[str, Any]) -> subprocess.Popen[str]:
    code = ("import json, sys\nfrom prefect.deployments import run_deployment\n"
            "fr = run_deployment('alignflow-pipeline/pipeline', parameters=json.loads(sys.argv[1]), timeout=900)\n"
            "print(json.dumps({'id': str(fr.id), 'name': fr.name, 'state': fr.state.type.value}))\n")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=ROOT, env=team.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_deployment_cli(team: Team, params: dict[str, Any]) -> subprocess.Popen[str]:
    """`prefect deployment run ... --params JSON --watch`, the way a script submits a run (issue 19)."""
    argv = [sys.executable, "-m", "prefect", "deployment", "run", "alignflow-pipeline/pipeline", "--params",
            json.dumps(params), "--watch", "--watch-timeout", "900"]
    return subprocess.Popen(argv, cwd=ROOT, env={**team.env, "COLUMNS": "400"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_pipelines_at_once_through_the_worker(team: Team) -> None:
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                             "deployments/prefect.yaml", "--all"], cwd=ROOT, env=team.env, capture_output=True,
                            text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert "alignflow-retrain/retrain" in deploy.stdout  # the scheduled + event-triggered one deploys too

    smoke = load_recipe(ROOT / "configs" / "smoke.yaml", [])
    beta = load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.beta=0.3"])
    # the smoke recipe exactly as written (plain strings for data.*, defaults left out), as `yq -o json` gives it
    # to `prefect deployment run --params`; and a second one through the Python client, normalized
    as_written = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    assert isinstance(as_written["data"]["sft"], str)
    procs = [_run_deployment_cli(team, {"recipe": as_written, "work_dir": str(team.work)}),
             _run_deployment(team, {"recipe": beta.model_dump(mode="json"), "work_dir": str(team.work)})]
    # a recipe from the form that names a file outside the project and ALIGNFLOW_DATA_ROOTS: refused at validation
    escape = smoke.model_dump(mode="json")
    escape["data"]["sft"] = ["/etc/hostname"]
    refused = _run_deployment(team, {"recipe": escape, "work_dir": str(team.work)})
    for p in procs:
        out, errs = p.communicate(timeout=900)
        if p.returncode != 0:  # the deployment CLI prints events only: the reason is in the worker's log
            log = (team.home / "logs" / "prefect-worker.log").read_text(errors="replace").splitlines()
            reasons = [line for i, line in enumerate(log) if "Traceback" in line or "Error" in line
                       or "Exception" in line or any("Traceback" in before for before in log[max(0, i - 60):i])]
            pytest.fail(f"a pipeline through the worker failed:\n{out[-1500:]}{errs[-1500:]}\n"
                        f"worker log, errors:\n" + "\n".join(reasons[-120:]))
        if p is procs[0]:  # the CLI prints the flow run's name and UUID, and exits 0 only when it COMPLETED
            found = re.search(r"Created flow run '([^']+)'.*?UUID: ([0-9a-f-]{36})", out, re.S)
            assert found and "finished successfully in 'Completed'" in out, out[-3000:]
            team.flow_runs.append({"id": found.group(2), "name": found.group(1), "state": "COMPLETED"})
        else:
            team.flow_runs.append(json.loads(out.strip().splitlines()[-1]))
    log = (team.home / "logs" / "prefect-worker.log").read_text(errors="replace")
    assert [fr["state"] for fr in team.flow_runs] == ["COMPLETED", "COMPLETED"], log[-8000:]
    out, errs = refused.communicate(timeout=300)
    assert json.loads(out.strip().splitlines()[-1])["state"] == "FAILED", errs[-3000:]
    refused_id = json.loads(out.strip().splitlines()[-1])["id"]
    logs = _api(team, "/logs/filter", {"logs": {"flow_run_id": {"any_": [refused_id]}}})
    said = " ".join(entry["message"] for entry in logs)
    assert "data.sft[0]: '/etc/hostname' is outside the allowed folders" in said, said[-3000:]

    client = team.mlflow()
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert {p.data.tags["alignflow.prefect_flow_run_id"] for p in parents} == {fr["id"] for fr in team.flow_runs}
    for parent in parents:
        assert parent.info.status == "FINISHED"
        children = client.search_runs([experiment.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert sorted(c.info.run_name for c in children) == sorted(
            ["curate", "synthesize", "tokenize", "quantize", "sft", "reward", "dpo", "evaluate", "register"])
        for child in children:  # every stage folder is complete, whichever run produced it
            assert child.info.status == "FINISHED"
            assert (Path(child.data.tags["alignflow.stage_dir"]) / "manifest.json").exists()
    betas = sorted(float(r.data.params["dpo.beta"]) for r in runs if r.info.run_name == "dpo")
    assert betas == [0.1, 0.3]
    versions = client.search_model_versions("name = 'smoke-assistant'")
    assert {v.tags["alignflow.parent_run_id"] for v in versions} <= {p.info.run_id for p in parents}
    assert len(versions) == 2
    assert client.get_model_version_by_alias("smoke-assistant", "champion").version in {v.version for v in versions}
    # every stage that ran reported progress in the UI; the training stages step by step, ending at 100 %
    for stage in ("sft", "reward", "dpo"):
        progress = _api(team, "/artifacts/filter", {"artifacts": {"key": {"any_": [f"{stage}-progress"]}}})
        assert progress and {a["type"] for a in progress} == {"progress"}
        assert all(a["data"] == 100.0 for a in progress)
    # the artifacts went through the server's proxy into the team's artifact store
    assert any((team.home / "mlflow-artifacts").rglob("manifest.json"))
    # the worker logged as its own MLflow user, not the admin: it created the experiment and the model (MANAGE),
    # and the first run, which asked for a champion before the model existed, was answered "none" (MLflow's auth
    # app answers a non-admin 403 there, not 404)
    worker = _mlflow_admin(team, f"/users/get?username={team.state.worker_user}")["user"]
    assert worker["is_admin"] is False and team.state.worker_user == "alignflow-worker"
    for kind, resource in (("experiment", experiment.experiment_id), ("registered_model", "smoke-assistant")):
        permission = _mlflow_admin(team, f"/users/permissions/get?username={team.state.worker_user}"
                                         f"&resource_type={kind}&resource_id={resource}", api="3.0")
        assert permission["permission"] == "MANAGE", (kind, permission)
    elsewhere = _mlflow_admin(team, f"/users/permissions/get?username={team.state.worker_user}"
                                    "&resource_type=registered_model&resource_id=someone-elses", api="3.0")
    assert elsewhere["permission"] == "READ"  # default_permission: it may read what others made, not change it


def _up_argv(team: Team) -> list[str]:
    return ["server", "up", "--home", str(team.home), "--auth", "--pg-port", str(team.state.pg_port),
            "--prefect-port", str(team.state.prefect_port), "--mlflow-port", str(team.state.mlflow_port)]


def test_job_variables_cannot_change_what_the_worker_runs(team: Team) -> None:
    """Issue 27: `--job-variable "command=..."` ran any script on the worker. The server now refuses the variable;
    a Prefect user who puts Prefect's default template back on the pool meets the worker's refusal; `up` puts
    the team template back."""
    if not team.flow_runs:  # run alone (-k): deploy here
        deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                                 "deployments/prefect.yaml", "--all"], cwd=ROOT, env=team.env, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    from prefect.workers.process import ProcessWorker

    from alignflow.worker import PROCESS_TEMPLATE

    prefect = [sys.executable, "-m", "prefect"]
    target = team.work / "PWNED"
    run = [*prefect, "deployment", "run", "alignflow-pipeline/pipeline", "--job-variable", f"command=touch {target}"]
    env = {**team.env, "COLUMNS": "400"}
    refused = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout
    assert "'command' was unexpected" in " ".join((refused.stdout + refused.stderr).split())

    default = team.work / "prefect-default-template.json"
    default.write_text(json.dumps(ProcessWorker.get_default_base_job_template()))
    subprocess.run([*prefect, "work-pool", "update", "alignflow", "--base-job-template", str(default)], cwd=ROOT,
                   env=env, check=True, capture_output=True, timeout=120)
    crashed = subprocess.run([*run, "--job-variable", 'env={"ALIGNFLOW_HOME": "/"}', "--watch", "--watch-timeout",
                              "300"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    said = crashed.stdout + crashed.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", said)
    assert found and crashed.returncode != 0 and "Crashed" in said, said[-3000:]
    state = _api(team, f"/flow_runs/{found.group(1)}")["state"]
    assert state["type"] == "CRASHED"
    assert "refused this run: the flow run sets job variables command, env" in state["message"], state
    assert not target.exists()

    again = team.cli(*_up_argv(team))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _api(team, "/work_pools/alignflow")["base_job_template"] == PROCESS_TEMPLATE


RACE = """
import asyncio, json, sys, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate

SWD = "prefect.deployments.steps.set_working_directory"
GOOD = [{SWD: {"directory": "{{ $ALIGNFLOW_HOME }}"}}]
target, params = sys.argv[1], json.loads(sys.argv[2])
EVIL = [{"prefect.deployments.steps.run_shell_script": {"script": f"touch {target}"}}, *GOOD]


async def final(client, flow_run_id):
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        run = await client.read_flow_run(flow_run_id)
        if run.state and run.state.is_final():
            break
        await asyncio.sleep(0.5)
    return {"id": str(run.id), "type": run.state.type.value, "message": run.state.message or ""}


async def main():
    out = {}
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("alignflow-pipeline")

        async def deployment(name, entrypoint, steps):
            return await client.create_deployment(flow_id=flow_id, name=name, entrypoint=entrypoint,
                                                  work_pool_name="alignflow", pull_steps=steps, parameters=params,
                                                  enforce_parameter_schema=False)

        # controls: created that way, the worker's check refuses them
        for name, entrypoint, steps in (("r27-steps", "flows/pipeline.py:pipeline", EVIL),
                                        ("r27-entry", "evil.py:evil", GOOD)):
            run = await client.create_flow_run_from_deployment(await deployment(name, entrypoint, steps))
            out[name] = await final(client, run.id)
        # the race: changed after the check (Submitting comes after it), before the run's process starts
        dep = await deployment("r27-race", "flows/pipeline.py:pipeline", GOOD)
        run = await client.create_flow_run_from_deployment(dep)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            now = await client.read_flow_run(run.id)
            if now.state and (now.state.name in ("Submitting", "Running") or now.state.is_final()):
                break
            await asyncio.sleep(0.05)
        out["patched_at"] = now.state.name
        await client.update_deployment(dep, DeploymentUpdate(pull_steps=EVIL, entrypoint="evil.py:evil"))
        out["r27-race"] = await final(client, run.id)
    print(json.dumps(out))


asyncio.run(main())
"""


def test_a_deployment_changed_after_the_workers_check_runs_nothing_else(team: Team) -> None:
    """Issue 27 finding 1: the worker checked the deployment it read; Prefect's workspace supervisor then read it
    again and ran that copy's pull steps and entrypoint, so swapping them once the run was Submitting ran any
    shell command as the worker's user. Created with a shell pull step or another entrypoint, a deployment is
    refused; changed to them after the check, the run still runs alignflow's pipeline from the checked entrypoint
    (here a recipe the flow refuses: the run FAILS inside the pipeline) and the shell step never runs. All of it
    with a pool template that hard-codes a command and a directory (review finding 6: never tested end to end)."""
    if not team.flow_runs:  # run alone (-k): deploy here (the flow alignflow-pipeline must exist)
        deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file",
                                 "deployments/prefect.yaml", "--all"], cwd=ROOT, env=team.env, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    from prefect.workers.process import ProcessWorker

    from alignflow.worker import PROCESS_TEMPLATE

    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", []).model_dump(mode="json")
    recipe["data"]["sft"] = ["/etc/hostname"]  # refused by the pipeline itself, seconds after it starts
    target = team.work / "PWNED-race"
    params = {"recipe": recipe, "work_dir": str(team.work)}
    # meanwhile the pool's template hard-codes a command and a directory (no job variable needed to use them)
    pool_target = team.work / "PWNED-pool"
    hostile = ProcessWorker.get_default_base_job_template()
    hostile["job_configuration"].update(command=f"touch {pool_target}", working_dir="/tmp")
    template = team.work / "hostile-template.json"
    template.write_text(json.dumps(hostile))
    prefect = [sys.executable, "-m", "prefect", "work-pool", "update", "alignflow", "--base-job-template"]
    subprocess.run([*prefect, str(template)], cwd=ROOT, env=team.env, check=True, capture_output=True, timeout=120)
    try:
        raced = subprocess.run([sys.executable, "-c", RACE, str(target), json.dumps(params)], cwd=ROOT,
                               env=team.env, capture_output=True, text=True, timeout=1500)
    finally:
        template.write_text(json.dumps(PROCESS_TEMPLATE))
        subprocess.run([*prefect, str(template)], cwd=ROOT, env=team.env, check=True, capture_output=True,
                       timeout=120)
    assert not pool_target.exists(), "the pool's hard-coded command ran"
    assert raced.returncode == 0, raced.stdout[-3000:] + raced.stderr[-3000:]
    out = json.loads(raced.stdout.strip().splitlines()[-1])
    assert out["r27-steps"]["type"] == "CRASHED" and "pull steps must be" in out["r27-steps"]["message"], out
    assert out["r27-entry"]["type"] == "CRASHED" and "is not one of alignflow's flows" in out["r27-entry"]["message"]
    assert out["patched_at"] in ("Submitting", "Running"), out  # after the worker's check
    assert not target.exists(), "the pull steps of the deployment as changed after the check ran"
    assert out["r27-race"]["type"] == "FAILED", out  # ran the checked entrypoint, not evil.py (a load error)
    logs = _api(team, "/logs/filter", {"logs": {"flow_run_id": {"any_": [out["r27-race"]["id"]]}}})
    said = " ".join(entry["message"] for entry in logs)
    assert "data.sft[0]: '/etc/hostname' is outside the allowed folders" in said, said[-3000:]


def test_the_worker_holds_no_shell_secret_and_the_home_is_private(team: Team) -> None:
    """Issue 27: the worker had the whole environment of the shell that ran `up`; the home was 0755/0644."""
    state = load_state(team.home)
    assert state is not None
    environ = {name: Path(f"/proc/{state.pids[name]}/environ").read_bytes()
               for name in ("prefect-worker", "prefect-server", "mlflow-server")}
    # PostgreSQL's postmaster, started by pg_ctl (finding 4 of issue 27: it inherited the whole shell)
    postmaster = int((Path(state.pg_data) / "postmaster.pid").read_text().splitlines()[0])
    environ["postgres"] = Path(f"/proc/{postmaster}/environ").read_bytes()
    for name, raw in environ.items():  # as the kernel shows it
        assert team.shell_canary.encode() not in raw, name
        assert b"AWS_SECRET_ACCESS_KEY=" not in raw and b"TEAM_SHELL_CANARY=" not in raw, name
    for secret in (team.password, team.prefect_auth):  # the admin's MLflow and Prefect credentials in `up`'s shell
        assert secret.encode() not in environ["postgres"]
    worker = dict(entry.split(b"=", 1) for entry in environ["prefect-worker"].split(b"\0") if b"=" in entry)
    for secret in (team.password, state.db_password, state.flask_secret):  # the admin's, the database's, Flask's
        assert secret.encode() not in environ["prefect-worker"]
    assert worker[b"MLFLOW_TRACKING_USERNAME"] == b"alignflow-worker"  # its own credentials, those it needs
    # its flow runs give up on an unanswered MLflow request after 30 s and retry, as the CLI's do
    assert (worker[b"MLFLOW_HTTP_REQUEST_TIMEOUT"], worker[b"MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) == (b"30", b"4")

    pg_data = Path(state.pg_data)
    readable = [f"{oct(p.lstat().st_mode & 0o777)} {p}" for p in [team.home, *team.home.rglob("*")]
                if not p.is_symlink() and p.lstat().st_mode & 0o077 and pg_data not in (p, *p.parents)]
    assert readable == []
    if team.flow_runs:  # the pipelines' artifacts are among what was checked
        assert any((team.home / "mlflow-artifacts").rglob("manifest.json"))
    assert (team.home / "mlflow-auth.db").stat().st_mode & 0o777 == 0o600


def test_credentials_never_land_in_a_store(team: Team) -> None:
    if not team.flow_runs:
        pytest.skip("needs the pipeline runs of the test above")
    state = team.state
    dumps = []
    for db in ("prefect", "mlflow"):
        argv = [str(Path(state.pg_bin) / "pg_dump"), "-h", state.pg_data, "-p", str(state.pg_port), "-U", "postgres",
                db]
        if state.pg_os_user:
            argv = ["runuser", "-u", state.pg_os_user, "--", *argv]
        out = subprocess.run(argv, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert len(out.stdout) > 10_000  # a real dump of a used database
        dumps.append(out.stdout)
    leaks = []
    for needle in (team.password.encode(), team.prefect_auth.split(":", 1)[1].encode()):
        leaks += [f"pg_dump {db}" for db, dump in zip(("prefect", "mlflow"), dumps, strict=True) if needle in dump]
        for root in (team.home, team.work):
            leaks += [str(f) for f in root.rglob("*") if f.is_file() and needle in f.read_bytes()]
    assert leaks == []
    # and the canary is really the password in use: the server accepts it
    client = team.mlflow()
    assert client.get_experiment_by_name("smoke") is not None


def test_prefect_ui_shows_the_flow_run_with_artifacts_and_the_recipe_form(team: Team) -> None:
    if not team.flow_runs:
        pytest.skip("needs the pipeline runs of the test above")
    from playwright.sync_api import sync_playwright

    ui = team.state.prefect_api_url.removesuffix("/api")
    flow_run = team.flow_runs[0]
    shots = team.work / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # the UI keeps the Prefect credentials (base64 of user:password) where its login form puts them
        token = base64.b64encode(team.prefect_auth.encode()).decode()
        context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                      extra_http_headers={"Authorization": f"Basic {token}"})
        context.add_init_script(f"window.localStorage.setItem('prefect-password', '{token}')")
        page = context.new_page()
        page.goto(f"{ui}/runs/flow-run/{flow_run['id']}", wait_until="networkidle")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("evaluate-summary").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "flow-run-artifacts.png"))
        text = page.inner_text("body")
        assert flow_run["name"] in text and "Completed" in text
        for stage in ("curate", "synthesize", "tokenize", "quantize", "sft", "reward", "dpo", "evaluate", "register"):
            assert f"{stage}-summary" in text
        assert "evaluate-side-by-side" in text

        # the recipe as a typed form: the pipeline deployment's "Run" page
        deployments = page.context.request.post(f"{team.state.prefect_api_url}/deployments/filter", data={}).json()
        pipeline = next(d for d in deployments if d["name"] == "pipeline")
        page.goto(f"{ui}/deployments/deployment/{pipeline['id']}/run", wait_until="networkidle")
        page.get_by_text("KL strength").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "run-form.png"))
        form = page.inner_text("body")
        for field_help in ("A whole alignflow recipe", "adapter rank", "MLflow experiment name", "Work Pool"):
            assert field_help in form
        browser.close()
    assert (shots / "flow-run-artifacts.png").stat().st_size > 20_000
    # keep the screenshots where a person can look at them after the run
    keep = Path(os.environ.get("ALIGNFLOW_SCREENSHOTS", ROOT / "tests" / ".screenshots"))
    keep.mkdir(parents=True, exist_ok=True)
    for png in shots.glob("*.png"):
        shutil.copy(png, keep / png.name)


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def _api(team: Team, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(f"{team.state.prefect_api_url}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": _basic(team.prefect_auth)})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _mlflow_admin(team: Team, path: str, api: str = "2.0") -> Any:
    req = urllib.request.Request(f"{team.state.mlflow_url}/api/{api}/mlflow{path}",
                                 headers={"Authorization": _basic(f"admin:{team.password}")})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_work_pool_templates_and_retrain_triggers_on_the_server(team: Team) -> None:
    if not team.flow_runs:
        pytest.skip("needs the deployments of the test above")
    prefect = [sys.executable, "-m", "prefect"]
    for kind in ("docker", "kubernetes"):  # the server validates each template against its variables
        out = subprocess.run([*prefect, "work-pool", "create", f"alignflow-{kind}", "--type", kind,
                              "--base-job-template", f"deployments/work-pools/{kind}.json"],
                             cwd=ROOT, env=team.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    k8s = _api(team, "/work_pools/alignflow-kubernetes")
    assert k8s["base_job_template"]["variables"]["properties"]["gpu_count"]["type"] == "integer"

    deployments = _api(team, "/deployments/filter", {})
    retrain = next(d for d in deployments if d["name"] == "retrain")
    assert [s["schedule"]["cron"] for s in retrain["schedules"]] == ["0 3 * * *"]

    # New data landed: the event fires the automation, which creates a retrain flow run. The pool is paused
    # first so that the worker leaves that run alone (it would train the demo model for minutes); the run is
    # deleted and the pool resumed after (a paused pool left every later run of this module waiting for ever).
    subprocess.run([*prefect, "work-pool", "pause", "alignflow"], cwd=ROOT, env=team.env, check=True,
                   capture_output=True, timeout=60)
    try:
        emitted = subprocess.run([sys.executable, "deployments/emit_data_landed.py", "data/sft.jsonl"], cwd=ROOT,
                                 env={**team.env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                 timeout=120)
        assert emitted.returncode == 0 and "emitted alignflow.data.landed" in emitted.stdout, emitted.stderr
        deadline, triggered = time.monotonic() + 90, []
        while time.monotonic() < deadline and not triggered:
            runs = _api(team, "/flow_runs/filter", {"deployments": {"id": {"any_": [retrain["id"]]}}})
            triggered = [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]
            time.sleep(2)
        assert triggered, "no retrain flow run was created by the alignflow.data.landed automation"
    finally:
        time.sleep(5)  # a run the automation creates late is deleted too
        for run in _api(team, "/flow_runs/filter", {"deployments": {"id": {"any_": [retrain["id"]]}}}):
            if run["state_type"] in ("SCHEDULED", "PENDING"):
                urllib.request.urlopen(urllib.request.Request(
                    f"{team.state.prefect_api_url}/flow_runs/{run['id']}", method="DELETE",
                    headers={"Authorization": _basic(team.prefect_auth)}), timeout=30).close()
        subprocess.run([*prefect, "work-pool", "resume", "alignflow"], cwd=ROOT, env=team.env, check=True,
                       capture_output=True, timeout=60)


def test_server_up_without_the_team_extra_says_so_and_starts_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from alignflow.server import ServerError, up

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg2" else real(name, *a))
    with pytest.raises(ServerError, match=r"psycopg2-binary .*pip install -e '\.\[team\]' \(nothing was started\)"):
        up(home=tmp_path / "home", pg_port=free_port(), prefect_port=free_port(), mlflow_port=free_port())
    assert not (tmp_path / "home").exists()  # no state, no PostgreSQL cluster


def test_up_with_auth_over_open_servers_refuses_and_down_stops_them(tmp_path: Path) -> None:
    """Issue 27: `up --auth` over servers started without auth said "already running (basic auth)", left them open
    and crashed. It must refuse, naming `down`, and change nothing; `down` then stops all three processes. As
    root, the worker runs as `nobody` (--worker-user), which can read neither the home's secrets nor the servers'
    environments."""
    from alignflow.tasks.lib.processes import pid_alive

    home = tmp_path / "open-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "client-prefect"), DO_NOT_TRACK="1", COLUMNS="400",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    ports = ["--pg-port", str(free_port()), "--prefect-port", str(free_port()), "--mlflow-port", str(free_port())]
    as_nobody = ["--worker-user", "nobody"] if os.geteuid() == 0 else []
    t = Team(home, tmp_path, State(home=str(home), project_dir=str(ROOT)), env, "")
    python_for_nobody = as_nobody and subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import alignflow.worker"], cwd=ROOT,
        capture_output=True).returncode == 0
    if as_nobody and not python_for_nobody:  # e.g. a venv whose python links into /root (0700)
        refused = t.cli("server", "up", "--home", str(home), *ports, *as_nobody)
        said = " ".join((refused.stdout + refused.stderr).split())
        assert refused.returncode != 0 and f"--worker-user nobody cannot run {sys.executable}" in said, said
        assert load_state(home) is None  # nothing was started, not even PostgreSQL
        as_nobody = []
    try:
        first = t.cli("server", "up", "--home", str(home), *ports, *as_nobody)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "NO AUTH" in first.stdout
        state = load_state(home)
        assert state is not None and state.auth is False
        if as_nobody:
            import psutil

            nobody = pwd.getpwnam("nobody").pw_uid
            assert psutil.Process(state.pids["prefect-worker"]).uids().real == nobody
            as_worker = ["runuser", "-u", "nobody", "--", "cat"]
            assert subprocess.run([*as_worker, str(ROOT / "README.md")], capture_output=True).returncode == 0
            for secret in (home / "state.json", f"/proc/{state.pids['mlflow-server']}/environ",
                           f"/proc/{state.pids['prefect-server']}/environ"):
                out = subprocess.run([*as_worker, str(secret)], capture_output=True, text=True)
                assert out.returncode != 0 and "Permission denied" in out.stderr, secret

        locked_env = {**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "canary-" + "x" * 16,
                      "PREFECT_API_AUTH_STRING": "team:canary-prefect"}
        second = subprocess.run([sys.executable, "-m", "alignflow.cli", "server", "up", "--home", str(home), "--auth",
                                 *ports, *as_nobody], cwd=ROOT, env=locked_env, capture_output=True, text=True,
                                timeout=300)
        said = " ".join((second.stdout + second.stderr).split())
        assert second.returncode != 0, said
        assert f"alignflow server down --home {home}" in said and "runs with NO AUTH, asked: basic auth" in said
        after = load_state(home)
        assert after is not None and after.auth is False and after.pids == state.pids  # nothing changed
        request = urllib.request.Request(f"{state.prefect_api_url}/flows/filter", method="POST", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:  # still open, as `up` said
            assert r.status == 200

        down = t.cli("server", "down", "--home", str(home))
        assert down.returncode == 0, down.stdout + down.stderr
        for name in ("prefect-worker", "mlflow-server", "prefect-server"):
            assert f"{name:<15} stopped (pid {state.pids[name]})" in down.stdout, down.stdout
            assert not pid_alive(state.pids[name])
    finally:
        t.cli("server", "down", "--home", str(home), "--purge", timeout=120)


def test_the_models_policy_holds_against_a_looser_recipe_through_the_worker(team: Team) -> None:
    """Issue 27 item 4 on the team server: the smoke champion's owner (here the admin) sets
    min_win_rate_vs_champion=1.0; a run submitted with the recipe's gate at 0.0 and another dpo.beta is not
    promoted, and its gate reasons name the policy. Needs the champion of test_two_pipelines_at_once_*.
    1.0, not 0.5: the lower bound must exceed the threshold and never exceeds 1, so the policy fails the run on any
    machine (at 0.5 the win rate of a tiny random candidate against the champion decided the outcome, by chance)."""
    name = "smoke-assistant"
    client = team.mlflow()
    champion = client.get_model_version_by_alias(name, "champion").version
    done = team.cli("policy", "set", name, "register.gate.min_win_rate_vs_champion=1.0")
    assert done.returncode == 0, done.stdout + done.stderr
    loose = load_recipe(ROOT / "configs" / "smoke.yaml", ["register.gate.min_win_rate_vs_champion=0.0",
                                                          "dpo.beta=0.5"])
    proc = _run_deployment(team, {"recipe": loose.model_dump(mode="json"), "work_dir": str(team.work)})
    out, errs = proc.communicate(timeout=900)
    assert json.loads(out.strip().splitlines()[-1])["state"] == "COMPLETED", errs[-3000:]
    versions = client.search_model_versions(f"name = '{name}'")
    newest = max(versions, key=lambda v: int(v.version))
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert newest.tags["alignflow.gate"] == "failed"
    assert f"[policy of {name}: register.gate.min_win_rate_vs_champion=1.0]" in newest.tags["alignflow.gate_reasons"]
    # the worker read the policy and wrote none
    tags = client.get_registered_model(name).tags
    assert {k: v for k, v in tags.items() if k.startswith("register.gate.")} == \
        {"register.gate.min_win_rate_vs_champion": "1.0"}
    assert tags["alignflow.policy.set_by"].startswith("admin at ")
