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


def _tokenize(tmp_path: Path, pairs: list[dict], rated: list[dict], fraction: float = 0.15,
              policy_pairs: bool = True, trained_before: Path | None = None) -> dict:
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    curated, synth = tmp_path / "c", tmp_path / "s"
    curated.mkdir()
    synth.mkdir()
    sft = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    for folder, name, rows in ((curated, "sft.jsonl", sft), (curated, "preference.jsonl", pairs),
                               (curated, "unpaired.jsonl", rated), (synth, "sft.jsonl", []),
                               (synth, "preference.jsonl", [])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run(TokenizeConfig(max_length=128), TokenizeInputs(base=base.path, curated=curated, synthesized=synth,
                                                             out_dir=tmp_path / "out", heldout_fraction=fraction,
                                                             policy_pairs=policy_pairs, trained_before=trained_before))


def test_pairs_alone_write_empty_unpaired_folders_that_load(tmp_path: Path) -> None:
    """datasets 5.2 saved zero rows as a folder with no shard, and load_from_disk of it raised IndexError: dpo.loss
    kto on pairs alone crashed there."""
    pairs = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": "yes", "rejected": "no"}
             for i in range(30)]
    m = _tokenize(tmp_path, pairs, [])["metrics"]
    assert m["preference.unpaired"] == m["preference.unpaired_heldout"] == 0
    for name in ("unpaired", "unpaired_heldout"):
        rows = load_from_disk(str(tmp_path / "out" / name))
        assert len(rows) == 0 and rows.column_names == ["prompt", "completion", "label"]


def test_thumbs_alone_hold_out_enough_pairs_for_the_judge(tmp_path: Path) -> None:
    """Thumbs alone: each prompt rated both ways makes a pair. Six pairs at eval_fraction 0.15 leave (here) none
    held out by hash, which stopped tokenize; the prompts with the lowest hashes are held out until 2 pairs are, 4
    stay to train, and the prompts' ratings go to the same side as their pairs."""
    from alignflow.tasks.lib.pairs import judge_side, prompt_key

    def position(p: list[dict]) -> float:  # where the held-out split places a prompt
        return int(prompt_key(p)[:8], 16) / 0x1_0000_0000

    candidates = [[{"role": "user", "content": f"Rate the shed colour number {i}."}] for i in range(40)]
    # six prompts the plain split (eval_fraction 0.15) does not hold out: the case that used to stop; the four
    # that stay for training are two on each side of the judge / policy split (each side's minimum)
    eligible = sorted((p for p in candidates if position(p) >= 0.15), key=position)
    rest = eligible[2:]
    prompts = eligible[:2] + [p for p in rest if judge_side(p)][:2] + [p for p in rest if not judge_side(p)][:2]
    rated = [{"prompt": p, "completion": answer, "label": label} for p in prompts
             for answer, label in (("red", True), ("I would rather not say.", False))]
    lone = [{"prompt": [{"role": "user", "content": "A prompt rated only once."}], "completion": "blue", "label": True}]
    m = _tokenize(tmp_path, [], rated + lone)["metrics"]
    assert m["preference.pairs_from_unpaired"] == 6
    assert (m["preference.pairs"], m["preference.heldout_pairs"], m["preference.heldout_prompts_added"]) == (4, 2, 2)
    held = {json.dumps(p) for p in load_from_disk(str(tmp_path / "out" / "preference_heldout"))["prompt"]}
    lowest = {json.dumps(p) for p in eligible[:2]}
    assert held == lowest  # the split a larger eval_fraction would make
    rated_held = {json.dumps(p) for p in load_from_disk(str(tmp_path / "out" / "unpaired_heldout"))["prompt"]}
    assert rated_held & held == held and m["preference.unpaired"] + m["preference.unpaired_heldout"] == 13


def test_too_few_pairs_for_the_judge_say_how_many_prompts_were_rated_both_ways(tmp_path: Path) -> None:
    import pytest

    from alignflow.tasks.lib.errors import StageError

    rated = [{"prompt": [{"role": "user", "content": f"p{i}"}], "completion": c, "label": up}
             for i in range(3) for c, up in (("good", True), ("bad", False))]
    with pytest.raises(StageError, match=r"needs at least 4 to train on and 2 held out.*\(3 prompt\(s\) here\)"):
        _tokenize(tmp_path, [], rated)


def _variant_pairs(n_prompts: int) -> tuple[list[dict], list[str]]:
    """Three pairs per prompt, each with another spelling of it: as written, with a trailing newline and doubled
    spaces, and upper-cased. curate's exact dedup compares such texts as one."""
    pairs, canonical = [], []
    for i in range(n_prompts):
        text = f"How do I reset my password on device {i}?"
        canonical.append(text.lower())
        for j, variant in enumerate((text, text.replace(" ", "  ") + "\n", text.upper())):
            pairs.append({"prompt": [{"role": "user", "content": variant}], "chosen": f"Open settings {i}.{j}",
                          "rejected": f"No idea {i}.{j}"})
    return pairs, canonical


def test_spelling_variants_of_a_prompt_land_on_one_side_of_both_splits(tmp_path: Path) -> None:
    """The held-out split and the judge / policy split are keyed on the normalised prompt: no prompt, in any case or
    white space spelling, is both held out and trained on, nor learned by both the judge and the policy. Keyed on
    the raw messages (as before), 3 spellings of each of 16 prompts scatter over both sides of each split."""
    from datasets import Dataset

    from alignflow.tasks.lib import pairs as pair_split

    pairs, _ = _variant_pairs(16)
    manifest = _tokenize(tmp_path, pairs, [], fraction=0.3)

    def prompts(rows: Dataset) -> set[str]:
        return {" ".join(r[0]["content"].lower().split()) for r in rows["prompt"]}

    train = load_from_disk(str(tmp_path / "out" / "preference"))
    held = load_from_disk(str(tmp_path / "out" / "preference_heldout"))
    assert len(train) + len(held) == 48 and len(train) % 3 == 0 and len(held) % 3 == 0  # whole prompts only
    assert prompts(train) and prompts(held) and not prompts(train) & prompts(held)
    judge, policy = pair_split.select(train, "judge", "disjoint"), pair_split.select(train, "policy", "disjoint")
    assert len(judge) % 3 == 0 and len(policy) % 3 == 0 and not prompts(judge) & prompts(policy)
    m = manifest["metrics"]
    assert (m["preference.judge_pairs"], m["preference.policy_pairs"]) == (len(judge), len(policy))
    assert "white space" in manifest["split_key"]
    # the hashes keep their meaning: sha256 of [prompt as written, chosen, rejected]
    assert manifest["heldout_pair_hashes"] == pair_split.hashes(held)
    # the prompts online RL samples from: one per prompt, none a spelling of a held-out one
    sampled = load_from_disk(str(tmp_path / "out" / "prompts"))
    assert not prompts(sampled) & prompts(held)
    assert len([p for p in sampled["prompt"] if "device" in p[0]["content"].lower()]) == len(prompts(train))


def test_too_few_pairs_on_a_side_of_the_judge_policy_split_stop_tokenize(tmp_path: Path) -> None:
    """Tokenize's own minimum (4 to train, 2 held out) passed data that left 1 pair on one side of the judge /
    policy split; reward or dpo then refused after sft (and reward) had trained. Now tokenize refuses first, naming
    the counts; with a loss that reads no pairs only the judge's side counts."""
    import pytest

    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.pairs import judge_side, prompt_key

    candidates = [[{"role": "user", "content": f"Name a colour, case {i}."}] for i in range(200)]
    kept = [p for p in candidates if int(prompt_key(p)[:8], 16) / 0x1_0000_0000 >= 0.5]  # trained at fraction 0.5
    held = [p for p in candidates if int(prompt_key(p)[:8], 16) / 0x1_0000_0000 < 0.5][:2]
    judge, policy = [p for p in kept if judge_side(p)], [p for p in kept if not judge_side(p)]

    def data(prompts: list[list[dict]]) -> list[dict]:
        return [{"prompt": p, "chosen": "Blue.", "rejected": "I cannot say."} for p in prompts + held]

    (tmp_path / "a").mkdir()
    with pytest.raises(StageError, match=r"4 training preference pairs.* into 3 for the judge and 1 for the policy; "
                                         r"1 on the policy's side .* fewer than 2.*Add preference pairs"):
        _tokenize(tmp_path / "a", data(judge[:3] + policy[:1]), [], fraction=0.5)
    (tmp_path / "b").mkdir()
    with pytest.raises(StageError, match=r"1 on the judge's side \(reward trains on it\)"):
        _tokenize(tmp_path / "b", data(judge[:1] + policy[:3]), [], fraction=0.5, policy_pairs=False)
    (tmp_path / "c").mkdir()  # grpo / rloo / kto: the policy's side may be short; the judge's has its two
    m = _tokenize(tmp_path / "c", data(judge[:3] + policy[:1]), [], fraction=0.5, policy_pairs=False)["metrics"]
    assert (m["preference.judge_pairs"], m["preference.policy_pairs"], m["preference.heldout_pairs"]) == (3, 1, 2)
    (tmp_path / "d").mkdir()
    m = _tokenize(tmp_path / "d", data(judge[:2] + policy[:2]), [], fraction=0.5)["metrics"]
    assert (m["preference.judge_pairs"], m["preference.policy_pairs"]) == (2, 2)


def test_a_prompt_the_lineage_trained_on_is_never_held_out(tmp_path: Path) -> None:
    """A retrain continues weights whose judge and policy learned pairs (the champion's lineage, flows/lineage.py):
    none of those prompts may be held out to measure the judge on, neither by its hash (here eval_fraction went up
    from the ancestors' 0.15 to 0.5) nor when the split holds out more prompts to reach 2 pairs. The old split
    ignored the lineage and held both out."""
    from alignflow.tasks.lib.pairs import pair_hash, prompt_key

    def position(p: list[dict]) -> float:
        return int(prompt_key(p)[:8], 16) / 0x1_0000_0000

    candidates = sorted(([{"role": "user", "content": f"Pick a tile colour, case {i}."}] for i in range(60)),
                        key=position)
    pairs = [{"prompt": p, "chosen": "Blue.", "rejected": "I cannot say."} for p in candidates]
    lineage = tmp_path / "lineage"
    lineage.mkdir()
    trained = [pairs[0], pairs[5]]  # the lowest hashes: held out at any fraction, were it not for the lineage
    (lineage / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trained))
    (lineage / "unpaired.jsonl").write_text("")
    sides = {"judge": [pair_hash(trained[0])], "policy": [pair_hash(trained[1])]}
    (lineage / "pairs.json").write_text(json.dumps(sides))

    for case, data, fraction in (("fraction", pairs, 0.5), ("added", pairs[:12], 0.001)):
        (tmp_path / case).mkdir()
        manifest = _tokenize(tmp_path / case, data, [], fraction=fraction, trained_before=lineage)
        held = load_from_disk(str(tmp_path / case / "out" / "preference_heldout"))
        train = load_from_disk(str(tmp_path / case / "out" / "preference"))
        held_prompts = {json.dumps(p) for p in held["prompt"]}
        assert len(held) >= 2 and not held_prompts & {json.dumps(r["prompt"]) for r in trained}, case
        assert {json.dumps(r["prompt"]) for r in trained} <= {json.dumps(p) for p in train["prompt"]}, case
        assert not set(manifest["heldout_pair_hashes"]) & {pair_hash(r) for r in trained}, case
        if case == "added":  # the next-lowest prompts the lineage did not train on were held out instead
            assert held_prompts == {json.dumps(p["prompt"]) for p in data[1:3]}
        else:
            assert manifest["metrics"]["preference.heldout_trained_before"] == 2
    # what the lineage reads: each training pair with its hash (held-out ones are not there)
    records = [json.loads(line) for line in (tmp_path / "fraction" / "out" / "records" / "preference.jsonl")
               .read_text().splitlines()]
    train = load_from_disk(str(tmp_path / "fraction" / "out" / "preference"))
    assert sorted(h for r in records for h in r["pairs"]) == sorted(pair_hash(r) for r in train)
