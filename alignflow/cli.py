"""The `alignflow` command line. Heavy imports (prefect, mlflow, torch) happen inside commands, so that
`alignflow --help` answers at once."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignflow.flows.keys import STAGES  # light: hashing and manifest helpers only

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="alignflow: one YAML recipe in, a trained, evaluated, registered model out.")
console = Console()
err = Console(stderr=True)
# Every message here is Rich markup: a value shown in it (a path, a recipe name, an error, a reason) goes through
# `escape`, and a literal bracket is written `\[`, or Rich takes `[...]` for a style and drops it (`alignflow[sweep]`
# printed as `alignflow`). tests/test_feedback.py checks every print of this file.

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML, e.g. configs/demo.yaml")]
SetOpt = Annotated[list[str] | None,
                   typer.Option("--set", help="override a recipe key: --set sft.lora.r=32 (repeatable)")]
WorkOpt = Annotated[Path, typer.Option("--work-dir", help="stage folders, caches and the default MLflow store")]


def _quiet_environment() -> None:
    # No telemetry, no hub calls; a slow first start of Prefect's temporary server is normal on 2 cores.
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # An unreachable tracking server fails in ~15 s (retries after 1, 2, 4, 8 s), not after minutes.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)
    # PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every adapter it loads (`export`
    # printed a FutureWarning no user can act on); flows/pipeline.py filters the same for flow runs on a worker.
    import warnings

    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)


def _prefect_api_may_be_configured() -> bool:
    """Whether a Prefect setting could name an API server, or leave the temporary one off, so that Prefect must
    decide itself. Read without importing Prefect (1 to 2 s): the environment (any case, as Prefect reads it), the
    active profile, and any `.env`, `prefect.toml` or `pyproject.toml` [tool.prefect] here, which are taken as a yes
    without reading further. A wrong yes only costs the seconds `_TemporaryServer` saves; a wrong no would hide a
    team server, so every doubt is a yes."""
    import tomllib

    for key in os.environ:
        k = key.upper()
        if k.startswith(("PREFECT_API_", "PREFECT_TESTING_")) or k in (
                "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "PREFECT_PROFILES_PATH",
                "PREFECT_TEST_MODE", "PREFECT_UNIT_TEST_MODE"):
            return True
    active = next((v for k, v in os.environ.items() if k.upper() == "PREFECT_PROFILE" and v), None)
    try:
        if Path("prefect.toml").exists():
            return True
        # a file only: a virtualenv named .env is no settings file, as for Prefect
        if Path(".env").is_file() and "PREFECT" in Path(".env").read_text("utf-8", errors="replace").upper():
            return True
        if Path("pyproject.toml").is_file() and \
                "prefect" in tomllib.loads(Path("pyproject.toml").read_text("utf-8")).get("tool", {}):
            return True
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
        if not (home / "profiles.toml").exists():
            return active not in (None, "ephemeral")  # Prefect's own profiles: only "ephemeral" names no API
        profiles = tomllib.loads((home / "profiles.toml").read_text("utf-8"))
    except (OSError, ValueError):
        return True
    active = active or profiles.get("active") or "ephemeral"
    settings = profiles.get("profiles", {}).get(active)
    if not isinstance(settings, dict):  # not in the file: Prefect's own profile of that name, if any
        return active != "ephemeral"
    if any("API" in k.upper() for k in settings):
        return True
    # a profile of the user's own turns the temporary server on explicitly (Prefect's default is off)
    return not any("EPHEMERAL" in k.upper() and str(v).lower() in ("true", "1") for k, v in settings.items())


class _TemporaryServer:
    """Prefect's temporary API server, started as Prefect starts it (the same `uvicorn` command and environment,
    `prefect.server.api.server.SubprocessASGIServer`) but at the command's first step, without importing Prefect
    here: Prefect's own start imports its whole server into this process first (about 3 s, fighting the flow's
    imports for one interpreter lock) and only then boots the subprocess, which imports it again. Here the
    subprocess boots while this process imports the flow, and `PREFECT_API_URL` names it before Prefect reads its
    settings. A fully cached demo run went from about 11 s to about 7 s (docs/profiles/cached-run.md).

    Used only where Prefect would start a temporary server anyway (`_prefect_api_may_be_configured()` is false);
    stopped at exit, and on Linux killed by the kernel if this process dies first. Must be created on the main
    thread: the kernel's parent-death signal follows the thread that started the child."""

    def __init__(self) -> None:
        import atexit
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.submodule_search_locations, "prefect is not installed"
        self.app_dir = str(Path(spec.submodule_search_locations[0]).parent)
        self.env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1"}
        self._spawn()
        os.environ.setdefault("PREFECT_UI_URL", "")  # serves no UI and ends with the run: no "View at" link
        atexit.register(self.stop)

    @staticmethod
    def flow_settings() -> AbstractContextManager[Any]:
        """Settings for the flows that report to this server: no flow-run heartbeats. Heartbeats let a lasting
        server find runs whose process died; this one dies with the command. They cost time: at every flow's end
        Prefect waits for the heartbeat thread's next 1 s tick (a cached `alignflow run configs/smoke.yaml`: 0.47 s
        per run, 0.30 to 0.78; `bench/bench_pipeline.py --only-command --heartbeat-pairs 5`). A heartbeat
        frequency the user set (environment, profile) is kept."""
        from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

        if "heartbeat_frequency" in get_current_settings().flows.model_fields_set:  # set, not Prefect's default
            return nullcontext()

        return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})

    def _spawn(self) -> None:
        import subprocess

        from alignflow.tasks.lib import launch

        self.port: int = launch.free_port()  # from the kernel (Prefect picks one at random in 8000-8999)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", self.app_dir, "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=self.env, preexec_fn=_parent_death_signal() if sys.platform == "linux" else None)
        os.environ["PREFECT_API_URL"] = f"{self.url}/api"

    def wait(self) -> None:
        """Return once the server answers /health. Its exit or the startup timeout is an error, except that a port
        taken meanwhile (uvicorn's exit code 3, as Prefect handles it) starts it again on another port."""
        import http.client
        import time
        import urllib.error
        import urllib.request

        limit = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        started, restarts = time.monotonic(), 0
        while time.monotonic() - started < limit:
            if self.process.poll() == 3 and restarts < 3:  # the port was taken between our pick and its bind
                restarts += 1
                self._spawn()
                import prefect.context

                prefect.context.refresh_global_settings_context()  # imported already: read the new URL
                continue
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server ({self.url}) exited with code "
                                   f"{self.process.returncode} before it answered; its error is above")
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, http.client.HTTPException, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary server ({self.url}) did not answer within {limit:g} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except Exception:
                self.process.kill()
                self.process.wait()


def _parent_death_signal() -> Callable[[], None]:
    """What the server's process runs before exec: the kernel sends it SIGTERM when this command's process dies,
    even by SIGKILL (PR_SET_PDEATHSIG), so no temporary server outlives its run. Looked up here, before the fork:
    the child only makes the call (and exits at once if this process died before it could)."""
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def in_child() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return in_child


def _start_prefect_server_early(r: Any) -> _TemporaryServer | None:
    """Start the temporary server now when Prefect would start one later; None when an API may be configured, or
    when stages fan out to a Dask cluster elsewhere (its workers could not reach this machine's loopback address)."""
    if r.scale_out.dask_address or _prefect_api_may_be_configured():
        return None
    return _TemporaryServer()


def _load(recipe: Path, overrides: list[str] | None, deployment: bool = False) -> Any:
    _quiet_environment()  # before validation: it reads HF_HUB_OFFLINE
    from alignflow.recipe import RecipeError, allowed_roots, load_recipe

    try:
        return load_recipe(recipe, overrides or [], confine=allowed_roots() if deployment else None)
    except RecipeError as e:
        err.print(f"[bold red]recipe {escape(e.source)} is not valid[/] ({len(e.problems)} problem(s)):")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        raise typer.Exit(2) from None


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    deployment: Annotated[bool, typer.Option(
        "--deployment", help="check as the worker checks a recipe submitted through a deployment: every path must "
        "lie in the project dir (ALIGNFLOW_HOME, else here) or ALIGNFLOW_DATA_ROOTS")] = False,
) -> None:
    """Check a recipe (keys, values, data files, base model) without running anything."""
    r = _load(recipe, set_, deployment)
    console.print(f"[green]ok[/] {escape(str(recipe))}: recipe '{escape(r.name)}', base {escape(r.model.base)}, "
                  f"{sum(len(getattr(r.data, n)) for n in ('sft', 'preference', 'eval'))} data file(s)")


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    work_dir: WorkOpt = Path("runs"),
    until: Annotated[str | None, typer.Option(help=f"stop after this stage: {', '.join(STAGES)}")] = None,
) -> None:
    """Run the pipeline: curate, synthesize, tokenize, quantize, sft, reward, dpo, evaluate, register."""
    if until is not None and until not in STAGES:
        err.print(f"[red]--until {escape(until)}: not a stage[/] (stages: {escape(', '.join(STAGES))})")
        raise typer.Exit(2)
    r = _load(recipe, set_)
    _quiet_environment()
    from alignflow.tasks.lib.errors import StageError

    console.print(f"[bold]alignflow[/] running '{escape(r.name)}' (base {escape(r.model.base)}) in "
                  f"{escape(str(work_dir.resolve()))}")
    try:
        server = _start_prefect_server_early(r)
        from alignflow.flows.pipeline import pipeline

        if server is not None:
            server.wait()
        with server.flow_settings() if server is not None else nullcontext():
            result = pipeline(recipe=r, work_dir=str(work_dir), until=until)
    except StageError as e:
        err.print(f"[bold red]stopped:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: re-run the same command to resume (finished stages are cached)")
        raise typer.Exit(130) from None
    except Exception as e:  # an unexpected failure: say where, keep the traceback for --debug users
        if os.environ.get("ALIGNFLOW_DEBUG"):
            raise
        from alignflow.flows.pipeline import disk_full

        full = disk_full(e)  # outside a stage (the base model's conversion, the tracking store): stages say theirs
        if full is not None:
            where = full.filename or work_dir.resolve()
            err.print(f"[bold red]stopped:[/] no space left on the device while writing {escape(str(where))}. Free "
                      "space on that disk and run the same command again: it resumes (finished stages are reused)",
                      highlight=False)
            raise typer.Exit(1) from None
        err.print(f"[bold red]failed:[/] {type(e).__name__}: {escape(str(e))}", highlight=False)
        err.print("set ALIGNFLOW_DEBUG=1 for the traceback; re-running resumes from the last finished stage")
        raise typer.Exit(1) from None
    _print_result(result, work_dir)


@app.command()
def sweep(
    recipe: RecipeArg,
    param: Annotated[list[str], typer.Option("--param", help="KEY=v1,v2,... (values to try) or KEY=low:high[:log] "
                                                             "(a range Optuna samples); repeatable")],
    trials: Annotated[int | None, typer.Option(help="finished trials to reach (default: the grid's size when "
                                                    "every --param is a list)")] = None,
    metric: Annotated[str, typer.Option(help="evaluate metric to optimise, e.g. rougeL, exact_match, "
                                             "win_rate_vs_base, lm_eval.<task>.acc")] = "rougeL",
    direction: Annotated[str, typer.Option(help="maximize or minimize")] = "maximize",
    parallel: Annotated[int, typer.Option(help="trials run at once (threads in this process)")] = 1,
    set_: SetOpt = None,
    work_dir: WorkOpt = Path("runs"),
) -> None:
    """Hyperparameter search: each trial a pipeline run up to evaluate; the best one is registered through the gate.
    Re-running the same command resumes the study."""
    r = _load(recipe, set_)
    _quiet_environment()
    try:
        import optuna  # noqa: F401
    except ImportError:
        err.print("[red]alignflow sweep needs Optuna:[/] pip install 'alignflow\\[sweep]'")
        raise typer.Exit(2) from None
    from alignflow.flows.sweep import grid_size, parse_param, with_overrides
    from alignflow.tasks.lib.errors import StageError

    problems: list[str] = []
    specs = []
    for text in param:
        try:
            specs.append(parse_param(text))
        except ValueError as e:
            problems.append(str(e))
    if direction not in ("maximize", "minimize"):
        problems.append(f"--direction {direction}: expected maximize or minimize")
    if parallel < 1:
        problems.append("--parallel must be at least 1")
    grid = grid_size(specs) if not problems else None
    if not problems and trials is None and grid is None:
        problems.append("--trials N is needed when a --param is a range (a pure grid defaults to its size)")
    for spec in specs:  # every value (or both ends of a range) must make a valid recipe, before any work
        for value in spec.choices if spec.choices is not None else [spec.low, spec.high]:
            if spec.integer and value is not None:
                value = int(value)
            try:
                with_overrides(r, {spec.key: value})
            except StageError as e:
                problems.append(str(e))
    if problems:
        err.print(f"[bold red]sweep is not valid[/] ({len(problems)} problem(s)):")
        for p in problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        raise typer.Exit(2)
    n = trials if trials is not None else grid
    assert n is not None
    from prefect.task_runners import ThreadPoolTaskRunner

    from alignflow.flows.sweep import sweep as sweep_flow

    console.print(f"[bold]alignflow sweep[/] '{escape(r.name)}': {n:d} trial(s) over "
                  f"{escape(', '.join(s.key for s in specs))}, {escape(direction)} {escape(metric)}, {parallel:d} at a "
                  f"time, in {escape(str(work_dir.resolve()))}")
    try:
        result = sweep_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=parallel))(
            recipe=r, params=specs, trials=n, metric=metric, direction=direction, parallel=parallel,
            work_dir=str(work_dir))
    except StageError as e:
        err.print(f"[bold red]stopped:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]: re-run the same command to resume the sweep")
        raise typer.Exit(130) from None
    table = Table(title=f"sweep {escape(str(result['sweep_id']))} ({escape(result['metric'])})")
    for col in result["trials"][0]:
        if col != "run_id":
            table.add_column(col)
    for row in result["trials"]:
        table.add_row(*[f"{v:g}" if isinstance(v, float) else escape(str(v)) for k, v in row.items()
                        if k != "run_id"])
    console.print(table)
    cache = result["cache"]
    console.print(f"the cache served {cache['cache_saved_stage_runs']:g} of {cache['stage_runs']:g} stage runs "
                  f"(~{cache['cache_saved_seconds']:g} s of work saved)")
    best = result["best"]
    console.print(f"best: trial {best['trial']:d} {escape(str(best['params']))} -> {escape(result['metric'])}="
                  f"{best['value']:g}")
    if result.get("registered"):
        console.print(_registered_line(result["registered"]))
    console.print(f"MLflow sweep run {escape(result['sweep_run_id'])} (tag alignflow.sweep="
                  f"{escape(str(result['sweep_id']))}); study {escape(str(result['storage']))}", highlight=False)


@app.command()
def retrain(recipe: RecipeArg, set_: SetOpt = None, work_dir: WorkOpt = Path("runs")) -> None:
    """Retrain on data that arrived since the current champion; the gate decides. No new data: ends at once."""
    r = _load(recipe, set_)
    _quiet_environment()
    from alignflow.tasks.lib.errors import StageError

    try:
        server = _start_prefect_server_early(r)
        from alignflow.flows.retrain import retrain as retrain_flow

        if server is not None:
            server.wait()
        with server.flow_settings() if server is not None else nullcontext():
            result = retrain_flow(recipe=r, work_dir=str(work_dir))
    except StageError as e:
        err.print(f"[bold red]stopped:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    if result["new_data"] is False:
        console.print(f"no new data since champion v{escape(str(result['champion_version']))} "
                      f"({escape(str(result['counts']))}): "
                      "nothing trained, nothing registered")
        return
    if result["new_data"]:
        console.print(f"new data since champion v{escape(str(result['champion_version']))}: "
                      f"{escape(str(result['counts']))}")
    _print_result(result, work_dir)


def _registered_line(reg: dict[str, Any]) -> str:
    """What register left in the registry (read back after it acted): the version, its alias, why, and where the
    champion is when it is another version."""
    why = "; ".join(reg["gate_reasons"]) or "gate passed"
    line = (f"registered [bold]{escape(reg['model_name'])}[/] version {escape(str(reg['version']))} as "
            f"[bold]{escape(str(reg['alias']))}[/] ({escape(why)})")
    if "champion" in reg and reg["champion"] != reg["version"]:
        line += f"; champion: version {escape(str(reg['champion']))}" if reg["champion"] else "; there is no champion"
    return line


def _print_result(result: dict[str, Any], work_dir: Path) -> None:
    table = Table(title="stages")
    waits = any(info.get("waited_seconds", 0.0) for info in result["stages"].values())
    for col in ("stage", "status", "seconds", *(["waited (s)"] if waits else []), "folder"):
        table.add_column(col)
    for stage, info in result["stages"].items():
        # `waited`: seconds spent waiting for another run that was building the same stage folder
        waited = [f"{info.get('waited_seconds', 0.0):.1f}"] if waits else []
        table.add_row(stage, "cached" if info["cached"] else "ran", f"{info['seconds']:.1f}", *waited,
                      escape(str(info["folder"])))
    console.print(table)
    metrics = Table(title="headline metrics")
    metrics.add_column("metric")
    metrics.add_column("value")
    for k, v in result["metrics"].items():
        metrics.add_row(escape(k), f"{v:g}")
    console.print(metrics)
    if "registered" in result:
        console.print(_registered_line(result["registered"]))
    uri = result["tracking_uri"]
    if uri.startswith(("http://", "https://")):  # a tracking server: the run's page
        console.print(f"MLflow parent run: {uri.rstrip('/')}/#/experiments/{result['experiment_id']}/runs/"
                      f"{result['parent_run_id']}", highlight=False, markup=False)
    else:
        console.print(f"MLflow parent run {result['parent_run_id']}: mlflow ui --backend-store-uri {uri}",
                      highlight=False, markup=False)


def _client(work_dir: Path) -> Any:
    """An MlflowClient on MLFLOW_TRACKING_URI, or on the SQLite store under --work-dir (as `run` uses)."""
    _quiet_environment()
    import mlflow
    from mlflow import MlflowClient

    from alignflow.flows.tracking import tracking_uri

    uri = tracking_uri(work_dir.expanduser().resolve())
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _user_error(fn: Any, *args: Any) -> Any:
    from alignflow.tasks.lib.errors import StageError

    try:
        return fn(*args)
    except StageError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def _registry_change(action: str, model_name: str, needs: str, fn: Any, *args: Any) -> Any:
    """`_user_error` for a command that changes a registered model: the tracking server's 403 becomes one line
    naming the user, the model and the permission the change needs (no traceback)."""
    from mlflow.exceptions import MlflowException

    try:
        return _user_error(fn, *args)
    except MlflowException as e:
        if e.error_code != "PERMISSION_DENIED":
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "this user"
        said = (f"{action}: permission denied: MLflow user {user!r} needs {needs} on registered model "
                f"{model_name!r} (its owner or an admin grants it)")
        err.print(f"[bold red]error:[/] {escape(said)}", highlight=False)
        raise typer.Exit(1) from None


@app.command()
def promote(model_name: str, version: str, work_dir: WorkOpt = Path("runs")) -> None:
    """Make VERSION the champion of MODEL_NAME by hand (the old champion becomes previous-champion)."""
    from alignflow.flows.registry import promote as do_promote

    console.print(_registry_change("promote", model_name, "EDIT (moving its champion alias)", do_promote,
                                   _client(work_dir), model_name, version), markup=False)


@app.command()
def rollback(model_name: str, work_dir: WorkOpt = Path("runs")) -> None:
    """Swap champion and previous-champion of MODEL_NAME."""
    from alignflow.flows.registry import rollback as do_rollback

    console.print(_registry_change("rollback", model_name, "EDIT (moving its champion alias)", do_rollback,
                                   _client(work_dir), model_name), markup=False)


@app.command()
def export(
    model_uri: Annotated[str, typer.Argument(help="e.g. models:/demo-assistant@champion or models:/demo-assistant/3")],
    merged: Annotated[Path | None, typer.Option(help="write merged safetensors weights + tokenizer here")] = None,
    adapter: Annotated[Path | None, typer.Option(help="write the LoRA adapter + tokenizer here")] = None,
    gguf: Annotated[Path | None, typer.Option(help="write one GGUF file here (llama.cpp, Ollama): merged weights, "
                                                   "tokenizer and chat template; Llama-family models")] = None,
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="GGUF weight type: f16, q8_0 or f32")] = "f16",
    work_dir: WorkOpt = Path("runs"),
) -> None:
    """Export a registered model as plain transformers files (merged), its PEFT adapter, or a GGUF file."""
    import tempfile

    from alignflow.flows.registry import download_model, resolve_model_uri, shipped_records
    from alignflow.tasks.export import ExportInputs
    from alignflow.tasks.export import run as do_export

    if sum(x is not None for x in (merged, adapter, gguf)) != 1:
        err.print("[red]give exactly one of --merged OUT, --adapter OUT or --gguf OUT.gguf[/]")
        raise typer.Exit(2)
    if gguf_type not in ("f16", "q8_0", "f32"):
        err.print(f"[red]--gguf-type {escape(gguf_type)}: expected f16, q8_0 or f32[/]")
        raise typer.Exit(2)
    out = merged or adapter or gguf
    assert out is not None
    kind = "merged" if merged else "adapter" if adapter else "gguf"
    _client(work_dir)
    # one version, resolved once: an alias that moves meanwhile cannot mix one version's weights with another's tags
    pinned = _user_error(resolve_model_uri, model_uri)
    with tempfile.TemporaryDirectory() as tmp:
        weights, config = _user_error(download_model, pinned, Path(tmp))  # the registry, nothing else
        # the artifacts evaluate measured for this version (register.ship): a GGUF or merged folder must be those
        # bytes (a logged GGUF file is downloaded and copied; a merged folder is rebuilt and checked)
        measured = _user_error(shipped_records, pinned, f"gguf_{gguf_type}" if gguf else "",
                               Path(tmp) / "shipped") if kind != "adapter" else {}
        result = _user_error(do_export, ExportInputs(artifacts=weights.parent, config=config, out_dir=out, kind=kind,
                                                     gguf_type=gguf_type, measured=measured))
    extra = f", {result['gguf_type']}, {result['bytes'] / 2**20:.1f} MiB" if kind == "gguf" else ""
    readme = ", its model card as README.md" if result.get("readme") else ""
    shown = model_uri if pinned == model_uri else f"{model_uri} ({pinned})"
    console.print(f"exported {shown} ({result['kind']}{extra}{readme}) to {out}", markup=False)
    if result.get("measured"):
        console.print(f"the artifact evaluate measured for this version: sha256 {result['sha256']} "
                      f"({'the file logged with it' if result.get('source') == 'logged' else 'rebuilt, same bytes'})",
                      markup=False, soft_wrap=True)
    elif result.get("measured") is False:
        console.print(f"not the measured artifact: this version was measured as "
                      f"{', '.join(result['measured_formats'])}, not {result['format']}", markup=False, soft_wrap=True)
    elif kind != "adapter" and not (pinned.startswith("models:/") and pinned.count("/") == 2):  # no NAME/VERSION
        console.print(f"not checked against a measured artifact: {pinned} names no registered version (export "
                      "models:/NAME/VERSION to check against what evaluate measured)", markup=False, soft_wrap=True)


@app.command()
def compare(run_a: str, run_b: str, work_dir: WorkOpt = Path("runs")) -> None:
    """Stage by stage: what differed between two pipeline runs (config, data, cache) and their metrics."""
    from alignflow.flows.registry import compare as do_compare

    lineage, rows = _user_error(do_compare, _client(work_dir), run_a, run_b)
    console.print(f"[bold]{escape(run_a)}[/] vs [bold]{escape(run_b)}[/]")
    for line in lineage or ["lineage: same recipe hash, data and code"]:
        console.print(f"  {line}", highlight=False, markup=False)
    for row in rows:
        table = Table(title=escape(f"{row.stage}  (cached: {row.cached[0]} / {row.cached[1]})"), title_justify="left")
        for col in ("metric", "A", "B", "delta"):
            table.add_column(col)
        for name, a, b in row.metrics:
            delta = f"{b - a:+.4g}" if a is not None and b is not None else ""
            table.add_row(escape(name), "" if a is None else f"{a:.4g}", "" if b is None else f"{b:.4g}", delta)
        console.print(table)
        for change in row.config_diff:
            console.print(f"  config {change}", highlight=False, markup=False)


policy_app = typer.Typer(no_args_is_help=True, help="A registered model's promotion policy: the register.gate.* "
                        "floor its owner sets; a recipe's gate may be stricter, never looser.")
app.add_typer(policy_app, name="policy")


@policy_app.command("set")
def policy_set(
    model_name: str,
    values: Annotated[list[str], typer.Argument(help="register.gate.KEY=VALUE ... (VALUE null removes KEY), e.g. "
                                                     "register.gate.min_win_rate_vs_champion=0.5")],
    work_dir: WorkOpt = Path("runs"),
) -> None:
    """Set MODEL_NAME's promotion policy (needs MANAGE on the model, or an admin)."""
    from alignflow.flows.policy import set_policy

    console.print(_registry_change("policy set", model_name, "MANAGE", set_policy, _client(work_dir), model_name,
                                   values), highlight=False, markup=False)


@policy_app.command("show")
def policy_show(model_name: str, work_dir: WorkOpt = Path("runs")) -> None:
    """Show MODEL_NAME's promotion policy."""
    from alignflow.flows.policy import show_policy

    console.print(_user_error(show_policy, _client(work_dir), model_name), highlight=False, markup=False)


server_app = typer.Typer(no_args_is_help=True, help="Team mode: PostgreSQL, Prefect server + worker, MLflow server.")
app.add_typer(server_app, name="server")
HomeOpt = Annotated[Path | None, typer.Option("--home", help="state, logs, artifact store (env ALIGNFLOW_SERVER_HOME)")]


def _default_home() -> Path:
    return Path(os.environ.get("ALIGNFLOW_SERVER_HOME", "~/.alignflow/server")).expanduser()


@server_app.command("up")
def server_up(
    home: HomeOpt = None,
    project_dir: Annotated[Path, typer.Option(help="the checkout the worker runs flows from")] = Path("."),
    pg_port: Annotated[int, typer.Option(help="PostgreSQL port (127.0.0.1)")] = 5433,
    prefect_port: Annotated[int, typer.Option(help="Prefect UI/API port (127.0.0.1)")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port (127.0.0.1)")] = 5000,
    pool: Annotated[str, typer.Option(help="Prefect work pool the worker serves")] = "alignflow",
    auth: Annotated[bool, typer.Option(help="MLflow basic auth; credentials from MLFLOW_TRACKING_USERNAME/"
                                            "MLFLOW_TRACKING_PASSWORD")] = False,
    worker_user: Annotated[str, typer.Option(help="run the worker (and so every flow run) as this OS user, which "
                                                  "then cannot read the home's secrets; needs root")] = "",
) -> None:
    """Start PostgreSQL, a Prefect server and worker, and an MLflow server on this machine (safe to re-run)."""
    from alignflow.server import ServerError, up

    try:
        state = up(home or _default_home(), project_dir, pg_port, prefect_port, mlflow_port, pool, auth,
                   say=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True),
                   worker_user=worker_user)
    except ServerError as e:
        err.print(f"[bold red]server up failed:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    console.print("\npoint alignflow (and any Prefect/MLflow client) at them:")
    for key, value in state.client_env().items():
        console.print(f"export {key}={value}", highlight=False, markup=False, soft_wrap=True)
    if state.auth:
        console.print("# and keep MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD exported", markup=False)
    console.print(f"deploy: prefect deploy --prefect-file deployments/prefect.yaml --all   "
                  f"(UI: {state.prefect_api_url.removesuffix('/api')})", highlight=False, markup=False)


@server_app.command("down")
def server_down(
    home: HomeOpt = None,
    purge: Annotated[bool, typer.Option(help="also delete the databases, artifact store and logs")] = False,
) -> None:
    """Stop what `alignflow server up` started (data and artifacts stay unless --purge)."""
    from alignflow.server import ServerError, down

    try:
        down(home or _default_home(), purge, say=lambda line: console.print(line, highlight=False, markup=False,
                                                                            soft_wrap=True))
    except ServerError as e:
        err.print(f"[bold red]server down failed:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
