"""Registry and run operations behind `alignflow promote / rollback / compare / export` (MLflow wiring only)."""

from __future__ import annotations

import difflib
import getpass
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.registry import clear_demoted, move_champion, registry_alias


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    version = registry_alias(client, name, alias)  # a server error is raised, not read as "no such alias"
    return None if version is None else str(version.version)


def _stamp(action: str) -> str:
    return f"{action} by {getpass.getuser()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"


def _record(client: MlflowClient, name: str, version: str, stamp: str) -> str:
    """Write who moved which alias when, on the version and on the registered model."""
    client.set_model_version_tag(name, version, f"alignflow.alias_change.{int(time.time())}", stamp)
    client.set_registered_model_tag(name, "alignflow.last_alias_change", stamp)
    return stamp


def promote(client: MlflowClient, name: str, version: str) -> str:
    """Make `version` the champion by hand; the displaced champion becomes previous-champion and its weights are
    marked demoted by a person (the gate does not make them champion again on its own). The promoted weights'
    demotion mark, if any, is cleared: a person's decision."""
    try:
        mine = client.get_model_version(name, version)
    except MlflowException:
        raise StageError(f"promote: {name} has no version {version}") from None
    current = _alias_version(client, name, "champion")
    if current == version:
        clear_demoted(client, name, mine)  # what a promote killed after its move left: completed here
        return f"{name} version {version} is already champion"
    stamp = _stamp(f"promote: champion v{current} -> v{version}")
    if not move_champion(client, name, expected=current, new=version, by_person=stamp):  # compare-and-set
        raise StageError(f"promote: the champion of {name} moved while promoting (it was v{current}); try again")
    return _record(client, name, version, stamp)


def rollback(client: MlflowClient, name: str) -> str:
    """Swap champion and previous-champion. The demoted weights are marked on the registered model
    (`alignflow.demoted.<sha256>`, and `alignflow.rolled_back` on the version) before any alias moves, inside the
    alias lock: the gate never makes them champion again on its own (re-running their recipe leaves the champion
    where it is and says why); only `alignflow promote` does (or a later rollback back to them). A rollback killed
    part-way is completed by running it again; a previous-champion equal to the champion is refused."""
    current = _alias_version(client, name, "champion")
    previous = _alias_version(client, name, "previous-champion")
    if previous is None:
        raise StageError(f"rollback: {name} has no previous-champion to roll back to")
    if previous == current:
        raise StageError(f"rollback: the previous-champion of {name} is the champion (v{current}): nothing to roll "
                         f"back to; `alignflow promote {name} VERSION` names the version to serve")
    stamp = _stamp(f"rollback: champion v{current} -> v{previous}")
    if not move_champion(client, name, expected=current, new=previous, by_person=stamp):  # compare-and-set
        raise StageError(f"rollback: the champion of {name} moved while rolling back (it was v{current}); try again")
    return _record(client, name, previous, stamp)


def resolve_model_uri(model_uri: str) -> str:
    """`model_uri` pinned to one version, `models:/NAME/VERSION`, resolved once (an alias, `latest` or a stage as
    MLflow resolves them; a bare registered NAME or models:/NAME: its champion; NAME@ALIAS: that alias), so
    that everything export reads (weights, config, shipped tags, logged files) comes from the same version even when
    an alias moves meanwhile. `runs:/RUN/model` of the run that registered exactly one version: that version (its
    shipped tags are checked like any other's), and so is `models:/<logged model id>`; any other `runs:/` URI or
    logged model is returned as it is (no version)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    if not model_uri.startswith(("models:/", "runs:/")) and "://" not in model_uri:
        # a bare name: its champion; NAME@ALIAS: that alias
        model_uri = f"models:/{model_uri}" if "@" in model_uri else f"models:/{model_uri}@champion"
    if model_uri.startswith("runs:/"):
        return _version_of_run(client, model_uri)
    if not model_uri.startswith("models:/"):
        return model_uri
    name = model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        if re.fullmatch(r"m-[0-9a-f]{32}", name) and model_uri == f"models:/{name}":  # a logged model's id (MLflow 3)
            return _version_of_logged_model(client, model_uri, name)
        known = sorted(m.name for m in client.search_registered_models(max_results=1000))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise StageError(f"export: no registered model named '{name}'{hint} Registered: "
                         f"{', '.join(known) or 'none'} (tracking store {mlflow.get_tracking_uri()})") from None
    if model_uri == f"models:/{name}":  # a registered name without version or alias: its champion, as bare
        model_uri += "@champion"
    try:
        found = get_model_name_and_version(client, model_uri)
    except MlflowException as e:
        raise StageError(f"export: cannot resolve {model_uri}: {e.message}") from None
    if len(found) != 2:  # models:/<logged model id>: not a registered version
        return model_uri
    return f"models:/{found[0]}/{found[1]}"


def _version_of_run(client: MlflowClient, run_uri: str) -> str:
    """`runs:/RUN/model` (the path register logs the model at) as `models:/NAME/VERSION` when exactly one registered
    version was made from that run; otherwise the URI as it is."""
    run_id, _, path = run_uri.removeprefix("runs:/").partition("/")
    if path.strip("/") != "model" or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return run_uri
    try:
        found = client.search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:  # a store that cannot search by run: no version known
        return run_uri
    return f"models:/{found[0].name}/{found[0].version}" if len(found) == 1 else run_uri


def _version_of_logged_model(client: MlflowClient, model_uri: str, model_id: str) -> str:
    """`models:/<logged model id>` (a version's `source`) as `models:/NAME/VERSION` when exactly one registered
    version was made from it; otherwise the URI as it is."""
    try:
        run_id = client.get_logged_model(model_id).source_run_id
        found = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.source == model_uri]
    except MlflowException:  # no such logged model, or a store that cannot say: no version known
        return model_uri
    return f"models:/{found[0].name}/{found[0].version}" if len(found) == 1 else model_uri


def download_model(model_uri: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """A registered model's weights folder (adapter, or full model) and its config (base path, spec, dtype).

    `model_uri` is `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or a bare registered NAME (its champion); pinned
    by `resolve_model_uri` first."""
    model_uri = resolve_model_uri(model_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    except MlflowException as e:
        raise StageError(f"export: cannot resolve {model_uri}: {e.message}") from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    config = pyfunc.get("config") or pyfunc.get("model_config") or {}  # MLflow 3 stores model_config as "config"
    adapter = local / "artifacts" / "adapter"
    return (adapter if adapter.exists() else local / "artifacts" / "model"), config


def shipped_records(model_uri: str, fmt: str, dest: Path) -> dict[str, dict[str, Any]]:
    """The artifacts the version was measured as (its `alignflow.shipped.<format>.*` tags): format -> {sha256,
    built_with, artifact_uri}, and for `fmt` ('' for none), when register logged its file (register.log_shipped),
    `logged`: that file downloaded into `dest`. {} for a version measured as none, or a `runs:/` URI (no version).
    Pass the URI `resolve_model_uri` pinned, so that the tags are those of the version whose weights are exported."""
    client = MlflowClient()
    model_uri = resolve_model_uri(model_uri)
    if not model_uri.startswith("models:/") or model_uri.count("/") != 2:
        return {}
    name, version = model_uri.removeprefix("models:/").split("/")
    try:
        tags = client.get_model_version(name, version).tags
    except MlflowException as e:
        raise StageError(f"export: cannot read the tags of {model_uri}: {e.message}") from None
    found: dict[str, dict[str, Any]] = {}
    for tag, value in tags.items():
        parts = tag.split(".")
        if len(parts) == 4 and tag.startswith("alignflow.shipped."):
            found.setdefault(parts[2], {})[parts[3]] = value
    records = {f: {"sha256": r["sha256"], "built_with": r.get("built_with", ""),
                   "artifact_uri": r.get("artifact_uri", "")} for f, r in found.items() if "sha256" in r}
    uri = found.get(fmt, {}).get("artifact_uri")
    if fmt in records and uri:
        try:
            records[fmt]["logged"] = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
        except MlflowException as e:
            raise StageError(f"export: the {fmt} file logged with this version ({uri}) cannot be downloaded: "
                             f"{e.message}") from None
    return records


@dataclass
class StageRow:
    stage: str
    cached: tuple[str, str]
    config_diff: list[str]
    metrics: list[tuple[str, float | None, float | None]]


def compare(client: MlflowClient, run_a: str, run_b: str) -> tuple[list[str], list[StageRow]]:
    """What differs between two pipeline (parent) runs: lineage tags, then per stage config, cache, metrics."""
    runs = []
    for run_id in (run_a, run_b):
        try:
            runs.append(client.get_run(run_id))
        except MlflowException:
            raise StageError(f"compare: no run {run_id} in this tracking store") from None
    a, b = runs
    lineage = [f"{k}: {a.data.tags.get(k)} -> {b.data.tags.get(k)}"
               for k in sorted(set(a.data.tags) | set(b.data.tags))
               if k.startswith("alignflow.") and k not in ("alignflow.prefect_flow_run_id",)
               and a.data.tags.get(k) != b.data.tags.get(k)]

    def children(run: Any) -> dict[str, Any]:
        found = client.search_runs([run.info.experiment_id],
                                   filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        return {c.info.run_name: c for c in found}

    ca, cb = children(a), children(b)
    # stored numbers side by side: evaluate's compare only when measured on the same prompts, sampling budget and
    # base (its eval_config_hash); the gate never needs this, as evaluate re-measures the champion each time
    ha, hb = (c["evaluate"].data.tags.get("alignflow.eval_config_hash") if "evaluate" in c else None
              for c in (ca, cb))
    if ha is not None and hb is not None and ha != hb:
        lineage.append(f"alignflow.eval_config_hash: {ha[:12]} -> {hb[:12]}: evaluate measured the "
                       "two runs on other prompts, sampling budget or base, so its metrics below do not compare")
    rows = []
    for stage in [s for s in ca if s in cb] + [s for s in cb if s not in ca] + [s for s in ca if s not in cb]:
        x, y = ca.get(stage), cb.get(stage)
        px, py = (x.data.params if x else {}), (y.data.params if y else {})
        diff = [f"{k}: {px.get(k)} -> {py.get(k)}" for k in sorted(set(px) | set(py)) if px.get(k) != py.get(k)]
        mx, my = (x.data.metrics if x else {}), (y.data.metrics if y else {})
        metrics = [(k, mx.get(k), my.get(k)) for k in sorted(set(mx) | set(my)) if k != "stage_seconds"]
        cached = tuple((r.data.tags.get("alignflow.cached", "?") if r else "absent") for r in (x, y))
        rows.append(StageRow(stage, cached, diff, metrics))  # type: ignore[arg-type]
    return lineage, rows
