"""evaluate: measure the tuned model against its base on the held-out eval set.

- perplexity: exp(mean negative log-likelihood) of the reference answers (answer tokens only), for the tuned
  model (`perplexity`) and the base (`perplexity_base`);
- ROUGE-1/2/L of greedy answers against the references, through the `evaluate` module shipped in
  `metrics/rouge` (`rouge1`, `rouge2`, `rougeL`, and `rougeL_base` for the base);
- BLEU (`bleu`) and exact match (`exact_match`, `exact_match_base`) through the shipped `metrics/bleu` and
  `metrics/exact_match` modules;
- reward-model win-rate: the reward stage's model scores the base's and the tuned model's answer to each
  prompt; a win counts 1, a tie (same text) 0.5 (`win_rate_vs_base`). When the registry has a `champion`
  (another adapter than this one), its answers are generated and scored too (`win_rate_vs_champion`);
- optional pairwise LLM judge (`judge: true`): the recipe's teacher (the base model or an OpenAI-compatible
  endpoint) compares the base's and the tuned model's answers in both orders; a win needs both orders, a
  disagreement counts one half (`judge_win_rate_vs_base`);
- `samples.jsonl`: prompt, reference, base / champion / tuned answers and their rewards (side-by-side table).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.training import seed_everything

Metric = Literal["perplexity", "rouge", "bleu", "exact_match", "rm_win_rate"]


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, gt=0, description="tokens generated per answer (greedy)")
    batch_size: int = Field(8, gt=0, description="prompts per generate() call")
    max_samples: int | None = Field(None, gt=0, description="evaluate on the first N eval records (None: all)")
    metrics: list[Metric] = ["perplexity", "rouge", "bleu", "exact_match", "rm_win_rate"]
    judge: bool = Field(False, description="also let the teacher judge tuned vs base answers (both orders)")


class EvaluateInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    curated: Path
    candidate: Path  # the dpo stage folder (adapter/, or model/ after a full fine-tune)
    reward: Path  # the reward stage folder (adapter/)
    champion: Path | None = None  # the registry champion's weights (an adapter or a full model), when there is one
    teacher: Any = "base"  # the recipe's synthesize.teacher, for the optional LLM judge
    out_dir: Path
    seed: int


def run(cfg: EvaluateConfig, inputs: EvaluateInputs) -> dict[str, Any]:
    import evaluate as hf_evaluate
    from peft import PeftModel

    from alignflow.tasks.lib.inference import answer_perplexity, generate, score_answers
    from alignflow.tasks.lib.models import is_adapter, load_causal_lm, load_reward_model, load_tokenizer, tuned_weights

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
    base_ppl = answer_perplexity(model, tok, prompts, references) if "perplexity" in cfg.metrics else None
    champion_answers: list[str] | None = None
    if inputs.champion is not None and is_adapter(inputs.champion):  # over the same base: no second model
        model = PeftModel.from_pretrained(model, inputs.champion, adapter_name="champion")
        champion_answers = [a[0] for a in generate(model, tok, prompts, desc="evaluate: champion", **gen)]
        model = model.unload()  # back to the plain base, without the champion's layers
    elif inputs.champion is not None:  # a fully fine-tuned champion: its own weights
        champion = load_causal_lm(inputs.champion, inputs.dtype)
        champion_answers = [a[0] for a in generate(champion, tok, prompts, desc="evaluate: champion", **gen)]
        del champion
    weights = tuned_weights(inputs.candidate)
    if is_adapter(weights):
        model = PeftModel.from_pretrained(model, weights)
    else:  # a full fine-tune: the candidate is a complete model
        del model
        model = load_causal_lm(weights, inputs.dtype)
    answers = [a[0] for a in generate(model, tok, prompts, desc="evaluate: tuned", **gen)]
    metrics: dict[str, float] = {"eval_examples": len(records)}
    if base_ppl is not None:
        metrics["perplexity"] = round(answer_perplexity(model, tok, prompts, references), 4)
        metrics["perplexity_base"] = round(base_ppl, 4)
    del model

    module = resources.files("alignflow.metrics")
    if "rouge" in cfg.metrics:
        rouge = hf_evaluate.load(str(module / "rouge"))
        tuned = rouge.compute(predictions=answers, references=references)
        base = rouge.compute(predictions=base_answers, references=references)
        metrics.update({k: round(v, 4) for k, v in tuned.items()})
        metrics["rougeL_base"] = round(base["rougeL"], 4)
        metrics["rougeL_gain"] = round(tuned["rougeL"] - base["rougeL"], 4)
    if "bleu" in cfg.metrics:
        bleu = hf_evaluate.load(str(module / "bleu"))
        metrics["bleu"] = round(bleu.compute(predictions=answers, references=references)["bleu"], 4)
        metrics["bleu_base"] = round(bleu.compute(predictions=base_answers, references=references)["bleu"], 4)
    if "exact_match" in cfg.metrics:
        em = hf_evaluate.load(str(module / "exact_match"))
        metrics["exact_match"] = round(em.compute(predictions=answers, references=references)["exact_match"], 4)
        metrics["exact_match_base"] = round(
            em.compute(predictions=base_answers, references=references)["exact_match"], 4)

    nan = [float("nan")] * len(records)
    rewards, base_rewards, champion_rewards = nan, nan, nan
    if "rm_win_rate" in cfg.metrics:
        rm = load_reward_model(inputs.base, inputs.dtype, adapter=inputs.reward / "adapter")
        rm_tok = load_tokenizer(inputs.reward / "adapter")
        rewards = score_answers(rm, rm_tok, prompts, answers)
        base_rewards = score_answers(rm, rm_tok, prompts, base_answers)
        metrics["win_rate_vs_base"] = _win_rate(answers, rewards, base_answers, base_rewards)
        metrics["reward_mean"] = round(sum(rewards) / len(rewards), 4)
        metrics["reward_mean_base"] = round(sum(base_rewards) / len(base_rewards), 4)
        if champion_answers is not None:
            champion_rewards = score_answers(rm, rm_tok, prompts, champion_answers)
            metrics["win_rate_vs_champion"] = _win_rate(answers, rewards, champion_answers, champion_rewards)

    if cfg.judge:
        from alignflow.tasks.lib.teacher import Teacher, teacher_scores

        judge = Teacher(inputs.teacher, max_new_tokens=4, temperature=0.8, top_p=0.95, batch_size=8,  # (greedy:
                        base=inputs.base, dtype=inputs.dtype, journal=out / "judge.jsonl")  # temperature, top_p unused)
        verdicts = [teacher_scores(judge, p, [b, a]) for p, b, a in zip(prompts, base_answers, answers, strict=True)]
        judge.close()
        # [base, tuned] scores: (0, 1) tuned won both orders, (1, 0) base did, (0, 0) the orders disagreed
        metrics["judge_win_rate_vs_base"] = round(
            sum(1.0 if t > b else 0.0 if b > t else 0.5 for b, t in verdicts) / max(len(verdicts), 1), 4)

    write_jsonl(out / "samples.jsonl", (
        {"prompt": p[-1]["content"], "reference": ref, "base": b, **({"champion": c} if champion_answers else {}),
         "tuned": a, "reward_base": round(rb, 4), **({"reward_champion": round(rc, 4)} if champion_answers else {}),
         "reward_tuned": round(r, 4)}
        for p, ref, b, c, a, rb, rc, r in zip(prompts, references, base_answers, champion_answers or base_answers,
                                              answers, base_rewards, champion_rewards, rewards, strict=True)
    ))
    return write_manifest(out, {"stage": "evaluate", "outputs": ["samples.jsonl"], "artifacts": ["samples.jsonl"],
                                "metrics": metrics})


def _win_rate(answers: list[str], rewards: list[float], others: list[str], other_rewards: list[float]) -> float:
    """Fraction of prompts where the tuned answer out-scores the other; identical answers count one half."""
    pairs = zip(answers, rewards, others, other_rewards, strict=True)
    wins = [0.5 if a == o else float(r > ro) for a, r, o, ro in pairs]
    return round(sum(wins) / max(len(wins), 1), 4)
