"""dpo: direct preference optimisation with TRL's DPOTrainer, continuing the SFT adapter.

The policy is base + the SFT adapter (trainable). No second model copy is loaded for the reference: TRL
freezes a copy of the SFT adapter under the name `ref` and swaps to it for reference log-probs, so the
reference is the SFT policy itself (standard DPO) at the cost of one extra adapter (a few MB), not a model.
Loss variants are TRL's (`sigmoid`, `ipo`, `hinge`, `robust`, ...). `simpo` and `orpo` are reference-free
and live in other TRL trainers (`trl.experimental.cpo.CPOTrainer` with loss_type="simpo" and cpo_alpha=0, and
`trl.experimental.orpo.ORPOTrainer`); with them the stage trains the same SFT adapter on the same pairs, and
there are no reference log-probs at all. Output: `adapter/` (the tuned adapter only, without the frozen
reference copy) + tokenizer, the reward-margin curves, the log history.

After a full fine-tune (sft wrote `model/`), the SFT model is the base here: a new LoRA adapter (the recipe's
`sft.lora` settings) is trained over it, so the reference is still the SFT weights with the adapter disabled
and no second model copy is held; at the end the adapter is merged in and the stage writes `model/` instead.

With `precompute_ref_log_probs`, every pair's reference log-probs are computed once, before training (the
steps then skip the reference forward pass), with TRL's own `compute_ref_log_probs`, and kept in
`<work>/cache/ref_logps/` under a key of what they depend on: the reference weights, dtype, quantization,
max length and the tokenized pairs. TRL's own cache keys on the prepared dataset's fingerprint, which changes
with the DPOConfig (beta, output dir), so a run with another beta recomputed them; here it reuses them.
`ref_logprobs_cached` in the manifest (tag `alignflow.ref_logprobs_cached`) says whether a run did.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.lib.hashing import sha256_dataset, sha256_json, sha256_tree
from alignflow.tasks.lib.launch import LaunchSpec, distributed, launched
from alignflow.tasks.lib.lora import LoraSpec
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.progress import progress_callback
from alignflow.tasks.lib.training import (
    add_step_metrics,
    last_complete_checkpoint,
    plot_curves,
    seed_everything,
    trainer_summary,
)


class DpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="KL strength: higher stays closer to the SFT model")
    # TRL 1.16 DPOTrainer losses, then the two reference-free ones from trl.experimental (CPO's SimPO, ORPO)
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                  "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "simpo", "orpo"] = "sigmoid"
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (loss: simpo only)")
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

    @model_validator(mode="after")
    def _reference_free(self) -> DpoConfig:
        if self.precompute_ref_log_probs and self.loss in REFERENCE_FREE:
            raise ValueError(f"precompute_ref_log_probs is for losses with a reference model; {self.loss!r} has none")
        return self


REFERENCE_FREE = ("simpo", "orpo")


class DpoInputs(BaseModel):
    base: Path
    base_key: str = ""  # the base model's identity: the reference is base + SFT adapter (reference log-prob cache)
    dtype: str
    tokenized: Path
    quantized: Path
    sft: Path
    out_dir: Path
    seed: int
    report_to: list[str] = ["none"]
    ref_cache: Path | None = None  # where reference log-probs are kept across runs (None: this stage's folder)
    lora: LoraSpec = LoraSpec()  # the adapter trained over a fully fine-tuned SFT model (sft.method: full)
    launch: LaunchSpec = LaunchSpec()  # >1 process: this run() re-runs itself under `accelerate launch`


def run(cfg: DpoConfig, inputs: DpoInputs) -> dict[str, Any]:
    import trl
    from datasets import load_from_disk
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from alignflow.tasks.lib.models import is_adapter, load_causal_lm, load_tokenizer, tuned_weights
    from alignflow.tasks.lib.training import check_optimizer, peak_memory_bytes, train_precision

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if inputs.launch.num_processes > 1 and not launched():
        return distributed("alignflow.tasks.dpo", inputs.launch, cfg, inputs, out)
    seed_everything(inputs.seed)
    check_optimizer(cfg.optim)
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    quant = json.loads((inputs.quantized / "quantization.json").read_text())
    sft_weights = tuned_weights(inputs.sft)
    full = not is_adapter(sft_weights)  # sft.method: full; the recipe check keeps quantization off then
    base = load_causal_lm(sft_weights if full else inputs.base, inputs.dtype, quant or None)
    if quant:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if full:  # a fresh adapter over the SFT model: disabled, it is the reference
        model = get_peft_model(base, inputs.lora.peft("CAUSAL_LM"))
    else:
        model = PeftModel.from_pretrained(base, sft_weights, is_trainable=True)
    pairs = load_from_disk(str(inputs.tokenized / "preference"))
    heldout = load_from_disk(str(inputs.tokenized / "preference_heldout"))  # not trained on: the metrics come from it

    common = dict(  # TrainingArguments every trainer below shares
        output_dir=str(out / "checkpoints"),
        run_name="dpo",
        beta=cfg.beta,  # DPO's KL strength; SimPO's reward scale; ORPO's odds-ratio weight (lambda)
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
        report_to=inputs.report_to,
        **train_precision(inputs.dtype),
    )
    callbacks = [progress_callback()]
    ref_cached = False
    if cfg.loss == "simpo":  # reference-free: the policy's length-normalised log-probs are the reward
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma, **common)
        trainer = CPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout,
                             processing_class=tok, callbacks=callbacks)
    elif cfg.loss == "orpo":  # reference-free: NLL on chosen + beta * log odds ratio
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout, processing_class=tok,
                              callbacks=callbacks)
    else:
        args = trl.DPOConfig(loss_type=[cfg.loss],
                             precompute_ref_log_probs=False,  # done below, with a cache keyed on what they depend on
                             **common)
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, eval_dataset=heldout,
                                 processing_class=tok,
                                 callbacks=callbacks)
        if cfg.precompute_ref_log_probs:
            trainer.train_dataset, ref_cached = _ref_logps(trainer, trainer.train_dataset, inputs, quant)
            trainer.eval_dataset, _ = _ref_logps(trainer, trainer.eval_dataset, inputs, quant)
            trainer.precompute_ref_logps = True  # DPOTrainer's switch: the loss reads the batch's reference log-probs
    add_step_metrics(trainer)  # tokens/s and peak memory on every step's log
    resume = last_complete_checkpoint(out / "checkpoints")  # after a crash: resume, same data order and LR
    result = trainer.train(resume_from_checkpoint=resume)
    # Means over the held-out pairs (not the last training batch of a few pairs): margin, accuracy, loss.
    heldout_metrics = trainer.evaluate()
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
        "reward_margin": round(float(heldout_metrics.get("eval_rewards/margins", float("nan"))), 5),
        "reward_accuracy": round(float(heldout_metrics.get("eval_rewards/accuracies", float("nan"))), 5),
        "heldout_loss": round(float(heldout_metrics.get("eval_loss", float("nan"))), 5),
        "heldout_pairs": len(heldout),
        "train_reward_margin": last.get("rewards/margins", float("nan")),  # the last training batch's
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
    }
    if full:  # fold the adapter into the SFT weights: the product is a complete model again
        del trainer, model, base  # free the training copy first
        merged = PeftModel.from_pretrained(load_causal_lm(sft_weights, inputs.dtype), out / "adapter")
        merged.merge_and_unload().save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        shutil.rmtree(out / "adapter")
    return write_manifest(out, {
        "stage": "dpo",
        "resumed_from": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "ref_logprobs_cached": ref_cached,
        "outputs": ["model" if full else "adapter", "rewards.png", "log_history.json"],
        "artifacts": ["rewards.png", "log_history.json"],
        "metrics": metrics,
    })


def _ref_logps(trainer: Any, dataset: Any, inputs: DpoInputs, quant: dict[str, Any]) -> tuple[Any, bool]:
    """`dataset` (the training or held-out pairs, as TRL tokenized them) with every pair's reference log-probs
    attached, computed once and reused by later runs; and whether they came from the cache.

    TRL's own precompute caches them under the prepared dataset's fingerprint, which changes with the DPOConfig
    (beta, output_dir): a run with another beta recomputed them. The key here is what they depend on: the
    reference weights (the SFT adapter, whose config names the base, or the full SFT model), dtype and
    quantization, and the pairs as TRL tokenized them. The loss then reads them from each batch
    (`precompute_ref_logps`) instead of running the reference.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from alignflow.tasks.lib.models import tuned_weights

    sft_outputs = read_manifest(inputs.sft).get("outputs", {})  # the SFT weights, hashed when sft wrote them
    weights = tuned_weights(inputs.sft)
    key = sha256_json({"reference": sft_outputs.get(weights.name) or sha256_tree(weights), "base": inputs.base_key,
                       "dtype": inputs.dtype, "quant": quant, "max_length": trainer.args.max_length,
                       # every row's token ids (not `str()` of a lazy Column, which shows the first rows only)
                       "pairs": sha256_dataset(dataset, ["prompt_ids", "chosen_ids", "rejected_ids"])})
    # safetensors: plain tensors, nothing executed on load (a torch.save file is a pickle, and this cache lives
    # in a work dir that runs and people share)
    cache = (inputs.ref_cache or inputs.out_dir) / f"ref-logps-{key[:32]}.safetensors"
    cached = cache.exists()
    if cached:
        logps = load_file(cache)
    else:
        loader = DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size,
                            collate_fn=trainer.data_collator, shuffle=False)
        chosen, rejected = [], []
        for batch in tqdm(loader, desc="dpo: reference log-probs", unit="batch"):
            batch = {k: v.to(trainer.accelerator.device) if hasattr(v, "to") else v for k, v in batch.items()}
            c, r = trainer.compute_ref_log_probs(trainer.model, batch)  # TRL's own: the frozen "ref" adapter
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        logps = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # atomic: a reader never sees half a file
        save_file(logps, tmp)
        os.replace(tmp, cache)
    dataset = dataset.add_column("ref_chosen_logps", logps["chosen"].tolist()).add_column(
        "ref_rejected_logps", logps["rejected"].tolist())
    return dataset, cached
