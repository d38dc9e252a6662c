"""Lineage: everything a pipeline run's weights learned from, its ancestors' data included.

A retrain continues the champion's weights on records new to it, so its own curated data holds only those;
what the weights learned is the champion's lineage plus what this run's training stages read. After the training
stages, the pipeline writes the union (`<work>/lineage/<hash>/`) and logs it on the pipeline's parent run:
- `sft.jsonl`, `preference.jsonl`, `unpaired.jsonl`: the records trained on, as curate (or synthesize) wrote
  them: the ancestors' lineage, then this run's records not among them. This run's are taken from tokenize's
  `records/` (tasks/tokenize.py): the SFT records behind its rows (synthesized ones included; with
  `sft.keep: best` not its held-out rows) unless sft handed the weights on untrained; the pairs among reward's
  (the judge's) and dpo's (the policy's) `trained_pair_hashes`; the rated completions that made such a pair,
  or that kto trained on (the policy's side of `unpaired/`). Held-out pairs, and records tokenize dropped, are
  in none of them.
- `pairs.json`: `{"judge": [...], "policy": [...]}`, the hashes (tasks/lib/pairs.pair_hash) of every pair a judge
  or a policy of the lineage trained on: evaluate's `judge_independent` reads it, as tokenize's held-out split
  reads the prompts of the files above (never held out again).
- `seen/`: every record the lineage's runs had at hand (curated, held out or dropped, and the synthesized ones
  trained on), with `eval.jsonl`: what `alignflow retrain` compares new data with (a held-out pair is not new
  data) and hands on as old preference data;
- `eval.jsonl` as curated.
The three trained files are artifacts under `lineage/` and MLflow dataset inputs (context `lineage`) with their
digests; the digests and record counts also become tags of the registered version (`alignflow.lineage.<name>`).
`alignflow retrain` reads the champion's lineage back from its parent run, so the second retrain after a first
one still knows every record the champion's ancestors trained on. A lineage logged before `pairs.json` and
`seen/` existed held every curated record in its three files: it is read as both (its sides unknown), and every
lineage continuing it says so (`"unknown": true` in `pairs.json`).
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
from alignflow.tasks.lib.manifest import read_manifest
from alignflow.tasks.lib.pairs import PairsMode, on_side
from alignflow.tasks.lib.processes import folder_lock

TRAINED = ("sft.jsonl", "preference.jsonl", "unpaired.jsonl")  # what the training stages read, as records
SIDES = "pairs.json"  # the pair hashes each side of the lineage trained on
SEEN = "seen"  # every record the lineage had at hand (a subfolder with the TRAINED names and eval.jsonl)
ARTIFACTS = "lineage"  # the parent run's artifact folder

Rows = dict[str, list[dict[str, Any]]]  # lineage file name -> records


def trained(tokenized: Path, sft: dict[str, Any] | None, reward: dict[str, Any] | None,
            dpo: dict[str, Any] | None, kto: bool) -> tuple[Rows, dict[str, list[str]]]:
    """What this run's training stages read, from tokenize's `records/` and the manifests of sft, reward and dpo
    (None: the stage did not run): (records per lineage file, pair hashes per side). sft's manifest `trained`
    False (weights handed on) adds no SFT record; `kto`: dpo trained on its side of the rated completions."""
    judge = set(reward.get("trained_pair_hashes") or []) if reward else set()
    policy = set(dpo.get("trained_pair_hashes") or []) if dpo else set()
    mode: PairsMode = (dpo or {}).get("pairs", "shared")
    records = tokenized / "records"
    rows: Rows = {name: [] for name in TRAINED}
    if sft is not None and sft.get("trained", True):
        # sft.keep: best measured its loss on tokenize's held-out SFT rows and trained on the others only
        held = set(read_manifest(tokenized).get("sft_heldout_rows") or []) if sft.get("kept_by", "last") != "last" \
            else set()
        rows["sft.jsonl"] = [e["record"] for i, e in enumerate(read_jsonl(records / "sft.jsonl")) if i not in held]
    rows["preference.jsonl"] = [e["record"] for e in read_jsonl(records / "preference.jsonl")
                                if set(e["pairs"]) & (judge | policy)]
    rows["unpaired.jsonl"] = [e["record"] for e in read_jsonl(records / "unpaired.jsonl")
                              if set(e["pairs"]) & (judge | policy)
                              or (kto and dpo is not None and e["kto"] and on_side(e["record"]["prompt"], "policy",
                                                                                    mode))]
    return rows, {"judge": sorted(judge), "policy": sorted(policy)}


def digest(folder: Path) -> str:
    """Content hash of what tokenize and evaluate read from a lineage folder (the trained files, `pairs.json`)."""
    return sha256_json({name: sha256_tree(folder / name) if (folder / name).exists() else None
                        for name in (*TRAINED, SIDES)})


def sides(folder: Path | None) -> dict[str, list[str]] | None:
    """A lineage's `pairs.json` (pair hashes per side); {} without ancestors, None for a lineage logged before
    sides were recorded (or a curated folder standing in for one): its sides are unknown."""
    if folder is None:
        return {"judge": [], "policy": []}
    if not (folder / SIDES).exists():
        return None
    recorded = json.loads((folder / SIDES).read_text())
    return None if recorded.get("unknown") else recorded


def seen_folder(folder: Path) -> Path:
    """Where a lineage keeps every record it had at hand: `seen/`, or the folder itself for one logged before."""
    return folder / SEEN if (folder / SEEN / "sft.jsonl").exists() else folder


def _merged(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of `parts`, in order, each distinct record (as JSON) once."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for rows in parts:
        for row in rows:
            text = json.dumps(row, sort_keys=True, ensure_ascii=False)
            if text not in seen:
                seen.add(text)
                out.append(row)
    return out


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path)) if path.exists() else []


def union(ancestors: Path | None, curated: Path, this_run: tuple[Rows, dict[str, list[str]]],
          dest_root: Path) -> Path:
    """The ancestors' lineage plus what this run trained on (`trained`), in order; `seen/`: the ancestors' seen
    records, this run's curated ones and what it trained on; eval as curated. Written once per content."""
    rows, hashes = this_run
    before = sides(ancestors)
    files = {name: _merged([_rows(ancestors / name) if ancestors else [], rows[name]]) for name in TRAINED}
    pairs: dict[str, Any] = {side: sorted(set((before or {}).get(side, [])) | set(hashes[side]))
                             for side in ("judge", "policy")}
    if before is None:  # an ancestor's sides are unknown (logged before they were recorded): so are this lineage's,
        pairs["unknown"] = True  # for good: this run's hashes alone would read as the whole history's
    seen = {name: _merged([_rows(seen_folder(ancestors) / name) if ancestors else [], _rows(curated / name),
                           files[name]]) for name in TRAINED}
    key = sha256_json([files, pairs, seen, sha256_tree(curated / "eval.jsonl")])
    dest = dest_root / key[:16]
    dest_root.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest):  # two runs sharing the work dir: one writes it, the other finds it
        if (dest / "eval.jsonl").exists():
            return dest
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SEEN).mkdir(parents=True)
        for name in TRAINED:
            write_jsonl(tmp / name, files[name])
            write_jsonl(tmp / SEEN / name, seen[name])
        (tmp / SIDES).write_text(json.dumps(pairs, indent=1) + "\n")
        shutil.copyfile(curated / "eval.jsonl", tmp / SEEN / "eval.jsonl")
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
    """The lineage folder as artifacts of `run_id` (`lineage/`), its trained files also as dataset inputs (context
    `lineage`)."""
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
    client.log_artifact(run_id, str(folder / SIDES), ARTIFACTS)  # evaluate's and tokenize's checks (no input)
    client.log_artifacts(run_id, str(folder / SEEN), f"{ARTIFACTS}/{SEEN}")  # retrain's new-data check (no input)
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
