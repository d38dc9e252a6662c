"""dpo: direct preference optimisation with TRL's DPOTrainer, continuing the SFT adapter.

The policy is base + the SFT adapter (trainable). No second model copy is loaded for the reference: TRL
freezes a copy of the SFT adapter under the name `ref` and swaps to it for reference log-probs, so the
reference is the SFT policy itself (standard DPO) at the cost of one extra adapter (a few MB), not a model.
Loss variants are TRL's (`sigmoid`, `ipo`, `hinge`, `robust`, ...). Output: `adapter/` (the tuned adapter
only, without the frozen reference copy) + tokenizer, the reward-margin curves, the log history.

With `precompute_ref_log_probs`, TRL computes the reference log-probs of every pair once, before training
(the training steps then skip the reference forward pass), and caches them beside the tokenized data under
a key of (prepared-data fingerprint, hash of the reference weights). Measured here: that fingerprint changes
with the DPOConfig (beta, output dir), so a run with another beta does NOT reuse them; `ref_logprobs_cached`
in the manifest (tag `alignflow.ref_logprobs_cached`) says whether a run did.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import (
    last_complete_checkpoint,
    plot_curves,
    read_manifest,
    seed_everything,
    trainer_summary,
    write_manifest,
)
from tasks.launch import LaunchSpec, distributed, launched


class DpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="KL strength: higher stays closer to the SFT model")
    # TRL 1.16 DPOTrainer losses (SimPO and ORPO live in other, reference-free trainers under trl.experimental)
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                  "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm"] = "sigmoid"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")
    lr: float = Field(5e-5, gt=0)
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    batch_size: int = Field(4, gt=0, description="pairs per step")
    grad_accum: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    optim: str = Field("adamw_torch", description="Trainer optimizer, e.g. adamw_torch, paged_adamw_8bit (CUDA)")
    save_steps: int = Field(50, gt=0)
    precompute_ref_log_probs: bool = Field(False, description="compute reference log-probs once and cache them")


class DpoInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    quantized: Path
    sft: Path
    out_dir: Path
    seed: int
    report_to: list[str] = ["none"]
    launch: LaunchSpec = LaunchSpec()  # >1 process: this run() re-runs itself under `accelerate launch`


def run(cfg: DpoConfig, inputs: DpoInputs) -> dict[str, Any]:
    import trl
    from datasets import load_from_disk
    from peft import PeftModel, prepare_model_for_kbit_training

    from tasks.modeling import (
        check_optimizer,
        load_causal_lm,
        load_tokenizer,
        peak_memory_bytes,
        train_precision,
    )

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if inputs.launch.num_processes > 1 and not launched():
        return distributed("tasks.dpo", inputs.launch, cfg, inputs, out)
    seed_everything(inputs.seed)
    check_optimizer(cfg.optim)
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    quant = json.loads((inputs.quantized / "quantization.json").read_text())
    base = load_causal_lm(inputs.base, inputs.dtype, quant or None)
    if quant:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model = PeftModel.from_pretrained(base, inputs.sft / "adapter", is_trainable=True)
    pairs = load_from_disk(str(inputs.tokenized / "preference"))

    args = trl.DPOConfig(
        output_dir=str(out / "checkpoints"),
        run_name="dpo",
        beta=cfg.beta,
        loss_type=[cfg.loss],
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=cfg.optim,
        seed=inputs.seed,
        data_seed=inputs.seed,
        max_length=read_manifest(inputs.tokenized)["max_length"],
        precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        report_to=inputs.report_to,
        **train_precision(inputs.dtype),
    )
    started = time.time()
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, processing_class=tok)
    ref_cached = cfg.precompute_ref_log_probs and _ref_logprobs_reused(trainer.train_dataset, started)
    resume = last_complete_checkpoint(out / "checkpoints")  # after a crash: resume, same data order and LR
    result = trainer.train(resume_from_checkpoint=resume)
    if trainer.is_world_process_zero():  # the trained adapter only, not TRL's frozen "ref" copy
        trainer.model.save_pretrained(out / "adapter", selected_adapters=["default"])
    else:  # launched processes: the main one writes everything
        return {}
    tok.save_pretrained(out / "adapter")
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    plot_curves(out / "rewards.png", history, ["loss", "rewards/margins", "rewards/accuracies"], "dpo")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    last = trainer_summary(history)
    metrics = {
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "train_loss": round(float(result.training_loss), 5),
        "final_loss": last.get("loss", float("nan")),
        "reward_margin": last.get("rewards/margins", float("nan")),
        "reward_accuracy": last.get("rewards/accuracies", float("nan")),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
    }
    return write_manifest(out, {
        "stage": "dpo",
        "resumed_from": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "ref_logprobs_cached": ref_cached,
        "outputs": ["adapter", "rewards.png", "log_history.json"],
        "artifacts": ["rewards.png", "log_history.json"],
        "metrics": metrics,
    })


def _ref_logprobs_reused(dataset: Any, started: float) -> bool:
    """True when the reference log-probs TRL attached came from a cache file written before this stage began."""
    from datasets import Dataset

    for entry in dataset.cache_files:
        path = Path(entry["filename"])
        if "ref_chosen_logps" in Dataset.from_file(str(path)).column_names:
            return path.stat().st_mtime < started
    return False
