"""The record checks, end to end: which records are kept, and under which reason each other one is dropped.

Two phases, so that the per-record work can be split into shards (see tasks/curate.py) while the decisions
that need every record before it are still taken in input order:
  1. `inspect_records`, record by record: parse, normalise (readers.py), scrub PII (tasks/lib/pii.py), length
     limit, and everything the decisions need: the exact-dedup key, the quality problem, the MinHash signature,
     the eval overlap;
  2. `decide_records`, in input order: phase-1 rejects, then exact dedup, quality, near dedup and
     decontamination; then optional semantic dedup over what is left.
Nothing is dropped silently: every drop is counted under its reason, and the first `reject_samples` rejects
per reason are kept (PII-scrubbed too, since they are written out).

`filter_synthetic` and `new_records` put generated or newly landed records through the same checks, against
an already-curated folder (its records count as seen before, its eval set decides contamination).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.pii import scrub, scrub_record
from alignflow.tasks.records.decontaminate import DecontaminateConfig, EvalIndex
from alignflow.tasks.records.dedup import DedupConfig, NearDuplicates, exact_key, semantic_duplicates
from alignflow.tasks.records.quality import QualityConfig, quality_problem
from alignflow.tasks.records.readers import Dataset, normalise, read_all
from alignflow.tasks.records.text import record_text

Checked = tuple[list[dict[str, Any]], Counter[str], list[dict[str, Any]], Counter[str]]  # kept, drops, samples, pii


class RecordChecks(BaseModel):
    """The record-level settings of the recipe's `curate` section. tasks/curate.py's CurateConfig repeats these
    fields (same names, defaults and descriptions, in its own field order); `from_attributes` lets a
    CurateConfig validate into a RecordChecks wherever one is expected."""

    model_config = ConfigDict(extra="forbid", from_attributes=True)
    dedup: DedupConfig = DedupConfig()
    quality: QualityConfig = QualityConfig()
    decontaminate: DecontaminateConfig = DecontaminateConfig()
    pii: bool = Field(True, description="replace PII and secrets with typed placeholders")
    max_chars: int = Field(4000, gt=0, description="records longer than this (all turns, characters) are dropped")
    reject_samples: int = Field(5, ge=0, description="rejected records kept per reason in rejects.jsonl")


def filter_synthetic(
    name: Dataset, records: list[dict[str, Any]], cfg: RecordChecks, curated: Path
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Pass generated records through the same checks as real ones: validation, PII, quality, exact and near
    dedup (against the curated data too, so near-copies of seed data go), and decontamination against eval."""
    eval_records = list(read_jsonl(curated / "eval.jsonl"))
    index = EvalIndex(eval_records, cfg.decontaminate.ngram) if cfg.decontaminate.enabled else None
    prior = list(read_jsonl(curated / f"{name}.jsonl"))
    if name == "preference" and (curated / "unpaired.jsonl").exists():  # rated completions are preference data too
        prior += list(read_jsonl(curated / "unpaired.jsonl"))
    source = ((f"synthetic[{i}]", r, None) for i, r in enumerate(records))
    kept, dropped, _samples, _pii = check_dataset(name, source, cfg, index, prior)
    return kept, dropped


def new_records(
    name: Dataset, files: list[Path], cfg: RecordChecks, used: Path
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Records of `files` (curated as usual) that were not already used: exact and near duplicates of the
    curated folder `used` (e.g. the champion's) are dropped, and eval overlap is removed, as for any data."""
    current, _dropped, _samples, _pii = check_dataset(name, read_all(files), cfg, None)
    return filter_synthetic(name, current, cfg, used)


def check_dataset(
    name: Dataset, source: Any, cfg: RecordChecks, index: EvalIndex | None,
    prior: list[dict[str, Any]] | None = None,
) -> Checked:
    """Both phases in one process: (kept records, drops per reason, reject samples, PII replaced per type)."""
    return decide_records(name, inspect_records(name, source, cfg, index), cfg, prior)


def inspect_records(name: Dataset, source: Any, cfg: RecordChecks, index: EvalIndex | None, shard: int = 0,
                    shards: int = 1, portable: bool = False) -> Any:
    """Phase 1, record by record (what a shard does): parse, normalise, scrub PII, and compute everything the
    decisions need: the exact-dedup key, the quality problem, the MinHash signature, the eval overlap.
    Yields one dict per input record whose position % shards == shard. `portable`: picklable values only."""
    lsh = NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled and name != "eval" else None
    for pos, (where, raw, error) in enumerate(source):
        if pos % shards != shard:
            continue
        item: dict[str, Any] = {"pos": pos, "where": where, "reason": error, "raw": raw, "pii": {}}
        record = None
        if not error:
            extra = {k: raw[k] for k in ("source", "margin", "judge") if isinstance(raw, dict) and k in raw}
            record, item["reason"] = normalise(name, raw)
        if record is not None:
            if cfg.pii:
                pii: Counter[str] = Counter()
                record = scrub_record(record, pii)
                item["pii"] = dict(pii)
            if len(json.dumps(record, ensure_ascii=False)) > cfg.max_chars:  # characters of the whole record
                item["reason"] = "too_long"
            else:
                item["record"] = {**record, **extra}
                item["key"] = exact_key(record)
                item["quality"] = quality_problem(record, cfg.quality) if name != "eval" else None
                text = record_text(record) if lsh is not None or index is not None else ""
                if lsh is not None:
                    m = lsh.signature(text)
                    item["minhash"] = m.hashvalues if portable else m  # a uint64 array travels lighter
                item["contaminated"] = index is not None and index.contaminated(text, cfg.decontaminate.threshold)
        if item["reason"] is None:
            item.pop("raw")  # kept for reject samples only
        elif portable:
            item["raw"] = str(item["raw"])[:2000]  # enough for a reject sample (500 characters)
        yield item


def decide_records(name: Dataset, items: Any, cfg: RecordChecks, prior: list[dict[str, Any]] | None = None,
                   ) -> Checked:
    """Phase 2, in input order (the merge): rejects from phase 1, then exact dedup, quality, near dedup and
    decontamination; then optional semantic dedup. Every drop is counted under its reason."""
    kept: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    lsh = NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled else None
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for record in prior or []:  # already-curated records: a new record that repeats one is a duplicate
        seen.add(exact_key(record))
        if lsh is not None:
            lsh.seen_before(record_text(record))

    def reject(reason: str, raw: Any, where: str) -> None:
        dropped[reason] += 1
        if len(samples[reason]) < cfg.reject_samples:
            text = scrub(str(raw)) if cfg.pii else str(raw)  # rejects are written too: scrub them as well
            samples[reason].append({"dataset": name, "reason": reason, "where": where, "record": text[:500]})

    for item in items:
        pii.update(item["pii"])
        where = item["where"]
        if item["reason"]:
            reject(item["reason"], item["raw"], where)
            continue
        record = item["record"]
        if cfg.dedup.exact:
            if item["key"] in seen:
                reject("duplicate", record, where)
                continue
            seen.add(item["key"])
        if item["quality"]:
            reject(item["quality"], record, where)
            continue
        if lsh is not None and name != "eval" and lsh.seen_before(item["minhash"]):
            reject("near_duplicate", record, where)
            continue
        if item["contaminated"]:
            reject("contaminated", record, where)
            continue
        kept.append(record)
    if cfg.dedup.semantic.enabled and name != "eval" and kept:
        duplicate = semantic_duplicates([record_text(r) for r in kept],
                                        [record_text(r) for r in prior or []], cfg.dedup.semantic)
        for record, is_duplicate in zip(list(kept), duplicate, strict=True):
            if is_duplicate:
                reject("semantic_duplicate", json.dumps(record, ensure_ascii=False), "after filters")
        kept = [r for r, is_duplicate in zip(kept, duplicate, strict=True) if not is_duplicate]
    return kept, dropped, [s for group in samples.values() for s in group], pii
