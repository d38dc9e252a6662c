"""reward: a reward model from preference pairs with TRL's RewardTrainer (scalar head + LoRA).

The base model gets a one-output sequence-classification head; LoRA (task SEQ_CLS, which also trains the
head) learns to score chosen answers above rejected ones. The base is held as the quantize stage says (QLoRA
when `quantize.bits` is set), and pairs are at most `tokenize.max_length` tokens, as for sft and dpo.
It trains on its side of tokenize's training pairs (`reward.pairs`, tasks/lib/pairs.py): by default the judge
half, split by prompt from the policy half dpo trains on, so the judge never learns the pairs the policy learns;
the manifest lists the pairs it trained on (`trained_pair_hashes`).
tokenize's held-out pairs (which neither this stage nor dpo trains on) measure it: pairwise accuracy
(`heldout_accuracy`, chosen scored higher) and the mean margin (chosen - rejected score); the manifest lists
those pairs' hashes. The evaluate stage uses this model as the judge of tuned vs base answers, and the gate
trusts it only when `heldout_accuracy` reaches `register.gate.min_judge_accuracy`.

`keep: best` evaluates pairwise accuracy on those held-out pairs every `eval_steps` (RewardTrainer's
`eval_accuracy`) and hands on the checkpoint where it was highest (the first such, on ties);
`early_stopping_patience` stops after that many evaluations without a higher one. The manifest's `kept_step` /
`kept_by` record the choice (`last` under keep: last) and loss.png marks it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib import pairs as pair_split
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.launch import LaunchSpec, distributed, launched
from alignflow.tasks.lib.lora import LoraSpec
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.progress import progress_callback
from alignflow.tasks.lib.step_metrics import tracking_callback
from alignflow.tasks.lib.training import (
    Keep,
    add_step_metrics,
    keep_arguments,
    keep_callbacks,
    kept,
    plot_curves,
    run_loss,
    save_trained,
    seed_everything,
    train_resuming,
    trainer_summary,
)


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora: LoraSpec = LoraSpec(r=8, alpha=16)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(8, gt=0, description="pairs per step")
    grad_accum: int = Field(1, gt=0)
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="pairs held out for accuracy / margin")
    optim: str = Field("adamw_torch", description="Trainer optimizer, e.g. adamw_torch, paged_adamw_8bit (CUDA)")
    save_steps: int = Field(50, gt=0)
    # disjoint: the judge trains on its half of the training prompts, dpo on the other (tasks/lib/pairs.py);
    # shared: both on all of them, and evaluate tags the judge alignflow.judge_independent=false
    pairs: pair_split.PairsMode = Field("disjoint", description="training pairs of the judge vs the policy: "
                                        "disjoint (split by prompt) or shared (both train on all)")
    keep: Keep = Field("last", description="last: the weights after the last step; best: the checkpoint with the "
                       "highest pairwise accuracy on the held-out pairs")
    eval_steps: int = Field(50, ge=1, description="keep: best: evaluate and checkpoint every this many optimizer "
                            "steps (in place of save_steps)")
    early_stopping_patience: int | None = Field(None, ge=1, description="keep: best: stop after this many "
                                                "evaluations without a higher held-out accuracy")


class RewardInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    quantized: Path | None = None  # quantization.json: the base is held as sft and dpo hold it (QLoRA)
    out_dir: Path
    seed: int
    report_to: list[str] = ["none"]
    launch: LaunchSpec = LaunchSpec()  # >1 process: this run() re-runs itself under `accelerate launch`


def run(cfg: RewardConfig, inputs: RewardInputs) -> dict[str, Any]:
    import trl
    from datasets import load_from_disk
    from peft import prepare_model_for_kbit_training

    from alignflow.tasks.lib.inference import score_answers
    from alignflow.tasks.lib.memory import check_training_memory
    from alignflow.tasks.lib.models import load_reward_model, load_tokenizer
    from alignflow.tasks.lib.training import check_optimizer, peak_memory_bytes, train_precision

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if inputs.launch.num_processes > 1 and not launched():
        return distributed("alignflow.tasks.reward", inputs.launch, cfg, inputs, out)
    seed_everything(inputs.seed)
    check_optimizer(cfg.optim)
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    tok_manifest = read_manifest(inputs.tokenized)
    train = pair_split.select(load_from_disk(str(inputs.tokenized / "preference")), "judge", cfg.pairs)
    if len(train) < 2:
        raise StageError(f"reward: only {len(train)} training pairs on the judge's side (reward.pairs={cfg.pairs}); "
                         "add preference data")
    trained = pair_split.hashes(train)
    held = load_from_disk(str(inputs.tokenized / "preference_heldout"))  # neither reward nor dpo trains on these
    if len(held) < 2:
        raise StageError(f"reward: only {len(held)} held-out pairs; add data or raise reward.eval_fraction")
    quant = json.loads((inputs.quantized / "quantization.json").read_text()) if inputs.quantized else {}
    memory_estimate = check_training_memory(  # refuse what cannot fit before loading anything
        "reward", inputs.base, quant, dtype=inputs.dtype, method="lora", lora_r=cfg.lora.r,
        seq_len=tok_manifest["max_length"], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        gradient_checkpointing=False, pairs=True, lm_logits=False)
    model = load_reward_model(inputs.base, inputs.dtype, adapter=None, quantization=quant or None)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.pad_token_id = tok.pad_token_id

    args = trl.RewardConfig(
        output_dir=str(out / "checkpoints"),
        run_name="reward",
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=False,
        logging_steps=1,
        save_total_limit=2,  # keep: best: the best checkpoint is never rotated away
        # the held-out evaluation at the Trainer's eval batch size, as before keep: TRL averages per-batch means,
        # so another size would change the held-out figures of the same weights
        **keep_arguments(cfg.keep, cfg.eval_steps, cfg.save_steps, "eval_accuracy", greater_is_better=True),
        optim=cfg.optim,
        seed=inputs.seed,
        data_seed=inputs.seed,
        max_length=tok_manifest["max_length"],  # TRL's default is 1024; pairs were sized for this in tokenize
        report_to=["none"],  # step metrics: tracking_callback, which never blocks training
        **train_precision(inputs.dtype),
    )
    trainer = trl.RewardTrainer(model=model, args=args, train_dataset=train,
                                eval_dataset=held if cfg.keep == "best" else None, processing_class=tok,
                                peft_config=cfg.lora.peft("SEQ_CLS"),
                                callbacks=[progress_callback(), *tracking_callback(inputs.report_to, out),
                                           *keep_callbacks(cfg.early_stopping_patience)])
    if quant and not (args.bf16 or args.fp16):
        # TRL casts a quantized model's trainable weights (LoRA and the score head) to bf16, which only works
        # under bf16 autocast; without it the fp32 hidden states meet a bf16 head. Keep them in fp32 then.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    add_step_metrics(trainer)  # tokens/s and peak memory on every step's log
    result, resume = train_resuming(trainer, out / "checkpoints")  # after a crash: from the last checkpoint
    save_trained(trainer, out / "adapter")  # the PEFT adapter + score head; collective under FSDP / DeepSpeed

    # Held-out pairwise accuracy and margin, scored by the trained model exactly as evaluate will score. Every
    # rank scores all held-out pairs (a few dozen to hundreds): under FSDP / ZeRO-3 each forward pass gathers
    # parameters from all ranks, so a forward on the main process alone would wait for the others forever.
    prompts = list(held["prompt"])
    chosen = score_answers(trainer.model, tok, prompts, [c[-1]["content"] for c in held["chosen"]])
    rejected = score_answers(trainer.model, tok, prompts, [r[-1]["content"] for r in held["rejected"]])
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    if not trainer.is_world_process_zero():  # launched processes: the main one writes the rest
        return {}
    tok.save_pretrained(out / "adapter")
    (out / "adapter" / "training_args.bin").unlink(missing_ok=True)  # a pickle (torch.save); the manifest has the args
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    kept_at = kept(trainer, cfg.keep)
    plot_curves(out / "loss.png", history, ["loss", "accuracy", "margin", "eval_accuracy"], "reward",
                kept_step=kept_at["kept_step"] if cfg.keep == "best" else None)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    last = trainer_summary(history)
    metrics = {
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "memory_estimate_bytes": memory_estimate,  # the preflight's estimate, beside the measured peak
        "train_loss": run_loss(history, result),  # every step's, also after a resume
        "final_loss": last.get("loss", float("nan")),
        "trained_pairs": len(train),
        "heldout_pairs": len(held),
        "heldout_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
        "heldout_margin_mean": round(sum(margins) / len(margins), 4),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
        "kept_step": kept_at["kept_step"],  # the step whose weights are the product
        **({"kept_eval_accuracy": kept_at["kept_metric"]} if cfg.keep == "best" else {}),
    }
    return write_manifest(out, {
        "stage": "reward",
        "resumed_from": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "kept_step": kept_at["kept_step"],
        "kept_by": kept_at["kept_by"],  # eval_accuracy (keep: best), or last
        "quantized": bool(quant),
        "heldout_pair_hashes": tok_manifest["heldout_pair_hashes"],  # what heldout_accuracy was measured on
        "pairs": cfg.pairs,
        "trained_pair_hashes": trained,  # the same hash as heldout_pair_hashes: the pairs this judge learned
        "trained_pairs_sha256": sha256_json(trained),  # their digest (evaluate's cache key reads it)
        "outputs": ["adapter", "loss.png", "log_history.json"],
        "artifacts": ["loss.png", "log_history.json"],
        "metrics": metrics,
    })
