"""The retrain flow: train on data that arrived since the current champion, and let the gate decide.

1. Find the registry's `champion` for the recipe's model name (none yet: run the full pipeline instead).
2. Find everything it was trained on: the lineage its pipeline run logged (version tag
   `alignflow.parent_run_id` -> that run's `lineage/` artifacts, flows/lineage.py): what it and all its
   ancestors trained on, and every record they had at hand (`seen/`: held-out pairs too).
   (A version logged before lineage existed: the curate data of that run.)
3. Curate the recipe's current data and keep only records not already used: exact and near duplicates of
   the lineage's seen records are dropped, and eval overlap is removed (`tasks.records.checks.new_records`).
4. Nothing new: end now, saying so, and register nothing.
5. Otherwise run the pipeline on all preference pairs, old and new (the reward model is retrained from
   scratch), and, for SFT (`retrain.start_from`):
   - champion: continue the champion's weights on the new SFT records only; with none, sft hands the champion's
     weights on untrained (they learned every old record already). The run's lineage is the champion's plus
     what this run trained on, so the next retrain finds only what arrived after it; tokenize never holds out
     a pair the lineage trained on, and evaluate's judge independence reads the lineage's sides.
   - base: train from the base on every SFT record, the lineage's and the new ones.
   Evaluate compares with the champion and the gate decides: champion or challenger.
Wiring only: the ML is in the stages.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from alignflow.flows import lineage
from alignflow.flows.pipeline import pipeline_internal
from alignflow.flows.registry import download_model
from alignflow.flows.tracking import tracking_uri
from alignflow.recipe import DataSection, Recipe, RecipeError, allowed_roots, resolve_recipe
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.registry import registry_alias
from alignflow.tasks.records.checks import new_records


def champion_data(client: MlflowClient, model_name: str, dest_root: Path) -> tuple[Any, Path] | None:
    """The champion version and a folder with everything it was trained on; None without a champion.

    The data comes from MLflow, so any worker that reaches the tracking server finds it (downloaded once into
    `dest_root`): the `lineage/` artifacts of the champion's pipeline run (its ancestors' data and its own).
    Versions logged before lineage existed fall back to the `data/` artifacts of that run's curate child run,
    and older ones to the stage folder recorded in `alignflow.stage_dir`."""
    version = registry_alias(client, model_name, "champion")  # a server error is raised, not read as "none"
    if version is None:
        return None
    parent = version.tags.get("alignflow.parent_run_id")
    if not parent:
        raise StageError(f"retrain: {model_name} v{version.version} has no alignflow.parent_run_id tag")
    found = lineage.download(client, parent, dest_root / f"{model_name}-v{version.version}-{parent}-lineage")
    if found is not None:
        return version, found
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
        return {"new_data": None, **pipeline_internal(recipe=recipe, work_dir=work_dir)}
    version, used = found

    fresh: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, int] = {}
    seen = lineage.seen_folder(used)  # every record the lineage had (held out too): none of it is new
    for dataset in ("sft", "preference"):
        files = [Path(f) for f in getattr(recipe.data, dataset)]
        fresh[dataset], dropped = new_records(dataset, files, recipe.curate, seen)  # type: ignore[arg-type]
        summary[f"{dataset}.new"] = len(fresh[dataset])
        summary[f"{dataset}.already_used"] = dropped.get("duplicate", 0) + dropped.get("near_duplicate", 0)
    if not fresh["sft"] and not fresh["preference"]:
        logger.info("no new data since %s v%s (%s): nothing to train, nothing registered", name, version.version,
                    summary)
        return {"new_data": False, "champion_version": str(version.version), "counts": summary}

    # SFT from the champion: the new records only (it learned the old ones); with none, sft trains nothing and
    # hands the champion's weights on (the records still go to tokenize, for online RL's prompts). From the base:
    # every record, old and new. Preference pairs (and rated completions): old and new together, since reward
    # and DPO start again from the SFT result.
    from_champion = recipe.retrain.start_from == "champion"
    unchanged = from_champion and not fresh["sft"]
    old_sft = base_sft(seen)
    folder = work / "retrain" / sha256_json([fresh, str(used), from_champion])[:16]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "sft.jsonl", fresh["sft"] if from_champion and fresh["sft"] else old_sft + fresh["sft"])
    # the old pairs the lineage had, held-out ones too (tokenize holds out none that an ancestor trained on)
    rated = list(read_jsonl(seen / "unpaired.jsonl")) if (seen / "unpaired.jsonl").exists() else []
    write_jsonl(folder / "preference.jsonl", list(read_jsonl(seen / "preference.jsonl")) + rated + fresh["preference"])
    data = DataSection(sft=[str(folder / "sft.jsonl")], preference=[str(folder / "preference.jsonl")],
                       eval=recipe.data.eval)
    init = None
    if from_champion:
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
    corpus = None
    if recipe.model.base.startswith("tiny:"):  # the test base is built from data: build the champion's again
        parent = client.get_run(version.tags["alignflow.parent_run_id"]).data.tags
        corpus = json.loads(parent["alignflow.base_corpus"]) if "alignflow.base_corpus" in parent else None
    logger.info("retraining %s from %s on %s%s", name, "champion v" + str(version.version) if init else "the base",
                summary, " (no new SFT records: sft hands the champion's weights on)" if unchanged else "")
    # (a Ctrl-C that Prefect drops as this subflow ends, flows/interrupts.py, stops nothing: the work is done)
    result = pipeline_internal(recipe=recipe.model_copy(update={"data": data}), work_dir=work_dir,
                               init_adapter=str(init) if init else None,
                               # the champion's lineage goes on with its weights; from the base, this run's data is all
                               ancestors=str(used) if init else None, sft_unchanged=unchanged, base_corpus=corpus,
                               tags={"alignflow.retrain_of": str(version.version),
                                     **{f"alignflow.retrain.{k}": str(v) for k, v in summary.items()}})
    return {"new_data": True, "champion_version": str(version.version), "counts": summary, **result}


def base_sft(seen: Path) -> list[dict[str, Any]]:
    """The old SFT records a retrain from the base trains on again: every curated one the lineage had at hand
    (`seen/`: a record `sft.keep: best` held out included, which the trained list leaves out), not the ones
    synthesize wrote (`source: synthetic`): this run's synthesize writes its own, and fed back through curate they
    would count as the user's data."""
    return [r for r in read_jsonl(seen / "sft.jsonl") if r.get("source") != "synthetic"]

