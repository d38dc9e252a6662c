"""The GPU path's checks that run anywhere: the memory preflight, the kernel checks, and the prepared GPU check's
dry run (`bench/gpu_check.sh --dry-run`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.memory import GiB, estimate, model_shape, preflight

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def llama8b(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "bench" / "shapes" / "llama-3-8b.json", tmp_path / "config.json")
    return tmp_path


def test_memory_estimate_of_the_llama_3_8b_shape(llama8b: Path) -> None:
    shape = model_shape(llama8b)  # no weights: counted from the config
    assert 8.0e9 < shape.params < 8.1e9 and len(shape.linear) == 32 * 7
    common = dict(dtype_bytes=2, method="lora", lora_r=16, seq_len=2048, rows=4)
    lora = estimate(shape, bits=None, gradient_checkpointing=False, **common)
    assert 14.5 * GiB < lora["weights"] < 15.5 * GiB  # 8.03e9 x 2 bytes = 14.96 GiB
    qlora = estimate(shape, bits=4, gradient_checkpointing=False, **common)
    assert qlora["weights"] < 0.4 * lora["weights"] and qlora["activations"] == lora["activations"]
    ckpt = estimate(shape, bits=None, gradient_checkpointing=True, **common)
    assert ckpt["activations"] < lora["activations"] / 5
    full = estimate(shape, bits=None, gradient_checkpointing=True, **{**common, "method": "full"})
    assert full["optimizer"] == shape.params * 16  # fp32 weights, gradients, two AdamW moments
    sharded = estimate(shape, bits=None, gradient_checkpointing=True, shards=8, **{**common, "method": "full"})
    assert sharded["optimizer"] == full["optimizer"] // 8


def test_preflight_refuses_what_cannot_fit_and_says_what_to_change(llama8b: Path) -> None:
    parts = estimate(model_shape(llama8b), dtype_bytes=2, bits=None, method="lora", lora_r=16, seq_len=2048,
                     rows=8, gradient_checkpointing=False)
    with pytest.raises(StageError) as err:
        preflight("sft", parts, 40 * GiB, "cuda:0 (test)", method="lora", bits=None, batch_size=8, grad_accum=1,
                  gradient_checkpointing=False)
    message = str(err.value)
    assert "sft: a training step needs about" in message and "40.0 GiB free" in message
    for tip in ("sft.batch_size: 4 with sft.grad_accum: 2", "sft.gradient_checkpointing: true", "quantize.bits: 4"):
        assert tip in message
    preflight("sft", parts, parts["total"] + 1, "cuda:0 (test)", method="lora", bits=None, batch_size=8,
              grad_accum=1, gradient_checkpointing=False)  # fits: no error


def test_gpu_kernels_are_refused_on_a_cpu_machine() -> None:
    import torch

    from alignflow.tasks.lib.training import check_kernels

    if torch.cuda.is_available():
        pytest.skip("a GPU machine")
    with pytest.raises(StageError, match="flash_attention_2' needs a CUDA GPU"):
        check_kernels("sft", "flash_attention_2", False)
    with pytest.raises(StageError, match=r"dpo\.use_liger_kernel needs a CUDA GPU"):
        check_kernels("dpo", "sdpa", True)
    check_kernels("sft", "sdpa", False)


def test_gpu_check_dry_run_prints_the_table(tmp_path: Path) -> None:
    """`bash bench/gpu_check.sh --dry-run`: the same code as on a GPU, on a reduced shape on the CPU."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out" / "gpu_check-dry-run.md").read_text()
    assert "dry run: CPU, reduced shape" in table
    for row in ("P5 QLoRA NF4 / LoRA bf16 peak memory", "P8 LoRA tokens/s: alignflow sft",
                "P8 LoRA tokens/s: plain TRL SFTTrainer", "P8 alignflow / plain TRL"):
        assert re.search(rf"\| {re.escape(row)} \| [0-9][0-9,.]* \|", table), (row, table)


def test_reward_model_rewards_are_refused_where_the_policy_is_sharded() -> None:
    from alignflow.recipe import RecipeError, load_recipe

    online = ["dpo.loss=grpo", "dpo.rewards=[reward_model]", "launch.num_processes=2"]
    with pytest.raises(RecipeError, match=r"reward_model cannot score under launch\.strategy 'fsdp'"):
        load_recipe(ROOT / "configs" / "smoke.yaml", [*online, "launch.strategy=fsdp"])
    assert load_recipe(ROOT / "configs" / "smoke.yaml", online).launch.strategy == "ddp"  # DDP: a full copy each
