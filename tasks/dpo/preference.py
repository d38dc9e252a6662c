"""The pair losses: DPO with its TRL loss variants (`sigmoid`, `ipo`, `hinge`, `robust`, ...), SimPO and ORPO.

All three learn from the same data: the policy's side of tokenize's training pairs (by prompt; with
`reward.pairs: disjoint` the reward model learned the other side, tasks/lib/pairs.py), measured on the held-out
pairs. They differ in the TRL trainer:
- DPO: `trl.DPOTrainer` with `loss_type=[dpo.loss]`. No second model copy is loaded for the reference: TRL
  freezes a copy of the SFT adapter under the name `ref` and swaps to it for reference log-probs, so the
  reference is the SFT policy itself (standard DPO) at the cost of one extra adapter (a few MB), not a model.
- SimPO: reference-free, `trl.experimental.cpo.CPOTrainer` with loss_type="simpo" and cpo_alpha=0 (no NLL term);
  the policy's length-normalised log-probs are the reward, `dpo.simpo_gamma` the target margin.
- ORPO: reference-free, `trl.experimental.orpo.ORPOTrainer`: NLL on chosen + beta * log odds ratio.

With `dpo.precompute_ref_log_probs` (DPO only), every pair's reference log-probs are computed once, before
training (the steps then skip the reference forward pass), with TRL's own `compute_ref_log_probs`, and kept in
`<work>/cache/ref_logps/` under a key of what they depend on: the reference weights, dtype, quantization, max
length and the tokenized pairs. TRL's own cache keys on the prepared dataset's fingerprint, which changes with
the DPOConfig (beta, output dir), so a run with another beta recomputed them; here it reuses them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from alignflow.tasks.lib import pairs as pair_split
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_dataset, sha256_json, sha256_weights
from alignflow.tasks.lib.manifest import read_manifest

if TYPE_CHECKING:
    from alignflow.tasks.dpo import DpoConfig, DpoInputs


def trainer(cfg: DpoConfig, inputs: DpoInputs, model: Any, tok: Any, common: dict[str, Any], callbacks: list[Any],
            quant: dict[str, Any], max_length: int) -> tuple[Any, Any, Any, bool]:
    """(the trainer, the pairs it trains on, the held-out pairs, whether the reference log-probs came from the
    cache) for a pair loss."""
    import trl
    from datasets import load_from_disk

    pairs = pair_split.select(load_from_disk(str(inputs.tokenized / "preference")), "policy", inputs.pairs)
    if len(pairs) < 2:
        raise StageError(f"dpo: only {len(pairs)} training pairs on the policy's side (reward.pairs="
                         f"{inputs.pairs}); add preference data")
    heldout = load_from_disk(str(inputs.tokenized / "preference_heldout"))  # not trained on: the metrics
    if cfg.loss == "simpo":  # reference-free: the policy's length-normalised log-probs are the reward
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=cfg.simpo_gamma, max_length=max_length,
                         **common)
        made = CPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout,
                          processing_class=tok, callbacks=callbacks)
        return made, pairs, heldout, False
    if cfg.loss == "orpo":  # reference-free: NLL on chosen + beta * log odds ratio
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(max_length=max_length, **common)
        made = ORPOTrainer(model=model, args=args, train_dataset=pairs, eval_dataset=heldout,
                           processing_class=tok, callbacks=callbacks)
        return made, pairs, heldout, False
    args = trl.DPOConfig(loss_type=[cfg.loss],
                         precompute_ref_log_probs=False,  # done below, with a cache keyed on their inputs
                         max_length=max_length, **common)
    made = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs,
                          eval_dataset=heldout, processing_class=tok, callbacks=callbacks)
    ref_cached = False
    if cfg.precompute_ref_log_probs:
        made.train_dataset, ref_cached = ref_logps(made, made.train_dataset, inputs, quant)
        made.eval_dataset, _ = ref_logps(made, made.eval_dataset, inputs, quant)
        made.precompute_ref_logps = True  # DPOTrainer's switch: the loss reads the batch's ref log-probs
    return made, pairs, heldout, ref_cached


def ref_logps(trainer: Any, dataset: Any, inputs: DpoInputs, quant: dict[str, Any]) -> tuple[Any, bool]:
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
