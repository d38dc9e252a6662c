"""Curation and synthesis shards fan out with Prefect task mapping onto a Dask task runner (local worker
processes), and give exactly what the same work gives in one process."""

from __future__ import annotations

import json
from pathlib import Path

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import load_recipe
from alignflow.tasks import curate, synthesize
from alignflow.tasks.lib.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_curate_and_synthesize_shards_on_dask_processes_match_a_sequential_run(prefect_server: None, in_root: Path,
                                                                      tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", [
        "curate.shards=2", "synthesize.shards=3", "synthesize.instructions=6", "synthesize.preference_prompts=6",
        "scale_out.task_runner=dask", "scale_out.workers=2"])
    result = pipeline(recipe=recipe, work_dir=str(tmp_path / "w"), until="synthesize")
    curated = Path(result["stages"]["curate"]["folder"])
    assert json.loads((curated / "manifest.json").read_text())["metrics"]["shards"] == 2
    one_pass = curate.run(recipe.curate.model_copy(update={"shards": 1}), curate.CurateInputs(
        sft=recipe.data.sft, preference=recipe.data.preference, eval=recipe.data.eval, out_dir=tmp_path / "c1"))
    assert one_pass["metrics"] == {**json.loads((curated / "manifest.json").read_text())["metrics"], "shards": 1}
    for name in ("sft.jsonl", "preference.jsonl", "eval.jsonl"):
        assert (curated / name).read_text() == (tmp_path / "c1" / name).read_text()

    folder = Path(result["stages"]["synthesize"]["folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["shards"] == 3 and m["shard_processes"] == 2  # three shards over two Dask worker processes
    assert m["instructions.attempted"] == 6 and m["pairs.attempted"] == 6
    stats = [json.loads((folder / "shards" / f"{i:03d}-of-003" / "stats.json").read_text()) for i in range(3)]
    assert [s["instructions.attempted"] for s in stats] == [2, 2, 2]

    # the same shards, one after another in this process (synthesize.run), give the same records
    base = next((tmp_path / "w" / "base").rglob("config.json")).parent  # the tiny model the flow built
    inputs = synthesize.SynthesizeInputs(base=base, dtype="float32",
                                         curated=Path(result["stages"]["curate"]["folder"]),
                                         curate_cfg=recipe.curate, out_dir=tmp_path / "sequential", seed=recipe.seed)
    sequential = synthesize.run(recipe.synthesize, inputs)
    assert sequential["metrics"]["shard_processes"] == 1
    for name in ("sft.jsonl", "preference.jsonl"):
        assert list(read_jsonl(folder / name)) == list(read_jsonl(tmp_path / "sequential" / name))
    assert sum(1 for _ in read_jsonl(folder / "generations.jsonl")) == m["teacher.completions"]
