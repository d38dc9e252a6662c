"""Team mode: `alignflow server up` / `down` run, on this machine, the servers a team shares.

    PostgreSQL (127.0.0.1:5433)  ── databases `prefect` and `mlflow`, role `alignflow`
    Prefect server (127.0.0.1:4200, UI + API) on Postgres, and a Prefect worker for the `alignflow` pool
    MLflow tracking server (127.0.0.1:5000) on Postgres, artifacts proxied into <home>/mlflow-artifacts

Everything lives in one folder (`--home`, default ~/.alignflow/server): state.json (ports, pids), logs/,
the artifact store, Prefect's home. `up` is idempotent: a service whose process is alive and answers its
health check is left alone, anything else is (re)started. `down` stops them all, PostgreSQL last.

Secrets: the database password is generated once and kept in <home>/state.json (mode 0600); it reaches the
servers through their environment, never their command lines (`ps` shows those). With `--auth`, the MLflow
server runs its basic-auth app; its admin credentials are read from MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD in the caller's environment (the same variables the MLflow client reads) and are
passed on through the environment only, so they never land in a file, a log, a param or an artifact.

PostgreSQL refuses to run as root. When called as root (containers, CI), the database cluster belongs to
the `postgres` OS user that Debian's package creates, and lives under /var/lib/postgresql/alignflow/.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from alignflow.tasks.lib.processes import pid_alive

DEFAULT_HOME = Path(os.environ.get("ALIGNFLOW_SERVER_HOME", "~/.alignflow/server")).expanduser()
DB_USER = "alignflow"
DATABASES = ("prefect", "mlflow")
PG_INSTALL_HINT = "install PostgreSQL's server first: apt-get update && apt-get install -y postgresql"


class ServerError(RuntimeError):
    """A problem the user can fix (missing PostgreSQL, a port taken by something else, missing credentials)."""


@dataclass
class State:
    """What `up` started, persisted in <home>/state.json so that `up` again and `down` find it."""

    home: str
    project_dir: str
    pg_port: int = 5433
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pool: str = "alignflow"
    auth: bool = False
    pg_data: str = ""
    pg_bin: str = ""
    pg_os_user: str = ""  # "" = the current user; "postgres" when run as root
    db_password: str = field(default="", repr=False)
    flask_secret: str = field(default="", repr=False)  # MLflow auth app's CSRF key: stable across restarts
    pids: dict[str, int] = field(default_factory=dict)
    # what identifies each process `up` started, beyond its pid (pids are reused): its start time (seconds since
    # the epoch, as the kernel reports it) and its command line. `down` signals a pid only when both still match.
    procs: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker_user: str = ""  # the MLflow user the worker runs pipelines as (--auth); its password is below
    worker_password: str = field(default="", repr=False)
    worker_os_user: str = ""  # --worker-user: the OS user the worker runs as ("" = the caller)

    @property
    def prefect_api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def db_url(self, db: str, driver: str) -> str:
        # name the driver: SQLAlchemy 2.1's plain postgresql:// means psycopg 3, which is not installed
        return f"{driver}://{DB_USER}:{self.db_password}@127.0.0.1:{self.pg_port}/{db}"

    def client_env(self) -> dict[str, str]:
        """The variables that point `alignflow run` (and any Prefect / MLflow client) at the team servers."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}


def _state_file(home: Path) -> Path:
    return home / "state.json"


def load_state(home: Path) -> State | None:
    path = _state_file(home)
    return State(**json.loads(path.read_text())) if path.exists() else None


def _save_state(state: State) -> None:
    path = _state_file(Path(state.home))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the database password
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f, indent=2)


# ---------------------------------------------------------------- processes and health checks


def _http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except urllib.error.HTTPError as e:
        return e.code == 401  # MLflow with basic auth: up, and asking for credentials
    except (OSError, ValueError):
        return False


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(what: str, check: Callable[[], bool], pid: int, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and pid_alive(pid):
        if check():
            return
        time.sleep(0.5)
    why = "exited" if not pid_alive(pid) else f"did not answer within {timeout_s:.0f} s"
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise ServerError(f"{what} {why}; the end of {log}:\n{tail}")


def _spawn(name: str, argv: list[str], env: dict[str, str], state: State, cwd: Path, auth: bool = False,
           user: str | None = None) -> int:
    """Start a long-running service detached from this terminal (own session), output into logs/<name>.log.

    umask 077: whatever it writes (MLflow's artifact store and auth database, Prefect's home, the worker's flow
    runs) is its owner's only. `auth` is the mode it starts in, recorded so that a later `up` can compare.
    `user`: the OS user to run it as (its primary group, no supplementary groups); None = the caller."""
    log = Path(state.home) / "logs" / f"{name}.log"
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077,
                                **({"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
                                   if user else {}))
    state.pids[name] = proc.pid
    state.procs[name] = {"pid": proc.pid, **_identity(proc.pid), "cmdline": argv, "auth": auth}
    _save_state(state)
    return proc.pid


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start in clock ticks since boot (/proc/PID/stat, field 22): fixed at fork, unlike
    psutil's create_time(), which adds the boot time the kernel reports *now* (/proc/stat btime). btime moves
    whenever the wall clock is stepped (NTP, a VM's clock sync), so the same process's create_time() changes
    by that step, and comparing it as a float with the recorded one said "another process" for `up`'s own."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3


def _identity(pid: int) -> dict[str, Any]:
    """What identifies process `pid` beyond its number: the boot it runs in and its start (ticks since boot),
    plus its start as seconds since the epoch for platforms without /proc (and for people reading the file)."""
    return {"boot_id": _boot_id(), "start_ticks": _start_ticks(pid), "started": _start_time(pid)}


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()  # fixed at fork: the same before and after exec
    except psutil.Error:
        return None


# a start time given as seconds since the epoch may move by a wall-clock step between `up` and `down`; two
# processes under one pid are never this close (the pid must first be freed, then reused)
START_TIME_SLACK_S = 5.0


def _ours(state: State, name: str) -> int | None:
    """The pid of service `name` if the process running under it is the one `up` started: same boot, same start
    (clock ticks since boot where /proc has them) and same command line as recorded. None when it is gone, or
    when the pid now belongs to another process."""
    import psutil

    rec = state.procs.get(name)
    pid = state.pids.get(name)
    if not rec or not pid or rec.get("pid") != pid or not pid_alive(pid):
        return None
    try:
        proc = psutil.Process(pid)
        if rec.get("start_ticks") is not None and _start_ticks(pid) is not None:
            same_start = rec["start_ticks"] == _start_ticks(pid) and rec.get("boot_id") == _boot_id()
        else:  # a state file from before start_ticks was recorded, or no /proc
            started = rec.get("started")
            same_start = started is not None and abs(proc.create_time() - started) < START_TIME_SLACK_S
        same = same_start and proc.cmdline() == rec.get("cmdline")
    except psutil.Error:
        return None
    return pid if same else None


def _stop_pid(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group (a server's own workers included) and every descendant in a session of its own
    (Prefect's worker starts each flow run in a new session: killing the worker's group alone left a running
    pipeline training on), SIGKILL what is left after grace_s."""
    import psutil

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        for child in descendants:  # psutil checks that each is still the process it listed (pid reuse)
            with contextlib.suppress(psutil.Error):
                child.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and (pid_alive(pid) or any(_running(c) for c in descendants)):
            time.sleep(0.2)
        if not pid_alive(pid) and not any(_running(c) for c in descendants):
            return


def _running(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path:
    """The directory of PostgreSQL's server binaries (Debian keeps them out of PATH)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if candidates:
        return candidates[-1].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise ServerError(f"PostgreSQL server binaries (pg_ctl, initdb) not found: {PG_INSTALL_HINT}")


def _as_pg_user(state: State, argv: list[str]) -> list[str]:
    return ["runuser", "-u", state.pg_os_user, "--", *argv] if state.pg_os_user else argv


# What PostgreSQL's programs get from the caller's environment: where programs and libraries are, the locale and
# time zone. `pg_ctl start` hands its environment to the postmaster (and `runuser -u` keeps the caller's), so
# anything more (the admin's MLFLOW_TRACKING_PASSWORD, PREFECT_API_AUTH_STRING, AWS_*, PG*) would sit in
# /proc/<postmaster>/environ for as long as the database runs.
PG_PASS_ENV = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "LD_LIBRARY_PATH")


def _pg_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in PG_PASS_ENV}


def _pg_run(state: State, argv: list[str]) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(_as_pg_user(state, argv), capture_output=True, text=True, timeout=120, env=_pg_env())
    if out.returncode != 0:
        raise ServerError(f"{' '.join(argv[:2])} failed ({out.returncode}):\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
    return out


def _pg_ready(state: State) -> bool:
    ready = Path(state.pg_bin) / "pg_isready"
    out = subprocess.run([str(ready), "-h", "127.0.0.1", "-p", str(state.pg_port), "-q"], timeout=10, env=_pg_env())
    return out.returncode == 0


def _start_postgres(state: State) -> str:
    data = Path(state.pg_data)
    bin_dir = Path(state.pg_bin)
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if state.pg_os_user:
            user = pwd.getpwnam(state.pg_os_user)
            for p in (data.parent, data):
                os.chown(p, user.pw_uid, user.pw_gid)
        data.chmod(0o700)
        # trust on the local socket only (for creating the role below); TCP needs the role's password
        _pg_run(state, [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
    if _pg_ready(state):
        return "already running"
    if _port_taken(state.pg_port):
        raise ServerError(f"port {state.pg_port} is taken by another program: choose one with --pg-port")
    # -k: the unix socket goes into the data dir (Debian's /var/run/postgresql may not exist without a cluster)
    _pg_run(state, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60",
                    "-o", f"-p {state.pg_port} -h 127.0.0.1 -k {data}", "start"])
    return "started"


def _ensure_databases(state: State) -> None:
    import psycopg2  # the `team` extra
    from psycopg2 import sql

    conn = psycopg2.connect(host=state.pg_data, port=state.pg_port, user="postgres", dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE can't run in a transaction
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(DB_USER)),
                    (state.db_password,))
        for db in DATABASES:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if not cur.fetchone():
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(DB_USER)))
    conn.close()


# ---------------------------------------------------------------- up / down


# What every process `up` starts may inherit from the caller's shell: where programs and libraries are, the
# locale, and alignflow's own non-secret settings. Nothing else: the shell that runs `up` may hold cloud keys
# and other credentials (OPENAI_API_KEY, AWS_SECRET_ACCESS_KEY, ...) that no server or flow run needs.
PASS_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
            "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "HF_HOME",
            "ALIGNFLOW_DATA_ROOTS", "ALIGNFLOW_SECRET_ENV_ALLOW", "ALIGNFLOW_TEACHER_URL_ALLOW",
            "ALIGNFLOW_TRACKING_WAIT_S", "ALIGNFLOW_SKIP_MEMORY_CHECK", "ALIGNFLOW_DEBUG")


def _base_env(state: State) -> dict[str, str]:
    """The servers' environment: PASS_ENV from the caller, and settings of their own (never PREFECT_* or
    MLFLOW_* from the caller: each service gets exactly the ones `up` sets)."""
    env = {k: v for k, v in os.environ.items() if k in PASS_ENV}
    env.update(PREFECT_HOME=str(Path(state.home) / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# The worker's default allow list (ALIGNFLOW_SECRET_ENV_ALLOW unset in `up`'s shell): OPENAI_API_KEY alone, not the
# recipe default's `*_API_KEY`, which handed every *_API_KEY of the operator's shell to every flow run.
WORKER_SECRET_ENV_ALLOW = "OPENAI_API_KEY"


def worker_secret_allow() -> str:
    """The allow list the worker runs with (and validates recipes against): the caller's, else OPENAI_API_KEY."""
    return os.environ.get("ALIGNFLOW_SECRET_ENV_ALLOW", WORKER_SECRET_ENV_ALLOW)


def worker_secret_env() -> dict[str, str]:
    """The caller's variables a recipe may name as its teacher's key: those `worker_secret_allow()` allows (unset:
    `OPENAI_API_KEY` only), never a server's credentials (tasks/lib/secret_env.py decides, as it does when the
    worker validates a recipe). `ALIGNFLOW_SECRET_ENV_ALLOW=` (empty) hands the worker none."""
    from alignflow.tasks.lib.secret_env import secret_env_problem

    saved = os.environ.get("ALIGNFLOW_SECRET_ENV_ALLOW")
    os.environ["ALIGNFLOW_SECRET_ENV_ALLOW"] = worker_secret_allow()  # secret_env_problem reads the environment
    try:
        return {k: v for k, v in os.environ.items()
                if k not in PASS_ENV and k != "ALIGNFLOW_SECRET_ENV_ALLOW" and secret_env_problem(k) is None}
    finally:
        if saved is None:
            del os.environ["ALIGNFLOW_SECRET_ENV_ALLOW"]
        else:
            os.environ["ALIGNFLOW_SECRET_ENV_ALLOW"] = saved


def _make_private(home: Path, skip: Path | None) -> None:
    """Take group and other permissions off everything under `home` (folders 0700, files 0600 for files that
    were 0644): what earlier versions (or other umasks) left readable, the password hashes in mlflow-auth.db,
    the artifact store, logs. `skip`: PostgreSQL's cluster, whose modes initdb and the server keep themselves."""
    for root, dirs, files in os.walk(home):
        here = Path(root)
        if skip is not None and here == skip:
            dirs.clear()
            continue
        for name in [*dirs, *files]:
            path = here / name
            if path.is_symlink() or (skip is not None and path == skip):
                continue
            mode = path.stat().st_mode & 0o7777
            if mode & 0o077:
                path.chmod(mode & 0o700)
    home.chmod(0o700)


def _prefect_locked(state: State) -> bool:
    """Whether the Prefect API refuses an unauthenticated request (401), i.e. runs with basic auth."""
    req = urllib.request.Request(f"{state.prefect_api_url}/flows/filter", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10):
            return False
    except urllib.error.HTTPError as e:
        return e.code == 401
    except OSError:
        return False


def _mlflow_locked(state: State) -> bool:
    """Whether the MLflow server refuses an unauthenticated request (401), i.e. runs its basic-auth app."""
    try:
        with urllib.request.urlopen(f"{state.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1",
                                    timeout=10):
            return False
    except urllib.error.HTTPError as e:
        return e.code == 401
    except OSError:
        return False


def _mode(locked: bool) -> str:
    return "basic auth" if locked else "NO AUTH"


def _check_modes(state: State, prefect_auth: bool, mlflow_auth: bool) -> None:
    """Refuse, before anything changes, to keep a running service in another mode than the one asked for:
    `up --auth` over servers that run open would otherwise leave them open and say they are fine. The servers'
    modes are what they answer to a request without credentials; the worker's is the one `up` recorded."""
    home = state.home
    wrong = []
    if _ours(state, "prefect-server") and _http_ok(f"{state.prefect_api_url}/health"):
        running = _prefect_locked(state)
        if running != prefect_auth:
            wrong.append(f"the Prefect server runs with {_mode(running)}, asked: {_mode(prefect_auth)}")
    if _ours(state, "mlflow-server") and _http_ok(f"{state.mlflow_url}/health"):
        running = _mlflow_locked(state)
        if running != mlflow_auth:
            wrong.append(f"the MLflow server runs with {_mode(running)}, asked: {_mode(mlflow_auth)}")
    if _ours(state, "prefect-worker"):
        running = bool(state.procs["prefect-worker"].get("auth"))
        if running != mlflow_auth:
            wrong.append(f"the worker was started with {_mode(running)}, asked: {_mode(mlflow_auth)}")
    if wrong:
        raise ServerError("; ".join(wrong) + f". Nothing was changed. Stop them first with `alignflow server down "
                          f"--home {home}` (data and artifacts stay), then run `up` again in the mode you want")


def _prefect_auth(auth: bool) -> str | None:
    """PREFECT_API_AUTH_STRING (`user:password`), the variable every Prefect client reads: the server requires it.
    With --auth it is required, so that a team server never runs an open API beside a locked MLflow."""
    value = os.environ.get("PREFECT_API_AUTH_STRING") or None
    if auth and not value:
        raise ServerError("--auth needs PREFECT_API_AUTH_STRING (user:password) in the environment: the Prefect "
                          "server then asks every client for it (and every Prefect client reads the same variable); "
                          "without it anyone who reaches the API could read deployments and run flows on the worker")
    if value is not None and ":" not in value:
        raise ServerError("PREFECT_API_AUTH_STRING must look like user:password")
    return value


def _auth_credentials() -> tuple[str, str]:
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise ServerError("--auth needs MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                          "(they become the MLflow admin's credentials, and every client reads the same variables)")
    return user, password


TEAM_EXTRA = {"psycopg2": "psycopg2-binary (MLflow's PostgreSQL driver)",
              "flask_wtf": "Flask-WTF (MLflow's basic-auth app)"}


def check_team_extra(auth: bool, find: Callable[[str], object] | None = None) -> None:
    """Raise ServerError naming what to install when a module team mode needs is missing."""
    import importlib.util

    find = find or importlib.util.find_spec
    missing = [what for module, what in TEAM_EXTRA.items() if (auth or module != "flask_wtf") and find(module) is None]
    if missing:
        raise ServerError(f"team mode needs {', '.join(missing)}: pip install -e '.[team]' (nothing was started)")


def _worker_home(state: State) -> Path:
    """The worker's own folder (Prefect home, HOME for caches) when it runs as another OS user: outside the team
    home, which stays the caller's alone (0700), like the cluster PostgreSQL's user owns when run as root."""
    return Path(f"/var/lib/alignflow/worker/{sha256(state.home.encode()).hexdigest()[:12]}")


def _writable_code(user: str, project_dir: Path) -> str | None:
    """The first file or folder of alignflow's code that `user` may write, or None: the checkout's top folder
    (`python -m` from there puts it first on sys.path), its `alignflow/` and `flows/`, the installed package, the
    virtual environment (its site-packages, `.pth` files and `bin/` scripts) and the interpreter's standard library,
    all but the top folder searched through. `find -writable` asks the kernel (access(2)) as that user."""
    import site
    import sysconfig

    import alignflow

    deep = [project_dir / "alignflow", project_dir / "flows", Path(alignflow.__file__).parent]
    deep += [Path(sys.prefix)] if sys.prefix != sys.base_prefix else [Path(p) for p in site.getsitepackages()]
    deep += [Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib", "stdlib", "platstdlib")]
    seen: list[str] = []
    for path in [p for p in deep if p.exists()]:
        if str(path.resolve()) not in seen:
            seen.append(str(path.resolve()))
    top = subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(project_dir)], capture_output=True,
                         timeout=30)
    if top.returncode == 0:
        return str(project_dir)
    found = subprocess.run(["runuser", "-u", user, "--", "find", *seen, "-writable", "-print", "-quit"],
                           capture_output=True, text=True, timeout=300)  # unreadable folders: errors, not writable
    return (found.stdout.splitlines() or [None])[0]


def _prepare_worker_user(state: State) -> dict[str, str]:
    """Check that --worker-user can run the worker, make its private home; the variables that point it there."""
    if os.geteuid() != 0:
        raise ServerError("--worker-user needs `up` to run as root (it starts the worker as that user); "
                          "nothing was started")
    try:
        user = pwd.getpwnam(state.worker_os_user)
    except KeyError:
        raise ServerError(f"--worker-user {state.worker_os_user}: no such OS user (create it with "
                          f"`useradd --system {state.worker_os_user}`)") from None
    if user.pw_uid == 0:
        raise ServerError("--worker-user must not be root: its flow runs could then read everything `up` keeps")
    readable = subprocess.run(["runuser", "-u", user.pw_name, "--", "test", "-r", state.project_dir, "-a", "-x",
                               state.project_dir], capture_output=True, timeout=30)
    if readable.returncode != 0:
        raise ServerError(f"--worker-user {user.pw_name} cannot read the project dir {state.project_dir}: give it "
                          "read access (not write access: see below) and write access to the work dirs its runs use")
    writable = _writable_code(user.pw_name, Path(state.project_dir))
    if writable:
        raise ServerError(f"--worker-user {user.pw_name} can write {writable}: a flow run could then change code "
                          "that `up` and every alignflow command (run as root) import. Make the checkout and the "
                          "virtual environment read-only for that user; give it write access only to the work "
                          "dirs its runs use (a folder it owns, e.g. runs/ inside the read-only checkout); "
                          "nothing was started")
    # the interpreter (a venv's python may link into another user's home), the venv and the checkout
    runs = subprocess.run(["runuser", "-u", user.pw_name, "--", sys.executable, "-c", "import alignflow.worker"],
                          cwd=state.project_dir, env={"PATH": os.environ.get("PATH", ""), "HOME": "/"},
                          capture_output=True, text=True, timeout=300)
    if runs.returncode != 0:
        raise ServerError(f"--worker-user {user.pw_name} cannot run {sys.executable} with alignflow "
                          f"({(runs.stderr.strip().splitlines() or ['?'])[-1]}): the interpreter, the virtual "
                          "environment and the checkout must be readable by that user; nothing was started")
    whome = _worker_home(state)
    whome.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    whome.mkdir(mode=0o700, exist_ok=True)
    os.chown(whome, user.pw_uid, user.pw_gid)
    whome.chmod(0o700)
    return {"HOME": str(whome), "USER": user.pw_name, "LOGNAME": user.pw_name, "PREFECT_HOME": str(whome / "prefect")}


def _ensure_pool(state: State, env: dict[str, str]) -> None:
    """Create the process work pool with the team worker's template (alignflow/worker.py: no `command`, `env` or
    `working_dir` job variables), or put that template back on a pool that exists (an older `up` made it with
    Prefect's default one, or a Prefect user edited it). The worker uses its own copy either way."""
    from alignflow.worker import PROCESS_TEMPLATE

    template = Path(state.home) / "work-pool-template.json"
    fd = os.open(template, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(PROCESS_TEMPLATE, f, indent=2)
    prefect = [sys.executable, "-m", "prefect", "work-pool"]
    create = subprocess.run([*prefect, "create", state.pool, "--type", "process", "--base-job-template",
                             str(template)], env=env, capture_output=True, text=True, timeout=120)
    said = create.stdout + create.stderr
    if create.returncode != 0 and "already exists" in said:
        update = subprocess.run([*prefect, "update", state.pool, "--base-job-template", str(template)], env=env,
                                capture_output=True, text=True, timeout=120)
        if update.returncode != 0:
            raise ServerError(f"could not update work pool {state.pool}: {update.stdout}{update.stderr}")
    elif create.returncode != 0:
        raise ServerError(f"could not create work pool {state.pool}: {said}")


def up(home: Path = DEFAULT_HOME, project_dir: Path | None = None, pg_port: int = 5433, prefect_port: int = 4200,
       mlflow_port: int = 5000, pool: str = "alignflow", auth: bool = False,
       say: Callable[[str], None] = print, worker_user: str = "") -> State:
    """Start (or keep) PostgreSQL, the Prefect server and worker, and the MLflow server. Idempotent."""
    check_team_extra(auth)  # before anything starts: a missing driver must not leave PostgreSQL running
    previous = os.umask(0o077)  # what `up` itself writes (logs, the auth config, state) is the caller's only
    try:
        return _up(home, project_dir, pg_port, prefect_port, mlflow_port, pool, auth, say, worker_user)
    finally:
        os.umask(previous)


def _up(home: Path, project_dir: Path | None, pg_port: int, prefect_port: int, mlflow_port: int, pool: str,
        auth: bool, say: Callable[[str], None], worker_user: str) -> State:
    home = home.expanduser().resolve()
    project = (project_dir or Path.cwd()).resolve()
    state = load_state(home) or State(home=str(home), project_dir=str(project), db_password=secrets.token_urlsafe(24))
    credentials = _auth_credentials() if auth else None
    prefect_auth = _prefect_auth(auth)
    _check_modes(state, bool(prefect_auth), bool(credentials))  # before the state file changes
    if _ours(state, "prefect-worker") and state.worker_os_user != worker_user:
        raise ServerError(f"the worker runs as {state.worker_os_user or 'the caller'}, asked: "
                          f"{worker_user or 'the caller'}. Nothing was changed. Stop it first with `alignflow "
                          f"server down --home {home}`, then run `up` again")
    state.project_dir = str(project)
    state.pg_port, state.prefect_port, state.mlflow_port, state.pool, state.auth = (
        pg_port, prefect_port, mlflow_port, pool, auth)
    state.worker_os_user = worker_user
    state.pg_bin = str(find_pg_bin())
    if os.geteuid() == 0:  # PostgreSQL won't run as root: the Debian package's `postgres` user owns the cluster
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise ServerError(f"running as root needs the `postgres` OS user: {PG_INSTALL_HINT}") from None
        state.pg_os_user = "postgres"
        state.pg_data = f"/var/lib/postgresql/alignflow/{sha256(str(home).encode()).hexdigest()[:12]}"
    else:
        state.pg_os_user, state.pg_data = "", str(home / "postgres")
    worker_home_env = _prepare_worker_user(state) if worker_user else {}
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(home, skip=Path(state.pg_data))  # files an older `up` (or another umask) left readable
    _save_state(state)
    log = say

    log(f"postgres  127.0.0.1:{state.pg_port}  {_start_postgres(state)}  (data {state.pg_data})")
    _ensure_databases(state)

    env = _base_env(state)
    prefect_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": state.db_url("prefect", "postgresql+asyncpg"),
                   "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(state.prefect_port)}
    if prefect_auth:  # basic auth on every API route (and the UI asks for it); through the environment only
        prefect_env["PREFECT_SERVER_API_AUTH_STRING"] = prefect_auth
    if _ours(state, "prefect-server") and _http_ok(f"{state.prefect_api_url}/health"):
        status = "already running"
    else:
        if _port_taken(state.prefect_port):
            raise ServerError(f"port {state.prefect_port} is taken by another program: choose one with --prefect-port")
        pid = _spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(state.prefect_port)], prefect_env, state, home,
                     auth=bool(prefect_auth))
        _wait("the Prefect server", lambda: _http_ok(f"{state.prefect_api_url}/health"), pid, 180,
              home / "logs" / "prefect-server.log")
        status = "started"
    locked = _prefect_locked(state)  # what the server answers now, not what was asked
    log(f"prefect   {state.prefect_api_url.removesuffix('/api')}  {status}  (UI and API, on Postgres, "
        f"{'basic auth' if locked else 'NO AUTH: set PREFECT_API_AUTH_STRING to require credentials'})")

    mlflow_env = {**env, "MLFLOW_BACKEND_STORE_URI": state.db_url("mlflow", "postgresql+psycopg2"),
                  "MLFLOW_ARTIFACTS_DESTINATION": str(home / "mlflow-artifacts")}
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(state.mlflow_port),
            "--serve-artifacts", "--workers", "2",
            # uvicorn's supervisor kills a worker that has not answered its ping within 5 s, and a worker still
            # importing MLflow on a busy machine (load 16 on 2 cores: over 60 s) never answers in time, so the
            # server never came up; 120 s lets it finish starting
            "--uvicorn-opts", "--timeout-worker-healthcheck 120"]
    if credentials:
        ini = home / "mlflow-auth.ini"  # holds no secret: the admin's credentials come from the environment
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{home / 'mlflow-auth.db'}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        state.flask_secret = state.flask_secret or secrets.token_urlsafe(32)
        _save_state(state)
        mlflow_env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY=state.flask_secret,
                          MLFLOW_AUTH_ADMIN_USERNAME=credentials[0],
                          MLFLOW_AUTH_ADMIN_PASSWORD=credentials[1])
        argv += ["--app-name", "basic-auth"]
    if _ours(state, "mlflow-server") and _http_ok(f"{state.mlflow_url}/health"):
        status = "already running"
    else:
        if _port_taken(state.mlflow_port):
            raise ServerError(f"port {state.mlflow_port} is taken by another program: choose one with --mlflow-port")
        pid = _spawn("mlflow-server", argv, mlflow_env, state, home, auth=bool(credentials))
        _wait("the MLflow server", lambda: _http_ok(f"{state.mlflow_url}/health"), pid, 180,
              home / "logs" / "mlflow-server.log")
        status = "started"
    log(f"mlflow    {state.mlflow_url}  {status}  (tracking + registry on Postgres, "
        f"artifacts in {home / 'mlflow-artifacts'}, {_mode(_mlflow_locked(state))})")

    # The pool's template, and the work-pool commands' own Prefect home: the servers' (not the worker's)
    client_env = {**env, **state.client_env(), "PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    if prefect_auth:
        client_env["PREFECT_API_AUTH_STRING"] = prefect_auth
    _ensure_pool(state, client_env)

    # The worker runs flow runs as subprocesses, with this environment (Prefect gives each run the worker's):
    # PASS_ENV, where both servers are and its own credentials for them, the secrets ALIGNFLOW_SECRET_ENV_ALLOW
    # lets recipes name; nothing else from the caller's shell. With --auth it logs to MLflow as its own user,
    # which may write experiments and models but is not the admin (a pipeline's code cannot create users or
    # change permissions); the admin's credentials stay with the caller.
    worker_env = {**env, **worker_secret_env(), **state.client_env(), "ALIGNFLOW_HOME": state.project_dir,
                  "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", **worker_home_env,
                  "ALIGNFLOW_SECRET_ENV_ALLOW": worker_secret_allow(),  # the worker validates recipes with it
                  # the CLI's MLflow request settings (alignflow/cli.py): a request the server never answers fails
                  # after 30 s and is retried (after 1, 2, 4, 8 s). MLflow's defaults (120 s, 7 retries, backoff
                  # factor 2) held a flow run on the worker in one unanswered update_model_version for over 15 min
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    if prefect_auth:
        worker_env["PREFECT_API_AUTH_STRING"] = prefect_auth
    if credentials:
        _ensure_worker_user(state, credentials)
        worker_env.update(MLFLOW_TRACKING_USERNAME=state.worker_user, MLFLOW_TRACKING_PASSWORD=state.worker_password)
    if _ours(state, "prefect-worker"):
        status = "already running"
    else:
        _spawn("prefect-worker", [sys.executable, "-m", "alignflow.worker", "--pool", state.pool], worker_env, state,
               Path(state.project_dir), auth=bool(credentials), user=worker_user or None)
        status = "started"
    running = bool(state.procs["prefect-worker"].get("auth"))
    log(f"worker    pool '{state.pool}'  {status}  (runs alignflow's flows from {state.project_dir} as "
        f"{worker_user or 'the caller'}, {_mode(running)} to MLflow)")
    return state


WORKER_USER = "alignflow-worker"


def _mlflow_call(state: State, credentials: tuple[str, str], method: str, path: str,
                 body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """One request to the MLflow server's REST API as the admin; (HTTP status, JSON body)."""
    import base64

    token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
    req = urllib.request.Request(f"{state.mlflow_url}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}")
        except ValueError:  # an HTML error page (a server without the auth app answers 404 with one)
            return e.code, {"message": body[:300].decode(errors="replace")}


def _ensure_worker_user(state: State, credentials: tuple[str, str]) -> None:
    """The MLflow user the worker runs pipelines as: not an admin. MLflow's basic-auth app lets any user create
    experiments and registered models and gives their creator MANAGE on them; default_permission (READ) covers the
    rest. Its generated password is kept in state.json (mode 0600) beside the database password."""
    state.worker_user = state.worker_user or WORKER_USER
    state.worker_password = state.worker_password or secrets.token_urlsafe(24)
    _save_state(state)
    body = {"username": state.worker_user, "password": state.worker_password}
    status, answer = _mlflow_call(state, credentials, "POST", "/api/2.0/mlflow/users/create", body)
    if status == 400 and answer.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        status, answer = _mlflow_call(state, credentials, "PATCH", "/api/2.0/mlflow/users/update-password", body)
    if status != 200:
        raise ServerError(f"could not create the MLflow user {state.worker_user} for the worker: HTTP {status} "
                          f"{answer.get('message', answer)}")


def down(home: Path = DEFAULT_HOME, purge: bool = False, say: Callable[[str], None] = print) -> bool:
    """Stop the worker, the servers and PostgreSQL that `up` started from this home. False if none was.

    purge=True also deletes what they stored: the database cluster, the artifact store, logs and state.
    """
    home = home.expanduser().resolve()
    state = load_state(home)
    if state is None:
        say(f"nothing to stop: no team servers were started from {home}")
        return False
    for name in ("prefect-worker", "mlflow-server", "prefect-server"):
        pid = _ours(state, name)  # a pid alone is not enough: it may have been reused by another program
        recorded = state.pids.pop(name, None)
        state.procs.pop(name, None)
        if pid is not None:
            _stop_pid(pid)
            say(f"{name:<15} stopped (pid {pid})")
        elif pid_alive(recorded):
            say(f"{name:<15} not stopped: pid {recorded} is now another process (its start time or command line "
                "differs from what `up` recorded), left alone")
    if state.pg_data and (Path(state.pg_data) / "postmaster.pid").exists():
        _pg_run(state, [str(Path(state.pg_bin) / "pg_ctl"), "-D", state.pg_data, "-m", "fast", "-w", "stop"])
        say("postgres        stopped")
    if purge:
        if state.pg_data:
            shutil.rmtree(state.pg_data, ignore_errors=True)
        if state.worker_os_user:
            shutil.rmtree(_worker_home(state), ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        say(f"purged          {home} and {state.pg_data}")
        return True
    _save_state(state)
    return True
