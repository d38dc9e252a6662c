"""Retraining: with no new data it ends at once and registers nothing; with new records it trains on them
only, continuing the champion's adapter, evaluates against the champion and lets the gate decide."""

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
]


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

    extra = tmp_path / "new.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in NEW))
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
