"""sft: supervised fine-tuning with TRL's SFTTrainer: a PEFT LoRA / QLoRA / DoRA / rsLoRA adapter, or every weight.

Trains on the tokenize stage's pre-tokenized examples (labels are -100 outside assistant turns, so the loss
is on the answers only). When the quantize stage asked for 4/8-bit, the base is loaded with those
bitsandbytes settings and prepared for k-bit training (QLoRA). Checkpoints go to `checkpoints/` every
`save_steps`; a re-run of an interrupted stage resumes from the last complete one (the Trainer restores
optimizer, scheduler, RNG state and the data order). Output: `adapter/` (PEFT adapter + tokenizer), the
loss curve, and the Trainer's log history.

`keep: best` holds tokenize's held-out SFT rows (`sft_heldout_rows`) out of training, evaluates the loss on them
every `eval_steps` and hands on the checkpoint with the lowest (`load_best_model_at_end`); `early_stopping_patience`
stops after that many evaluations without a lower one. The manifest's `kept_step` / `kept_by` say which step was
kept and by what (`last` under keep: last), and loss.png marks it.

`method: full` trains every weight instead (small models: AdamW keeps ~16 bytes per parameter, so a 135M model
needs ~2 GB, a 7B one ~110 GB) and writes `model/` (complete weights + tokenizer) in place of `adapter/`.
Later stages then treat that model as the base: dpo trains a LoRA adapter over it (its reference is the same
weights with the adapter disabled, as always) and merges it in; evaluate, register and export take the full
weights as they are.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.launch import LaunchSpec, distributed, launched
from alignflow.tasks.lib.lora import LoraSpec
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.progress import progress_callback
from alignflow.tasks.lib.step_metrics import tracking_callback
from alignflow.tasks.lib.training import (
    Attention,
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


class SftConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train a PEFT adapter (QLoRA when quantize.bits is set); full: train every weight")
    lora: LoraSpec = LoraSpec()
    epochs: float = Field(1.0, gt=0, description="passes over the data (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(8, gt=0, description="examples per device per step")
    grad_accum: int = Field(1, gt=0, description="steps accumulated per optimizer step")
    gradient_checkpointing: bool = False  # saves activation memory, costs ~30% more compute; off on CPU
    attn_implementation: Attention = Field("sdpa", description="attention kernel: sdpa, flash_attention_2 "
                                           "(CUDA + flash-attn), eager")
    use_liger_kernel: bool = Field(False, description="TRL's Liger kernels (fused RMSNorm, RoPE, SwiGLU, "
                                   "cross-entropy): less memory on GPUs; needs liger-kernel (the gpu extra)")
    optim: str = Field("adamw_torch", description="Trainer optimizer, e.g. adamw_torch, paged_adamw_8bit (CUDA)")
    save_steps: int = Field(50, gt=0, description="checkpoint every this many optimizer steps (resume point)")
    logging_steps: int = Field(1, gt=0)
    keep: Keep = Field("last", description="last: the weights after the last step; best: the checkpoint with the "
                       "lowest loss on the held-out SFT rows (which it then does not train on)")
    eval_steps: int = Field(50, ge=1, description="keep: best: evaluate and checkpoint every this many optimizer "
                            "steps (in place of save_steps)")
    early_stopping_patience: int | None = Field(None, ge=1, description="keep: best: stop after this many "
                                                "evaluations without a lower held-out loss")


class SftInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    quantized: Path
    out_dir: Path
    seed: int
    init_adapter: Path | None = None  # continue from these tuned weights (retraining from the champion)
    report_to: list[str] = ["none"]
    launch: LaunchSpec = LaunchSpec()  # >1 process: this run() re-runs itself under `accelerate launch`


def run(cfg: SftConfig, inputs: SftInputs) -> dict[str, Any]:
    import trl
    from datasets import load_from_disk
    from peft import PeftModel, prepare_model_for_kbit_training

    from alignflow.tasks.lib.memory import check_training_memory
    from alignflow.tasks.lib.models import is_adapter, load_causal_lm, load_tokenizer
    from alignflow.tasks.lib.training import check_kernels, check_optimizer, peak_memory_bytes, train_precision

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not launched() and read_manifest(inputs.tokenized)["packing"] and cfg.attn_implementation == "eager":
        # (once, by the calling process) eager attention builds the block-diagonal mask over every packed row:
        # packing costs more than it saves (bench/bench_training.py --only P4 --p4-attn sdpa,eager: 0.77x padded
        # on CPU; sdpa 1.18x)
        logging.getLogger("alignflow").warning(
            "sft: tokenize.packing with attn_implementation 'eager' trains slower than padded rows "
            "(measured 0.77x on CPU); use sdpa or flash_attention_2, or set tokenize.packing: false")
    if inputs.launch.num_processes > 1 and not launched():
        return distributed("alignflow.tasks.sft", inputs.launch, cfg, inputs, out)
    seed_everything(inputs.seed)
    check_optimizer(cfg.optim)
    check_kernels("sft", cfg.attn_implementation, cfg.use_liger_kernel)
    tok_manifest = read_manifest(inputs.tokenized)
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    quant = json.loads((inputs.quantized / "quantization.json").read_text())
    if cfg.method == "full" and quant:  # the recipe check refuses this too; a stage run on its own must as well
        raise StageError("sft: method 'full' trains every weight and cannot train a 4/8-bit quantized base")
    init = inputs.init_adapter
    if init is not None and not is_adapter(init) and cfg.method == "lora":
        raise StageError(f"sft: {init} holds full weights (a full fine-tune); continue it with sft.method: full")
    full_init = init is not None and cfg.method == "full" and not is_adapter(init)
    # Full fine-tuning keeps fp32 master weights: AdamW's small updates vanish in bf16/fp16 weights. A bf16 or fp16
    # recipe then trains under autocast (the Trainer's bf16/fp16 flags, on GPUs); LoRA keeps the base in model.dtype.
    memory_estimate = check_training_memory(  # refuse what cannot fit before loading anything
        "sft", init if full_init else inputs.base, quant, dtype=inputs.dtype, method=cfg.method, lora_r=cfg.lora.r,
        seq_len=tok_manifest["max_length"], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing, pairs=False)
    model = load_causal_lm(init if full_init else inputs.base, "float32" if cfg.method == "full" else inputs.dtype,
                           quant or None, attn_implementation=cfg.attn_implementation)
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_config = cfg.lora.peft("CAUSAL_LM") if cfg.method == "lora" else None
    if init is not None and is_adapter(init):  # continue an existing adapter instead of starting a new one
        model = PeftModel.from_pretrained(model, init, is_trainable=cfg.method == "lora")
        if cfg.method == "full":  # a LoRA champion, fully fine-tuned from here on: fold it into the weights
            model = model.merge_and_unload()
        peft_config = None
    train = load_from_disk(str(inputs.tokenized / "sft"))
    held = None
    if cfg.keep == "best":  # the held-out rows are measured, never trained on
        held_rows = set(tok_manifest.get("sft_heldout_rows") or [])
        if not held_rows:
            raise StageError("sft: keep: best needs held-out SFT rows, and tokenize held none out; add SFT data or "
                             "set sft.keep: last")
        held = train.select(sorted(held_rows))
        train = train.select([i for i in range(len(train)) if i not in held_rows])

    args = trl.SFTConfig(
        output_dir=str(out / "checkpoints"),
        run_name="sft",
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers v5: a float < 1 here is a fraction of the steps
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_total_limit=2,  # keep: best: the best checkpoint is never rotated away
        **keep_arguments(cfg.keep, cfg.eval_steps, cfg.save_steps, "eval_loss", greater_is_better=False),
        per_device_eval_batch_size=cfg.batch_size,  # keep: best's held-out loss: no larger batch than training's
        optim=cfg.optim,
        seed=inputs.seed,
        data_seed=inputs.seed,
        max_length=tok_manifest["max_length"],
        packing=tok_manifest["packing"],
        use_liger_kernel=cfg.use_liger_kernel,
        include_num_input_tokens_seen="non_padding",  # tokens/s counts real tokens: packed vs padded is fair
        report_to=["none"],  # step metrics: tracking_callback, which never blocks training
        **train_precision(inputs.dtype),
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=held, processing_class=tok,
                             peft_config=peft_config,
                             callbacks=[progress_callback(), *tracking_callback(inputs.report_to, out),
                                        *keep_callbacks(cfg.early_stopping_patience)])
    add_step_metrics(trainer)  # tokens/s and peak memory on every step's log
    result, resume = train_resuming(trainer, out / "checkpoints")  # after a crash: from the last checkpoint

    product = out / ("model" if cfg.method == "full" else "adapter")
    save_trained(trainer, product)  # the adapter or the whole model (keep: best: the best checkpoint's, loaded
    # by the Trainer at the end of train()); collective under FSDP / DeepSpeed
    if not trainer.is_world_process_zero():  # launched processes: the main one writes the rest
        return {}
    tok.save_pretrained(product)
    # save_model also writes training_args.bin, a pickle (torch.save) that this folder and the registry would carry
    # to anyone who loads it; the arguments are in the manifest's config already
    (product / "training_args.bin").unlink(missing_ok=True)
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    kept_at = kept(trainer, cfg.keep)
    plot_curves(out / "loss.png", history, ["loss", "eval_loss", "learning_rate", "grad_norm"], "sft",
                kept_step=kept_at["kept_step"] if cfg.keep == "best" else None)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter is the product; checkpoints were for resume

    last = trainer_summary(history)
    seconds = float(result.metrics.get("train_runtime", 0.0))
    tokens = float(trainer.state.num_input_tokens_seen or 0)
    metrics = {
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "memory_estimate_bytes": memory_estimate,  # the preflight's estimate, beside the measured peak
        "train_loss": run_loss(history, result),  # every step's, also after a resume
        "final_loss": last.get("loss", float("nan")),
        "train_runtime_s": round(seconds, 2),
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "processes": trainer.args.world_size,
        "kept_step": kept_at["kept_step"],  # the step whose weights are the product
        **({"heldout_examples": len(held), "kept_eval_loss": kept_at["kept_metric"]} if held is not None else {}),
    }
    return write_manifest(out, {
        "stage": "sft",
        "resumed_from": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "kept_step": kept_at["kept_step"],
        "kept_by": kept_at["kept_by"],  # eval_loss (keep: best), or last
        "quantized": bool(quant),
        "method": cfg.method,
        "init_adapter": str(inputs.init_adapter) if inputs.init_adapter else None,
        "outputs": [product.name, "loss.png", "log_history.json"],
        "artifacts": ["loss.png", "log_history.json"],
        "metrics": metrics,
    })


def hand_on(cfg: SftConfig, inputs: SftInputs) -> dict[str, Any]:
    """No SFT records new to the weights being continued (a retrain on new preference data only): those weights
    (`init_adapter`, the champion's) are this stage's product as they are. Training them again on records they
    already learned would count those records twice; dpo then continues from them as from any SFT result."""
    from alignflow.tasks.lib.models import is_adapter

    init = inputs.init_adapter
    if init is None:
        raise StageError("sft: nothing to hand on without init_adapter (the weights a retrain continues)")
    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    product = out / ("adapter" if is_adapter(init) else "model")
    shutil.copytree(init, product)
    quant = json.loads((inputs.quantized / "quantization.json").read_text())
    return write_manifest(out, {
        "stage": "sft",
        "resumed_from": None,
        "quantized": bool(quant),
        "method": cfg.method,
        "init_adapter": str(init),
        "trained": False,  # handed on: no step taken
        "outputs": [product.name],
        "artifacts": [],
        "metrics": {"global_step": 0, "trained_examples": 0},
    })
