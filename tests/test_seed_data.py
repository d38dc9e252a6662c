"""The demo's claims: its held-out eval set uses names, cities and fruits that never occur in training, and its
preference pairs teach a style (the short answer over the sentence) that the SFT data does not settle."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _seed() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_seed_data", ROOT / "data" / "make_seed_data.py")
    assert spec and spec.loader
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    return seed


def _lines(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines() if line.endswith("}")]


def test_the_shipped_data_is_what_the_script_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = _seed()
    monkeypatch.setattr(seed, "HERE", tmp_path)
    seed.main()
    for name, lines in (("sft.jsonl", 318), ("pairs.jsonl", 240), ("eval.jsonl", 48)):  # the counts docs quote
        written = (tmp_path / name).read_text()
        assert written == (ROOT / "data" / name).read_text(), f"data/{name} is stale: run data/make_seed_data.py"
        assert len(written.splitlines()) == lines, name


def test_preference_pairs_prefer_the_short_form_that_sft_data_mixes_with_sentences() -> None:
    styled = ("Classify the sentiment", "Rewrite the date")
    sft = [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in _lines("sft.jsonl")]
    sentences = [a for p, a in sft if p.startswith(styled) and a.startswith("The ")]
    short = [a for p, a in sft if p.startswith(styled) and not a.startswith("The ")]
    # both forms are in the SFT data, the sentence more often: the SFT model is left answering in sentences
    assert len(short) >= 30 and len(sentences) > 1.5 * len(short)
    pairs = [r for r in _lines("pairs.jsonl") if r["prompt"].startswith(styled)]
    assert len(pairs) >= 90
    for r in pairs:  # the same content, short chosen over the sentence
        assert not r["chosen"].startswith("The ") and r["rejected"].startswith("The ")
        assert r["chosen"].removeprefix("sentiment: ") in r["rejected"]
    # the held-out references use the short form, so exact match sees the preference; no pair of any task
    # prefers a sentence
    assert all(not r["reference"].startswith("The ") for r in _lines("eval.jsonl"))
    assert all(not r["chosen"].startswith("The ") for r in _lines("pairs.jsonl"))


def test_held_out_entities_never_occur_in_training_data() -> None:
    seed = _seed()
    training = ((ROOT / "data" / "sft.jsonl").read_text() + (ROOT / "data" / "pairs.jsonl").read_text()).lower()
    evaluation = (ROOT / "data" / "eval.jsonl").read_text().lower()
    for word in [*seed.EVAL_FRUITS, *seed.EVAL_FIRST, *seed.EVAL_LAST, *seed.EVAL_CITY]:
        assert not re.search(rf"\b{re.escape(word.lower())}", training), f"held-out '{word}' occurs in training"
    # and the eval set's fruits are only held-out ones (it used to mix in apple and pear)
    listed = re.findall(r"fruits: ([a-z]+), ([a-z]+)", evaluation)
    assert listed and {f for pair in listed for f in pair} <= {f.lower() for f in seed.EVAL_FRUITS}
