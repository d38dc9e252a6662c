"""Training on several processes through `accelerate launch`: the command line for each strategy, and real
two-process DDP runs of sft, reward and dpo on CPU (gloo) that log into the stages' MLflow child runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import load_recipe
from alignflow.tasks.lib.launch import LaunchSpec, command

ROOT = Path(__file__).resolve().parents[1]
SFT = "alignflow.tasks.sft"


def test_launch_command_for_each_strategy(tmp_path: Path) -> None:
    cfg, inputs = tmp_path / "c.json", tmp_path / "i.json"
    tail = ["--main_process_port", "29555", "--module",
            "alignflow.tasks.lib.launch", SFT, str(cfg), str(inputs)]

    ddp = command(LaunchSpec(num_processes=4, mixed_precision="bf16"), SFT, cfg, inputs, 29555)
    assert ddp[1:3] == ["-m", "accelerate.commands.launch"] and ddp[-len(tail):] == tail
    assert ddp[3:ddp.index("--main_process_port")] == [
        "--num_processes", "4", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--multi_gpu"]
    fsdp = command(LaunchSpec(num_processes=8, strategy="fsdp"), SFT, cfg, inputs, 29555)
    assert "--use_fsdp" in fsdp and fsdp[fsdp.index("--fsdp_sharding_strategy") + 1] == "FULL_SHARD"
    assert "--multi_gpu" not in fsdp
    ds = command(LaunchSpec(num_processes=2, strategy="deepspeed", zero_stage=3), SFT, cfg, inputs, 29555)
    assert ds[ds.index("--use_deepspeed") + 1 : ds.index("--use_deepspeed") + 3] == ["--zero_stage", "3"]
    own = command(LaunchSpec(num_processes=2, config_file=tmp_path / "acc.yaml"), SFT, cfg, inputs, 29555)
    assert own[3:7] == ["--config_file", str(tmp_path / "acc.yaml"), "--num_processes", "2"]
    assert "--multi_gpu" not in own and "--mixed_precision" not in own
    cpu = command(LaunchSpec(num_processes=2, cpu=True), SFT, cfg, inputs, 29555)
    assert "--multi_gpu" in cpu and "--cpu" not in cpu  # torchrun-style processes over gloo


def test_a_strategy_the_cpu_launch_cannot_honour_is_refused(tmp_path: Path) -> None:
    """accelerate shards parameters only across GPUs: FSDP / DeepSpeed on CPU would silently train DDP."""
    from alignflow.recipe import RecipeError

    for strategy in ("fsdp", "deepspeed"):
        with pytest.raises(RecipeError, match=f"launch.strategy '{strategy}' cannot run with launch.cpu"):
            load_recipe(ROOT / "configs" / "smoke.yaml", ["launch.num_processes=2", "launch.cpu=true",
                                                          f"launch.strategy={strategy}"])
    fsdp = command(LaunchSpec(num_processes=2, strategy="fsdp"), SFT, tmp_path / "c", tmp_path / "i", 29555)
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp  # on GPUs the flags are passed, never dropped


def test_sft_on_two_processes_through_accelerate(prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", [
        "launch.num_processes=2", "launch.cpu=true", "quantize.bits=null", "sft.max_steps=4", "sft.batch_size=4",
        "reward.max_steps=2", "dpo.max_steps=2"])
    result = pipeline(recipe=recipe, work_dir=str(tmp_path / "w"), until="dpo")
    folder = Path(result["stages"]["sft"]["folder"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["processes"] == 2 and manifest["metrics"]["global_step"] == 4
    assert manifest["launch"] == {"num_processes": 2, "strategy": "ddp", "cpu": True}
    assert (folder / "adapter" / "adapter_config.json").exists() and (folder / "loss.png").exists()
    assert "--num_processes 2" in (folder / "launch" / "command.txt").read_text()
    # rank 0's Trainer callback logged its steps into the stage's child run, not into a run of its own
    client = MlflowClient(result["tracking_uri"])
    runs = client.search_runs([result["experiment_id"]])
    sft_run = next(r for r in runs if r.info.run_name == "sft")
    assert len(client.get_metric_history(sft_run.info.run_id, "loss")) == 4
    assert len(runs) == 1 + 7  # parent + seven stages up to dpo: no stray runs from the launched processes
    for stage in ("reward", "dpo"):  # the other two training stages went through accelerate as well
        stage_manifest = json.loads((Path(result["stages"][stage]["folder"]) / "manifest.json").read_text())
        assert stage_manifest["launch"]["num_processes"] == 2 and stage_manifest["metrics"]["global_step"] == 2
