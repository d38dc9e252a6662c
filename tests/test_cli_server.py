"""The CLI's own start of Prefect's temporary server (alignflow/cli.py, `_TemporaryServer`): used only where Prefect
would start one anyway, serving the run, and never outliving the command, even one killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignflow.cli import _prefect_api_may_be_configured

ROOT = Path(__file__).resolve().parents[1]
SERVER = "prefect.server.api.server:create_app"


@pytest.fixture()
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with no Prefect settings in it, a Prefect home of its own, no PREFECT_* in the environment."""
    for key in list(os.environ):
        if key.startswith("PREFECT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    return tmp_path


def test_an_api_named_anywhere_leaves_the_server_to_prefect(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profiles = bare / "home" / "profiles.toml"
    assert not _prefect_api_may_be_configured()  # nothing set: Prefect would start a temporary server
    # Prefect's own profiles file names an API for the "local" profile; only the active one counts
    profiles.write_text('active = "ephemeral"\n[profiles.ephemeral]\nPREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "true"\n'
                        '[profiles.local]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n')
    assert not _prefect_api_may_be_configured()
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert _prefect_api_may_be_configured()
    monkeypatch.delenv("PREFECT_PROFILE")
    profiles.write_text('active = "team"\n[profiles.team]\nPREFECT_API_URL = "http://prefect:4200/api"\n')
    assert _prefect_api_may_be_configured()
    profiles.write_text('active = "off"\n[profiles.off]\nPREFECT_SERVER_EPHEMERAL_ENABLED = "false"\n')
    assert _prefect_api_may_be_configured()  # Prefect's own error ("No Prefect API URL provided") must show
    profiles.write_text('active = "dev"\n[profiles.dev]\nPREFECT_LOGGING_LEVEL = "DEBUG"\n')
    assert _prefect_api_may_be_configured()  # Prefect's default is no temporary server: it must refuse itself
    profiles.write_text("not toml [")
    assert _prefect_api_may_be_configured()
    profiles.unlink()
    monkeypatch.setenv("PREFECT_PROFILE", "local")  # Prefect's own profiles file: "local" names :4200
    assert _prefect_api_may_be_configured()
    monkeypatch.delenv("PREFECT_PROFILE")
    for name in ("prefect_api_url", "PREFECT_TEST_MODE"):  # Prefect reads the environment in any case
        monkeypatch.setenv(name, "http://prefect:4200/api" if "url" in name else "1")
        assert _prefect_api_may_be_configured(), name
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    assert _prefect_api_may_be_configured()
    monkeypatch.delenv("PREFECT_API_URL")
    Path("pyproject.toml").write_text('[project]\nname = "x"\n')
    assert not _prefect_api_may_be_configured()
    Path("pyproject.toml").write_text('[tool.prefect.api]\nurl = "http://prefect:4200/api"\n')
    assert _prefect_api_may_be_configured()
    Path("pyproject.toml").unlink()
    Path("prefect.toml").write_text('[api]\nurl = "http://prefect:4200/api"\n')
    assert _prefect_api_may_be_configured()
    Path("prefect.toml").unlink()
    Path(".env").mkdir()  # a virtualenv called .env: no settings file, and no crash
    assert not _prefect_api_may_be_configured()
    Path(".env").rmdir()
    Path(".env").write_text("prefect_api_url=http://prefect:4200/api\n")
    assert _prefect_api_may_be_configured()


def test_a_remote_dask_cluster_leaves_the_server_to_prefect(bare: Path) -> None:
    """Its workers get the flow's settings: a URL on this machine's loopback address would not reach it."""
    from types import SimpleNamespace

    from alignflow.cli import _start_prefect_server_early

    assert not _prefect_api_may_be_configured()  # here Prefect would start one; the recipe's cluster decides
    r = SimpleNamespace(scale_out=SimpleNamespace(task_runner="dask", dask_address="tcp://10.0.0.1:8786"))
    assert _start_prefect_server_early(r) is None
    assert "PREFECT_API_URL" not in os.environ


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if int(parent) == pid and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_run_uses_its_own_server_and_leaves_none_behind(bare: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # the bare environment, as a user's shell
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.cli", "run", str(ROOT / "configs/smoke.yaml"),
                             "--work-dir", str(tmp_path / "w"), "--until", "curate"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = None
    deadline = time.monotonic() + 60
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        server = next((pid for pid, cmd in _children(proc.pid) if SERVER in cmd), None)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert server is not None, "the command started no server of its own: Prefect's slower start was used"
    assert "Starting temporary server" not in out  # Prefect did not start a second one
    assert "View at http" not in out  # no link to a UI that is not served and ends with the run
    assert "curate" in out
    assert not _alive(server)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_takes_its_server_with_it(bare: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.cli", "run", str(ROOT / "configs/smoke.yaml"),
                             "--work-dir", str(tmp_path / "w")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = None
    deadline = time.monotonic() + 60
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        server = next((pid for pid, cmd in _children(proc.pid) if SERVER in cmd), None)
        time.sleep(0.05)
    assert server is not None
    proc.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can end the server now
    proc.wait()
    deadline = time.monotonic() + 30
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = not _alive(server)
    if not gone:
        os.kill(server, signal.SIGKILL)
    assert gone, "Prefect's temporary server outlived the killed command"


def test_a_port_taken_before_the_server_binds_it_starts_it_on_another(bare: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import prefect.context

    from alignflow import cli
    from alignflow.tasks.lib import launch

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real = launch.free_port
    monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or real())
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the suite's Prefect harness replaced Prefect's process-wide settings with its own: put them back after
    saved = prefect.context.GLOBAL_SETTINGS_CONTEXT
    server = cli._TemporaryServer()
    try:
        assert server.port == taken.getsockname()[1]
        server.wait()  # uvicorn exits with 3 (address in use); a second start on a port of the kernel's answers
        assert server.port != taken.getsockname()[1]
        assert os.environ["PREFECT_API_URL"] == f"http://127.0.0.1:{server.port}/api"
        # Prefect's process-wide settings (a test harness may hold a context of its own around this test)
        assert prefect.context.GLOBAL_SETTINGS_CONTEXT.settings.api.url == os.environ["PREFECT_API_URL"]
    finally:
        server.stop()
        taken.close()
        for key in ("PREFECT_API_URL", "PREFECT_UI_URL"):
            os.environ.pop(key, None)
        prefect.context.GLOBAL_SETTINGS_CONTEXT = saved  # the later tests' server (a rebuild would drop it)


def test_flows_on_the_commands_own_server_send_no_heartbeats(bare: Path, tmp_path: Path) -> None:
    """Heartbeats find runs whose process died, for a server that outlives them; the command's own server dies with
    the command, and every flow's end would wait up to 1 s for the heartbeat thread. A frequency the user set is
    kept. (Prefect logs the heartbeat thread's start at DEBUG.)"""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "DEBUG"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for user_set, work in ((None, "w"), ("60", "w60")):
        run_env = env if user_set is None else {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": user_set}
        proc = subprocess.run([sys.executable, "-m", "alignflow.cli", "run", str(ROOT / "configs/smoke.yaml"),
                               "--work-dir", str(tmp_path / work), "--until", "curate"], cwd=ROOT, env=run_env,
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "Executing flow 'alignflow-pipeline'" in out  # DEBUG lines are printed: the next check can see
        assert "Starting temporary server" not in out  # the command's own server, as in the tests above
        assert ("Started flow run heartbeat context" in out) == (user_set is not None), out[-3000:]


def test_the_readmes_prefect_ui_on_another_port_talks_to_that_port(bare: Path) -> None:
    # `prefect server start --port N` alone serves a UI that asks the API on :4200 (issue 28, item 13); the README's
    # command names the port twice. Run that very line (on a free port) and ask the UI where its API is.
    import json
    import re
    import shlex
    import urllib.request

    from alignflow.tasks.lib.launch import free_port

    line = next(li for li in (ROOT / "README.md").read_text().splitlines() if "prefect server start --port" in li)
    port = free_port()
    argv = shlex.split(re.sub(r"\b4300\b", str(port), line))
    env = {**os.environ, **dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))}
    cmd = [a for a in argv if not ("=" in a and not a.startswith("-"))]
    assert cmd[:3] == ["prefect", "server", "start"]
    proc = subprocess.Popen([sys.executable, "-m", "prefect", *cmd[1:]], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=2) as r:
                    settings = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the Prefect server did not start"
                time.sleep(0.5)
        assert settings["api_url"] == f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
