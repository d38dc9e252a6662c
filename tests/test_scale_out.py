"""Curation and synthesis shards fan out with Prefect task mapping onto a Dask task runner (local worker
processes), and give exactly what the same work gives in one process; a Ctrl-C as the shards' subflow ends
stops the stage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import load_recipe
from alignflow.tasks import curate, synthesize
from alignflow.tasks.lib.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_curate_and_synthesize_shards_on_dask_processes_match_a_sequential_run(prefect_server: None, in_root: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", [
        "curate.shards=2", "synthesize.shards=3", "synthesize.instructions=6", "synthesize.preference_prompts=6",
        "scale_out.task_runner=dask", "scale_out.workers=2"])
    threads = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    for name in threads:  # unset (tests/conftest.py sets OMP_NUM_THREADS=1, Dask's own value, in xdist workers)
        monkeypatch.delenv(name, raising=False)
    environment = {name: os.environ.get(name) for name in threads}
    result = pipeline(recipe=recipe, work_dir=str(tmp_path / "w"), until="synthesize")
    # Dask's nannies set these (OMP_NUM_THREADS=1 ...) in the process that starts them: put back, or every process
    # started afterwards runs torch on one thread (a sweep trial's weights then differed from a run alone)
    assert {name: os.environ.get(name) for name in threads} == environment
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


def test_a_ctrl_c_that_prefect_drops_as_curates_shards_end_stops_the_stage(
        prefect_server: None, in_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Curate's shards run as a subflow. Prefect 3.8 drops a KeyboardInterrupt raised after a subflow's function
    returned (flows/interrupts.py; here from its completion hook, every time): the stage must stop all the same,
    not go on to merging and then to hours of training."""
    from alignflow.flows import pipeline as pipeline_module
    from alignflow.recipe import load_recipe
    from alignflow.tasks import curate

    def ctrl_c(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(pipeline_module, "curate_shards", pipeline_module.curate_shards.with_options(
        on_completion=[ctrl_c]))  # the fan-out's own with_options(task_runner=...) keeps the hook
    recipe = load_recipe(in_root / "configs" / "smoke.yaml", ["curate.shards=2"])
    inputs = curate.CurateInputs(sft=recipe.data.sft, preference=recipe.data.preference, eval=recipe.data.eval,
                                 out_dir=tmp_path / "curated")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline_module.curate_fanned_out(recipe.scale_out, recipe.curate, inputs)
    finally:
        signal.signal(signal.SIGINT, before)
    assert list((tmp_path / "curated" / "shards").iterdir()), "the shards ran"
    assert not (tmp_path / "curated" / "manifest.json").exists()  # the merge did not
