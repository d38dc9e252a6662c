"""The retrain flow: train on data that arrived since the current champion, and let the gate decide.

1. Find the registry's `champion` for the recipe's model name (none yet: run the full pipeline instead).
2. Find the data it was trained on: the curate stage folder of the pipeline run it came from (version tag
   `alignflow.parent_run_id` -> that run's curate child run -> `alignflow.stage_dir`).
3. Curate the recipe's current data and keep only records not already used: exact and near duplicates of
   the champion's data are dropped, and eval overlap is removed (`tasks.records.checks.new_records`).
4. Nothing new: end now, saying so, and register nothing.
5. Otherwise run the pipeline on the new SFT records (continuing the champion's adapter, or from the base:
   `retrain.start_from`) and on all preference pairs, old and new (the reward model is retrained from
   scratch). Evaluate compares with the champion and the gate decides: champion or challenger.
Wiring only: the ML is in the stages.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from alignflow.flows.pipeline import pipeline
from alignflow.flows.registry import download_model
from alignflow.flows.tracking import tracking_uri
from alignflow.recipe import DataSection, Recipe, RecipeError, allowed_roots, resolve_recipe
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.registry import registry_alias
from alignflow.tasks.records.checks import new_records


def champion_data(client: MlflowClient, model_name: str, dest_root: Path) -> tuple[Any, Path] | None:
    """The champion version and a folder with the curated data it was trained on; None without a champion.

    The data comes from MLflow: the `data/` artifacts of the curate run under the champion's pipeline run, so any
    worker that reaches the tracking server finds it (downloaded once into `dest_root`). Runs logged before the
    curated data became artifacts fall back to the stage folder recorded in `alignflow.stage_dir`."""
    version = registry_alias(client, model_name, "champion")  # a server error is raised, not read as "none"
    if version is None:
        return None
    parent = version.tags.get("alignflow.parent_run_id")
    if not parent:
        raise StageError(f"retrain: {model_name} v{version.version} has no alignflow.parent_run_id tag")
    run = client.get_run(parent)
    children = client.search_runs([run.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent}' and tags.`alignflow.stage` = 'curate'"))
    for child in children:
        if not any(a.path == "data" for a in client.list_artifacts(child.info.run_id)):
            continue
        dest = dest_root / f"{model_name}-v{version.version}-{child.info.run_id}-data"
        if not (dest / "sft.jsonl").exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            local = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="data",
                                                        dst_path=str(tmp))
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(local, dest)
            shutil.rmtree(tmp, ignore_errors=True)
        return version, dest
    folders = [Path(c.data.tags["alignflow.stage_dir"]) for c in children if "alignflow.stage_dir" in c.data.tags]
    found = next((f for f in folders if (f / "sft.jsonl").exists()), None)
    if found is None:
        raise StageError(f"retrain: the data champion v{version.version} was trained on is gone "
                         f"(looked in {', '.join(map(str, folders)) or 'no folder recorded'})")
    return version, found


@flow(name="alignflow-retrain", log_prints=False)
def retrain(recipe: Recipe, work_dir: str = "runs") -> dict[str, Any]:
    """Retrain on new data since the champion; with none, end in seconds and register nothing."""
    from prefect.runtime import deployment

    logger = get_run_logger()
    try:  # as the pipeline does: a deployment's recipe reads and writes only inside the allowed folders
        recipe = resolve_recipe(recipe, confine=allowed_roots() if deployment.id else None, work_dir=work_dir)
    except RecipeError as e:
        raise StageError(str(e)) from None
    work = Path(work_dir).expanduser().resolve()
    uri = tracking_uri(work)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = recipe.register.model_name

    found = champion_data(client, name, work / "champions")
    if found is None:
        logger.info("%s has no champion yet: running the full pipeline", name)
        return {"new_data": None, **pipeline(recipe=recipe, work_dir=work_dir)}
    version, used = found

    fresh: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, int] = {}
    for dataset in ("sft", "preference"):
        files = [Path(f) for f in getattr(recipe.data, dataset)]
        fresh[dataset], dropped = new_records(dataset, files, recipe.curate, used)  # type: ignore[arg-type]
        summary[f"{dataset}.new"] = len(fresh[dataset])
        summary[f"{dataset}.already_used"] = dropped.get("duplicate", 0) + dropped.get("near_duplicate", 0)
    if not fresh["sft"] and not fresh["preference"]:
        logger.info("no new data since %s v%s (%s): nothing to train, nothing registered", name, version.version,
                    summary)
        return {"new_data": False, "champion_version": str(version.version), "counts": summary}

    # New SFT records only (the champion already learned the old ones); with none, the champion's own data.
    # Preference pairs (and rated completions): old and new together, since reward and DPO start again from the
    # SFT result.
    folder = work / "retrain" / sha256_json([fresh, str(used)])[:16]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "sft.jsonl", fresh["sft"] or list(read_jsonl(used / "sft.jsonl")))
    rated = list(read_jsonl(used / "unpaired.jsonl")) if (used / "unpaired.jsonl").exists() else []
    write_jsonl(folder / "preference.jsonl", list(read_jsonl(used / "preference.jsonl")) + rated + fresh["preference"])
    data = DataSection(sft=[str(folder / "sft.jsonl")], preference=[str(folder / "preference.jsonl")],
                       eval=recipe.data.eval)
    init = None
    if recipe.retrain.start_from == "champion":
        sha = version.tags.get("alignflow.adapter_sha256", "")[:12]  # by content: version numbers can be reused
        init = work / "champions" / f"{name}-v{version.version}-{sha}-weights"  # adapter, or full model
        if not init.exists():
            with tempfile.TemporaryDirectory() as tmp:
                weights, _config = download_model(f"models:/{name}/{version.version}", Path(tmp))
                partial = init.with_name(init.name + ".partial")  # a crash mid-copy leaves no half `init`
                shutil.rmtree(partial, ignore_errors=True)
                partial.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(weights), partial)  # across filesystems (tmp -> work dir)
                os.replace(partial, init)
    logger.info("retraining %s from %s on %s", name, "champion v" + str(version.version) if init else "the base",
                summary)
    # (a Ctrl-C that Prefect drops as this subflow ends, flows/interrupts.py, stops nothing: the work is done)
    result = pipeline(recipe=recipe.model_copy(update={"data": data}), work_dir=work_dir,
                      init_adapter=str(init) if init else None,
                      tags={"alignflow.retrain_of": str(version.version),
                            **{f"alignflow.retrain.{k}": str(v) for k, v in summary.items()}})
    return {"new_data": True, "champion_version": str(version.version), "counts": summary, **result}
