"""The smoke recipe end to end on the real stack: nine child runs with metrics, a registered version with an
alias, cache re-use across runs, selective invalidation, and --until."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import STAGES, Recipe, load_recipe
from alignflow.tasks.lib.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _children(client: MlflowClient, result: dict) -> dict:
    runs = client.search_runs([result["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    return {r.info.run_name: r for r in runs}


@pytest.fixture()
def smoke(in_root: Path) -> Recipe:
    return load_recipe(ROOT / "configs" / "smoke.yaml")


def test_smoke_pipeline_end_to_end_then_cached(prefect_server: None, smoke: Recipe, tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = pipeline(recipe=smoke, work_dir=str(work))
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")

    # --- one parent run with lineage tags, nine finished child runs with metrics -------------------------
    parent = client.get_run(first["parent_run_id"])
    for tag in ("alignflow.recipe_hash", "alignflow.git_sha", "alignflow.prefect_flow_run_id",
                "alignflow.data_hash.sft", "alignflow.data_hash.preference", "alignflow.data_hash.eval"):
        assert parent.data.tags.get(tag), tag
    assert parent.info.status == "FINISHED"
    assert "recipe.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = _children(client, first)
    assert sorted(children) == sorted(STAGES)
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["alignflow.cached"] == "false", name
        assert run.data.metrics, f"{name} logged no metrics"
        assert "manifest.json" in [a.path for a in client.list_artifacts(run.info.run_id)], name
    assert children["curate"].data.metrics["sft.dropped.duplicate"] == 4  # the planted defects
    assert children["curate"].data.metrics["sft.dropped.bad_json"] == 1
    assert children["sft"].data.params["sft.lora.r"] == "8"
    assert len(client.get_metric_history(children["sft"].info.run_id, "loss")) >= 3  # live step metrics
    for metric in ("learning_rate", "grad_norm", "tokens_per_s", "peak_memory_bytes"):  # one per step (6)
        history = client.get_metric_history(children["sft"].info.run_id, metric)
        assert len({h.step for h in history}) >= 6 and all(h.value > 0 for h in history), metric
    assert children["sft"].data.metrics["global_step"] == 6
    assert children["quantize"].data.metrics["memory_ratio"] < 1.0  # NF4 base is smaller
    assert "side_by_side.json" in [a.path for a in client.list_artifacts(children["evaluate"].info.run_id)]
    for metric in ("perplexity", "rougeL", "win_rate_vs_base"):
        assert metric in children["evaluate"].data.metrics
    measured = children["evaluate"].data.metrics  # what DPO added by the references: tuned - SFT only
    assert measured["exact_match_gain_vs_sft"] == pytest.approx(  # (each of the three rounded to 4 places)
        measured["exact_match"] - measured["exact_match_sft"], abs=2e-4)
    assert measured["exact_match_gain_vs_sft_ci_low"] <= measured["exact_match_gain_vs_sft"] \
        <= measured["exact_match_gain_vs_sft_ci_high"]

    # --- a registered version with an alias and lineage tags ----------------------------------------------
    version = client.get_model_version_by_alias("smoke-assistant", "champion")
    assert str(version.version) == "1" and first["registered"]["alias"] == "champion"
    assert version.tags["alignflow.parent_run_id"] == first["parent_run_id"]
    assert version.tags["alignflow.base_model"] == "tiny:llama"

    # --- an unchanged re-run is served from cache, and says so in MLflow ----------------------------------
    second = pipeline(recipe=smoke, work_dir=str(work))
    # (register is a side effect: it acts on the registry in every run, and finds the same version)
    assert all(info["cached"] != (stage == "register") for stage, info in second["stages"].items())
    again = _children(client, second)
    assert sorted(again) == sorted(STAGES)
    for name, run in again.items():
        assert run.data.tags["alignflow.cached"] == ("false" if name == "register" else "true"), name
        if name != "register":
            assert run.data.tags["alignflow.cached_from"] == children[name].info.run_id
    assert len(client.search_model_versions("name='smoke-assistant'")) == 1  # no new version

    # --- changing dpo.beta re-runs dpo, evaluate and register only -----------------------------------------
    changed = smoke.model_copy(update={"dpo": smoke.dpo.model_copy(update={"beta": 0.3})})
    third = pipeline(recipe=changed, work_dir=str(work))
    assert {s for s, info in third["stages"].items() if not info["cached"]} == {"dpo", "evaluate", "register"}

    # --- a deleted stage folder is recomputed even though Prefect still holds its cache record --------------
    shutil.rmtree(Path(third["stages"]["evaluate"]["folder"]))
    fourth = pipeline(recipe=changed, work_dir=str(work))
    assert {s for s, info in fourth["stages"].items() if not info["cached"]} == {"evaluate", "register"}


def test_until_stops_after_the_named_stage(prefect_server: None, smoke: Recipe, tmp_path: Path) -> None:
    result = pipeline(recipe=smoke, work_dir=str(tmp_path / "w"), until="tokenize")
    assert list(result["stages"]) == ["curate", "synthesize", "tokenize"]
    assert "registered" not in result
    # each work dir keeps its own store, even after other runs in this process set MLflow's global URI
    assert result["tracking_uri"] == f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}"
    # MLflow's UI opens an experiment in its GenAI mode unless it is tagged as model training
    exp = MlflowClient(result["tracking_uri"]).get_experiment(result["experiment_id"])
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_an_experiment_made_before_the_kind_tag_gets_it(in_root: Path, tmp_path: Path) -> None:
    from alignflow.flows.tracking import Tracker, tracking_uri

    work = tmp_path / "w"
    work.mkdir()
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml")
    client = MlflowClient(tracking_uri(work))
    old = client.create_experiment(recipe.name)  # as an older alignflow (or a user) made it: no kind tag
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    tracker = Tracker.start(recipe, work, {}, flow_run_id="test")
    assert tracker.experiment_id == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failing_stage_exits_nonzero_with_a_message_and_marks_runs_failed(in_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir", str(work),
         "--set", "curate.max_drop_fraction=0.0"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})  # set by earlier in-process runs
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "curate.max_drop_fraction=0.0" in proc.stderr and "Traceback" not in proc.stderr
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    statuses = {r.info.run_name.split("-")[0]: r.info.status for r in runs}
    assert statuses["curate"] == "FAILED" and statuses["smoke"] == "FAILED"
    assert not list((work / "stages" / "curate").glob("*/manifest.json"))  # nothing half-written published


def test_unreachable_tracking_server_fails_fast_with_a_clear_message(in_root: Path, tmp_path: Path) -> None:
    import time

    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "alignflow.cli", "run", "configs/smoke.yaml", "--work-dir",
                           str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 1
    assert "tracking server http://127.0.0.1:9 is unreachable" in proc.stderr.replace("\n", " ")
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 120
    assert not (tmp_path / "w" / "stages").exists()  # failed before any stage ran


def test_a_datasets_folder_runs_through_the_whole_pipeline(prefect_server: None, in_root: Path,
                                                             tmp_path: Path) -> None:
    """data.sft as a `datasets.save_to_disk` folder (it used to crash on hashing a directory). The same run ships a
    q8_0 GGUF (register.ship): the pipeline hands it to evaluate and register (tests/test_ship.py has the rest)."""
    import json

    from datasets import Dataset

    rows = []
    for line in (ROOT / "data" / "sft.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the planted malformed line
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            rows.append({"messages": record["messages"]})
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "sft_ds"))
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", [f"data.sft={tmp_path / 'sft_ds'}",
                                                           "register.ship=[{gguf: q8_0}]"])
    result = pipeline(recipe=recipe, work_dir=str(tmp_path / "w"))
    assert result["registered"]["version"] == "1"
    curated = read_manifest(Path(result["stages"]["curate"]["folder"]))["metrics"]
    assert curated["sft.records_in"] == len(rows) and curated["sft.records_kept"] > 0.9 * len(rows)

    # what ships: measured in evaluate (its MLflow run), its point value on the parent, its hash on the version
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    evaluated = client.get_run(_children(client, result)["evaluate"].info.run_id).data.metrics
    assert evaluated["shipped.gguf_q8_0.exact_match_delta_ci_low"] <= evaluated["shipped.gguf_q8_0.exact_match"] - \
        evaluated["exact_match"] <= evaluated["shipped.gguf_q8_0.exact_match_delta_ci_high"]
    assert result["metrics"]["shipped.gguf_q8_0.exact_match"] == evaluated["shipped.gguf_q8_0.exact_match"]
    shipped = read_manifest(Path(result["stages"]["evaluate"]["folder"]))["shipped"]["gguf_q8_0"]
    assert Path(shipped["path"]).is_relative_to(tmp_path / "w" / "cache" / "shipped")
    tags = client.get_model_version("smoke-assistant", "1").tags
    assert tags["alignflow.shipped.gguf_q8_0.sha256"] == shipped["sha256"]


def test_the_deployment_form_accepts_the_recipe_as_written(in_root: Path) -> None:
    """The flow's parameter schema (what the Prefect UI form and `deployment run --params` check) accepts a
    recipe exactly as the CLI does: plain strings for data paths; and the flow resolves them like the CLI."""
    import jsonschema
    import yaml
    from prefect.utilities.callables import parameter_schema

    from alignflow.recipe import resolve_recipe

    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    assert isinstance(raw["data"]["sft"], str)
    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    resolver_schema = {**schema["properties"]["recipe"], "definitions": schema.get("definitions", {}),
                       "$defs": schema.get("definitions", {})}
    jsonschema.validate(raw, resolver_schema)  # raises if a string is refused where a list is expected
    resolved = resolve_recipe(Recipe.model_validate(raw))
    assert resolved.data.sft == [str(ROOT / "data" / "sft.jsonl")]
    with pytest.raises(Exception, match=r"data.eval\[0\]: no data file found"):
        resolve_recipe(Recipe.model_validate({**raw, "data": {**raw["data"], "eval": "nope/*.jsonl"}}))


def test_until_curate_builds_no_model_and_reports_the_data(prefect_server: None, smoke: Recipe,
                                                           tmp_path: Path) -> None:
    result = pipeline(recipe=smoke, work_dir=str(tmp_path / "w"), until="curate")
    assert list(result["stages"]) == ["curate"]
    assert not (tmp_path / "w" / "base").exists()  # curate needs no model: nothing converted or built
    m = result["metrics"]
    assert m["sft.records_in"] > m["sft.records_kept"] > 0 and m["sft.dropped.duplicate"] == 4


def test_stage_summaries_link_images_that_render(tmp_path: Path) -> None:
    from alignflow.flows.pipeline import _renderable, _short

    card = "| a | b |\n\n![answer lengths](lengths.png)\n![remote](https://example.org/x.png)\n"
    served = _renderable(card, "http://127.0.0.1:5000", "r1", tmp_path)
    assert "![answer lengths](http://127.0.0.1:5000/get-artifact?path=lengths.png&run_uuid=r1)" in served
    local = _renderable(card, "sqlite:///x.db", "r1", tmp_path)
    assert "](lengths.png)" not in local and str(tmp_path / "lengths.png") in local
    assert "![remote](https://example.org/x.png)" in local  # absolute links are left alone
    row = _short({"prompt": "p" * 500, "tuned": "ok", "reward_tuned": 1.5})
    assert len(row["prompt"]) == 120 and row["prompt"].endswith("…") and row["tuned"] == "ok"
