"""Lineage: everything a pipeline run's weights learned from, its ancestors' data included.

A retrain continues the champion's weights on records new to it, so its own curated data holds only those;
what the weights learned is the champion's lineage plus that. After curate, the pipeline writes the union
(`<work>/lineage/<hash>/`: sft.jsonl, preference.jsonl, unpaired.jsonl of the ancestors, then this run's
curated records not among them; eval.jsonl as curated) and logs it on the pipeline's parent run: the files as
artifacts under `lineage/`, each as an MLflow dataset input (context `lineage`) with its digest; the digests
and record counts also become tags of the registered version (`alignflow.lineage.<name>`). `alignflow retrain`
reads the champion's lineage back from its parent run, so the second retrain after a first one still knows
every record the champion's ancestors trained on.
Wiring only: records are compared as curated JSON (curation is deterministic), nothing is trained here.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from alignflow.tasks.lib.hashing import sha256_json, sha256_tree
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.processes import folder_lock

TRAINED = ("sft.jsonl", "preference.jsonl", "unpaired.jsonl")  # what training stages read (curate's outputs)
ARTIFACTS = "lineage"  # the parent run's artifact folder


def union(ancestors: Path | None, curated: Path, dest_root: Path) -> Path:
    """The ancestors' lineage folder plus this run's curated records not already in it, in order; eval as curated."""
    parts = {name: [ancestors / name if ancestors else None, curated / name] for name in TRAINED}
    key = sha256_json({name: [sha256_tree(p) if p and p.exists() else None for p in paths]
                       for name, paths in parts.items()})
    dest = dest_root / key[:16]
    dest_root.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest):  # two runs sharing the work dir: one writes it, the other finds it
        if (dest / "eval.jsonl").exists():
            return dest
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, paths in parts.items():
            seen: set[str] = set()
            rows: list[dict[str, Any]] = []
            for path in paths:
                for row in read_jsonl(path) if path and path.exists() else []:
                    text = json.dumps(row, sort_keys=True, ensure_ascii=False)
                    if text not in seen:
                        seen.add(text)
                        rows.append(row)
            write_jsonl(tmp / name, rows)
        shutil.copyfile(curated / "eval.jsonl", tmp / "eval.jsonl")
        shutil.rmtree(dest, ignore_errors=True)  # a half-written one from a crash
        os.replace(tmp, dest)
    return dest


def counts(folder: Path) -> dict[str, int]:
    """Records per lineage file (`sft`, `preference`, `unpaired`)."""
    return {Path(name).stem: sum(1 for _ in read_jsonl(folder / name)) for name in TRAINED}


def version_tags(folder: Path) -> dict[str, str]:
    """Tags for the registered version: each lineage file's digest and record count."""
    tags = {f"alignflow.lineage.{Path(name).stem}_sha256": sha256_tree(folder / name) for name in TRAINED}
    tags.update({f"alignflow.lineage.{name}_records": str(n) for name, n in counts(folder).items()})
    return tags


def log(client: MlflowClient, run_id: str, folder: Path) -> None:
    """The lineage files as artifacts of `run_id` (`lineage/`) and as its dataset inputs (context `lineage`)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name in TRAINED:
        client.log_artifact(run_id, str(folder / name), ARTIFACTS)
        uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACTS}/{name}"
        dataset = MetaDataset(HTTPDatasetSource(uri), name=f"lineage-{Path(name).stem}",
                              digest=sha256_tree(folder / name)[:32])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", ARTIFACTS)]))
    client.log_artifact(run_id, str(folder / "eval.jsonl"), ARTIFACTS)  # retrain's record checks read it (no input)
    # as the curated inputs (flows/tracking.py): two runs logging the same dataset race on its UNIQUE row; a local
    # store is taken in turns, a server's gets a second try (which finds the row the other run made)
    uri = str(client.tracking_uri)
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    with folder_lock(db) if db is not None else nullcontext():
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException:
            time.sleep(1.0)
            client.log_inputs(run_id, datasets=inputs)


def download(client: MlflowClient, run_id: str, dest: Path) -> Path | None:
    """The lineage folder a pipeline run logged, downloaded once into `dest`; None for a run logged before
    lineage was."""
    if (dest / "sft.jsonl").exists():
        return dest
    if not any(a.path == f"{ARTIFACTS}/sft.jsonl" for a in client.list_artifacts(run_id, ARTIFACTS)):
        return None
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACTS, dst_path=str(tmp)))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(local, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest
