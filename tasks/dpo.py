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

Pair selection: the pair losses and kto train on the policy's side of tokenize's training pairs (and of the
unpaired feedback), by prompt: with `reward.pairs: disjoint` (the default) the reward model learned the other
side (tasks/lib/pairs.py). The manifest lists the pairs trained on (`trained_pair_hashes`; none for grpo / rloo,
which sample from prompts) and whether the policy was optimised against the reward model itself
(`optimised_against_reward_model`: grpo / rloo with `reward_model` among dpo.rewards).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.lib import pairs as pair_split
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_dataset, sha256_json, sha256_weights
from alignflow.tasks.lib.launch import LaunchSpec, distributed, launched
from alignflow.tasks.lib.lora import LoraSpec
from alignflow.tasks.lib.losses import ONLINE, REFERENCE_FREE, UNPAIRED
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.progress import progress_callback
from alignflow.tasks.lib.rewards import Recorder, RewardSource, reward_functions, source_names
from alignflow.tasks.lib.step_metrics import tracking_callback
from alignflow.tasks.lib.training import (
    Attention,
    add_step_metrics,
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
    precompute_ref_log_probs: bool = Field(False, description="compute reference log-probs once and cache them")
    # online RL (loss: grpo | rloo) only
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
            if not self.rewards:
                raise ValueError(f"loss {self.loss!r} needs at least one reward source in dpo.rewards")
            if (self.batch_size * self.grad_accum) % self.num_generations:
                raise ValueError(f"loss {self.loss!r}: dpo.batch_size x dpo.grad_accum ({self.batch_size} x "
                                 f"{self.grad_accum}) completions must hold whole groups of dpo.num_generations "
                                 f"({self.num_generations})")
        return self


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
    import trl
    from datasets import load_from_disk
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
        save_steps=cfg.save_steps,
        save_total_limit=2,
        optim=cfg.optim,
        seed=inputs.seed,
        data_seed=inputs.seed,
        report_to=["none"],  # step metrics: tracking_callback, which never blocks training
        use_liger_kernel=cfg.use_liger_kernel,
        **train_precision(inputs.dtype),
    )
    max_length = read_manifest(inputs.tokenized)["max_length"]
    callbacks = [progress_callback(), *tracking_callback(inputs.report_to, out)]
    ref_cached = False
    heldout = None
    recorder = None
    kto_counts: dict[str, int] = {}
    trained_pairs: Any = []  # the preference pairs this run trains on (none for grpo / rloo)
    if cfg.loss in ONLINE:  # sample num_generations completions per prompt, score them with dpo.rewards
        prompts = load_from_disk(str(inputs.tokenized / "prompts"))
        if len(prompts) == 0:
            raise StageError("dpo: no prompts to sample from (tokenize wrote none that fit tokenize.max_length)")
        names = source_names(cfg.rewards)
        recorder = Recorder(names, [s.weight for s in cfg.rewards])
        funcs = reward_functions(cfg.rewards, recorder, _reward_model_scorer(cfg, inputs, quant, model, full))
        online = dict(num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                      temperature=cfg.temperature, reward_weights=[s.weight for s in cfg.rewards], **common)
        if cfg.loss == "grpo":
            args = trl.GRPOConfig(**online)
            trainer = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=prompts,
                                      processing_class=tok, callbacks=callbacks)
        else:
            args = trl.RLOOConfig(**online)
            trainer = trl.RLOOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=prompts,
                                      processing_class=tok, callbacks=callbacks)
        trainer.add_callback(_sample_tables(recorder, out, cfg.sample_every))
        _online_metric_names(trainer, names)
    elif cfg.loss == "kto":  # one rated completion at a time: the unpaired feedback, and each pair's two sides
        # the policy's side, by prompt: the judge learned the other side's pairs, some made from this feedback
        unpaired = pair_split.select(load_from_disk(str(inputs.tokenized / "unpaired")), "policy", inputs.pairs)
        trained_pairs = pair_split.select(load_from_disk(str(inputs.tokenized / "preference")), "policy",
                                          inputs.pairs)
        rated = _kto_rows(unpaired, trained_pairs, inputs.seed)
        heldout = _kto_rows(load_from_disk(str(inputs.tokenized / "unpaired_heldout")),
                            load_from_disk(str(inputs.tokenized / "preference_heldout")), inputs.seed)
        if len(rated) < 2:
            raise StageError(f"dpo: kto needs rated completions to learn from; found {len(rated)}")
        kto_counts = {"kto_rows": len(rated), "kto_unpaired_rows": len(unpaired),
                      "kto_desirable_rows": sum(rated["label"])}
        args = trl.KTOConfig(loss_type="kto", max_length=max_length, **common)
        trainer = trl.KTOTrainer(model=model, args=args, train_dataset=rated, eval_dataset=heldout,
                                 processing_class=tok, callbacks=callbacks)
    else:
        pairs = trained_pairs = pair_split.select(load_from_disk(str(inputs.tokenized / "preference")), "policy",
                                                  inputs.pairs)
        if len(pairs) < 2:
            raise StageError(f"dpo: only {len(pairs)} training pairs on the policy's side (reward.pairs="
                             f"{inputs.pairs}); add preference data")
        heldout = load_from_disk(str(inputs.tokenized / "preference_heldout"))  # not trained on: the metrics
        if cfg.loss == "simpo":  # reference-free: the policy's length-normalised log-probs are the reward
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma, max_length=max_length,
                             **common)
            trainer = CPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout,
                                 processing_class=tok, callbacks=callbacks)
        elif cfg.loss == "orpo":  # reference-free: NLL on chosen + beta * log odds ratio
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            args = ORPOConfig(max_length=max_length, **common)
            trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout,
                                  processing_class=tok, callbacks=callbacks)
        else:
            args = trl.DPOConfig(loss_type=[cfg.loss],
                                 precompute_ref_log_probs=False,  # done below, with a cache keyed on their inputs
                                 max_length=max_length, **common)
            trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs,
                                     eval_dataset=heldout, processing_class=tok, callbacks=callbacks)
            if cfg.precompute_ref_log_probs:
                trainer.train_dataset, ref_cached = _ref_logps(trainer, trainer.train_dataset, inputs, quant)
                trainer.eval_dataset, _ = _ref_logps(trainer, trainer.eval_dataset, inputs, quant)
                trainer.precompute_ref_logps = True  # DPOTrainer's switch: the loss reads the batch's ref log-probs
    add_step_metrics(trainer)  # tokens/s and peak memory on every step's log
    result, resume = train_resuming(trainer, out / "checkpoints")  # after a crash: from the last checkpoint
    # Means over the held-out pairs / rated completions (not the last training batch): margin, accuracy, loss.
    # Online losses have none: their measure is the reward of what they sample, logged every step.
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
    plot_curves(out / "rewards.png", history, curves, f"dpo ({cfg.loss})")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    last = trainer_summary(history)
    metrics: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "memory_estimate_bytes": memory_estimate,  # the preflight's estimate, beside the measured peak
        "train_loss": run_loss(history, result),  # every step's, also after a resume
        "final_loss": last.get("loss", float("nan")),
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 2),
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


def _kto_rows(unpaired: Any, pairs: Any, seed: int) -> Any:
    """KTO's rows (prompt, completion, label): the unpaired feedback, then every pair as its chosen answer
    (desirable) and its rejected one (undesirable), shuffled with the seed. KTOTrainer reads its data in order
    (its KL term pairs each completion with a neighbour's prompt), so desirable and undesirable rows must mix.
    A pair side that is already a rated row (tokenize makes a pair of a prompt's thumbs-up and thumbs-down
    answers, for the reward model) is not added again: each rating counts once."""
    from datasets import Dataset

    rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in unpaired]
    seen = {sha256_json([r["prompt"], r["completion"], r["label"]]) for r in rows}
    for p in pairs:
        for side, label in ((p["chosen"], True), (p["rejected"], False)):
            if sha256_json([p["prompt"], side, label]) not in seen:
                rows.append({"prompt": p["prompt"], "completion": side, "label": label})
    return Dataset.from_list(rows).shuffle(seed=seed) if rows else Dataset.from_list(rows)


def _reward_model_scorer(cfg: DpoConfig, inputs: DpoInputs, quant: dict[str, Any], policy: Any, full: bool) -> Any:
    """The reward stage's model as a scorer of (prompt, completion text); None when no source asks for it.

    Over a LoRA policy the reward model costs no second copy of the base: its adapter is loaded into the policy
    as a third adapter (`reward`, frozen, beside `default` and TRL's `ref`) and its score head is one vector, so a
    score is the policy's forward pass with that adapter (PEFT's per-batch `adapter_names`, which leaves the
    active adapter alone) and the head on the last non-pad token, as the sequence-classification model reads it.
    After a full fine-tune the policy's weights are not the base the reward model was trained over: it is loaded
    on its own then."""
    if not any(s.reward_model for s in cfg.rewards):
        return None
    if inputs.reward is None:
        raise StageError("dpo: the reward_model reward needs the reward stage's folder")
    import torch

    from alignflow.tasks.lib.inference import score_answers
    from alignflow.tasks.lib.models import load_reward_model, load_tokenizer, tuned_weights

    weights = tuned_weights(inputs.reward)
    rm_tok = load_tokenizer(weights)
    if full:
        rm = load_reward_model(inputs.base, inputs.dtype, weights, quant or None)
        return lambda prompts, texts: score_answers(rm, rm_tok, prompts, texts)
    from safetensors.torch import load_file

    training = policy.training
    policy.load_adapter(str(weights), adapter_name="reward", is_trainable=False)  # frozen; PEFT switches to eval
    policy.train(training)
    saved = load_file(str(weights / "adapter_model.safetensors"))
    head = {k.rsplit(".", 1)[-1]: v for k, v in saved.items() if ".score." in k and "lora" not in k}
    if "weight" not in head:
        raise StageError(f"dpo: the reward adapter in {weights} has no score head")

    def score(prompts: list[Any], texts: list[str]) -> list[float]:
        rendered = [rm_tok.apply_chat_template([*p, {"role": "assistant", "content": t}], tokenize=False)
                    for p, t in zip(prompts, texts, strict=True)]
        scores: list[float] = []
        training = policy.training
        policy.eval()  # PEFT takes per-batch adapter names in inference mode only
        try:
            for i in range(0, len(rendered), 16):
                batch = rm_tok(rendered[i : i + 16], return_tensors="pt", padding=True, padding_side="right",
                               add_special_tokens=False).to(policy.device)
                with torch.no_grad():
                    out = policy(**batch, adapter_names=["reward"] * len(batch["input_ids"]),
                                 output_hidden_states=True)
                hidden = out.hidden_states[-1]  # after the final norm, as the classification head sees it
                ids = batch["input_ids"]
                # the rightmost token that is not padding (transformers' sequence classification rule)
                last = (torch.arange(ids.shape[1], device=ids.device) * (ids != rm_tok.pad_token_id)).argmax(-1)
                picked = hidden[torch.arange(len(ids), device=ids.device), last]
                w = head["weight"].to(picked.device, picked.dtype)
                value = picked @ w.T + (head["bias"].to(picked.device, picked.dtype) if "bias" in head else 0)
                scores.extend(float(x) for x in value[:, 0].float().cpu())
        finally:
            policy.train(training)
        return scores

    return score


def _online_metric_names(trainer: Any, names: list[str]) -> None:
    """The dpo child run's per-step names for online RL, beside TRL's own (`reward`, `rewards/<name>/mean`,
    `completions/mean_length`): `reward_mean`, `reward.<source>_mean`, `completion_length_mean`; `reward_std`
    and `kl` keep TRL's names. Inserted first, so the step-metrics callback sends the extended dict."""
    from transformers import TrainerCallback

    aliases = {"reward": "reward_mean", "completions/mean_length": "completion_length_mean",
               **{f"rewards/{n}/mean": f"reward.{n}_mean" for n in names}}

    class OnlineNames(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs is None:
                return
            extra = {new: logs[old] for old, new in aliases.items() if logs.get(old) is not None}
            logs.update(extra)
            if state.log_history and extra:
                state.log_history[-1].update(extra)

    trainer.callback_handler.callbacks.insert(0, OnlineNames())


def _sample_tables(recorder: Recorder, out: Path, every: int) -> Any:
    """Every `every` steps: a table of a few prompts with their sampled completions and rewards (per source and
    summed), written to `samples/step_N.json` in the stage folder (the flow logs them as tables to the stage's MLflow
    run when it records the stage, so that no training step waits for the tracking server): what RL
    practitioners read to catch reward hacking."""
    from transformers import TrainerCallback

    class SampleTables(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero or state.global_step % every or not recorder.prompts:
                return
            rows = recorder.rows(limit_prompts=4)
            name = f"samples/step_{state.global_step:05d}.json"
            (out / "samples").mkdir(exist_ok=True)
            (out / name).write_text(json.dumps(rows, indent=2, ensure_ascii=False))  # MLflow: when recorded

    return SampleTables()


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

    from alignflow.tasks.lib.models import device_kind, tuned_weights

    sft_outputs = read_manifest(inputs.sft).get("outputs", {})  # the SFT weights, hashed when sft wrote them
    weights = tuned_weights(inputs.sft)
    key = sha256_json({"reference": sft_outputs.get(weights.name) or sha256_weights(weights), "base": inputs.base_key,
                       "dtype": inputs.dtype, "device": device_kind(),  # `auto` is bf16 on some GPUs, fp32 on CPUs
                       # TRL computes them under the accelerator's autocast
                       "autocast": [trainer.args.bf16, trainer.args.fp16, str(trainer.accelerator.mixed_precision)],
                       "quant": quant, "max_length": trainer.args.max_length,
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
