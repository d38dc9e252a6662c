"""Every training option trains on the smoke recipe (tiny model): LoRA variants, QLoRA NF4 / FP4, 8-bit,
target modules, gradient checkpointing + accumulation, packing, schedules, DPO loss variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignflow.recipe import load_recipe
from flows.pipeline import pipeline
from tasks.common import read_manifest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "lora-plain": (["quantize.bits=null"], "sft"),
    "qlora-fp4": (["quantize.bits=4", "quantize.quant_type=fp4", "quantize.double_quant=false"], "sft"),
    "int8": (["quantize.bits=8"], "sft"),
    "dora": (["quantize.bits=null", "sft.lora.use_dora=true"], "sft"),
    "rslora-qv": (["sft.lora.use_rslora=true", "sft.lora.target_modules=[q_proj,v_proj]"], "sft"),
    "checkpointing-accum": (["sft.gradient_checkpointing=true", "sft.grad_accum=2"], "sft"),
    "packing-cosine": (["tokenize.packing=true", "sft.scheduler=cosine", "sft.warmup_ratio=0.2"], "sft"),
    "dpo-ipo": (["dpo.loss=ipo"], "dpo"),
    "dpo-hinge": (["dpo.loss=hinge", "dpo.beta=0.5"], "dpo"),
    "llm-judge": (["evaluate.judge=true"], "evaluate"),
}


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("options")  # one work dir: curate/synthesize/tokenize are cached across cases


@pytest.mark.parametrize("case", list(CASES))
def test_option_trains(case: str, prefect_server: None, in_root: Path, shared_work: Path) -> None:
    overrides, until = CASES[case]
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", overrides)
    result = pipeline(recipe=recipe, work_dir=str(shared_work), until=until)
    sft = read_manifest(Path(result["stages"]["sft"]["folder"]))
    assert sft["metrics"]["global_step"] == recipe.sft.max_steps
    assert sft["metrics"]["train_loss"] > 0
    adapter = json.loads((Path(result["stages"]["sft"]["folder"]) / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] == recipe.sft.lora.use_dora and adapter["use_rslora"] == recipe.sft.lora.use_rslora
    if case == "rslora-qv":
        assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert sft["quantized"] == (recipe.quantize.bits is not None)
    if until == "evaluate":
        assert 0.0 <= read_manifest(Path(result["stages"]["evaluate"]["folder"]))["metrics"][
            "judge_win_rate_vs_base"] <= 1.0
    if until == "dpo":
        dpo = read_manifest(Path(result["stages"]["dpo"]["folder"]))
        assert dpo["metrics"]["global_step"] == recipe.dpo.max_steps
        assert dpo["config"]["loss"] == recipe.dpo.loss


def test_reference_logprobs_are_computed_once_and_reused_by_a_run_with_another_beta(
        prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    work = tmp_path / "w"
    first = load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.precompute_ref_log_probs=true"])
    second = load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.precompute_ref_log_probs=true", "dpo.beta=0.3"])
    for recipe, reused in ((first, False), (second, True)):
        result = pipeline(recipe=recipe, work_dir=str(work), until="dpo")
        folder = Path(result["stages"]["dpo"]["folder"])
        dpo = read_manifest(folder)
        assert dpo["metrics"]["global_step"] == recipe.dpo.max_steps
        assert dpo["ref_logprobs_cached"] is reused  # computed by the first run, loaded by the second
        # before the first update the policy is the reference: with the right reference log-probs attached to
        # the right pairs, the implicit rewards of the first step are zero, up to float noise (other padding
        # in the precompute batches, 4-bit kernels); a pair given another pair's values is off by whole nats
        first_step = json.loads((folder / "log_history.json").read_text())[0]
        for side in ("chosen", "rejected"):
            assert abs(first_step[f"rewards/{side}"]) / recipe.dpo.beta < 0.05  # nats
        client = MlflowClient(result["tracking_uri"])
        runs = client.search_runs([result["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{result['parent_run_id']}' and "
                                  "attributes.run_name = 'dpo'")
        assert runs[0].data.tags["alignflow.ref_logprobs_cached"] == str(reused).lower()
    assert len(list((work / "cache" / "ref_logps").glob("ref-logps-*.pt"))) == 1
