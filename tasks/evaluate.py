"""evaluate: measure the tuned model against its base on the held-out eval set.

- perplexity: exp(mean negative log-likelihood) of the reference answers (answer tokens only), for the tuned
  model (`perplexity`) and the base (`perplexity_base`);
- ROUGE-1/2/L of greedy answers against the references, through the `evaluate` module shipped in
  `metrics/rouge` (`rouge1`, `rouge2`, `rougeL`, and `rougeL_base` for the base);
- reward-model win-rate: the reward stage's model scores the base's and the tuned model's answer to each
  prompt; a win counts 1, a tie (same text) 0.5 (`win_rate_vs_base`);
- `samples.jsonl`: prompt, reference, base answer, tuned answer and their rewards, for the side-by-side table.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import read_jsonl, seed_everything, write_jsonl, write_manifest

Metric = Literal["perplexity", "rouge", "rm_win_rate"]


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, gt=0, description="tokens generated per answer (greedy)")
    batch_size: int = Field(8, gt=0, description="prompts per generate() call")
    max_samples: int | None = Field(None, gt=0, description="evaluate on the first N eval records (None: all)")
    metrics: list[Metric] = ["perplexity", "rouge", "rm_win_rate"]


class EvaluateInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    curated: Path
    candidate: Path  # the dpo stage folder (adapter/)
    reward: Path  # the reward stage folder (adapter/)
    out_dir: Path
    seed: int


def run(cfg: EvaluateConfig, inputs: EvaluateInputs) -> dict[str, Any]:
    import evaluate as hf_evaluate
    from peft import PeftModel

    from tasks.modeling import generate, load_causal_lm, load_reward_model, load_tokenizer, score_answers

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(inputs.seed)
    records = list(read_jsonl(inputs.curated / "eval.jsonl"))[: cfg.max_samples]
    prompts = [r["prompt"] for r in records]
    references = [r["reference"] for r in records]
    tok = load_tokenizer(inputs.tokenized / "tokenizer")

    model = load_causal_lm(inputs.base, inputs.dtype)
    gen = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    base_answers = [a[0] for a in generate(model, tok, prompts, desc="evaluate: base", **gen)]
    base_ppl = _perplexity(model, tok, prompts, references) if "perplexity" in cfg.metrics else None
    model = PeftModel.from_pretrained(model, inputs.candidate / "adapter")
    answers = [a[0] for a in generate(model, tok, prompts, desc="evaluate: tuned", **gen)]
    metrics: dict[str, float] = {"eval_examples": len(records)}
    if base_ppl is not None:
        metrics["perplexity"] = round(_perplexity(model, tok, prompts, references), 4)
        metrics["perplexity_base"] = round(base_ppl, 4)
    del model

    if "rouge" in cfg.metrics:
        rouge = hf_evaluate.load(str(resources.files("metrics") / "rouge"))
        tuned = rouge.compute(predictions=answers, references=references)
        base = rouge.compute(predictions=base_answers, references=references)
        metrics.update({k: round(v, 4) for k, v in tuned.items()})
        metrics["rougeL_base"] = round(base["rougeL"], 4)
        metrics["rougeL_gain"] = round(tuned["rougeL"] - base["rougeL"], 4)

    rewards = base_rewards = [float("nan")] * len(records)
    if "rm_win_rate" in cfg.metrics:
        rm = load_reward_model(inputs.base, inputs.dtype, adapter=inputs.reward / "adapter")
        rm_tok = load_tokenizer(inputs.reward / "adapter")
        rewards = score_answers(rm, rm_tok, prompts, answers)
        base_rewards = score_answers(rm, rm_tok, prompts, base_answers)
        wins = [0.5 if a == b else float(r > rb)
                for a, b, r, rb in zip(answers, base_answers, rewards, base_rewards, strict=True)]
        metrics["win_rate_vs_base"] = round(sum(wins) / len(wins), 4)
        metrics["reward_mean"] = round(sum(rewards) / len(rewards), 4)
        metrics["reward_mean_base"] = round(sum(base_rewards) / len(base_rewards), 4)

    write_jsonl(out / "samples.jsonl", (
        {"prompt": p[-1]["content"], "reference": ref, "base": b, "tuned": a,
         "reward_base": round(rb, 4), "reward_tuned": round(r, 4)}
        for p, ref, b, a, rb, r in zip(prompts, references, base_answers, answers, base_rewards, rewards, strict=True)
    ))
    return write_manifest(out, {"stage": "evaluate", "outputs": ["samples.jsonl"], "artifacts": ["samples.jsonl"],
                                "metrics": metrics})


def _perplexity(model: Any, tok: Any, prompts: list[list[dict[str, str]]], references: list[str]) -> float:
    """exp(mean NLL per answer token) of the references given their prompts (answer tokens only)."""
    import torch

    from tasks.tokenize import encode_conversation

    total_nll, total_tokens = 0.0, 0
    model.eval()
    for prompt, ref in zip(prompts, references, strict=True):
        encoded = encode_conversation(tok, [*prompt, {"role": "assistant", "content": ref}])
        if encoded is None:
            continue
        ids, labels = encoded
        n = sum(1 for label in labels[1:] if label != -100)  # labels are shifted by one inside the model
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids], device=model.device),
                         labels=torch.tensor([labels], device=model.device)).loss
        total_nll += float(loss) * n
        total_tokens += n
    return math.exp(total_nll / max(total_tokens, 1))
