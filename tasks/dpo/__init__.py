"""dpo: preference tuning of the SFT policy, one loss family per module (the stage's name and recipe section stay
`dpo`). This file is the stage: its config, its inputs, and `run()` (load the policy, build the family's TRL
trainer, train, write the product and the manifest). Where each family is configured:

    preference.py  DPO and its TRL loss variants (sigmoid, ipo, hinge, ...), SimPO and ORPO: the pair losses,
                   and the cache of reference log-probs (`dpo.precompute_ref_log_probs`)
    kto.py         KTO: single rated completions (unpaired feedback and each pair's two sides)
    grpo.py        GRPO: online, samples completions and scores them with `dpo.rewards`
    rloo.py        RLOO: the same, with a leave-one-out baseline
    online.py      what GRPO and RLOO share: prompts, reward functions, sample tables, per-step names
    judge.py       the reward stage's model as a reward (`reward_model` among `dpo.rewards`)

The policy is base + the SFT adapter (trainable), and the reference (DPO, KTO; GRPO / RLOO with `dpo.beta` > 0)
is a frozen copy of that adapter TRL keeps under the name `ref`: no second model copy. Output: `adapter/` (the
tuned adapter only, without the frozen reference copy) + tokenizer, the reward-margin (or reward) curves, the log
history.

After a full fine-tune (sft wrote `model/`), the SFT model is the base here: a new LoRA adapter (the recipe's
`sft.lora` settings) is trained over it, so the reference is still the SFT weights with the adapter disabled
and no second model copy is held; at the end the adapter is merged in and the stage writes `model/` instead.

`ref_logprobs_cached` in the manifest (tag `alignflow.ref_logprobs_cached`) says whether a run reused cached
reference log-probs (preference.py).

Pair selection: the pair losses and kto train on the policy's side of tokenize's training pairs (and of the
unpaired feedback), by prompt: with `reward.pairs: disjoint` (the default) the reward model learned the other
side (tasks/lib/pairs.py). The manifest lists the pairs trained on (`trained_pair_hashes`; none for grpo / rloo,
which sample from prompts) and whether the policy was optimised against the reward model itself
(`optimised_against_reward_model`: grpo / rloo with `reward_model` among dpo.rewards).

`keep: best` (pair losses and kto; not grpo / rloo, which have no held-out set) evaluates on the held-out pairs
(kto: the held-out rated completions) every `eval_steps` and hands on the checkpoint with the highest held-out
reward accuracy (`eval_rewards/accuracies`, the first such on ties; kto, which has no accuracy: the highest reward
margin, `eval_rewards/margins`); `early_stopping_patience` stops after that many evaluations without improvement.
The held-out metrics in the manifest are then the kept step's evaluation; `kept_step` / `kept_by` record the choice
(`last` under keep: last) and rewards.png marks it.

Every module of this package imports its siblings by absolute name (`from alignflow.tasks.dpo import online`):
the stage's cache key hashes the sources it finds that way (flows/keys.py `code_hash`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.dpo import grpo, kto, preference, rloo
from alignflow.tasks.lib import pairs as pair_split
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.launch import LaunchSpec, distributed, launched
from alignflow.tasks.lib.lora import LoraSpec
from alignflow.tasks.lib.losses import ONLINE, REFERENCE_FREE, UNPAIRED
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.progress import progress_callback
from alignflow.tasks.lib.rewards import RewardSource
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


class DpoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.1, gt=0, description="KL strength: higher stays closer to the SFT model (grpo / rloo: "
                        "the KL coefficient)")
    # TRL 1.16 DPOTrainer losses; the two reference-free ones from trl.experimental (CPO's SimPO, ORPO); KTO
    # (unpaired feedback); and the online ones, GRPO and RLOO, which sample completions and score them
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
                  "exo_pair", "aot", "aot_unpaired", "discopop", "sigmoid_norm", "simpo", "orpo", "kto", "grpo",
                  "rloo"] = "sigmoid"
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (loss: simpo only)")
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="optimizer steps; -1: use epochs")
    lr: float = Field(5e-5, gt=0)
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    batch_size: int = Field(4, gt=0, description="pairs per step (kto: records; grpo / rloo: completions, a "
                            "multiple of num_generations)")
    grad_accum: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    attn_implementation: Attention = Field("sdpa", description="attention kernel: sdpa, flash_attention_2 "
                                           "(CUDA + flash-attn), eager")
    use_liger_kernel: bool = Field(False, description="TRL's Liger kernels (fused RMSNorm, RoPE, SwiGLU, "
                                   "cross-entropy): less memory on GPUs; needs liger-kernel (the gpu extra)")
    optim: str = Field("adamw_torch", description="Trainer optimizer, e.g. adamw_torch, paged_adamw_8bit (CUDA)")
    save_steps: int = Field(50, gt=0)
    keep: Keep = Field("last", description="last: the weights after the last step; best: the checkpoint with the "
                       "highest held-out reward accuracy (kto: reward margin); not for grpo / rloo")
    eval_steps: int = Field(50, ge=1, description="keep: best: evaluate and checkpoint every this many optimizer "
                            "steps (in place of save_steps)")
    early_stopping_patience: int | None = Field(None, ge=1, description="keep: best: stop after this many "
                                                "evaluations without improvement")
    precompute_ref_log_probs: bool = Field(False, description="compute reference log-probs once and cache them")
    # online RL (loss: grpo | rloo) only: grpo.py, rloo.py and what they share, online.py
    num_generations: int = Field(4, ge=2, description="grpo / rloo: completions sampled per prompt (the group)")
    max_completion_length: int = Field(64, gt=0, description="grpo / rloo: tokens per sampled completion")
    temperature: float = Field(1.0, gt=0, description="grpo / rloo: sampling temperature")
    rewards: list[RewardSource] = Field(
        default_factory=lambda: [RewardSource(reward_model=True)],
        description="grpo / rloo: weighted reward sources, summed: reward_model, reference, {regex: P}, "
                    "{json_schema: FILE}, {python: module:function}, each with an optional weight")
    sample_every: int = Field(10, gt=0, description="grpo / rloo: steps between tables of sampled completions "
                              "and their rewards (MLflow artifacts samples/step_N.json)")

    @model_validator(mode="after")
    def _reference_free(self) -> DpoConfig:
        if self.precompute_ref_log_probs and self.loss in REFERENCE_FREE:
            raise ValueError(f"precompute_ref_log_probs is for losses with a reference model; {self.loss!r} has none")
        if self.precompute_ref_log_probs and self.loss not in PAIRED_WITH_REFERENCE:
            raise ValueError(f"precompute_ref_log_probs is for DPOTrainer's pair losses; {self.loss!r} is not one "
                             "(kto, grpo and rloo compute their reference log-probs as they go)")
        if self.loss in ONLINE:
            if self.keep == "best":
                raise ValueError(f"keep: best chooses a checkpoint by held-out pairs; loss {self.loss!r} samples "
                                 "from prompts and has none (use keep: last)")
            if not self.rewards:
                raise ValueError(f"loss {self.loss!r} needs at least one reward source in dpo.rewards")
            if (self.batch_size * self.grad_accum) % self.num_generations:
                raise ValueError(f"loss {self.loss!r}: dpo.batch_size x dpo.grad_accum ({self.batch_size} x "
                                 f"{self.grad_accum}) completions must hold whole groups of dpo.num_generations "
                                 f"({self.num_generations})")
        return self


KEPT_BY = {False: "eval_rewards/accuracies", True: "eval_rewards/margins"}  # keep: best's figure, by loss == kto
PAIRED_WITH_REFERENCE = tuple(a for a in DpoConfig.model_fields["loss"].annotation.__args__  # type: ignore[union-attr]
                              if a not in (*REFERENCE_FREE, *ONLINE, *UNPAIRED))


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
    reward: Path | None = None  # the reward stage's folder: its model is the `reward_model` reward (grpo / rloo)
    pairs: pair_split.PairsMode = "disjoint"  # the recipe's reward.pairs: train on the policy's side only


def run(cfg: DpoConfig, inputs: DpoInputs) -> dict[str, Any]:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from alignflow.tasks.lib.memory import check_training_memory
    from alignflow.tasks.lib.models import is_adapter, load_causal_lm, load_tokenizer, tuned_weights
    from alignflow.tasks.lib.training import check_kernels, check_optimizer, peak_memory_bytes, train_precision

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if inputs.launch.num_processes > 1 and not launched():
        return distributed("alignflow.tasks.dpo", inputs.launch, cfg, inputs, out)
    seed_everything(inputs.seed)
    check_optimizer(cfg.optim)
    check_kernels("dpo", cfg.attn_implementation, cfg.use_liger_kernel)
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    quant = json.loads((inputs.quantized / "quantization.json").read_text())
    sft_weights = tuned_weights(inputs.sft)
    full = not is_adapter(sft_weights)  # sft.method: full; the recipe check keeps quantization off then
    memory_estimate = check_training_memory(  # refuse what cannot fit before loading anything
        "dpo", sft_weights if full else inputs.base, quant, dtype=inputs.dtype, method="lora",
        lora_r=inputs.lora.r if full else json.loads((sft_weights / "adapter_config.json").read_text())["r"],
        seq_len=read_manifest(inputs.tokenized)["max_length"],
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, gradient_checkpointing=cfg.gradient_checkpointing,
        pairs=True)
    base = load_causal_lm(sft_weights if full else inputs.base, inputs.dtype, quant or None,
                          attn_implementation=cfg.attn_implementation)
    if quant:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if full:  # a fresh adapter over the SFT model: disabled, it is the reference
        model = get_peft_model(base, inputs.lora.peft("CAUSAL_LM"))
    else:
        model = PeftModel.from_pretrained(base, sft_weights, is_trainable=True)

    common = dict(  # TrainingArguments every trainer below shares
        output_dir=str(out / "checkpoints"),
        run_name="dpo",
        # DPO's and KTO's KL strength; SimPO's reward scale; ORPO's odds-ratio weight (lambda); GRPO's and RLOO's
        # KL coefficient (TRL then keeps a frozen copy of the SFT adapter, named `ref`, as the reference)
        beta=cfg.beta,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.scheduler,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1,
        save_total_limit=2,  # keep: best: the best checkpoint is never rotated away
        # the held-out evaluation at the Trainer's eval batch size, as before keep: TRL averages per-batch means,
        # so another size would change the held-out figures of the same weights
        # keep: best: by held-out reward accuracy; kto logs no accuracy, so by its held-out reward margin
        **keep_arguments(cfg.keep, cfg.eval_steps, cfg.save_steps, KEPT_BY[cfg.loss == "kto"],
                         greater_is_better=True),
        optim=cfg.optim,
        seed=inputs.seed,
        data_seed=inputs.seed,
        report_to=["none"],  # step metrics: tracking_callback, which never blocks training
        use_liger_kernel=cfg.use_liger_kernel,
        **train_precision(inputs.dtype),
    )
    max_length = read_manifest(inputs.tokenized)["max_length"]
    if cfg.keep == "best" and cfg.loss in ONLINE:  # the recipe refuses it; a stage run on its own must as well
        raise StageError(f"dpo: keep: best needs held-out pairs, and loss {cfg.loss!r} has none")
    callbacks = [progress_callback(), *tracking_callback(inputs.report_to, out),
                 *keep_callbacks(cfg.early_stopping_patience)]
    ref_cached = False  # reference log-probs read from the cache (preference.py, precompute_ref_log_probs)
    heldout = None  # what the held-out metrics are measured on (none for grpo / rloo)
    kto_counts: dict[str, int] = {}
    trained_pairs: Any = []  # the preference pairs this run trains on (none for grpo / rloo)
    if cfg.loss == "grpo":  # sample num_generations completions per prompt, score them with dpo.rewards
        trainer = grpo.trainer(cfg, inputs, model, tok, common, callbacks, quant, full)
    elif cfg.loss == "rloo":
        trainer = rloo.trainer(cfg, inputs, model, tok, common, callbacks, quant, full)
    elif cfg.loss == "kto":  # one rated completion at a time: the unpaired feedback, and each pair's two sides
        trainer, trained_pairs, heldout, kto_counts = kto.trainer(cfg, inputs, model, tok, common, callbacks,
                                                                  max_length)
    else:  # DPO's losses, SimPO, ORPO
        trainer, trained_pairs, heldout, ref_cached = preference.trainer(cfg, inputs, model, tok, common, callbacks,
                                                                         quant, max_length)
    add_step_metrics(trainer)  # tokens/s and peak memory on every step's log
    result, resume = train_resuming(trainer, out / "checkpoints")  # after a crash: from the last checkpoint
    # Means over the held-out pairs / rated completions (not the last training batch): margin, accuracy, loss.
    # Online losses have none: their measure is the reward of what they sample, logged every step.
    # keep: best: the kept step's evaluation, from the history (the kept weights were measured there already)
    kept_at = kept(trainer, cfg.keep)
    if kept_at["kept_metric"] is not None:
        heldout_metrics = next(h for h in trainer.state.log_history
                               if h.get("step") == kept_at["kept_step"] and kept_at["kept_by"] in h)
    else:
        heldout_metrics = trainer.evaluate() if heldout is not None and len(heldout) else {}
    save_trained(trainer, out / "adapter")  # collective under FSDP / DeepSpeed; the main process writes
    if not trainer.is_world_process_zero():  # launched processes: the main one writes everything else
        return {}
    # PEFT saves every adapter it holds: TRL's frozen "ref" copy (when continuing an SFT adapter) lands in
    # adapter/ref/. The product is the trained "default" adapter only.
    shutil.rmtree(out / "adapter" / "ref", ignore_errors=True)
    shutil.rmtree(out / "adapter" / "reward", ignore_errors=True)  # grpo/rloo's reward-model adapter: not the product
    tok.save_pretrained(out / "adapter")
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    curves = ["loss", "reward_mean", "kl", "completion_length_mean"] if cfg.loss in ONLINE else \
        ["loss", "rewards/margins", "rewards/accuracies"] if cfg.loss != "kto" else ["loss", "rewards/margins", "kl"]
    if cfg.keep == "best":
        curves.append(KEPT_BY[cfg.loss == "kto"])
    plot_curves(out / "rewards.png", history, curves, f"dpo ({cfg.loss})",
                kept_step=kept_at["kept_step"] if cfg.keep == "best" else None)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    last = trainer_summary(history)
    metrics: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "memory_estimate_bytes": memory_estimate,  # the preflight's estimate, beside the measured peak
        "train_loss": run_loss(history, result),  # every step's, also after a resume
        "final_loss": last.get("loss", float("nan")),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
        "kept_step": kept_at["kept_step"],  # the step whose weights are the product
    }
    if cfg.loss in ONLINE:
        rewards = [h["reward_mean"] for h in history if h.get("reward_mean") is not None]
        quarter = max(len(rewards) // 4, 1)
        metrics.update({
            "prompts": len(trainer.train_dataset),
            # the mean reward of what the policy sampled, over the first and the last quarter of the steps
            "reward_mean_first_quarter": round(sum(rewards[:quarter]) / quarter, 5) if rewards else float("nan"),
            "reward_mean_last_quarter": round(sum(rewards[-quarter:]) / quarter, 5) if rewards else float("nan"),
            # the last step's (named apart from the per-step metrics, which the child run holds as histories)
            "final_kl": last.get("kl", float("nan")),
            "final_completion_length_mean": last.get("completion_length_mean", float("nan")),
        })
    else:
        metrics.update({
            "reward_margin": round(float(heldout_metrics.get("eval_rewards/margins", float("nan"))), 5),
            "reward_accuracy": round(float(heldout_metrics.get("eval_rewards/accuracies", float("nan"))), 5),
            "heldout_loss": round(float(heldout_metrics.get("eval_loss", float("nan"))), 5),
            # held-out pairs; for kto, held-out rated completions (each pair's two sides and the held-out feedback)
            "heldout_rated" if cfg.loss == "kto" else "heldout_pairs": len(heldout) if heldout is not None else 0,
            "trained_pairs": len(trained_pairs),  # the policy's side of the training pairs (reward.pairs)
            "train_reward_margin": last.get("rewards/margins", float("nan")),  # the last training batch's
            **kto_counts,
        })
    if full:  # fold the adapter into the SFT weights: the product is a complete model again
        del trainer, model, base  # free the training copy first
        merged = PeftModel.from_pretrained(load_causal_lm(sft_weights, inputs.dtype), out / "adapter")
        merged.merge_and_unload().save_pretrained(out / "model")
        tok.save_pretrained(out / "model")
        shutil.rmtree(out / "adapter")
    return write_manifest(out, {
        "stage": "dpo",
        "resumed_from": int(resume.rsplit("-", 1)[-1]) if resume else None,
        "kept_step": kept_at["kept_step"],
        "kept_by": kept_at["kept_by"],  # eval_rewards/accuracies or eval_rewards/margins (keep: best), or last
        "ref_logprobs_cached": ref_cached,
        "pairs": inputs.pairs,
        "trained_pair_hashes": (trained := pair_split.hashes(trained_pairs)),  # as tokenize's heldout_pair_hashes
        "trained_pairs_sha256": sha256_json(trained),  # their digest (evaluate's cache key reads it)
        # grpo / rloo rewarded by the reward model: the judge's win-rates then measure what was optimised
        "optimised_against_reward_model": cfg.loss in ONLINE and any(s.reward_model for s in cfg.rewards),
        "outputs": ["model" if full else "adapter", "rewards.png", "log_history.json"],
        "artifacts": ["rewards.png", "log_history.json"],
        "metrics": metrics,
    })
