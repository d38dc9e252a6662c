"""Retraining: with no new data it ends at once and registers nothing; with new records it trains on them
only, continuing the champion's adapter, evaluates against the champion and lets the gate decide. Lineage
accumulates: a second retrain knows everything the first one's champion and its ancestors trained on, and new
preference data alone does not train SFT again."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow import MlflowClient

from alignflow.flows.pipeline import pipeline
from alignflow.flows.retrain import retrain
from alignflow.recipe import load_recipe
from alignflow.tasks.lib.manifest import read_manifest

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


def test_retrain_on_nothing_new_then_on_new_data(prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    smoke = load_recipe(ROOT / "configs" / "smoke.yaml")
    first = pipeline(recipe=smoke, work_dir=str(work))
    client = MlflowClient(first["tracking_uri"])
    assert first["registered"]["alias"] == "champion"

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

    # --- six more: the second retrain knows what v2 *and* v1 trained on (v2's own curated data is NEW only) ----
    more = _jsonl(tmp_path / "more.jsonl", MORE)
    again = load_recipe(ROOT / "configs" / "smoke.yaml", [f"data.sft=[data/sft.jsonl, {extra}, {more}]",
                                                          "register.gate.min_win_rate_vs_champion=null"])
    second = retrain(recipe=again, work_dir=str(work))
    assert second["counts"]["sft.new"] == len(MORE), second["counts"]
    parent = client.get_run(second["parent_run_id"])
    assert parent.data.tags["alignflow.retrain.sft.new"] == "6" and parent.data.tags["alignflow.retrain_of"] == "2"
    assert read_manifest(Path(second["stages"]["tokenize"]["folder"]))["metrics"]["sft.examples"] == len(MORE)
    lineage = {d.dataset.name: d for d in parent.inputs.dataset_inputs
               if any(t.value == "lineage" for t in d.tags)}
    assert set(lineage) == {"lineage-sft", "lineage-preference", "lineage-unpaired"}
    assert second["registered"]["version"] == "3" and second["registered"]["alias"] == "champion"
    v3 = client.get_model_version("smoke-assistant", "3").tags
    assert int(v3["alignflow.lineage.sft_records"]) == int(v1["alignflow.lineage.sft_records"]) + 12
    assert lineage["lineage-sft"].dataset.digest == v3["alignflow.lineage.sft_sha256"][:32]
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
    champion_weights = read_manifest(Path(second["stages"]["dpo"]["folder"]))["outputs"]["adapter"]
    assert sft["outputs"]["adapter"] == champion_weights  # the champion's weights, handed on as they are
