"""Near-duplicate detection side by side, on generated records with planted near duplicates (issue 18):

  datasketch   one datasketch MinHash per record + MinHashLSH (what curate did before issue 18)
  alignflow    tasks/records/dedup.py NearDuplicates: datasketch's values computed per batch with numpy, and
               exact band sets (what curate does now)
  rensa        rensa's RMinHash + RMinHashLSH (Rust), 8 bands of 8 rows (64 permutations must split evenly;
               8x8 puts the S-curve's midpoint at 0.77, the closest to datasketch's 5x11 for threshold 0.8)

Each decides, in input order, whether a record is a near duplicate of an earlier kept one (query, then insert
when new). Prints the seconds each takes (signatures + index) and how many decisions agree with datasketch's.
Also the exact-dedup key's hash: sha256 (what curate uses) vs xxhash's xxh3_128 over the same texts.

  pip install -e '.[bench]'
  python bench/bench_minhash.py                # 50k records
  python bench/bench_minhash.py --records 200000
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignflow.tasks.records.dedup import NearDedupConfig, NearDuplicates, words  # noqa: E402

WORDS = ["river", "city", "garden", "market", "window", "music", "winter", "summer", "engine", "signal",
         "paper", "bridge", "forest", "doctor", "teacher", "planet", "coffee", "orange", "silver", "button"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Random texts; about 10 % are an earlier text with one to four words changed (near duplicates at
    Jaccard 0.5 to 0.95 of 5-gram shingles), and 2 % an exact copy."""
    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(n):
        r = rng.random()
        if r < 0.12 and texts:
            w = rng.choice(texts).split()
            if r >= 0.02:  # a near duplicate: change a few words
                for _ in range(rng.randint(1, 4)):
                    w[rng.randrange(len(w))] = rng.choice(WORDS)
            texts.append(" ".join(w))
        else:
            texts.append(f"Task {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50))))
    return texts


def shingles(text: str) -> list[str]:
    w = words(text)
    return list({" ".join(w[j : j + 5]) for j in range(max(len(w) - 4, 1))})


def with_datasketch(texts: list[str], cfg: NearDedupConfig) -> list[bool]:
    from datasketch import MinHash, MinHashLSH

    lsh, out = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm), []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm, seed=1)
        m.update_batch([s.encode() for s in shingles(text)])
        dup = bool(lsh.query(m))
        if not dup:
            lsh.insert(str(i), m)
        out.append(dup)
    return out


def with_alignflow(texts: list[str], cfg: NearDedupConfig) -> list[bool]:
    nd, out = NearDuplicates(cfg), []
    for start in range(0, len(texts), 512):  # curate's batch size
        for signature in nd.signatures([words(t) for t in texts[start : start + 512]]):
            out.append(nd.seen_before(signature.tobytes()))
    return out


def with_rensa(texts: list[str], cfg: NearDedupConfig) -> list[bool]:
    from rensa import RMinHash, RMinHashLSH

    lsh, out = RMinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, num_bands=8), []
    for i, text in enumerate(texts):
        m = RMinHash(num_perm=cfg.num_perm, seed=1)
        m.update(shingles(text))
        dup = bool(lsh.query(m))
        if not dup:
            lsh.insert(i, m)
        out.append(dup)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    texts, cfg = make_texts(args.records), NearDedupConfig()
    results: dict[str, tuple[float, list[bool]]] = {}
    for name, fn in (("datasketch", with_datasketch), ("alignflow", with_alignflow), ("rensa", with_rensa)):
        t0 = time.perf_counter()
        decisions = fn(texts, cfg)
        results[name] = (time.perf_counter() - t0, decisions)
    ref = results["datasketch"][1]
    print(f"records {len(texts)}, num_perm {cfg.num_perm}, threshold {cfg.threshold}")
    print(f"{'method':12s} {'seconds':>8s} {'x datasketch':>13s} {'near dups':>10s} {'agree':>8s} "
          f"{'only this':>10s} {'only datasketch':>16s}")
    for name, (seconds, decisions) in results.items():
        agree = sum(a == b for a, b in zip(decisions, ref, strict=True))
        only = sum(a and not b for a, b in zip(decisions, ref, strict=True))
        missed = sum(b and not a for a, b in zip(decisions, ref, strict=True))
        print(f"{name:12s} {seconds:8.2f} {results['datasketch'][0] / seconds:12.1f}x {sum(decisions):10d} "
              f"{agree / len(ref):8.4f} {only:10d} {missed:16d}")
    import xxhash

    data = [t.lower().encode() for t in texts]
    for name, fn in (("sha256", lambda b: hashlib.sha256(b).digest()), ("xxh3_128", xxhash.xxh3_128_digest)):
        t0 = time.perf_counter()
        for b in data:
            fn(b)
        print(f"exact key {name:9s} {1e6 * (time.perf_counter() - t0) / len(data):.2f} us per record")


if __name__ == "__main__":
    main()
