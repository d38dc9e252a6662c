"""The reward stage's model as a reward for online RL (`reward_model` among `dpo.rewards`, grpo / rloo): a scorer
of (prompt, completion text) that tasks/lib/rewards.py turns into TRL's reward function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignflow.tasks.lib.errors import StageError

if TYPE_CHECKING:
    from alignflow.tasks.dpo import DpoConfig, DpoInputs


def reward_model_scorer(cfg: DpoConfig, inputs: DpoInputs, quant: dict[str, Any], policy: Any, full: bool) -> Any:
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
