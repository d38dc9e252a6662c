"""curate's result is pinned: a generated corpus with every kind of defect gives byte-identical files and metrics
to the ones recorded before curation was made fast (issue 18: exact and MinHash dedup, PII, quality,
decontamination, readers), in one process, in shards split by byte ranges, and on several input files.

The hashes below were computed at commit f3a8891 (the implementation before the speed work) with
`python tests/test_curate_pinned.py`. A deliberate change of curate's result updates them, and says so.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignflow.tasks.curate import CurateConfig, CurateInputs, run  # noqa: E402

OUTPUTS = ("sft.jsonl", "preference.jsonl", "eval.jsonl", "rejects.jsonl", "data_card.md")
PINNED = {  # `python tests/test_curate_pinned.py` at f3a8891
    "sft.jsonl": "18dd2c1852e387b89dcf07a550db14412dfcfbb58d0b413622f932e7f84d3f68",
    "preference.jsonl": "a8a21235b0cf526c0a722ad0cdcfa24b99f9227bb77f1b88e0fdd019817f1720",
    "eval.jsonl": "62b02a697f2035e4208c6f3a6f273582ff6532c737f5691056383f2480de79b8",
    "rejects.jsonl": "cf2d8ca5f81ed5e675d55bf1f324499bd044aad9eb9e7b733d6c7ae65dcf90b1",
    "data_card.md": "291b789a5be6e12456e5207084b72951a105479fcc87309177769c645cdb3c8f",
    "metrics": "ed67265bedf9887f518137e3e086c798ebe1f2d32f7c43822a30c15994802858",
}

WORDS = ["river", "city", "garden", "market", "window", "music", "winter", "summer", "engine", "signal", "paper",
         "bridge", "forest", "doctor", "teacher", "planet", "coffee", "orange", "silver", "button", "ticket",
         "camera", "letter", "island", "mountain", "pencil", "rocket", "Zürich", "café", "naïve"]


def make_corpus(folder: Path, n: int = 2400, seed: int = 7) -> dict[str, list[Path]]:
    """sft (two JSONL files, one with CRLF line ends), preference and eval files exercising every check."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    evals = [{"prompt": f"Question {i}: {words(12)}", "reference": words(9)} for i in range(40)]
    rows: list[str] = []
    for i in range(n):
        r = rng.random()
        prompt, answer = f"Task {i}: {words(rng.randint(6, 14))}", words(rng.randint(8, 30))
        if r < 0.05 and rows:
            rows.append(rows[rng.randrange(len(rows))])  # exact duplicate
            continue
        if r < 0.08 and rows:  # the same text in other case and spacing: still a duplicate
            src = json.loads(rows[rng.randrange(len(rows))])
            if "prompt" in src and isinstance(src["prompt"], str):
                rows.append(json.dumps({"prompt": "  " + src["prompt"].upper(), "response": src.get("response", "x")}))
                continue
        if r < 0.16:  # near duplicate: a long answer with its last word changed
            base = f"Explain topic {i % 50}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(40))
            answer = base + " " + rng.choice(WORDS)
            prompt = f"Explain topic {i % 50}"
        elif r < 0.22:
            kind = rng.randrange(7)
            answer += [f" Mail {rng.choice(WORDS)}{i}@example.com now.", f" Call +1 415-555-{i % 10000:04d}.",
                       f" Server at 10.0.{i % 250}.{i % 200} or fe80::1:{i % 9999}.",
                       " Card 4111 1111 1111 1111 or order 1234567890123.",
                       f" key sk-{'a' * 12}{i:010d}XYZ and api_key={rng.choice(WORDS)}{i:06d}",
                       f" token ghp_{'B' * 30}{i:05d} AKIA{'Q' * 12}{i % 10000:04d}",
                       " at 12:30 on 2024-05-02 (ISO)"][kind]
        elif r < 0.25:
            contaminated = rng.choice(evals)
            prompt, answer = contaminated["prompt"], contaminated["reference"] + " " + words(3)
        elif r < 0.27:
            answer = "word " * 30  # repetitive
        elif r < 0.28:
            answer = words(5) + "\x01\x02\x03\x04\x05\x06"  # junk characters
        elif r < 0.29:
            answer = " "  # empty content
        elif r < 0.30:
            answer = words(900)  # too long
        shape = rng.randrange(4)
        if shape == 0:
            rec = {"prompt": prompt, "response": answer}
        elif shape == 1:
            rec = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        elif shape == 2:
            rec = {"instruction": prompt, "input": rng.choice(["", words(3)]), "output": answer}
        else:
            rec = {"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
        rows.append(json.dumps(rec, ensure_ascii=rng.random() < 0.5))
        if rng.random() < 0.01:
            rows.append(rng.choice(['{"prompt": "broken', '"just a string"', '{"foo": 1}', "",
                                    '{"messages": [{"role": "robot", "content": "x"}]}']))
    half = len(rows) // 2
    sft_a, sft_b = folder / "sft_a.jsonl", folder / "sft_b.jsonl"
    sft_a.write_bytes(("\n".join(rows[:half]) + "\n").encode() + b"\xff\xfe not utf8\n")
    sft_b.write_bytes(("\r\n".join(rows[half:]) + "\r\n").encode())
    pairs = []
    for i in range(n // 4):
        p = {"prompt": f"Pair {i % (n // 6)}: {words(6)}", "chosen": words(10), "rejected": words(7)}
        if i % 17 == 0:
            p["rejected"] = p["chosen"]
        if i % 23 == 0:
            p = {"chosen": f"\n\nHuman: {words(5)}\n\nAssistant: {words(6)}",
                 "rejected": f"\n\nHuman: {words(5)}\n\nAssistant: {words(4)}"}
        if i % 29 == 0:
            p["source"], p["margin"] = "synthetic", 0.5
        if i % 31 == 0:
            p["chosen"] += " write to me at x@y.org"
        pairs.append(json.dumps(p))
    pref = folder / "pairs.jsonl"
    pref.write_text("\n".join(pairs + pairs[:20]) + "\n")
    ev = folder / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": e["prompt"], "response": e["reference"]}) + "\n" for e in evals))
    return {"sft": [sft_a, sft_b], "preference": [pref], "eval": [ev]}


def digest(tmp: Path, out: Path, manifest: dict) -> dict[str, str]:
    """sha256 of each output, with the temporary folder's path (in rejects' `where`) replaced by `<tmp>`."""
    hashes = {name: hashlib.sha256((out / name).read_bytes().replace(str(tmp).encode(), b"<tmp>")).hexdigest()
              for name in OUTPUTS}
    # `preference.unpaired` (issue 16) is a count added after the pin was taken; the corpus has no unpaired records
    assert manifest["metrics"]["preference.unpaired"] == 0
    later = {"shards", "preference.unpaired"}
    hashes["metrics"] = hashlib.sha256(json.dumps({k: v for k, v in manifest["metrics"].items() if k not in later},
                                                  sort_keys=True).encode()).hexdigest()
    return hashes


def curate(tmp: Path, shards: int) -> dict[str, str]:
    files = make_corpus(tmp)
    manifest = run(CurateConfig(max_drop_fraction=1.0, shards=shards),
                   CurateInputs(**files, out_dir=tmp / "out"))
    return digest(tmp, tmp / "out", manifest)


@pytest.mark.parametrize("shards", [1, 3])
def test_curate_outputs_are_byte_identical_to_before(tmp_path: Path, shards: int) -> None:
    assert curate(tmp_path, shards) == PINNED


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(curate(Path(tmp), 1), indent=2))


def test_byte_range_shards_read_every_record_once_in_order(tmp_path: Path) -> None:
    """Shards cut JSON Lines files at line starts: together they yield exactly the single pass's records, with its
    line numbers, whatever the line ends (LF, CRLF, a lone CR), blank lines and a last line without an end."""
    from alignflow.tasks.records.readers import read_all, read_shard

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"i": 1}\r\n\r\n{"i": 2}\n{"i": 3}\r{"i": 4}\n\n\n{"i": 5}\r\n{bad\n'
                      + b'{"i": 6}\n' * 7 + b'{"i": 7}')
    csv = tmp_path / "b.csv"
    csv.write_text("prompt,response\n" + "".join(f"q{i},a{i}\n" for i in range(5)))
    files = [jsonl, csv, jsonl]
    single = [((-1, -1), *row) for row in read_all(files)]
    for shards in (1, 2, 3, 5, 40):
        rows = sorted((row for shard in range(shards) for row in read_shard(files, shard, shards)),
                      key=lambda row: row[0])
        assert [row[1:] for row in rows] == [row[1:] for row in single], shards


def test_long_curation_reports_records_per_second_and_an_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the pipeline shows in the curate progress artifact and logs to the terminal (flows/pipeline.py)."""
    from alignflow.tasks.lib import progress

    reports: list[tuple[float, str | None]] = []
    monkeypatch.setattr(progress, "REPORT_EVERY", 0.0)  # every record; the default is every 5 s
    progress.set_progress_reporter(lambda fraction, detail: reports.append((fraction, detail)))
    try:
        files = make_corpus(tmp_path, n=300)
        run(CurateConfig(max_drop_fraction=1.0), CurateInputs(**files, out_dir=tmp_path / "out"))
    finally:
        progress.set_progress_reporter(None)
    middle = [(f, d) for f, d in reports[:-1] if d]
    assert len(middle) > 300 and all("records/s" in d and "ETA" in d for _, d in middle)
    assert [f for f, _ in middle] == sorted(f for f, _ in middle) and 0 < middle[0][0] < middle[-1][0] <= 1
    assert reports[-1][0] == 1.0 and "records/s" in str(reports[-1][1])


def test_batched_minhash_values_are_datasketchs() -> None:
    """NearDuplicates.signatures reproduces datasketch's MinHash values bit for bit, so the LSH decisions are
    datasketch's (an off-by-one shingle, another hash or permutation would change them)."""
    import numpy as np
    from datasketch import MinHash

    from alignflow.tasks.records.dedup import NearDedupConfig, NearDuplicates, words

    rng = random.Random(3)
    texts = ["", "one", "a b c d", "a b c d e", "Zürich café, naïve!"] + \
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    for num_perm in (16, 64):
        rows = NearDuplicates(NearDedupConfig(num_perm=num_perm)).signatures([words(t) for t in texts])
        for text, row in zip(texts, rows, strict=True):
            w = words(text)
            m = MinHash(num_perm=num_perm, seed=1)
            m.update_batch(list({" ".join(w[i : i + 5]).encode() for i in range(max(len(w) - 4, 1))}))
            assert np.array_equal(m.hashvalues, row), text


def test_the_pii_prefilter_never_skips_a_text_scrub_would_change() -> None:
    """may_hold_pii flags exactly the texts some pattern matches; a text it does not flag, scrub leaves alone."""
    from collections import Counter

    from alignflow.tasks.lib import pii

    rng = random.Random(5)
    parts = ["a@b.com", "4111 1111 1111 1111", "4111-1111-1111-1111", "10.0.0.1", "fe80::1", "::", "12:30",
             "+1 415-555-0100", "+12 34 567", "(415) 555 0100", "415.555.0100", "sk-" + "a" * 22, "ghp_" + "b" * 31,
             "api_key=abcdefg", "password: 'hunter22'", "AKIA" + "A" * 16, "eyJabcdefghi.eyJabcdefghi.abcdefghij",
             "a:b:c:d:e:f:0:1", "xoxb-1234567890", "hf_" + "c" * 30, "123456", "1", "x", "\n", "=", "@", "(", "+"]
    for _ in range(1500):
        batch = ["".join(rng.choice(parts) + rng.choice(["", " ", "-", ".", ":"]) for _ in range(rng.randint(0, 5)))
                 for _ in range(rng.randint(1, 6))]
        for text, flagged in zip(batch, pii.may_hold_pii(batch), strict=True):
            assert flagged == any(p.search(text) for p, _ in pii._NEEDLES), text
            counts: Counter[str] = Counter()
            assert flagged or (pii.scrub(text, counts) == text and not counts), text
