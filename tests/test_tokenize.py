"""tokenize: assistant-only labels are exactly the assistant turns (decoded), truncation is counted."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_from_disk

from alignflow.tasks.lib.base_model import resolve_base
from alignflow.tasks.lib.chat import encode_conversation
from alignflow.tasks.lib.manifest import read_manifest
from alignflow.tasks.lib.models import load_tokenizer
from alignflow.tasks.tokenize import TokenizeConfig, TokenizeInputs, run

ROOT = Path(__file__).resolve().parents[1]


def test_unmasked_tokens_decode_to_the_assistant_turns_only(tmp_path: Path) -> None:
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    tok = load_tokenizer(base.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "fruits: apple"}, {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "fruits: pear"}]
    ids, labels = encode_conversation(tok, messages)
    trained = tok.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
    assert trained == "fruits: apple<|im_end|>\nfruits: pear<|im_end|>\n"
    masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
    assert "Be brief." in masked and "Name a fruit." in masked and "apple" not in masked


def test_stage_writes_datasets_and_counts_truncation(tmp_path: Path) -> None:
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    curated, synth = tmp_path / "c", tmp_path / "s"
    curated.mkdir()
    synth.mkdir()
    long_answer = " ".join(["word"] * 200)
    sft = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short answer"}]},
           {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": long_answer}]}]
    pairs = [{"prompt": [{"role": "user", "content": f"p{i}"}], "chosen": "yes", "rejected": "no"} for i in range(5)]
    pairs.append({"prompt": [{"role": "user", "content": "p"}], "chosen": long_answer, "rejected": "no"})
    (curated / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (curated / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (synth / "sft.jsonl").write_text("")
    (synth / "preference.jsonl").write_text("")
    run(TokenizeConfig(max_length=64), TokenizeInputs(base=base.path, curated=curated, synthesized=synth,
                                                      out_dir=tmp_path / "out"))
    m = read_manifest(tmp_path / "out")["metrics"]
    assert m["sft.examples"] == 2 and m["sft.truncated"] == 1 and m["sft.length_max"] == 64
    assert m["preference.pairs"] == 5 and m["preference.dropped.too_long"] == 1
    ds = load_from_disk(str(tmp_path / "out" / "sft"))
    assert set(ds.column_names) == {"input_ids", "labels"} and all(len(r) <= 64 for r in ds["input_ids"])
    assert (tmp_path / "out" / "lengths.png").stat().st_size > 1000
