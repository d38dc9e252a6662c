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


def test_stage_drops_what_does_not_fit_and_holds_out_pairs(tmp_path: Path) -> None:
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    curated, synth = tmp_path / "c", tmp_path / "s"
    curated.mkdir()
    synth.mkdir()
    long_text = " ".join(["word"] * 200)
    sft = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short answer"}]},
           {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": long_text}]}]
    pairs = [{"prompt": [{"role": "user", "content": f"p{i % 10}"}], "chosen": f"yes {i}", "rejected": "no"}
             for i in range(20)]  # two pairs per prompt: a prompt must not land on both sides of the split
    pairs.append({"prompt": [{"role": "user", "content": "p"}], "chosen": long_text, "rejected": "no"})
    pairs.append({"prompt": [{"role": "user", "content": long_text}], "chosen": "yes", "rejected": "no"})  # prompt
    (curated / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (curated / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (synth / "sft.jsonl").write_text("")
    (synth / "preference.jsonl").write_text("")
    run(TokenizeConfig(max_length=64), TokenizeInputs(base=base.path, curated=curated, synthesized=synth,
                                                      out_dir=tmp_path / "out", heldout_fraction=0.3))
    manifest = read_manifest(tmp_path / "out")
    m = manifest["metrics"]
    # the long SFT example is dropped whole (a cut one would end without its end-of-turn token)
    assert m["sft.examples"] == 1 and m["sft.dropped.too_long"] == 1 and m["sft.truncated"] == 1
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    for row in load_from_disk(str(tmp_path / "out" / "sft")):
        trained = tok.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
        assert trained.endswith("<|im_end|>\n")
    # a pair whose prompt alone is too long is dropped too (the prompt used to count as 2 tokens)
    assert m["preference.dropped.too_long"] == 2
    assert m["preference.pairs"] + m["preference.heldout_pairs"] == 20 and m["preference.heldout_pairs"] >= 2
    assert m["preference.length_max"] <= 64
    train = load_from_disk(str(tmp_path / "out" / "preference"))
    held = load_from_disk(str(tmp_path / "out" / "preference_heldout"))
    train_prompts = {r[0]["content"] for r in train["prompt"]}
    held_prompts = {r[0]["content"] for r in held["prompt"]}
    assert not train_prompts & held_prompts and len(held) == len(manifest["heldout_pair_hashes"])
    assert (tmp_path / "out" / "lengths.png").stat().st_size > 1000
