"""Curation throughput on 100k generated records: exact + near dedup, PII scrub, quality filters,
decontamination against 1k eval items, on the real `tasks.curate.run`.

Baseline measured in the same run: a plain pass that reads, parses and writes the same JSONL (the I/O floor).
Prints records/s and the ratio curate / plain. Issue target: <= 60 s for 100k records on 2 cores.

  python bench/bench_curate.py                 # 100k records
  python bench/bench_curate.py --records 20000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignflow.tasks.curate import CurateConfig, CurateInputs, run  # noqa: E402

WORDS = ["river", "city", "garden", "market", "window", "music", "winter", "summer", "engine", "signal",
         "paper", "bridge", "forest", "doctor", "teacher", "planet", "coffee", "orange", "silver", "button",
         "ticket", "camera", "letter", "island", "mountain", "pencil", "rocket"]


def make_data(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path, Path]:
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for i in range(n):
        prompt, answer = f"Task {i}: {sentence(12)}", sentence(rng.randint(8, 30))
        r = rng.random()
        if r < 0.03 and rows:
            rows.append(rows[rng.randrange(len(rows))])  # exact duplicate
            continue
        if r < 0.06:
            answer += f" Contact {rng.choice(WORDS)}{i}@example.com or +1 415-555-{i % 10000:04d}."
        rows.append(json.dumps({"prompt": prompt, "response": answer}))
    sft = folder / "sft.jsonl"
    sft.write_text("\n".join(rows) + "\n")
    pref = folder / "pairs.jsonl"
    pref.write_text("".join(json.dumps({"prompt": sentence(10), "chosen": sentence(12), "rejected": sentence(9)})
                            + "\n" for _ in range(n // 10)))
    ev = folder / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": sentence(15), "reference": sentence(10)}) + "\n" for _ in range(1000)))
    return sft, pref, ev


def plain(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        with open(f) as src, open(out / f.name, "w") as dst:
            for line in src:
                dst.write(json.dumps(json.loads(line)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sft, pref, ev = make_data(folder, args.records)
        n_total = sum(len(f.read_text().splitlines()) for f in (sft, pref, ev))
        t0 = time.perf_counter()
        plain([sft, pref, ev], folder / "plain")
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        manifest = run(CurateConfig(max_drop_fraction=1.0),
                       CurateInputs(sft=[sft], preference=[pref], eval=[ev], out_dir=folder / "curated"))
        t_curate = time.perf_counter() - t0
    m = manifest["metrics"]
    print(f"records (all datasets)      {n_total}")
    print(f"plain read/parse/write s    {t_plain:.2f}")
    print(f"curate s                    {t_curate:.2f}")
    print(f"curate records/s            {n_total / t_curate:.0f}")
    print(f"ratio curate / plain        {t_curate / t_plain:.1f}")
    print("sft dropped:", {k.removeprefix('sft.dropped.'): v for k, v in m.items() if k.startswith("sft.dropped.")})
    print("sft pii:", {k.removeprefix('sft.pii.'): v for k, v in m.items() if k.startswith("sft.pii.")})


if __name__ == "__main__":
    main()
