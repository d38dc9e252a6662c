"""curate: load the SFT, preference and eval data, validate every record, drop duplicates, and write the data.

Nothing is dropped silently: every rejected record is counted under a named reason (the curate child run
logs `<dataset>.records_in`, `<dataset>.records_kept` and `<dataset>.dropped.<reason>`), and a sample of
rejects per reason is kept in `rejects.jsonl`. If more than `max_drop_fraction` of a dataset is dropped the
stage fails: that much loss means the data or the format guess is wrong, not that the data is dirty.

The checks themselves live in tasks/records/, one file per decision:
  readers.py        files (JSONL, JSON array, CSV, Parquet, `datasets` folders) and the record shapes accepted
                    (chat, ShareGPT, alpaca, pair, preference, hh-rlhf, unpaired feedback), normalised to one
                    internal schema; unpaired feedback (a rated completion) is written to `unpaired.jsonl`, pairs to
                    `preference.jsonl`, and counted as `preference.unpaired`
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
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_tree
from alignflow.tasks.lib.jsonl import write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.progress import RecordMeter, report_progress
from alignflow.tasks.records.checks import (
    RecordChecks,
    check_dataset,
    decide_records,
    inspect_batches,
    inspect_records,
)
from alignflow.tasks.records.decontaminate import DecontaminateConfig, EvalIndex
from alignflow.tasks.records.dedup import DedupConfig
from alignflow.tasks.records.quality import QualityConfig
from alignflow.tasks.records.readers import Dataset, count_lines, is_unpaired, read_all, read_shard
from alignflow.tasks.records.text import answer_texts

_JSON = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False), as write_jsonl writes


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
    """Phase 1 for shard `index` of `name` (its byte range of each JSON Lines file, see `read_shard`): parse,
    normalise, scrub, quality, MinHash signature, eval overlap. Streamed to JSON lines (never the whole shard in
    memory), atomically: a shard folder may be shared (Dask workers on other hosts, a team's work dir), and
    reading JSON runs no code, unlike unpickling."""
    path = shard_file(inputs, name, index, cfg.shards)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = RecordChecks.model_validate(cfg)
    index_ = None
    if cfg.decontaminate.enabled:
        eval_kept, *_ = check_dataset("eval", read_all(inputs.eval), checks, None)
        index_ = EvalIndex(eval_kept, cfg.decontaminate.ngram)
    items = inspect_batches(name, read_shard(getattr(inputs, name), index, cfg.shards), checks, index_,
                            portable=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            for field in ("minhash", "key"):  # bytes (the signature's uint32 values; a sha256 digest), as hex
                if field in item:
                    item[field] = item[field].hex()
            f.write(json.dumps(item, ensure_ascii=False, default=_plain) + "\n")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """numpy scalars (a bool from the eval index, say) as the Python values JSON knows."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _shard_stream(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            for field in ("minhash", "key"):
                if field in item:
                    item[field] = bytes.fromhex(item[field])
            yield item


def _shard_items(cfg: CurateConfig, inputs: CurateInputs, name: Dataset) -> Any:
    """Every shard's items, back in input order (each shard's stream is in order: merge the streams)."""
    paths = [shard_file(inputs, name, index, cfg.shards) for index in range(cfg.shards)]
    for path in paths:
        if not path.exists():
            raise StageError(f"curate: shard {path.name} is missing; re-run the stage")
    return heapq.merge(*map(_shard_stream, paths), key=lambda item: item["pos"])


class _KeptFile:
    """Kept records, written as they are decided (a million records never sit in memory together), plus what
    the data card needs: their count, answer lengths and the first two. With `unpaired_path` (the preference
    data), unpaired feedback (one rated completion) goes to that file and pairs to `path`."""

    def __init__(self, path: Path, unpaired_path: Path | None = None) -> None:
        self.file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.unpaired_file = open(unpaired_path, "w", encoding="utf-8") if unpaired_path else None  # noqa: SIM115
        self.count = 0
        self.unpaired = 0
        self.lengths: list[int] = []
        self.first: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        if self.unpaired_file is not None and is_unpaired(record):
            self.unpaired_file.write(_JSON(record) + "\n")
            self.unpaired += 1
        else:
            self.file.write(_JSON(record) + "\n")
        self.count += 1
        self.lengths += [len(a) for a in answer_texts(record)]
        if len(self.first) < 2:
            self.first.append(record)

    def close(self) -> None:
        self.file.close()
        if self.unpaired_file is not None:
            self.unpaired_file.close()


def _merge(cfg: CurateConfig, inputs: CurateInputs) -> dict[str, Any]:
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    rejects: list[dict[str, Any]] = []
    card = ["# Data card", "", "| dataset | records in | kept | dropped (reason: count) |", "|---|---|---|---|"]
    samples_md: list[str] = []
    lengths: dict[str, list[int]] = {}
    checks = RecordChecks.model_validate(cfg)
    # records/s and ETA for the Prefect progress artifact and the terminal (an estimate: JSON Lines lines)
    meter = RecordMeter("curate", sum(count_lines(p) for n in SHARDED for p in getattr(inputs, n)))

    def metered(items: Any) -> Any:
        for item in items:
            meter.add()
            yield item

    # The eval set first: its n-grams decide what training data is contaminated.
    eval_kept, eval_dropped, eval_samples, eval_pii = check_dataset("eval", read_all(inputs.eval), checks, None)
    index = EvalIndex(eval_kept, cfg.decontaminate.ngram) if cfg.decontaminate.enabled else None
    for name in ("sft", "preference", "eval"):
        files: list[Path] = getattr(inputs, name)
        # pairs and unpaired feedback (one rated completion) go to their own files
        kept = _KeptFile(out / f"{name}.jsonl", out / "unpaired.jsonl" if name == "preference" else None)
        try:
            if name == "eval":
                for record in eval_kept:
                    kept.add(record)
                dropped, samples, pii = eval_dropped, eval_samples, eval_pii
            else:
                items = (_shard_items(cfg, inputs, name) if cfg.shards > 1  # type: ignore[arg-type]
                         else inspect_records(name, read_all(files), checks, index))  # type: ignore[arg-type]
                streamed = not cfg.dedup.semantic.enabled  # semantic dedup needs every kept record first
                records, dropped, samples, pii = decide_records(
                    name, metered(items), checks, keep=kept.add if streamed else None)  # type: ignore[arg-type]
                for record in records:
                    kept.add(record)
        finally:
            kept.close()
        n_in = kept.count + sum(dropped.values())
        if name == "preference":
            metrics["preference.unpaired"] = kept.unpaired
        metrics[f"{name}.records_in"] = n_in
        metrics[f"{name}.records_kept"] = kept.count
        for reason, count in sorted(dropped.items()):
            metrics[f"{name}.dropped.{reason}"] = count
        for kind, count in sorted(pii.items()):
            metrics[f"{name}.pii.{kind}"] = count
        rejects.extend(samples)
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(dropped.items())) or "-"
        card.append(f"| {name} | {n_in} | {kept.count} | {reasons} |")
        lengths[name] = kept.lengths
        shown = [json.dumps(r, ensure_ascii=False)[:400] for r in kept.first]
        samples_md += [f"### {name}", "", *[f"```json\n{text}\n```" for text in shown]]
        failure = None
        if n_in and (n_in - kept.count) / n_in > cfg.max_drop_fraction:
            failure = (f"curate: {name} lost {n_in - kept.count} of {n_in} records ({reasons}), more than "
                       f"curate.max_drop_fraction={cfg.max_drop_fraction}. See {out / 'rejects.jsonl'} (up to "
                       f"{cfg.reject_samples} rejected records per reason).")
        elif not kept.count:
            failure = (f"curate: no usable {name} records in {', '.join(map(str, files))} ({reasons}). See "
                       f"{out / 'rejects.jsonl'}.")
        if failure:
            # The rejects first, so that the message points at a file that is there; the datasets written so far
            # go, so that no half-made sft.jsonl is left to be mistaken for a result.
            write_jsonl(out / "rejects.jsonl", rejects)
            for written in ("sft.jsonl", "preference.jsonl", "unpaired.jsonl", "eval.jsonl"):
                (out / written).unlink(missing_ok=True)
            raise StageError(failure)
    seconds = time.monotonic() - meter.started
    report_progress(1.0, f"curate: {meter.done:,} records in {seconds:.1f} s, {meter.done / seconds:,.0f} records/s")

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
            "outputs": ["sft.jsonl", "preference.jsonl", "unpaired.jsonl", "eval.jsonl", "rejects.jsonl",
                        "data_card.md", "lengths.png"],
            "artifacts": ["data_card.md", "lengths.png", "rejects.jsonl"],
            "metrics": metrics,
        },
    )


def _plot_lengths(path: Path, lengths: dict[str, list[int]]) -> None:
    from matplotlib.figure import Figure  # not pyplot: no backend or GUI machinery to import (about 1 s)

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, values in lengths.items():
        if values:
            ax.hist(values, bins=30, alpha=0.6, label=f"{name} ({len(values)} answers)")
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
