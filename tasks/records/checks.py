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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.pii import may_hold_pii, record_strings, scrub, scrub_record
from alignflow.tasks.records.decontaminate import DecontaminateConfig, EvalIndex
from alignflow.tasks.records.dedup import DedupConfig, NearDuplicates, exact_key, semantic_duplicates, words
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


_JSON = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(.., ensure_ascii=False), one encoder for all
BATCH = 512  # records inspected together: one regex scan per PII pattern and one numpy MinHash pass per batch


def inspect_records(name: Dataset, source: Any, cfg: RecordChecks, index: EvalIndex | None,
                    portable: bool = False) -> Any:
    """Phase 1 over (where, record, error) triples: see `inspect_batches`; positions count from 0."""
    return inspect_batches(name, ((pos, *row) for pos, row in enumerate(source)), cfg, index, portable)


def inspect_batches(name: Dataset, source: Any, cfg: RecordChecks, index: EvalIndex | None,
                    portable: bool = False) -> Any:
    """Phase 1, record by record (what a shard does): parse, normalise, scrub PII, and compute everything the
    decisions need: the exact-dedup key, the quality problem, the MinHash signature, the eval overlap.
    `source` yields (position, where, record, error); yields one dict per record, in order, `BATCH` at a time.
    `portable`: picklable values only (raw rejects as text)."""
    lsh = NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled and name != "eval" else None
    batch: list[tuple[Any, str, Any, str | None]] = []
    for row in source:
        batch.append(row)
        if len(batch) == BATCH:
            yield from _inspect_batch(name, batch, cfg, index, lsh, portable)
            batch = []
    if batch:
        yield from _inspect_batch(name, batch, cfg, index, lsh, portable)


def _inspect_batch(name: Dataset, batch: list[tuple[Any, str, Any, str | None]], cfg: RecordChecks,
                   index: EvalIndex | None, lsh: NearDuplicates | None, portable: bool) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for pos, where, raw, error in batch:
        item: dict[str, Any] = {"pos": pos, "where": where, "reason": error, "raw": raw, "pii": {}}
        if not error:
            record, item["reason"] = normalise(name, raw)
            if record is not None:
                extra = {k: raw[k] for k in ("source", "margin", "judge") if k in raw}
                item["record"], item["extra"] = record, extra
        items.append(item)
    live = [item for item in items if "record" in item]
    if cfg.pii:  # one scan per pattern over the batch; only strings a pattern matched go through `scrub`
        flags = iter(may_hold_pii([text for item in live for text in record_strings(item["record"])]))
        for item in live:
            pii: Counter[str] = Counter()
            item["record"] = scrub_record(item["record"], pii, flags)
            item["pii"] = dict(pii)
    tokens: list[list[str]] = []
    for item in live:
        record = item["record"]
        if len(_JSON(record)) > cfg.max_chars:  # characters of the whole record
            item["reason"] = "too_long"
            del item["record"]
            continue
        item["record"] = {**record, **item["extra"]}
        item["key"] = exact_key(record)
        item["quality"] = quality_problem(record, cfg.quality) if name != "eval" else None
        w = words(record_text(record)) if lsh is not None or index is not None else []
        if lsh is not None:
            tokens.append(w)
        item["contaminated"] = index is not None and index.contaminated(w, cfg.decontaminate.threshold)
    if lsh is not None and tokens:
        signatures = lsh.signatures(tokens)
        for item, signature in zip((it for it in live if "record" in it), signatures, strict=True):
            item["minhash"] = signature.tobytes()  # its uint32 values, as NearDuplicates.seen_before takes them
    for item in items:
        item.pop("extra", None)
        if item["reason"] is None:
            item.pop("raw")  # kept for reject samples only
        elif portable:
            item["raw"] = str(item["raw"])[:2000]  # enough for a reject sample (500 characters)
    return items


def decide_records(name: Dataset, items: Any, cfg: RecordChecks, prior: list[dict[str, Any]] | None = None,
                   keep: Callable[[dict[str, Any]], None] | None = None) -> Checked:
    """Phase 2, in input order (the merge): rejects from phase 1, then exact dedup, quality, near dedup and
    decontamination; then optional semantic dedup. Every drop is counted under its reason. `keep`: called with
    each kept record as soon as it is decided (curate streams them to its file) instead of returning them all;
    not with semantic dedup, which needs every kept record first."""
    if keep is not None and cfg.dedup.semantic.enabled:
        raise ValueError("decide_records: `keep` streams records, semantic dedup needs them all")
    kept: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    lsh = NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled else None
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[bytes] = set()
    for record in prior or []:  # already-curated records: a new record that repeats one is a duplicate
        seen.add(exact_key(record))
        if lsh is not None:
            lsh.seen_text_before(record_text(record))

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
        if keep is None:
            kept.append(record)
        else:
            keep(record)
    if cfg.dedup.semantic.enabled and name != "eval" and kept:
        duplicate = semantic_duplicates([record_text(r) for r in kept],
                                        [record_text(r) for r in prior or []], cfg.dedup.semantic)
        for record, is_duplicate in zip(list(kept), duplicate, strict=True):
            if is_duplicate:
                reject("semantic_duplicate", json.dumps(record, ensure_ascii=False), "after filters")
        kept = [r for r, is_duplicate in zip(kept, duplicate, strict=True) if not is_duplicate]
    return kept, dropped, [s for group in samples.values() for s in group], pii
