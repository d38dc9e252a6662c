"""Curation throughput on 100k generated records: exact + near dedup, PII scrub, quality filters,
decontamination against 1k eval items, on the real `tasks.curate.run`.

Baseline measured in the same run: a plain pass that reads, parses and writes the same JSONL (the I/O floor).
The two alternate over `--pairs` pairs (curate, plain, curate, plain, ...), after an untimed plain pass and an
untimed curate run that warm the page cache and curate's imports for both, so load on a shared machine hits
both; the ratio is each pair's curate / plain, printed as median and range, and every curate run's outputs must
be identical. Issue 18 target: curate / plain <= 25.

Scale mode (issue 18): `--scale 1000000` generates a million SFT records (in a child process, so the data never
sits in this one), fans `curate.shards` out over local Dask worker processes through the pipeline's own
subflow (flows/pipeline.py), merges, and prints the wall time and the peak memory (RSS) of this process and
of the workers, sampled every 0.2 s. `--compare` then curates the same files in one process and checks that
every output file is byte-identical.

  python bench/bench_curate.py                 # 111k records (100k sft, 10k pairs, 1k eval)
  python bench/bench_curate.py --records 20000
  python bench/bench_curate.py --scale 1000000 --shards 4 --workers 2 [--compare]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pairs import at_least_one  # noqa: E402  (bench/pairs.py)

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


def make_stream(folder: Path, n: int, seed: int = 0) -> None:
    """Like make_data, written line by line (exact duplicates drawn from the last 10k rows): for --scale."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    recent: list[str] = []
    with open(folder / "sft.jsonl", "w") as f:
        for i in range(n):
            r = rng.random()
            if r < 0.03 and recent:
                f.write(recent[rng.randrange(len(recent))] + "\n")  # exact duplicate
                continue
            answer = sentence(rng.randint(8, 30))
            if r < 0.06:
                answer += f" Contact {rng.choice(WORDS)}{i}@example.com or +1 415-555-{i % 10000:04d}."
            row = json.dumps({"prompt": f"Task {i}: {sentence(12)}", "response": answer})
            f.write(row + "\n")
            recent.append(row)
            if len(recent) > 10_000:
                recent[rng.randrange(10_000)] = recent.pop()
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(n // 10):
            f.write(json.dumps({"prompt": sentence(10), "chosen": sentence(12), "rejected": sentence(9)}) + "\n")
    with open(folder / "eval.jsonl", "w") as f:
        for _ in range(1000):
            f.write(json.dumps({"prompt": sentence(15), "reference": sentence(10)}) + "\n")


def plain(files: list[Path], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        with open(f) as src, open(out / f.name, "w") as dst:
            for line in src:
                dst.write(json.dumps(json.loads(line)) + "\n")


def timed_plain(files: list[Path], out: Path) -> float:
    t0 = time.perf_counter()
    plain(files, out)
    return time.perf_counter() - t0


class PeakRss:
    """Peak resident memory (RSS) of this process, of its largest descendant (a Dask worker or nanny), and of
    all of them together, sampled every `every` seconds."""

    def __init__(self, every: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.peak_self = self.peak_children = self.peak_total = 0
        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self.stop.is_set():
            mine, kids = self.me.memory_info().rss, []
            for child in self.me.children(recursive=True):
                try:
                    kids.append(child.memory_info().rss)
                except psutil.Error:  # ended between the listing and the reading
                    continue
            self.peak_self = max(self.peak_self, mine)
            self.peak_children = max(self.peak_children, *kids, 0)
            self.peak_total = max(self.peak_total, mine + sum(kids))
            self.stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def digest(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in ("sft.jsonl", "preference.jsonl", "eval.jsonl", "rejects.jsonl", "data_card.md")}


def print_progress(fraction: float, detail: str | None) -> None:
    if detail:
        print(f"  {100 * fraction:5.1f} %  {detail}", file=sys.stderr, flush=True)


def scale(args: argparse.Namespace) -> None:
    os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                       "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})
    from alignflow.flows.pipeline import curate_shards, task_runner
    from alignflow.recipe import ScaleOutSection
    from alignflow.tasks.lib.progress import set_progress_reporter

    set_progress_reporter(print_progress)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--generate", str(args.scale), str(folder)], check=True)
        print(f"generated {args.scale} sft records in {time.perf_counter() - t0:.1f} s "
              f"({(folder / 'sft.jsonl').stat().st_size / 2**20:.0f} MiB)")
        files = {"sft": [folder / "sft.jsonl"], "preference": [folder / "pairs.jsonl"], "eval": [folder / "eval.jsonl"]}
        cfg = CurateConfig(max_drop_fraction=1.0, shards=args.shards)
        inputs = CurateInputs(**files, out_dir=folder / "sharded")
        runner = task_runner(ScaleOutSection(task_runner="dask", workers=args.workers), cpu_bound=True)
        with PeakRss() as rss:
            t0 = time.perf_counter()
            curate_shards.with_options(task_runner=runner)(cfg, inputs)
            t_shards = time.perf_counter() - t0
            manifest = run(cfg, inputs)
            t_sharded = time.perf_counter() - t0
        m = manifest["metrics"]
        n_total = m["sft.records_in"] + m["preference.records_in"] + m["eval.records_in"]
        gib = 2**30
        print(f"records (all datasets)      {n_total}")
        print(f"shards / dask workers       {args.shards} / {args.workers}")
        print(f"curate wall s               {t_sharded:.1f} (shards {t_shards:.1f}, merge {t_sharded - t_shards:.1f})")
        print(f"curate records/s            {n_total / t_sharded:.0f}")
        print(f"peak RSS this process GiB   {rss.peak_self / gib:.2f}")
        print(f"peak RSS one worker GiB     {rss.peak_children / gib:.2f}")
        print(f"peak RSS all processes GiB  {rss.peak_total / gib:.2f}")
        print("sft dropped:", {k.removeprefix("sft.dropped."): v for k, v in m.items() if k.startswith("sft.dropped.")})
        if args.compare:
            t0 = time.perf_counter()
            with PeakRss() as rss1:
                run(cfg.model_copy(update={"shards": 1}), CurateInputs(**files, out_dir=folder / "single"))
            print(f"one process: wall s {time.perf_counter() - t0:.1f}, peak RSS GiB {rss1.peak_self / gib:.2f} (an "
                  "upper bound: this process still holds what the sharded run's merge left)")
            same = digest(folder / "sharded") == digest(folder / "single")
            print(f"sharded == one process      {same}")
            if not same:
                sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--pairs", type=at_least_one, default=5,
                        help="alternating curate / plain pairs (median and range)")
    parser.add_argument("--scale", type=int, default=0, help="scale mode: this many sft records, sharded on Dask")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    parser.add_argument("--compare", action="store_true", help="scale mode: also one process, outputs compared")
    parser.add_argument("--generate", nargs=2, metavar=("N", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        make_stream(Path(args.generate[1]), int(args.generate[0]))
        return
    if args.scale:
        scale(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sft, pref, ev = make_data(folder, args.records)
        files = [sft, pref, ev]
        n_total = sum(len(f.read_text().splitlines()) for f in files)
        # warm, untimed: the files in the page cache, curate's imports and compiled patterns, for both
        timed_plain(files, folder / "plain")
        run(CurateConfig(max_drop_fraction=1.0), CurateInputs(sft=[sft], preference=[pref], eval=[ev],
                                                              out_dir=folder / "curated-warm"))
        curates, plains, ratios = [], [], []
        for i in range(args.pairs):  # alternating: curate, plain, curate, plain, ...
            t0 = time.perf_counter()
            manifest = run(CurateConfig(max_drop_fraction=1.0),
                           CurateInputs(sft=[sft], preference=[pref], eval=[ev], out_dir=folder / f"curated-{i}"))
            curates.append(time.perf_counter() - t0)
            plains.append(timed_plain(files, folder / "plain"))
            ratios.append(curates[-1] / plains[-1])
            print(f"pair {i + 1}: curate {curates[-1]:.2f} s, plain {plains[-1]:.2f} s, ratio {ratios[-1]:.1f}",
                  flush=True)
        same = all(digest(folder / f"curated-{i}") == digest(folder / "curated-warm") for i in range(args.pairs))
    m = manifest["metrics"]
    print(f"records (all datasets)      {n_total}")
    print(f"plain read/parse/write s    {statistics.median(plains):.2f} (median of {args.pairs}; "
          f"{min(plains):.2f} to {max(plains):.2f})")
    print(f"curate s                    {statistics.median(curates):.2f} ({min(curates):.2f} to {max(curates):.2f})")
    print(f"curate records/s            {n_total / statistics.median(curates):.0f}")
    print(f"ratio curate / plain        {statistics.median(ratios):.1f} (median of {args.pairs} pairs; "
          f"{min(ratios):.1f} to {max(ratios):.1f})")
    print(f"every curate run identical  {same}")
    if not same:
        sys.exit(1)
    print("sft dropped:", {k.removeprefix('sft.dropped.'): v for k, v in m.items() if k.startswith("sft.dropped.")})
    print("sft pii:", {k.removeprefix('sft.pii.'): v for k, v in m.items() if k.startswith("sft.pii.")})


if __name__ == "__main__":
    from machine import describe  # bench/machine.py

    shown = "--generate" not in sys.argv  # not in the child that writes the data
    if shown:
        print(describe("at start"), flush=True)
    main()
    if shown:
        print(describe("at end"))
