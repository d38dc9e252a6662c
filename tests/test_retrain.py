"""Retraining: with no new data it ends at once and registers nothing; with new records it trains on them
only, continuing the champion's adapter, evaluates against the champion and lets the gate decide. Lineage
accumulates: a second retrain knows everything the first one's champion and its ancestors trained on, and new
preference data alone does not train SFT again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from alignflow.flows import lineage
from alignflow.flows.pipeline import pipeline
from alignflow.flows.retrain import retrain
from alignflow.recipe import load_recipe
from alignflow.tasks.lib.manifest import read_manifest
from alignflow.tasks.lib.pairs import pair_hash

ROOT = Path(__file__).resolve().parents[1]
NEW = [
    {"prompt": "Name the planet closest to the sun, in one word.", "response": "Mercury"},
    {"prompt": "Which gas do plants take in for photosynthesis?", "response": "carbon dioxide"},
    {"prompt": "Give the chemical symbol for gold.", "response": "Au"},
    {"prompt": "How many legs does a spider have? Answer with a digit.", "response": "8"},
    {"prompt": "What is the capital city of Canada?", "response": "Ottawa"},
    {"prompt": "Which metal is liquid at room temperature?", "response": "mercury"},
]
MORE = [
    {"prompt": "Give the chemical symbol for sodium.", "response": "Na"},
    {"prompt": "How many sides does a hexagon have? Answer with a digit.", "response": "6"},
    {"prompt": "Name the largest ocean on Earth, in one word.", "response": "Pacific"},
    {"prompt": "Which planet is known as the red planet?", "response": "Mars"},
    {"prompt": "What is the boiling point of water at sea level, in Celsius?", "response": "100"},
    {"prompt": "Name the author of the play Hamlet.", "response": "William Shakespeare"},
]
PAIRS = [{"prompt": f"Reply with the colour of ripe banana number {i}, one word.", "chosen": "yellow",
          "rejected": f"Bananas are a fruit, and banana {i} is a banana like the others."} for i in range(6)]


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stage(result: dict, name: str) -> dict:
    return read_manifest(Path(result["stages"][name]["folder"]))


def _lineage_holds(client: MlflowClient, result: dict, version: str, parent: Path | None, tmp: Path) -> Path:
    """Version `version` (registered by `result`) lists exactly the pairs its judges and policies and those of its
    ancestors (`parent`: the lineage it continued) trained on, synthesized ones included, and no pair held out."""
    tags = client.get_model_version("smoke-assistant", version).tags
    folder = lineage.download(client, tags["alignflow.parent_run_id"], tmp / f"lineage-v{version}")
    assert folder is not None
    judge, policy = (set(_stage(result, s)["trained_pair_hashes"]) for s in ("reward", "dpo"))
    held = set(_stage(result, "tokenize")["heldout_pair_hashes"])
    before = json.loads((parent / "pairs.json").read_text()) if parent else {"judge": [], "policy": []}
    assert json.loads((folder / "pairs.json").read_text()) == {"judge": sorted(set(before["judge"]) | judge),
                                                               "policy": sorted(set(before["policy"]) | policy)}
    pairs = [pair_hash(json.loads(line)) for line in (folder / "preference.jsonl").read_text().splitlines()]
    # the smoke data has no rated completions: every pair trained on is a record of preference.jsonl
    assert len(pairs) == len(set(pairs)) and set(pairs) == judge | policy | set(before["judge"] + before["policy"])
    assert not held & set(pairs), "a held-out pair (which no stage trained on) is in the lineage"
    synthesized = {pair_hash(json.loads(line)) for line in
                   (Path(result["stages"]["synthesize"]["folder"]) / "preference.jsonl").read_text().splitlines()}
    assert synthesized & (judge | policy) <= set(pairs)  # the sampled pairs reward and dpo trained on
    return folder


def test_retrain_on_nothing_new_then_on_new_data(smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path) -> None:
    from conftest import warm_copy  # tests/ is on sys.path under pytest

    # the session's smoke seed (tests/conftest.py) trained the stages: v1 is registered in this work dir's store
    work = warm_copy(smoke_seed, tmp_path / "w")
    smoke = load_recipe(ROOT / "configs" / "smoke.yaml")
    first = pipeline(recipe=smoke, work_dir=str(work))
    assert {s for s, info in first["stages"].items() if not info["cached"]} == {"register"}
    client = MlflowClient(first["tracking_uri"])
    assert first["registered"]["alias"] == "champion"
    v1_lineage = _lineage_holds(client, first, "1", None, tmp_path)
    synthesized = (Path(first["stages"]["synthesize"]["folder"]) / "preference.jsonl").read_text().splitlines()
    assert synthesized and {pair_hash(json.loads(p)) for p in synthesized} & {  # (so the check above checks)
        pair_hash(json.loads(p)) for p in (v1_lineage / "preference.jsonl").read_text().splitlines()}

    started = time.perf_counter()
    nothing = retrain(recipe=smoke, work_dir=str(work))
    assert nothing["new_data"] is False and nothing["champion_version"] == "1"
    assert nothing["counts"]["sft.new"] == 0 and nothing["counts"]["sft.already_used"] > 0
    assert time.perf_counter() - started < 60
    assert len(client.search_model_versions("name='smoke-assistant'")) == 1  # nothing registered

    extra = _jsonl(tmp_path / "new.jsonl", NEW)
    # the champion check off: a tiny random model is not measurably better than another one, and this test is
    # about the retrain path, so the gate must promote and the aliases must move
    grown = load_recipe(ROOT / "configs" / "smoke.yaml", [f"data.sft=[data/sft.jsonl, {extra}]",
                                                          "register.gate.min_win_rate_vs_champion=null"])
    result = retrain(recipe=grown, work_dir=str(work))
    assert result["new_data"] is True and result["counts"]["sft.new"] == len(NEW)
    sft = read_manifest(Path(result["stages"]["sft"]["folder"]))
    assert sft["init_adapter"] and "smoke-assistant-v1" in sft["init_adapter"]  # continued the champion
    tokenized = read_manifest(Path(result["stages"]["tokenize"]["folder"]))
    assert tokenized["metrics"]["sft.examples"] == len(NEW)  # trained on the new records only
    assert "win_rate_vs_champion" in result["metrics"]  # measured against the champion
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["alignflow.retrain_of"] == "1"
    assert result["registered"]["version"] == "2" and result["registered"]["alias"] == "champion"
    assert str(client.get_model_version_by_alias("smoke-assistant", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("smoke-assistant", "previous-champion").version) == "1"
    v1, v2 = (client.get_model_version("smoke-assistant", v).tags for v in ("1", "2"))
    assert int(v2["alignflow.lineage.sft_records"]) == int(v1["alignflow.lineage.sft_records"]) + len(NEW)
    v2_lineage = _lineage_holds(client, result, "2", v1_lineage, tmp_path)
    # the held-out pairs the judge is measured on: none that v1's judge or policy learned; and this judge learned
    # none of the pairs v1's policy (which v2's weights continue) learned
    v1_sides = json.loads((v1_lineage / "pairs.json").read_text())
    assert not set(_stage(result, "tokenize")["heldout_pair_hashes"]) & set(v1_sides["judge"] + v1_sides["policy"])
    assert _stage(result, "evaluate")["judge_independent"] is True

    # --- six more: the second retrain knows what v2 *and* v1 trained on (v2's own curated data is NEW only) ----
    more = _jsonl(tmp_path / "more.jsonl", MORE)
    again = load_recipe(ROOT / "configs" / "smoke.yaml", [f"data.sft=[data/sft.jsonl, {extra}, {more}]",
                                                          "register.gate.min_win_rate_vs_champion=null"])
    second = retrain(recipe=again, work_dir=str(work))
    assert second["counts"]["sft.new"] == len(MORE), second["counts"]
    parent = client.get_run(second["parent_run_id"])
    assert parent.data.tags["alignflow.retrain.sft.new"] == "6" and parent.data.tags["alignflow.retrain_of"] == "2"
    assert read_manifest(Path(second["stages"]["tokenize"]["folder"]))["metrics"]["sft.examples"] == len(MORE)
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs if any(t.value == "lineage" for t in d.tags)}
    assert set(inputs) == {"lineage-sft", "lineage-preference", "lineage-unpaired"}
    assert second["registered"]["version"] == "3" and second["registered"]["alias"] == "champion"
    v3 = client.get_model_version("smoke-assistant", "3").tags
    assert int(v3["alignflow.lineage.sft_records"]) == int(v1["alignflow.lineage.sft_records"]) + 12
    assert inputs["lineage-sft"].dataset.digest == v3["alignflow.lineage.sft_sha256"][:32]
    # the judge and the policy learned disjoint halves of the training pairs (reward.pairs: disjoint)
    judge = read_manifest(Path(second["stages"]["reward"]["folder"]))["trained_pair_hashes"]
    policy = read_manifest(Path(second["stages"]["dpo"]["folder"]))["trained_pair_hashes"]
    assert judge and policy and not set(judge) & set(policy)

    # --- new preference pairs only: sft trains nothing (the champion learned every SFT record) ----------------
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    prefs = load_recipe(ROOT / "configs" / "smoke.yaml", [f"data.sft=[data/sft.jsonl, {extra}, {more}]",
                                                          f"data.preference=[data/pairs.jsonl, {pairs}]",
                                                          "register.gate.min_win_rate_vs_champion=null"])
    third = retrain(recipe=prefs, work_dir=str(work))
    assert third["counts"]["sft.new"] == 0 and third["counts"]["preference.new"] == len(PAIRS), third["counts"]
    sft = read_manifest(Path(third["stages"]["sft"]["folder"]))
    assert sft["trained"] is False and sft["metrics"]["global_step"] == 0
    assert "smoke-assistant-v3" in sft["init_adapter"]
    # handed on untrained: v4's lineage holds v3's SFT records and no SFT record of this run (its synthesized
    # ones included), and the new pairs its judge and policy trained on
    v3_lineage = lineage.download(client, v3["alignflow.parent_run_id"], tmp_path / "lineage-v3")
    assert v3_lineage is not None
    v4 = third["registered"]["version"]
    v4_lineage = _lineage_holds(client, third, v4, v3_lineage, tmp_path)
    assert (v4_lineage / "sft.jsonl").read_text() == (v3_lineage / "sft.jsonl").read_text()
    assert _lineage_holds(client, second, "3", v2_lineage, tmp_path) is not None
    champion_weights = read_manifest(Path(second["stages"]["dpo"]["folder"]))["outputs"]["adapter"]
    assert sft["outputs"]["adapter"] == champion_weights  # the champion's weights, handed on as they are


def test_lineage_is_what_the_training_stages_read_and_never_a_held_out_pair(tmp_path: Path) -> None:
    """The lineage (flows/lineage.py) from a real tokenize folder: the SFT records behind its rows, synthesized ones
    included, and the pairs reward and dpo list as trained on, added to the ancestors'; never a held-out pair
    (which no stage trained on), though `seen/` keeps it, so a retrain does not take it for new data. It was
    built from curate's folder: held-out pairs in, synthesized records out."""
    from datasets import load_from_disk

    from alignflow.tasks.lib import pairs as pair_split
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.records.checks import RecordChecks, new_records
    from alignflow.tasks.tokenize import TokenizeConfig, TokenizeInputs
    from alignflow.tasks.tokenize import run as tokenize

    def chat(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def user(q: str) -> list[dict]:
        return [{"role": "user", "content": q}]

    curated, synth, ancestors = tmp_path / "c", tmp_path / "s", tmp_path / "a"
    sft = [chat(r["prompt"], r["response"]) for r in NEW]
    pairs = [{"prompt": user(f"Pick a shed colour, case {i}."), "chosen": "Green.", "rejected": "No."}
             for i in range(24)]
    rated = [{"prompt": user("Rate this haiku."), "completion": "Lovely.", "label": True},
             {"prompt": user("Rate this haiku."), "completion": "It is a haiku.", "label": False},
             {"prompt": user("Rate this limerick."), "completion": "Funny.", "label": True}]  # no pair: kto only
    made = [chat("Teacher-written: name a prime.", "7")]
    made_pair = [{"prompt": user("Sampled: name a colour."), "chosen": "Red.", "rejected": "Hmm.",
                  "source": "synthetic"}]
    old_sft = [chat("Old question?", "Old answer.")]
    old_pair = {"prompt": user("Old pair?"), "chosen": "Y", "rejected": "N"}
    old_heldout = {"prompt": user("Old held-out pair?"), "chosen": "Y", "rejected": "N"}
    for folder, rows in ((curated, {"sft": sft, "preference": pairs, "unpaired": rated, "eval": []}),
                         (synth, {"sft": made, "preference": made_pair}),
                         (ancestors, {"sft": old_sft, "preference": [old_pair], "unpaired": [], "eval": []}),
                         (ancestors / "seen", {"sft": old_sft, "preference": [old_pair, old_heldout], "unpaired": [],
                                               "eval": []})):
        folder.mkdir()
        for name, data in rows.items():
            _jsonl(folder / f"{name}.jsonl", data)
    (ancestors / "pairs.json").write_text(json.dumps({"judge": ["j0"], "policy": [pair_split.pair_hash(old_pair)]}))
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    tok = tmp_path / "t"
    manifest = tokenize(TokenizeConfig(max_length=128), TokenizeInputs(
        base=base.path, curated=curated, synthesized=synth, out_dir=tok, heldout_fraction=0.3))
    train = load_from_disk(str(tok / "preference"))
    judge = pair_split.hashes(pair_split.select(train, "judge", "disjoint"))  # as reward and dpo take them
    policy = pair_split.hashes(pair_split.select(train, "policy", "disjoint"))
    held = set(manifest["heldout_pair_hashes"])
    assert held and judge and policy
    stages = ({"trained": True}, {"trained_pair_hashes": judge}, {"trained_pair_hashes": policy, "pairs": "disjoint"})
    folder = lineage.union(ancestors, curated, lineage.trained(tok, *stages, kto=False), tmp_path / "lineage")

    def rows(name: str, where: Path = folder) -> list[dict]:
        return [json.loads(line) for line in (where / name).read_text().splitlines()]

    assert rows("sft.jsonl") == old_sft + sft + made  # the synthesized record was trained on
    lineage_pairs = {pair_split.pair_hash(p) for p in rows("preference.jsonl")}
    from_thumbs = {pair_split.pair_hash({"prompt": user("Rate this haiku."), "chosen": "Lovely.",
                                         "rejected": "It is a haiku."})}
    assert lineage_pairs | from_thumbs == {pair_split.pair_hash(old_pair), *judge, *policy}
    assert not lineage_pairs & held  # no stage trained on a held-out pair
    assert (pair_split.pair_hash(made_pair[0]) in lineage_pairs) == (pair_split.pair_hash(made_pair[0]) not in held)
    # the two rated completions that made a trained pair are in it; the lone one (no kto here) is not
    assert rows("unpaired.jsonl") == (rated[:2] if from_thumbs & {*judge, *policy} else [])
    assert json.loads((folder / "pairs.json").read_text()) == {"judge": sorted({"j0", *judge}),
                                                               "policy": sorted({pair_split.pair_hash(old_pair),
                                                                                 *policy})}
    # seen: every pair at hand, held out or not; so a retrain finds none of them new
    assert {pair_split.pair_hash(p) for p in rows("preference.jsonl", folder / "seen")} >= held | lineage_pairs | {
        pair_split.pair_hash(old_heldout)}
    fresh, _ = new_records("preference", [curated / "preference.jsonl"], RecordChecks(), lineage.seen_folder(folder))
    assert fresh == []

    # sft handed the weights on untrained (a retrain with no new SFT record): no SFT record of this run; kto trained
    # on the policy's side of the rated completions
    handed = lineage.union(ancestors, curated, lineage.trained(tok, {"trained": False}, *stages[1:], kto=True),
                           tmp_path / "lineage")
    assert rows("sft.jsonl", handed) == old_sft
    # sft.keep: best trained on every SFT row but the held-out ones, which it measured its loss on
    measured = manifest["sft_heldout_rows"]
    assert measured
    best = lineage.union(ancestors, curated, lineage.trained(tok, {"trained": True, "kept_by": "eval_loss"},
                                                             *stages[1:], kto=False), tmp_path / "lineage")
    assert rows("sft.jsonl", best) == old_sft + [r for i, r in enumerate(sft + made) if i not in measured]
    lone_held = pair_split.prompt_key(rated[2]["prompt"]) in {pair_split.prompt_key(p) for p in load_from_disk(
        str(tok / "unpaired_heldout"))["prompt"]}
    lone_trained = pair_split.on_side(rated[2]["prompt"], "policy", "disjoint") and not lone_held
    assert (rated[2] in rows("unpaired.jsonl", handed)) == lone_trained

    # an ancestor logged before pairs.json: its sides are unknown, and so are those of every lineage continuing it
    # (this run's hashes alone would read as the whole history's, and a judge look independent that is not)
    (ancestors / "pairs.json").unlink()
    old = lineage.union(ancestors, curated, lineage.trained(tok, *stages, kto=False), tmp_path / "lineage")
    assert lineage.sides(old) is None and json.loads((old / "pairs.json").read_text())["unknown"] is True
    later = lineage.union(old, curated, lineage.trained(tok, *stages, kto=False), tmp_path / "lineage")
    assert lineage.sides(later) is None


def test_a_judge_that_learned_an_ancestors_policy_pairs_is_not_independent() -> None:
    """A retrain's policy continues the champion's weights: its judge must not have learned a pair any ancestor's
    policy learned (nor its policy one an ancestor's judge learned), as the lineage's pairs.json lists them. Only
    this run's two manifests were compared, which called such a judge independent."""
    from alignflow.tasks.evaluate import judge_independence

    reward, dpo = {"trained_pair_hashes": ["j1", "j2"]}, {"trained_pair_hashes": ["p1"]}
    assert judge_independence(reward, dpo) == (True, "")
    assert judge_independence(reward, dpo, {"judge": ["j0", "j1"], "policy": ["p0"]}) == (True, "")
    dependent, why = judge_independence(reward, dpo, {"judge": ["j0"], "policy": ["p0", "j2"]})
    assert dependent is False and "1 preference pairs that an ancestor's policy trained on" in why
    dependent, why = judge_independence(reward, dpo, {"judge": ["p1"], "policy": []})
    assert dependent is False and "an ancestor's judge" in why
    assert judge_independence(reward, dpo, None)[0] is False  # a lineage that does not say: not independent


def test_a_retrain_from_the_base_trains_on_every_curated_sft_record_and_no_synthesized_one(tmp_path: Path) -> None:
    """retrain.start_from: base takes the old SFT records from the lineage's `seen/` (a row sft.keep: best held out
    included: the trained list leaves it out, and it would be lost for good) without what synthesize wrote (this
    run's synthesize writes its own; fed back through curate it would count as the user's data)."""
    from alignflow.flows.retrain import base_sft

    curated = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A."}]}
               for i in range(3)]
    made = {"messages": [{"role": "user", "content": "Teacher Q?"}, {"role": "assistant", "content": "A."}],
            "source": "synthetic"}
    (tmp_path / "seen").mkdir()
    _jsonl(tmp_path / "seen" / "sft.jsonl", [curated[0], made, curated[1], curated[2]])
    _jsonl(tmp_path / "sft.jsonl", [curated[0], made, curated[2]])  # trained: curated[1] was held out
    assert base_sft(tmp_path / "seen") == curated
