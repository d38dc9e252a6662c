"""The sweep flow: hyperparameter search as pipeline runs (`alignflow sweep`).

Wiring only. An Optuna study (TPE, seeded with the recipe's seed; a grid sampler when every parameter is a list,
so each combination runs once) proposes recipe overrides; each trial is the pipeline `--until evaluate` as a
Prefect subflow (K at a time on a thread pool), its MLflow parent run nested under one sweep run tagged
`alignflow.sweep=<id>`. Trials share every stage whose inputs did not change through the pipeline's cache (a
`dpo.beta` sweep trains sft once); the sweep run records how many stage runs the cache saved. At the end the best
trial by `--metric` runs once more without `--until`: its stages come from the cache and register puts it through
the gate like any run, with one difference: the winner was picked among k trials on the same eval prompts the gate
reads, and the best of k passes a 95 % gate by luck far more often than one run does (about 7-fold for k = 8).
So its evaluate takes every interval at the familywise level 1 - 0.05/k (Bonferroni; k = the finished trials),
and the register run's gate bounds and reasons say so, with k (tag `alignflow.gate_selection`). The sweep run
holds a parallel-coordinates plot and the table of trials.

`--parallel K` runs each trial in a process of its own (a task of the flow's thread pool waits on it): threads of
one process share torch's random generator (what a stage made depended on what the other trials drew meanwhile,
and the shared cache then served it to later runs) and transformers' model-loading state (two trials loading
weights at once failed). A trial process is a flow run of its own on the same Prefect server and tracking server,
its stages exactly what the same recipe makes alone, so they go into the shared cache like any run's.

The study lives in `<work>/optuna.db` beside the MLflow store (or in `ALIGNFLOW_OPTUNA_STORAGE`, e.g. the team's
PostgreSQL), named by the sweep id: the hash of the resolved recipe, the parameter space, the metric and the
direction. Re-running the same command continues it: finished trials stay finished, a trial that was interrupted
is run again with the same parameters (its finished stages from the cache, training from its checkpoints).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ValidationError

from alignflow.flows.interrupts import ctrl_c_remembered
from alignflow.flows.keys import data_hashes
from alignflow.flows.pipeline import pipeline_internal
from alignflow.flows.tracking import Tracker, tracking_uri
from alignflow.recipe import Recipe
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.manifest import read_manifest

RANGE = re.compile(r"^(-?[0-9.eE+-]+):(-?[0-9.eE+-]+)(:log)?$")


class ParamSpec(BaseModel):
    """One `--param`: a recipe key and either the values to try (categorical) or a range Optuna samples."""

    key: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False  # both ends written as integers: sampled as an integer


def parse_param(text: str) -> ParamSpec:
    """`KEY=v1,v2,...` (categorical, each value read as YAML: numbers, booleans, null) or `KEY=low:high[:log]`."""
    if "=" not in text:
        raise ValueError(f"--param {text}: expected KEY=v1,v2 or KEY=low:high[:log]")
    key, value = (part.strip() for part in text.split("=", 1))
    match = RANGE.match(value)
    if match:
        low_text, high_text = match.group(1), match.group(2)
        low, high = float(low_text), float(high_text)
        if not low < high:
            raise ValueError(f"--param {text}: the range's low end must be below its high end")
        if match.group(3) and low <= 0:
            raise ValueError(f"--param {text}: a log range needs a positive low end")
        integer = all(re.fullmatch(r"-?\d+", t) for t in (low_text, high_text))
        return ParamSpec(key=key, low=low, high=high, log=bool(match.group(3)), integer=integer)
    choices = [yaml.safe_load(v) for v in value.split(",")]
    if not choices or any(c is None and v.strip() not in ("null", "~") for c, v in zip(choices, value.split(","),
                                                                                           strict=True)):
        raise ValueError(f"--param {text}: an empty value")
    return ParamSpec(key=key, choices=choices)


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The recipe with dotted keys set, validated again (a value the recipe refuses is a StageError)."""
    raw = recipe.model_dump(mode="json")
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise StageError(f"--param {key}: '{part}' is not a recipe section")
            node = node[part]
        node[parts[-1]] = value
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise StageError(f"the sweep's overrides {overrides} make an invalid recipe: {problems}") from None


def sweep_id(recipe: Recipe, params: list[ParamSpec], metric: str, direction: str) -> str:
    """What makes two sweep commands the same study (not --trials or --parallel: more trials continue it)."""
    # the data's contents too: a resumed study must not compare trials scored on other data
    return sha256_json({"recipe": recipe.model_dump(mode="json"), "data": data_hashes(recipe),
                        "params": [p.model_dump() for p in params], "metric": metric, "direction": direction})[:12]


def grid_size(params: list[ParamSpec]) -> int | None:
    """Combinations of a pure grid (every parameter a list), else None."""
    if any(p.choices is None for p in params):
        return None
    return math.prod(len(p.choices or []) for p in params)


def storage_uri(work: Path) -> str:
    return os.environ.get("ALIGNFLOW_OPTUNA_STORAGE") or f"sqlite:///{work / 'optuna.db'}"


def _trial(recipe: Recipe, work_dir: str, tags: dict[str, str]) -> dict[str, Any]:
    """One trial: the pipeline up to evaluate, as a subflow."""
    return pipeline_internal.with_options(flow_run_name=f"trial-{tags['alignflow.sweep_trial']}")(
        recipe=recipe, work_dir=work_dir, until="evaluate", tags=tags)


@task(name="sweep-trial", persist_result=False)
def run_trial(recipe: Recipe, work_dir: str, tags: dict[str, str]) -> dict[str, Any]:
    """One trial in a task of the flow's thread pool (`--parallel` above 1): the pipeline in a process of its own
    (`python -m alignflow.flows.sweep TRIAL.json`), so it shares no random generator and no model-loading state
    with the trials running beside it. Its output goes to this process's terminal."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    folder = Path(work_dir) / "sweeps" / tags["alignflow.sweep"] / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"trial-{tags['alignflow.sweep_trial']}"
    spec, out = folder / f"{name}.json", folder / f"{name}.result.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "work_dir": work_dir, "tags": tags,
                                "result": str(out)}))
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri(Path(work_dir).expanduser().resolve())  # the sweep's store
    if PREFECT_API_URL.value():  # the sweep's Prefect server (a test harness sets it in settings, not the env)
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    done = subprocess.run([sys.executable, "-m", "alignflow.flows.sweep", str(spec)], env=env, check=False)
    if done.returncode != 0 or not out.exists():
        raise StageError(f"trial {tags['alignflow.sweep_trial']} failed in its process (exit code "
                         f"{done.returncode}); its log is above")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@flow(name="alignflow-sweep", log_prints=False)
def sweep(recipe: Recipe, params: list[ParamSpec], trials: int, metric: str = "rougeL",
          direction: Literal["maximize", "minimize"] = "maximize", parallel: int = 1,
          work_dir: str = "runs") -> dict[str, Any]:
    """Run the study to `trials` finished trials (resuming one that exists), then register the best trial."""
    import optuna

    log = get_run_logger()
    work = Path(work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    ident = sweep_id(recipe, params, metric, direction)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage_uri(work), study_name=f"alignflow-sweep-{ident}",
                                sampler=optuna.samplers.TPESampler(seed=recipe.seed), direction=direction,
                                load_if_exists=True)
    # A trial left RUNNING by an interrupted sweep (Ctrl-C, a crash): closed as failed, and its parameters queued
    # to run again first. (So two processes must not run one sweep at once: the second would retry the first's.)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
        log.info("sweep %s: trial %d was interrupted; running it again", ident, stale.number)
    if grid_size(params) is not None:
        # A pure grid: every combination queued once, in the order given (Optuna's GridSampler stops the study
        # from inside `tell`, which only works under study.optimize; the flow asks and tells itself).
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING)
        queued = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(states=states)]
        for combination in itertools.product(*[p.choices or [] for p in params]):
            values = dict(zip([p.key for p in params], combination, strict=True))
            if values not in queued:
                study.enqueue_trial(values)
    tracker, resumed = _sweep_run(recipe, work, ident, params, metric, direction)
    log.info("sweep %s: MLflow run %s (%s), study %s", ident, tracker.parent_run_id,
             "resumed" if resumed else "new", storage_uri(work))

    try:
        with ctrl_c_remembered() as ctrl_c:
            _run_trials(study, recipe, params, trials, parallel, work, ident, metric, tracker, ctrl_c)
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = study.best_trial
        best_overrides = {p.key: best.params[p.key] for p in params}
        # (a Ctrl-C that Prefect drops as this last subflow ends stops nothing: all that is left is the summary)
        best_run = pipeline_internal.with_options(flow_run_name=f"best-trial-{best.number}")(
            recipe=with_overrides(recipe, best_overrides), work_dir=str(work),
            selection_trials=len(finished),  # picked among these on the gate's prompts: familywise intervals
            tags={"mlflow.parentRunId": tracker.parent_run_id, "mlflow.runName": f"best-trial-{best.number}",
                  "alignflow.sweep": ident, "alignflow.sweep_best": str(best.number)})
        saved = _cache_savings(finished, tracker.client)
        table = [{"trial": t.number, **{p.key: t.params.get(p.key) for p in params}, metric: t.value,
                  "run_id": t.user_attrs.get("parent_run_id", "")} for t in finished]
        summary = {"trials_completed": float(len(finished)), "best_value": float(best.value), "best_trial":
                   float(best.number), **{k: float(v) for k, v in saved.items()}}
        client = tracker.client
        client.log_table(tracker.parent_run_id, {k: [row[k] for row in table] for k in table[0]}, "trials.json")
        _parallel_coordinates(study, work / "sweeps" / ident / "parallel_coordinates.png")
        client.log_artifact(tracker.parent_run_id, str(work / "sweeps" / ident / "parallel_coordinates.png"))
        client.set_tag(tracker.parent_run_id, "alignflow.sweep_best_run", best_run["parent_run_id"])
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", {})
        raise
    tracker.finish("FINISHED", summary)
    return {"sweep_id": ident, "sweep_run_id": tracker.parent_run_id, "experiment_id": tracker.experiment_id,
            "tracking_uri": tracking_uri(work), "storage": storage_uri(work), "metric": metric,
            "trials": table, "best": {"trial": best.number, "value": best.value, "params": best_overrides},
            "registered": best_run.get("registered"), "cache": saved}


def _run_trials(study: Any, recipe: Recipe, params: list[ParamSpec], trials: int, parallel: int, work: Path,
                ident: str, metric: str, tracker: Tracker, ctrl_c: threading.Event) -> None:
    """Ask, run and tell trials until the study has `trials` finished ones."""
    import optuna

    log = get_run_logger()
    while (done := _complete(study)) < trials:
        batch = [study.ask() for _ in range(min(parallel, trials - done))]
        futures = []
        for trial in batch:
            overrides = {p.key: _suggest(trial, p) for p in params}
            trial_recipe = with_overrides(recipe, overrides)
            tags = {"mlflow.parentRunId": tracker.parent_run_id, "mlflow.runName": f"trial-{trial.number}",
                    "alignflow.sweep": ident, "alignflow.sweep_trial": str(trial.number),
                    **{f"alignflow.sweep_param.{k}": json.dumps(v) for k, v in overrides.items()}}
            # One at a time: the subflow runs in this thread, so Ctrl-C stops it at once (a thread pool's
            # worker would finish its trial first). K at a time: K subflows, each in a task of the pool.
            pending = (trial_recipe, str(work), tags)
            futures.append((trial, overrides, run_trial.submit(*pending) if parallel > 1 else pending))
        for trial, overrides, pending in futures:
            try:
                result = _trial(*pending) if isinstance(pending, tuple) else pending.result()
            except KeyboardInterrupt:
                raise  # the trial stays RUNNING in the study: the next run of the command runs it again
            except BaseException:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                raise
            value = _objective(result, metric)
            for k, v in overrides.items():
                trial.set_user_attr(f"param:{k}", v)
            trial.set_user_attr("parent_run_id", result["parent_run_id"])
            trial.set_user_attr("stages", {s: [i["folder"], i["cached"], i["seconds"]]
                                           for s, i in result["stages"].items()})
            # seconds this trial waited for a stage another trial was still building (see _cache_savings)
            trial.set_user_attr("waited", {s: i.get("waited_seconds", 0.0) for s, i in result["stages"].items()})
            tracker.client.log_batch(result["parent_run_id"], params=[
                _param(k, v) for k, v in overrides.items()])
            study.tell(trial.number, value)
            log.info("sweep %s: trial %d %s -> %s=%s", ident, trial.number, overrides, metric, value)
            if ctrl_c.is_set():  # Prefect dropped a Ctrl-C as the trial's subflow ended (flows/interrupts.py): the
                raise KeyboardInterrupt  # trial is finished and told; the sweep stops before the next one


def _complete(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _suggest(trial: Any, p: ParamSpec) -> Any:
    if p.choices is not None:
        return trial.suggest_categorical(p.key, p.choices)
    assert p.low is not None and p.high is not None
    if p.integer:
        return trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(p.key, p.low, p.high, log=p.log)


def _objective(result: dict[str, Any], metric: str) -> float:
    """The trial's `metric`, read from its evaluate stage (every metric evaluate wrote, not only the headline)."""
    metrics = read_manifest(Path(result["stages"]["evaluate"]["folder"]))["metrics"]
    if metric not in metrics:
        raise StageError(f"--metric {metric}: evaluate did not write it; it wrote {', '.join(sorted(metrics))}")
    value = float(metrics[metric])
    if math.isnan(value):
        raise StageError(f"--metric {metric} is NaN in trial run {result['parent_run_id']}")
    return value


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, json.dumps(value) if not isinstance(value, str) else value)


def _cache_savings(finished: list[Any], client: Any) -> dict[str, float]:
    """Stage runs the cache served across the sweep's trials, and the seconds they took where they did run: in
    another trial of this sweep, or before the sweep (the run that made the folder, named in its manifest, logged
    them as `stage_seconds`; 0 where that run or its figure is gone). A trial that waited for a stage another
    trial was still building (`--parallel`) saved only what was left after its wait: the wait is taken off."""
    ran_seconds: dict[str, float] = {}
    for t in finished:
        for folder, cached, seconds in t.user_attrs.get("stages", {}).values():
            if not cached:
                ran_seconds[folder] = seconds
    total = saved = 0
    saved_seconds = 0.0
    for t in finished:
        waited = t.user_attrs.get("waited", {})
        for stage, (folder, cached, _) in t.user_attrs.get("stages", {}).items():
            total += 1
            if cached:
                saved += 1
                if folder not in ran_seconds:  # made before the sweep: ask the run that made it, once
                    ran_seconds[folder] = _producer_seconds(Path(folder), client)
                saved_seconds += max(0.0, ran_seconds[folder] - waited.get(stage, 0.0))
    return {"stage_runs": total, "cache_saved_stage_runs": saved, "cache_saved_seconds": round(saved_seconds, 1)}


def _producer_seconds(folder: Path, client: Any) -> float:
    """`stage_seconds` of the MLflow run that produced a stage folder (its manifest's `produced_by`), else 0."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = read_manifest(folder)["produced_by"]["mlflow_run_id"]
        return float(client.get_run(run_id).data.metrics.get("stage_seconds", 0.0))
    except (MlflowException, KeyError, TypeError, OSError, ValueError):
        return 0.0


def _parallel_coordinates(study: Any, out: Path) -> None:
    """Optuna's parallel-coordinates plot (matplotlib backend): one line per trial, parameters to objective."""
    import warnings

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings of the matplotlib backend
        ax = plot_parallel_coordinate(study)
    # Optuna colours the lines by objective on "Blues", whose low end is near-white: with two trials one line all
    # but vanished on the white background. The same blues from 35 % of the scale up (the colour bar follows).
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap

    for lines in ax.collections:
        if isinstance(lines, LineCollection):
            blues = plt.get_cmap("Blues")(np.linspace(0.35, 1.0, 256))
            reverse = lines.get_cmap().name.endswith("_r")
            lines.set_cmap(LinearSegmentedColormap.from_list("blues_visible", blues[::-1] if reverse else blues))
    ax.figure.set_size_inches(9, 5)
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=100)
    plt.close(ax.figure)


def _sweep_run(recipe: Recipe, work: Path, ident: str, params: list[ParamSpec], metric: str,
               direction: str) -> tuple[Tracker, bool]:
    """The sweep's MLflow parent run: the one this sweep id made before (resuming), or a new one."""
    from mlflow import MlflowClient

    uri = tracking_uri(work)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(recipe.name)
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=(
            f"tags.`alignflow.sweep` = '{ident}' and tags.`alignflow.sweep_role` = 'parent'"), max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "alignflow.host", platform.node())
            client.set_tag(run_id, "alignflow.pid", str(os.getpid()))
            client.set_tag(run_id, "alignflow.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return Tracker(client, exp.experiment_id, run_id), True
    from prefect.runtime import flow_run

    from alignflow.flows.keys import data_hashes

    tracker = Tracker.start(recipe, work, data_hashes(recipe), str(flow_run.id or "local"), {
        "alignflow.sweep": ident, "alignflow.sweep_role": "parent", "alignflow.sweep_metric": metric,
        "alignflow.sweep_direction": direction})
    tracker.client.set_tag(tracker.parent_run_id, "mlflow.runName", f"sweep-{ident}")
    tracker.client.log_batch(tracker.parent_run_id, params=[
        _param(f"sweep.{p.key}", p.choices if p.choices is not None else
               f"{p.low}:{p.high}{':log' if p.log else ''}") for p in params])
    return tracker, False


if __name__ == "__main__":  # one parallel trial in its own process (run_trial): TRIAL.json in, its result out
    import sys

    _spec = json.loads(Path(sys.argv[1]).read_text())
    _result = _trial(Recipe.model_validate(_spec["recipe"]), _spec["work_dir"], _spec["tags"])
    Path(_spec["result"]).write_text(json.dumps(_result, default=str))
