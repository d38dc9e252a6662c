"""curate: every supported shape loads into the internal schema; every defect is counted under its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignflow.tasks.curate import CurateConfig, CurateInputs, run
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.manifest import read_manifest

GOOD_PAIR = {"prompt": "Say hi", "chosen": "hi", "rejected": "no"}
GOOD_EVAL = {"prompt": "Say hi", "reference": "hi"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, sft: list[Path], pref: list[Path] | None = None, ev: list[Path] | None = None,
         **cfg: object) -> dict:
    pref = pref or [_jsonl(tmp_path / "p.jsonl", [GOOD_PAIR])]
    ev = ev or [_jsonl(tmp_path / "e.jsonl", [GOOD_EVAL])]
    return run(CurateConfig(**cfg), CurateInputs(sft=sft, preference=pref, eval=ev, out_dir=tmp_path / "out"))


def test_formats_normalise_to_one_schema(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2"}]},
        {"conversations": [{"from": "human", "value": "q3"}, {"from": "gpt", "value": "a3"}]},
        {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        {"instruction": "Count", "input": "", "output": "3"},
        {"prompt": "q4", "response": "a4"},
        {"prompt": "q5", "completion": "a5"},
    ]
    (tmp_path / "arr.json").write_text(json.dumps([{"prompt": "q6", "response": "a6"}]))
    (tmp_path / "t.csv").write_text("prompt,response\nq7,a7\n")
    manifest = _run(tmp_path, [_jsonl(tmp_path / "s.jsonl", rows), tmp_path / "arr.json", tmp_path / "t.csv"])
    kept = list(read_jsonl(tmp_path / "out" / "sft.jsonl"))
    assert manifest["metrics"]["sft.records_in"] == 8 and manifest["metrics"]["sft.records_kept"] == 8
    assert kept[0]["messages"][0] == {"role": "system", "content": "be brief"} and len(kept[0]["messages"]) == 5
    assert kept[1]["messages"] == [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]
    assert kept[2]["messages"][0]["content"] == "Translate\n\nbonjour"  # alpaca input folded into the prompt
    assert kept[3]["messages"][0]["content"] == "Count"
    assert [r["messages"][-1]["content"] for r in kept[4:]] == ["a4", "a5", "a6", "a7"]


def test_every_defect_is_counted_under_its_reason(tmp_path: Path) -> None:
    sft = tmp_path / "s.jsonl"
    good = {"prompt": "q", "response": "a"}
    lines = [json.dumps(good), json.dumps(good),  # duplicate
             json.dumps({"prompt": "Q ", "response": "a"}).replace("Q ", "q"),  # duplicate after normalisation
             '{"prompt": "broken',  # bad_json
             json.dumps({"foo": 1}),  # wrong_schema
             json.dumps(["not", "a", "dict"]),  # wrong_schema
             json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "q"}]}),  # no_assistant_turn
             json.dumps({"prompt": "long", "response": "x" * 500}),  # too_long
             ]
    sft.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe", "response": "a"}\n')
    pref = _jsonl(tmp_path / "p.jsonl", [GOOD_PAIR, {"prompt": "p", "chosen": "same", "rejected": "same"},
                                         {"prompt": "p", "chosen": "only one side"},
                                         {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}],
                                          "rejected": [{"role": "assistant", "content": "r"}]}])
    m = _run(tmp_path, [sft], [pref], max_chars=300, max_drop_fraction=1.0)["metrics"]
    assert m["sft.records_in"] == 13 and m["sft.records_kept"] == 1
    expected = {"duplicate": 2, "bad_json": 1, "wrong_schema": 2, "bad_role": 1, "empty_content": 1,
                "non_string_content": 1, "no_user_turn": 1, "no_assistant_turn": 1, "too_long": 1, "invalid_utf8": 1}
    assert {k.removeprefix("sft.dropped."): v for k, v in m.items() if k.startswith("sft.dropped.")} == expected
    assert m["preference.records_kept"] == 2
    assert m["preference.dropped.chosen_equals_rejected"] == 1 and m["preference.dropped.missing_side"] == 1
    rejects = list(read_jsonl(tmp_path / "out" / "rejects.jsonl"))
    assert {r["reason"] for r in rejects} >= set(expected)
    assert read_manifest(tmp_path / "out")["outputs"]["sft.jsonl"]  # hashed output


def test_too_many_drops_fail_the_stage_with_a_clear_message(tmp_path: Path) -> None:
    sft = _jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "a"}, "{bad", "{bad", "{bad"])
    with pytest.raises(StageError, match=r"sft lost 3 of 4 records \(bad_json: 3\).*max_drop_fraction=0.5"):
        _run(tmp_path, [sft])


def test_a_failure_points_at_rejects_that_exist_and_leaves_no_half_written_data(tmp_path: Path) -> None:
    """The message names rejects.jsonl: it must be there (written before the stage stops), holding the drops that
    stopped it; the sft.jsonl written up to the failure is not left behind."""
    import re

    sft = _jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "a"}, "{bad", "{bad", "{bad"])
    with pytest.raises(StageError) as e:
        _run(tmp_path, [sft])
    named = Path(re.search(r"See (\S+rejects\.jsonl)", str(e.value)).group(1))
    assert named == tmp_path / "out" / "rejects.jsonl" and named.is_file()
    assert [r["reason"] for r in read_jsonl(named)] == ["bad_json"] * 3
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    """Spreadsheets save CSV with a UTF-8 byte-order mark: the first column is still `prompt`, so every record is
    kept (read as plain utf-8 the header was `\ufeffprompt` and every record went as wrong_schema). JSON Lines and
    JSON arrays with one read the same."""
    bom = "\ufeff"
    (tmp_path / "t.csv").write_text(bom + "prompt,response\nq1,a1\nq2,a2\nq3,a3\n", encoding="utf-8")
    (tmp_path / "t.jsonl").write_text(bom + json.dumps({"prompt": "q4", "response": "a4"}) + "\n", encoding="utf-8")
    (tmp_path / "t.json").write_text(bom + json.dumps([{"prompt": "q5", "response": "a5"}]), encoding="utf-8")
    pref = tmp_path / "p.csv"
    pref.write_text(bom + "prompt,chosen,rejected\nSay hi,hi,no\n", encoding="utf-8")
    m = _run(tmp_path, [tmp_path / "t.csv", tmp_path / "t.jsonl", tmp_path / "t.json"], [pref])["metrics"]
    assert m["sft.records_in"] == 5 and m["sft.records_kept"] == 5
    assert m["preference.records_kept"] == 1
    kept = [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "out" / "sft.jsonl")]
    assert kept == ["q1", "q2", "q3", "q4", "q5"]


def test_a_csv_header_that_matches_no_shape_names_the_columns_expected_and_found(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("\ufeffquestion,answer\nq1,a1\n", encoding="utf-8")
    with pytest.raises(StageError) as e:
        _run(tmp_path, [bad])
    message = str(e.value)
    assert "t.csv" in message and "['question', 'answer']" in message  # found (without the mark)
    assert "instruction, output" in message and "prompt, response" in message  # expected


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"\x00\x01\x02binary", "not a text data file")])
def test_a_file_that_is_not_data_is_an_error_naming_it(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(StageError, match=f"bad.jsonl.*{message}|{message}"):
        _run(tmp_path, [bad])


def test_pii_never_reaches_any_output(tmp_path: Path) -> None:
    secrets = ["ana.lima@example.com", "+1 415-555-0134", "10.20.30.40", "4111 1111 1111 1111",
               "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx12", "ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghij"]
    rows = [{"prompt": f"Contact {secrets[0]} or {secrets[1]}", "response": f"Server {secrets[2]}, card {secrets[3]}"},
            {"prompt": f"My key is {secrets[4]}", "response": f"Token {secrets[5]} noted. Order 1234 5678 9012 3456."},
            json.dumps({"prompt": f"broken {secrets[0]}"})[:-2]]  # a reject that carries PII
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"mail {secrets[0]}", "chosen": "ok", "rejected": secrets[1]}])
    m = _run(tmp_path, [_jsonl(tmp_path / "s.jsonl", rows)], [pref], max_drop_fraction=1.0)["metrics"]
    assert m["sft.pii.email"] == 1 and m["sft.pii.phone"] == 1 and m["sft.pii.ip_address"] == 1
    assert m["sft.pii.credit_card"] == 1 and m["sft.pii.secret"] == 2 and m["preference.pii.email"] == 1
    written = "".join(p.read_text() for p in (tmp_path / "out").iterdir() if p.suffix in (".jsonl", ".md", ".json"))
    for secret in secrets:
        assert secret not in written
    assert "1234 5678 9012 3456" in written  # not Luhn-valid: an order number, kept
    assert "<EMAIL>" in written and "<CREDIT_CARD>" in written and "<SECRET>" in written


def test_parquet_datasets_folder_and_hh_rlhf(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    table = pa.Table.from_pylist([{"instruction": "Add", "input": "1+1", "output": "2"}])
    pq.write_table(table, tmp_path / "a.parquet")
    Dataset.from_list([{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]).save_to_disk(
        tmp_path / "saved")
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A pear.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No."},
          {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: other\n\nAssistant: C"}]
    m = _run(tmp_path, [tmp_path / "a.parquet", tmp_path / "saved"], [_jsonl(tmp_path / "hh.jsonl", hh)],
             max_drop_fraction=1.0)["metrics"]
    assert m["sft.records_kept"] == 3
    assert m["preference.records_kept"] == 1 and m["preference.dropped.prompt_mismatch"] == 1
    pair = next(read_jsonl(tmp_path / "out" / "preference.jsonl"))
    assert pair["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "Name a fruit."}]
    assert (pair["chosen"], pair["rejected"]) == ("A pear.", "No.")


def test_near_duplicates_and_quality_filters(tmp_path: Path) -> None:
    base = "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"
    rows = [{"prompt": "Describe the scene.", "response": base},
            {"prompt": "Describe the scene.", "response": base + " again"},  # near-duplicate
            {"prompt": "Loop", "response": " ".join(["buy now cheap"] * 20)},  # repetitive
            {"prompt": "Junk", "response": "ok" + "\x07" * 20},  # non-printable
            {"prompt": "Fine", "response": "A different, perfectly good answer about cats and their habits."}]
    m = _run(tmp_path, [_jsonl(tmp_path / "s.jsonl", rows)], max_drop_fraction=1.0)["metrics"]
    assert m["sft.dropped.near_duplicate"] == 1 and m["sft.dropped.repetitive"] == 1
    assert m["sft.dropped.junk_characters"] == 1 and m["sft.records_kept"] == 2


def test_synthetic_records_pass_the_same_checks(tmp_path: Path) -> None:
    from alignflow.tasks.records.checks import filter_synthetic

    seed_answer = "The quick brown fox jumps over the lazy dog near the quiet river bank at dawn today"
    _run(tmp_path, [_jsonl(tmp_path / "s.jsonl", [{"prompt": "Describe the scene.", "response": seed_answer}])],
         ev=[_jsonl(tmp_path / "e.jsonl", [{"prompt": "What is the capital city of the small country of Moldova today?",
                                           "reference": "Chisinau is the capital city of Moldova"}])])
    synthetic = [
        {"messages": [{"role": "user", "content": "Describe the scene."},
                      {"role": "assistant", "content": seed_answer + " again"}], "source": "synthetic"},  # near-copy
        {"messages": [{"role": "user", "content": "What is the capital city of the small country of Moldova today?"},
                      {"role": "assistant", "content": "Chisinau is the capital city of Moldova"}]},  # eval leak
        {"messages": [{"role": "user", "content": "Mail me"}, {"role": "assistant", "content": "at bo@example.org"}],
         "source": "synthetic"},
        {"messages": [{"role": "user", "content": "Loop"}, {"role": "assistant", "content": "ha " * 40}]},
    ]
    kept, dropped = filter_synthetic("sft", synthetic, CurateConfig(), tmp_path / "out")
    assert dropped == {"near_duplicate": 1, "contaminated": 1, "repetitive": 1}
    assert kept == [{"messages": [{"role": "user", "content": "Mail me"},
                                  {"role": "assistant", "content": "at <EMAIL>"}], "source": "synthetic"}]


def test_semantic_dedup_drops_paraphrases_that_minhash_misses(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What is the capital city of France?", "response": "The capital of France is Paris."},
        {"prompt": "Which city is France's capital?", "response": "Paris is the capital of France."},
        {"prompt": "Write a haiku about autumn leaves.", "response": "Red leaves drift and fall, quiet paths of gold."},
        {"prompt": "How many legs does a spider have?", "response": "A spider has eight legs."},
    ]
    sft = [_jsonl(tmp_path / "s.jsonl", rows)]
    m = _run(tmp_path, sft)["metrics"]  # off by default; MinHash alone sees no near-duplicate here
    assert m["sft.records_kept"] == 4 and "sft.dropped.near_duplicate" not in m
    m = _run(tmp_path, sft, dedup={"semantic": {"enabled": True, "threshold": 0.9}})["metrics"]
    assert m["sft.dropped.semantic_duplicate"] == 1 and m["sft.records_kept"] == 3
    kept = [r["messages"][0]["content"] for r in read_jsonl(tmp_path / "out" / "sft.jsonl")]
    assert "Which city is France's capital?" not in kept and "How many legs does a spider have?" in kept
    rejects = list(read_jsonl(tmp_path / "out" / "rejects.jsonl"))
    assert any(r["reason"] == "semantic_duplicate" and "France" in r["record"] for r in rejects)


def test_shards_give_the_same_result_as_one_pass(tmp_path: Path) -> None:
    rows = [{"prompt": f"Tell me fact number {i % 40} about the planet {i % 40 + 1}?",
             "response": f"Fact {i % 40} is known."} for i in range(60)]
    rows += ["{not json", {"prompt": "", "response": "x"}, {"prompt": "Mail me", "response": "at a@b.com"}]
    sft = [_jsonl(tmp_path / "s.jsonl", rows)]
    (tmp_path / "one").mkdir()
    (tmp_path / "three").mkdir()
    one = _run(tmp_path / "one", sft, max_drop_fraction=1.0)
    three = _run(tmp_path / "three", sft, max_drop_fraction=1.0, shards=3)
    assert three["metrics"]["shards"] == 3
    assert one["metrics"] == {**three["metrics"], "shards": 1}
    assert one["metrics"]["sft.dropped.duplicate"] > 0 and one["metrics"]["sft.pii.email"] == 1
    for name in ("sft.jsonl", "preference.jsonl", "eval.jsonl", "rejects.jsonl"):
        assert (tmp_path / "one" / "out" / name).read_text() == (tmp_path / "three" / "out" / name).read_text()
    assert not (tmp_path / "three" / "out" / "shards").exists()  # intermediates removed after the merge


def test_curate_config_repeats_the_record_checks() -> None:
    """CurateConfig repeats RecordChecks' fields (to keep the recipe section's field order): they must agree, and a
    CurateConfig must validate into a RecordChecks with its values (synthesize's `curate_cfg` takes one)."""
    from alignflow.tasks.records.checks import RecordChecks
    from alignflow.tasks.synthesize import SynthesizeInputs

    for name, field in RecordChecks.model_fields.items():
        mirror = CurateConfig.model_fields[name]
        assert (mirror.annotation, mirror.default, mirror.description, mirror.metadata) == \
            (field.annotation, field.default, field.description, field.metadata), name
    assert list(CurateConfig.model_fields) == ["dedup", "quality", "decontaminate", "pii", "max_chars",
                                               "max_drop_fraction", "reject_samples", "shards"]
    cfg = CurateConfig(max_chars=99, reject_samples=1, shards=4, dedup={"exact": False})
    inputs = SynthesizeInputs(base=Path("b"), dtype="float32", curated=Path("c"), curate_cfg=cfg, out_dir=Path("o"),
                              seed=0)
    assert inputs.curate_cfg == RecordChecks(max_chars=99, reject_samples=1, dedup={"exact": False})
