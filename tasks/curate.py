"""curate: load the SFT, preference and eval data, validate every record, drop duplicates, and write the data.

Nothing is dropped silently: every rejected record is counted under a named reason (the curate child run
logs `<dataset>.records_in`, `<dataset>.records_kept` and `<dataset>.dropped.<reason>`), and a sample of
rejects per reason is kept in `rejects.jsonl`. If more than `max_drop_fraction` of a dataset is dropped the
stage fails: that much loss means the data or the format guess is wrong, not that the data is dirty.

The checks themselves live in tasks/records/, one file per decision:
  readers.py        files (JSONL, JSON array, CSV, Parquet, `datasets` folders) and the record shapes accepted
                    (chat, ShareGPT, alpaca, pair, preference, hh-rlhf), normalised to one internal schema
  quality.py        answer too short, repetitive text, non-printable junk, optional language allow-list (langid);
                    on the training sets only, not on eval, whose items are the benchmark
  dedup.py          exact (normalised text), near (MinHash LSH, Jaccard `near.threshold`), optional semantic
  decontaminate.py  training records holding `threshold` of an eval item's word n-grams go as `contaminated`;
                    the manifest records `decontaminated` = 1, which `register.gate.require_decontaminated` checks
  checks.py         the two phases below, and `RecordChecks`, the record-level part of this config
PII and secrets (emails, phones, IPs, Luhn-valid card numbers, API keys/tokens) are replaced by typed
placeholders in every record before anything is written, the rejects sample included (tasks/lib/pii.py); the
counts per type are logged as `<dataset>.pii.<type>`.

This stage adds the files, the failure threshold, the data card (with an answer-length plot) and sharding:
with `shards` > 1 the per-record work of sft and preference (phase 1, `run_shard`) is split by position and
fanned out by the pipeline; the decisions that need every earlier record (dedup) are then taken here, in
input order (phase 2, `_merge`), so the result equals a single pass.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_tree
from alignflow.tasks.lib.jsonl import write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.records.checks import RecordChecks, check_dataset, decide_records, inspect_records
from alignflow.tasks.records.decontaminate import DecontaminateConfig, EvalIndex
from alignflow.tasks.records.dedup import DedupConfig
from alignflow.tasks.records.quality import QualityConfig
from alignflow.tasks.records.readers import Dataset, read_all
from alignflow.tasks.records.text import answer_texts


# The recipe's `curate` section. Its record-level fields repeat `RecordChecks` (tasks/records/checks.py) with the
# same names, defaults and descriptions rather than subclass it, so that the section keeps its field order
# (max_drop_fraction sits among them); tests/test_curate.py checks that the two agree. A comment, not a docstring:
# a docstring would become the section's description in the recipe's JSON schema.
class CurateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dedup: DedupConfig = DedupConfig()
    quality: QualityConfig = QualityConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    pii: bool = Field(True, description="replace PII and secrets with typed placeholders")
    max_chars: int = Field(4000, gt=0, description="records longer than this (all turns, characters) are dropped")
    max_drop_fraction: float = Field(0.5, ge=0, le=1, description="fail if a dataset loses more than this")
    reject_samples: int = Field(5, ge=0, description="rejected records kept per reason in rejects.jsonl")
    shards: int = Field(1, ge=1, le=256, description="split the per-record work of sft and preference; the "
                        "pipeline fans the shards out with Prefect task mapping (recipe section scale_out)")


class CurateInputs(BaseModel):
    sft: list[Path]
    preference: list[Path]
    eval: list[Path]
    out_dir: Path


SHARDED: tuple[Dataset, ...] = ("sft", "preference")  # the eval set is small, and needed whole by every shard


def run(cfg: CurateConfig, inputs: CurateInputs) -> dict[str, Any]:
    """Curate all three datasets. With `shards` > 1 the per-record work of sft and preference is done by
    `run_shard` (the pipeline flow fans those out; here they run one after another, skipping finished ones),
    and the decisions that need every record (dedup) are taken here, in input order: the same result."""
    for name in SHARDED if cfg.shards > 1 else ():
        for index in range(cfg.shards):
            run_shard(cfg, inputs, name, index)
    return _merge(cfg, inputs)


def shard_file(inputs: CurateInputs, name: Dataset, index: int, shards: int) -> Path:
    # The shard count is in the name: a resumed run with another count must not take these positions as its own.
    return inputs.out_dir / "shards" / f"{name}-{index:03d}-of-{shards:03d}.jsonl"


def run_shard(cfg: CurateConfig, inputs: CurateInputs, name: Dataset, index: int) -> Path:
    """Phase 1 for the records of `name` at positions index, index + shards, ...: parse, normalise, scrub,
    quality, MinHash signature, eval overlap. Written as JSON lines, atomically: a shard folder may be shared
    (Dask workers on other hosts, a team's work dir), and reading JSON runs no code, unlike unpickling."""
    path = shard_file(inputs, name, index, cfg.shards)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = RecordChecks.model_validate(cfg)
    index_ = None
    if cfg.decontaminate.enabled:
        eval_kept, *_ = check_dataset("eval", read_all(inputs.eval), checks, None)
        index_ = EvalIndex(eval_kept, cfg.decontaminate.ngram)
    items = list(inspect_records(name, read_all(getattr(inputs, name)), checks, index_, index, cfg.shards,
                                 portable=True))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            if "minhash" in item:  # a uint64 array: as exact Python ints (JSON has no 64-bit limit)
                item["minhash"] = [int(v) for v in item["minhash"]]
            f.write(json.dumps(item, ensure_ascii=False, default=_plain) + "\n")
    os.replace(tmp, path)
    return path


def _shard_items(cfg: CurateConfig, inputs: CurateInputs, name: Dataset) -> Any:
    """Every shard's items, back in input order (each shard file is already in order: merge the streams)."""
    streams = []
    for index in range(cfg.shards):
        path = shard_file(inputs, name, index, cfg.shards)
        if not path.exists():
            raise StageError(f"curate: shard {path.name} is missing; re-run the stage")
        streams.append(_read_shard(path))
    return heapq.merge(*streams, key=lambda item: item["pos"])


def _plain(value: Any) -> Any:
    """numpy scalars (a bool from the eval index, say) as the Python values JSON knows."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _read_shard(path: Path) -> Any:
    import numpy as np

    with open(path, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            if "minhash" in item:
                item["minhash"] = np.array(item["minhash"], dtype=np.uint64)
            yield item


def _merge(cfg: CurateConfig, inputs: CurateInputs) -> dict[str, Any]:
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    rejects: list[dict[str, Any]] = []
    card = ["# Data card", "", "| dataset | records in | kept | dropped (reason: count) |", "|---|---|---|---|"]
    samples_md: list[str] = []
    lengths: dict[str, list[int]] = {}
    checks = RecordChecks.model_validate(cfg)

    # The eval set first: its n-grams decide what training data is contaminated.
    eval_kept, eval_dropped, eval_samples, eval_pii = check_dataset("eval", read_all(inputs.eval), checks, None)
    index = EvalIndex(eval_kept, cfg.decontaminate.ngram) if cfg.decontaminate.enabled else None
    for name in ("sft", "preference", "eval"):
        files: list[Path] = getattr(inputs, name)
        if name == "eval":
            kept, dropped, samples, pii = eval_kept, eval_dropped, eval_samples, eval_pii
        else:
            items = (_shard_items(cfg, inputs, name) if cfg.shards > 1  # type: ignore[arg-type]
                     else inspect_records(name, read_all(files), checks, index))  # type: ignore[arg-type]
            kept, dropped, samples, pii = decide_records(name, items, checks)  # type: ignore[arg-type]
        n_in = len(kept) + sum(dropped.values())
        write_jsonl(out / f"{name}.jsonl", kept)
        metrics[f"{name}.records_in"] = n_in
        metrics[f"{name}.records_kept"] = len(kept)
        for reason, count in sorted(dropped.items()):
            metrics[f"{name}.dropped.{reason}"] = count
        for kind, count in sorted(pii.items()):
            metrics[f"{name}.pii.{kind}"] = count
        rejects.extend(samples)
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(dropped.items())) or "-"
        card.append(f"| {name} | {n_in} | {len(kept)} | {reasons} |")
        lengths[name] = [len(a) for r in kept for a in answer_texts(r)]
        shown = [json.dumps(r, ensure_ascii=False)[:400] for r in kept[:2]]
        samples_md += [f"### {name}", "", *[f"```json\n{text}\n```" for text in shown]]
        if n_in and (n_in - len(kept)) / n_in > cfg.max_drop_fraction:
            raise StageError(
                f"curate: {name} lost {n_in - len(kept)} of {n_in} records ({reasons}), more than "
                f"curate.max_drop_fraction={cfg.max_drop_fraction}. See {out / 'rejects.jsonl'}."
            )
        if not kept:
            raise StageError(f"curate: no usable {name} records in {', '.join(map(str, files))} ({reasons})")

    metrics["decontaminated"] = float(cfg.decontaminate.enabled)
    metrics["shards"] = cfg.shards
    write_jsonl(out / "rejects.jsonl", rejects)
    pii_total = {k.split(".")[-1]: v for k, v in metrics.items() if ".pii." in k}
    card += ["", f"PII replaced: {pii_total or 'none found'} · decontaminated: {cfg.decontaminate.enabled}",
             "", "![answer lengths](lengths.png)", "", "## Samples (after scrubbing)", "", *samples_md]
    (out / "data_card.md").write_text("\n".join(card) + "\n")
    _plot_lengths(out / "lengths.png", lengths)
    shutil.rmtree(out / "shards", ignore_errors=True)  # intermediates (MinHash signatures), merged by now
    return write_manifest(
        out,
        {
            "stage": "curate",
            "inputs": {n: {str(p): sha256_tree(p) for p in getattr(inputs, n)} for n in ("sft", "preference", "eval")},
            "outputs": ["sft.jsonl", "preference.jsonl", "eval.jsonl", "rejects.jsonl", "data_card.md", "lengths.png"],
            "artifacts": ["data_card.md", "lengths.png", "rejects.jsonl"],
            "metrics": metrics,
        },
    )


def _plot_lengths(path: Path, lengths: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=f"{name} ({len(values)} answers)")
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
