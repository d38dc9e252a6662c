"""evaluate: measure the tuned model against its base, the SFT-only model and the champion, with intervals.

On the held-out eval set, every model compared answers greedily: the base, the SFT-only model (what sft made,
before preference tuning), the registry's champion when there is one (re-measured here on the current eval set,
so its numbers are always comparable), and the tuned candidate (dpo's product). Then:
- perplexity: exp(mean negative log-likelihood) of the reference answers (answer tokens only): `perplexity`,
  `perplexity_base`, `perplexity_champion`;
- ROUGE-1/2/L of the answers against the references through the `evaluate` module shipped in `metrics/rouge`
  (`rouge1`, `rouge2`, `rougeL`, `rougeL_base`, `rougeL_sft`, `rougeL_champion`, `rougeL_gain` = tuned - base);
- BLEU and exact match through the shipped `metrics/bleu` and `metrics/exact_match` modules (`bleu`,
  `bleu_base`, `exact_match`, `exact_match_base`, and `_sft` / `_champion`); `exact_match_gain_vs_sft` =
  tuned - SFT only: what preference tuning added, by a check that needs no reward model;
- reward-model win-rates: the reward stage's model scores each answer; per prompt a win counts 1, a loss 0, the
  same text (or score) 1/2: `win_rate_vs_base`, `win_rate_vs_sft` (what preference tuning added) and
  `win_rate_vs_champion`; `changed_vs_sft` is the share of answers preference tuning changed at all. The reward
  model, loaded exactly as it judges here, is scored on tokenize's held-out pairs that neither reward nor dpo
  trained on: `judge_heldout_accuracy` and the lower end of its 95 % Wilson interval (`_ci_low`), which the gate
  compares with `register.gate.min_judge_accuracy` before it trusts any win-rate;
- whether that judge is independent of the policy (`judge_independent`, 1/0; tag `alignflow.judge_independent`):
  not when reward and dpo trained on common pairs (`reward.pairs: shared`; their manifests'
  `trained_pair_hashes` intersect), nor when dpo optimised the policy against the reward model itself (grpo /
  rloo with `reward_model` among dpo.rewards), nor in a retrain when the judge learned pairs an ancestor's policy
  learned or the policy pairs an ancestor's judge learned (the lineage's `pairs.json`, flows/lineage.py);
  `judge_dependence` in the manifest says which. The gate does not count a dependent judge's win-rates;
- 95 % intervals from a paired bootstrap over the prompts (tasks/lib/stats.py): `<win rate>_ci_low/_ci_high`,
  `rougeL_gain_ci_low/_ci_high`, `exact_match_gain_vs_sft_ci_low/_ci_high`, and for each metric vs the champion
  `<metric>_delta_ci_low/_ci_high` (delta = candidate - champion). The gate decides on these bounds;
- optional pairwise LLM judge (`judge: true`): the recipe's teacher compares the base's and the tuned model's
  answers in both orders; a win needs both orders, a disagreement counts one half (`judge_win_rate_vs_base`);
- `samples.jsonl`: prompt, reference, each model's answer and reward (the side-by-side table);
- optional standard benchmarks (`lm_eval: {tasks: [...]}`): EleutherAI's lm-evaluation-harness on the same model
  objects (tasks/lib/harness.py): the tuned model, the base (the one base model this stage loaded, before any
  adapter goes on: no second copy) and the champion. Metrics `lm_eval.<task>.<metric>` (tuned),
  `..._base`, `..._champion`, and for metrics the harness gives per document (a mean over documents), a paired
  bootstrap of tuned - champion over the same documents, `lm_eval.<task>.<metric>_delta_ci_low/_ci_high`, which
  `register.gate.max_regression` reads like any other metric's; `lm_eval.<task>.<metric>_higher_is_better` (1/0)
  tells the gate which way a loss goes. `lm_eval_results.json` holds each model's harness results per task,
  `lm_eval_samples.jsonl` the per-document values;
- what ships (`register.ship`): each artifact (merged folder, GGUF file) built from the tuned weights by the code
  `alignflow export` runs (tasks/lib/shipped_artifacts.py), read back as users load it, answering the same prompts:
  `shipped.<format>.<metric>` and the paired interval of shipped - adapter, `shipped.<format>.<metric>_delta_ci_low
  /_ci_high`, which `register.gate.max_shipped_regression` reads; `shipped.<format>.changed` / `.bytes`. The
  artifacts are cached in `<work>/cache/shipped/` by what they are made from; the manifest's `shipped` holds each
  one's path and sha256.


Every model's answers (and reference log-likelihoods) are cached in `<work>/cache/answers/` under a key of the
weights' content hash, the tokenizer, the prompts and references, the generation settings, dtype, the machine
kind and the inference code: a run that changed only dpo generates the new candidate's answers and nothing else
(the champion's were cached when it was the candidate). The reward model is built over the loaded base's
backbone (one load of the base per evaluate, one copy in memory).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.harness import HarnessResult, run_harness, task_manager
from alignflow.tasks.lib.hashing import code_version, sha256_json
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.shipped_artifacts import ShipFormat, dtype_name, read_back_identity
from alignflow.tasks.lib.stats import (
    LEVEL,
    bootstrap_ci,
    delta_ci,
    familywise_level,
    mean_ci,
    perplexity_delta_ci,
    wilson_low,
    win_scores,
)
from alignflow.tasks.lib.training import seed_everything

Metric = Literal["perplexity", "rouge", "bleu", "exact_match", "rm_win_rate"]


class LmEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(..., min_length=1, description="lm-eval task, group or tag names, e.g. "
                             "[alignflow_sentiment] (shipped) or [arc_easy] (needs the hub or its cache)")
    include_path: str | None = Field(None, description="a folder of lm-eval task YAMLs, searched besides the "
                                     "shipped alignflow/metrics/lm_eval_tasks")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (None: each task's default)")
    limit: int | None = Field(None, gt=0, description="first N documents per task (None: all)")
    batch_size: int = Field(8, gt=0, description="requests per forward pass")


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(48, gt=0, description="tokens generated per answer (greedy)")
    batch_size: int = Field(8, gt=0, description="prompts per generate() call")
    max_samples: int | None = Field(None, gt=0, description="evaluate on the first N eval records (None: all)")
    metrics: list[Metric] = ["perplexity", "rouge", "bleu", "exact_match", "rm_win_rate"]
    judge: bool = Field(False, description="also let the teacher judge tuned vs base answers (both orders)")
    lm_eval: LmEvalConfig | None = Field(None, description="also run lm-evaluation-harness tasks on the tuned "
                                         "model, the base and the champion (the optional lm-eval extra)")


class EvaluateInputs(BaseModel):
    base: Path
    dtype: str
    tokenized: Path
    curated: Path
    candidate: Path  # the dpo stage folder (adapter/, or model/ after a full fine-tune)
    sft: Path | None = None  # the sft stage folder: the SFT-only model, to measure what preference tuning added
    reward: Path  # the reward stage folder (adapter/, and its held-out accuracy)
    champion: Path | None = None  # the registry champion's weights (an adapter or a full model), when there is one
    champion_sha: str | None = None  # their content hash (the registry tag): the key of the champion's cached answers
    base_key: str = ""  # the resolved base's identity: part of every cached answer's key
    answers_cache: Path | None = None  # <work>/cache/answers; None: no cache
    teacher: Any = "base"  # the recipe's synthesize.teacher, for the optional LLM judge
    out_dir: Path
    seed: int
    # >1: this candidate is the best of that many sweep trials, picked on these eval prompts: every interval is
    # taken at the familywise level 1 - 0.05/k (Bonferroni), so that the selection does not inflate a pass
    selection_trials: int = Field(1, ge=1)
    # a retrain: the lineage of the weights dpo continued (flows/lineage.py); its `pairs.json` lists the pairs the
    # history's judges and policies trained on (absent there: a lineage logged before sides were recorded)
    ancestors: Path | None = None
    # register.ship: the artifacts the version ships as, each built from the tuned weights as `alignflow export`
    # builds it, answering the same prompts (`shipped.<format>.*`); `base_spec` names the base in a GGUF's metadata
    ship: list[ShipFormat] = []
    base_spec: str = ""
    shipped_cache: Path | None = None  # <work>/cache/shipped; None: built under out_dir/shipped, not kept


def run(cfg: EvaluateConfig, inputs: EvaluateInputs) -> dict[str, Any]:
    import evaluate as hf_evaluate

    from alignflow.tasks.lib.inference import answer_nlls, generate, perplexity, score_answers
    from alignflow.tasks.lib.models import (
        device_kind,
        is_adapter,
        load_causal_lm,
        load_tokenizer,
        reward_model_over,
        tuned_weights,
    )

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(inputs.seed)
    # `auto` resolved once, here, to what every model below computes in: the answers' and artifacts' keys, and what
    # a shipped artifact records it was built in, name that dtype (another machine resolves `auto` otherwise)
    dtype = dtype_name(inputs.dtype)
    level = familywise_level(inputs.selection_trials)  # 0.95 for a run that was not selected among others
    records = list(read_jsonl(inputs.curated / "eval.jsonl"))[: cfg.max_samples]
    prompts = [r["prompt"] for r in records]
    references = [r["reference"] for r in records]
    tok = load_tokenizer(inputs.tokenized / "tokenizer")
    gen = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    harness: dict[str, HarnessResult] = {}
    manager = task_manager(cfg.lm_eval.tasks, cfg.lm_eval.include_path) if cfg.lm_eval else None

    # --- every model answers every prompt (an adapter goes over the one base model, then comes off again) -------
    others = {"sft": tuned_weights(inputs.sft) if inputs.sft else None, "champion": inputs.champion,
              "tuned": tuned_weights(inputs.candidate)}
    answers: dict[str, list[str]] = {}
    nlls: dict[str, list[tuple[float, int]]] = {}
    base_model = load_causal_lm(inputs.base, dtype)
    adapted: Any = None  # the last adapter model: it holds the base too
    # the weights' content hash names the answers, not the role: the candidate's answers are the champion's next
    # time, once it is promoted (the registry tag alignflow.adapter_sha256 is dpo's recorded hash of them)
    identity = {"base": inputs.base_key,
                "sft": read_manifest(inputs.sft).get("outputs", {}).get(others["sft"].name) if others["sft"] else None,
                "champion": inputs.champion_sha,
                "tuned": read_manifest(inputs.candidate).get("outputs", {}).get(others["tuned"].name)}
    answer_key = {"tokenizer": read_manifest(inputs.tokenized).get("outputs", {}).get("tokenizer"),
                  "records": records, "gen": gen, "perplexity": "perplexity" in cfg.metrics, "dtype": dtype,
                  "device": device_kind(), "base": inputs.base_key,
                  "code": code_version("alignflow.tasks.lib.inference", "alignflow.tasks.lib.served_model",
                                      "alignflow.tasks.lib.chat"),
                  "libraries": {n: version(n) for n in ("torch", "transformers", "peft", "bitsandbytes")}}

    def measure(name: str, model: Any, tokenizer: Any = tok) -> None:
        answers[name] = [a[0] for a in generate(model, tokenizer, prompts, desc=f"evaluate: {name}", **gen)]
        if "perplexity" in cfg.metrics:
            nlls[name] = answer_nlls(model, tokenizer, prompts, references, batch_size=cfg.batch_size)

    def cache_file(name: str) -> Path | None:
        if inputs.answers_cache is None or not identity.get(name) or not answer_key["tokenizer"]:
            return None  # weights of unknown content are not cached
        weights = identity[name] if name != "base" else f"base:{identity[name]}"
        # a shipped artifact's answers also depend on how it is read back (its loader's code, the gguf package)
        read = {"read_back": read_back_identity()} if name.startswith("shipped.") else {}
        return inputs.answers_cache / f"answers-{sha256_json({**answer_key, 'weights': weights, **read})[:32]}.json"

    def from_cache(name: str) -> bool:
        path = cache_file(name)
        if path is None or not path.exists():
            return False
        hit = json.loads(path.read_text())
        answers[name] = hit["answers"]
        if hit["nlls"] is not None:
            nlls[name] = [(float(a), int(b)) for a, b in hit["nlls"]]
        return True

    def to_cache(name: str) -> None:
        path = cache_file(name)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: a reader never sees half a file
        tmp.write_text(json.dumps({"answers": answers[name], "nlls": nlls.get(name)}))
        os.replace(tmp, path)

    cached_answers: list[str] = []

    def wanted(name: str) -> bool:
        """Whether this model must be loaded: its answers are not cached, or the harness runs on it."""
        if from_cache(name):
            cached_answers.append(name)
            return bool(cfg.lm_eval) and name != "sft"
        return True

    def answer(name: str, model: Any) -> None:
        if name not in answers:  # not from the cache
            measure(name, model)
            to_cache(name)
        if cfg.lm_eval and name != "sft":  # the same object: the base, or the base with this adapter on
            harness[name] = run_harness(model, load_tokenizer(inputs.tokenized / "tokenizer"), cfg.lm_eval.tasks,
                                        manager, num_fewshot=cfg.lm_eval.num_fewshot, limit=cfg.lm_eval.limit,
                                        batch_size=cfg.lm_eval.batch_size, seed=inputs.seed)

    if wanted("base"):
        answer("base", base_model)
    for name, weights in others.items():
        if weights is None or not wanted(name):
            continue
        if is_adapter(weights):
            from peft import PeftModel

            adapted = PeftModel.from_pretrained(base_model, weights, adapter_name=name)
            answer(name, adapted)
            base_model = adapted.unload()  # back to the plain base, without this adapter's layers
        else:  # a full fine-tune: its own complete weights
            full = load_causal_lm(weights, dtype)
            answer(name, full)
            del full
    compared = [name for name in ("base", "sft", "champion") if name in answers]

    # --- reference metrics, per model, with paired intervals where the gate reads them ----------------------
    metrics: dict[str, float] = {"eval_examples": len(records), "interval_level": round(level, 6),
                                 "selection_trials": inputs.selection_trials}
    tuned = "tuned"
    if nlls:
        metrics["perplexity"] = round(perplexity(nlls[tuned]), 4)
        for name in compared:
            metrics[f"perplexity_{name}"] = round(perplexity(nlls[name]), 4)
        if "champion" in nlls:
            _put(metrics, "perplexity_delta", perplexity_delta_ci(nlls[tuned], nlls["champion"], inputs.seed,
                                                                        level))
    module = resources.files("alignflow.metrics")
    per_example: dict[str, dict[str, list[float]]] = {}  # metric -> model -> per-prompt values
    if "rouge" in cfg.metrics:
        rouge = hf_evaluate.load(str(module / "rouge"))
        for name in [tuned, *compared]:
            scores = rouge.compute(predictions=answers[name], references=references, per_example=True)
            for key, values in scores.items():
                per_example.setdefault(key, {})[name] = values
        metrics.update({k: round(_mean(per_example[k][tuned]), 4) for k in ("rouge1", "rouge2", "rougeL")})
        metrics.update(gain("rougeL_gain", per_example["rougeL"][tuned], per_example["rougeL"]["base"], inputs.seed,
                            level))
    if "exact_match" in cfg.metrics:
        em = hf_evaluate.load(str(module / "exact_match"))
        per_example["exact_match"] = {
            name: em.compute(predictions=answers[name], references=references, per_example=True)["exact_match"]
            for name in [tuned, *compared]}
        metrics["exact_match"] = round(_mean(per_example["exact_match"][tuned]), 4)
        if "sft" in per_example["exact_match"]:  # what preference tuning added, by the references alone
            metrics.update(gain("exact_match_gain_vs_sft", per_example["exact_match"][tuned],
                                per_example["exact_match"]["sft"], inputs.seed, level))
    for key in ("rouge1", "rouge2", "rougeL", "exact_match"):
        for name in compared:
            if key in per_example and key in ("rougeL", "exact_match"):
                metrics[f"{key}_{name}"] = round(_mean(per_example[key][name]), 4)
        if key in per_example and "champion" in per_example[key]:
            _put(metrics, f"{key}_delta", delta_ci(per_example[key][tuned], per_example[key]["champion"], inputs.seed,
                                                   level))
    if "bleu" in cfg.metrics:
        bleu = hf_evaluate.load(str(module / "bleu"))
        metrics["bleu"] = round(bleu.compute(predictions=answers[tuned], references=references)["bleu"], 4)
        for name in compared:
            metrics[f"bleu_{name}"] = round(bleu.compute(predictions=answers[name], references=references)["bleu"], 4)
        if "champion" in answers:
            _put(metrics, "bleu_delta", _bleu_delta_ci(answers[tuned], answers["champion"], references, inputs.seed,
                                                       level))

    # --- the reward model as judge: is it independent of the policy? then win-rates with intervals ---------
    independent, why = judge_independence(read_manifest(inputs.reward), read_manifest(inputs.candidate),
                                          _lineage_sides(inputs.ancestors))
    metrics["judge_independent"] = float(independent)
    nan = [float("nan")] * len(records)
    rewards: dict[str, list[float]] = {name: nan for name in answers}
    if "rm_win_rate" in cfg.metrics:
        rm = reward_model_over(base_model, inputs.reward / "adapter")  # the loaded base's backbone, no second copy
        rm_tok = load_tokenizer(inputs.reward / "adapter")
        for name in answers:
            rewards[name] = score_answers(rm, rm_tok, prompts, answers[name])
        # The judge, exactly as loaded here, on the held-out pairs that neither reward nor dpo trained on: the
        # gate trusts its win-rates only when the lower bound of this accuracy is high enough.
        from datasets import load_from_disk

        held = load_from_disk(str(inputs.tokenized / "preference_heldout"))
        held_prompts = list(held["prompt"])
        chosen = score_answers(rm, rm_tok, held_prompts, [c[-1]["content"] for c in held["chosen"]])
        rejected = score_answers(rm, rm_tok, held_prompts, [r[-1]["content"] for r in held["rejected"]])
        right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        metrics["judge_heldout_pairs"] = len(held)
        metrics["judge_heldout_accuracy"] = round(right / max(len(held), 1), 4)
        metrics["judge_heldout_accuracy_ci_low"] = wilson_low(right, len(held),  # z=1.96 unless selected
                                                              level=level if inputs.selection_trials > 1 else None)
        if hasattr(rm, "unload"):  # take the reward LoRA layers out of the shared backbone again
            rm.unload()
        del rm
        metrics["reward_mean"] = round(_mean(rewards[tuned]), 4)
        for name in compared:
            metrics[f"reward_mean_{name}"] = round(_mean(rewards[name]), 4)
            wins = win_scores(answers[tuned], rewards[tuned], answers[name], rewards[name])
            metrics[f"win_rate_vs_{name}"] = round(_mean(wins), 4)
            _put(metrics, f"win_rate_vs_{name}", mean_ci(wins, inputs.seed, level))
        if "champion" in answers:
            _put(metrics, "reward_mean_delta", delta_ci(rewards[tuned], rewards["champion"], inputs.seed, level))
    if "sft" in answers:
        metrics["changed_vs_sft"] = round(_mean([float(a != s) for a, s in zip(answers[tuned], answers["sft"],
                                                                                  strict=True)]), 4)

    # --- what ships: each artifact of register.ship, built as export builds it, read back as users load it ------
    shipped: dict[str, dict[str, Any]] = {}
    if inputs.ship:
        import gc

        import torch

        from alignflow.tasks.lib.shipped_artifacts import artifact, build_identity, built_with, read_back

        # not used after this point: one model in memory at a time (the build loads its own on the CPU). The last
        # adapter model holds the base as well, so both go before the memory is handed back
        del base_model, adapted
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for fmt in inputs.ship:
            # weights of unknown content (no recorded hash) are never cached: their key would name no weights
            cache = inputs.shipped_cache if identity["tuned"] else None
            built = artifact(fmt, others["tuned"], inputs.base, dtype, inputs.base_spec, cache,
                             build_identity(fmt, identity["tuned"] or "", inputs.base_key, dtype,
                                            inputs.base_spec, device_kind()),
                             out / "shipped")
            name = f"shipped.{fmt}"
            identity[name] = f"{fmt}:{built.sha256}"  # its answers are cached under the artifact's own hash
            shipped[fmt] = {**built.record(), "built_with": built_with(fmt, dtype, device_kind())}
            if built.path.is_relative_to(out):  # built in this stage's folder (no cache): the flow renames it
                shipped[fmt]["path"] = built.path.relative_to(out).as_posix()
            if from_cache(name):
                cached_answers.append(name)
            else:
                model, shipped_tok = read_back(fmt, built.path, dtype)
                measure(name, model, shipped_tok)
                to_cache(name)
                del model
        metrics.update(_shipped_metrics(inputs.ship, answers, nlls, per_example, references, shipped, inputs.seed,
                                        level, cfg.metrics))

    if cfg.judge:
        from alignflow.tasks.lib.teacher import Teacher, teacher_scores

        judge = Teacher(inputs.teacher, max_new_tokens=4, temperature=0.8, top_p=0.95, batch_size=8,  # (greedy:
                        base=inputs.base, dtype=inputs.dtype, journal=out / "judge.jsonl")  # temperature, top_p unused)
        verdicts = [teacher_scores(judge, p, [b, a])
                    for p, b, a in zip(prompts, answers["base"], answers[tuned], strict=True)]
        judge.close()
        # [base, tuned] scores: (0, 1) tuned won both orders, (1, 0) base did, (0, 0) the orders disagreed
        metrics["judge_win_rate_vs_base"] = round(
            sum(1.0 if t > b else 0.0 if b > t else 0.5 for b, t in verdicts) / max(len(verdicts), 1), 4)

    outputs = ["samples.jsonl"]
    if harness:
        metrics.update(_harness_metrics(harness, inputs.seed, level))
        (out / "lm_eval_results.json").write_text(json.dumps({n: r.raw for n, r in harness.items()}, indent=2,
                                                             default=str))
        write_jsonl(out / "lm_eval_samples.jsonl", ({"model": n, "metric": m, "doc_id": d, "value": v}
                                                    for n, r in harness.items() for m, docs in r.per_doc.items()
                                                    for d, v in sorted(docs.items())))
        outputs += ["lm_eval_results.json", "lm_eval_samples.jsonl"]
    write_jsonl(out / "samples.jsonl", (
        {"prompt": p[-1]["content"], "reference": ref,
         **{name: answers[name][i] for name in compared}, "tuned": answers[tuned][i],
         **{f"reward_{name}": round(rewards[name][i], 4) for name in compared},
         "reward_tuned": round(rewards[tuned][i], 4),
         **{f"shipped.{fmt}": answers[f"shipped.{fmt}"][i] for fmt in shipped}}
        for i, (p, ref) in enumerate(zip(prompts, references, strict=True))
    ))
    # What makes two evaluations comparable: the same prompts and references, sampling budget and base model.
    eval_config_hash = sha256_json([records, cfg.max_samples, cfg.max_new_tokens, inputs.base.name])
    return write_manifest(out, {"stage": "evaluate", "compared": compared, "eval_config_hash": eval_config_hash,
                                "judge_independent": independent, "judge_dependence": why,
                                "interval_level": level, "selection_trials": inputs.selection_trials,
                                "cached_answers": cached_answers,  # models whose answers came from the cache
                                # register.ship: each artifact's path, sha256 (what export must reproduce), bytes
                                "shipped": shipped,
                                "outputs": outputs, "artifacts": outputs, "metrics": metrics})


def _shipped_metrics(formats: list[str], answers: dict[str, list[str]], nlls: dict[str, list[tuple[float, int]]],
                     per_example: dict[str, dict[str, list[float]]], references: list[str],
                     shipped: dict[str, dict[str, Any]], seed: int, level: float,
                     measured: list[str]) -> dict[str, float]:
    """`shipped.<format>.<metric>` of each artifact's answers to the eval prompts, with the paired interval of its
    difference from the adapter model's (`_delta_ci_low/_high`, delta = shipped - adapter), for the reference
    metrics evaluate computes; `shipped.<format>.changed`: the share of prompts whose answer differs from the
    adapter model's; `shipped.<format>.bytes`: the artifact's size."""
    from importlib import resources

    import evaluate as hf_evaluate

    from alignflow.tasks.lib.inference import perplexity

    module = resources.files("alignflow.metrics")
    out: dict[str, float] = {}
    for fmt in formats:
        name, key = f"shipped.{fmt}", f"shipped.{fmt}."
        mine: dict[str, list[float]] = {}
        if "exact_match" in measured:
            em = hf_evaluate.load(str(module / "exact_match"))
            mine["exact_match"] = em.compute(predictions=answers[name], references=references,
                                             per_example=True)["exact_match"]
        if "rouge" in measured:
            rouge = hf_evaluate.load(str(module / "rouge"))
            scores = rouge.compute(predictions=answers[name], references=references, per_example=True)
            mine.update({k: scores[k] for k in ("rouge1", "rouge2", "rougeL")})
        for metric, values in mine.items():
            out[key + metric] = round(_mean(values), 4)
            _put(out, key + metric + "_delta", delta_ci(values, per_example[metric]["tuned"], seed, level))
        if "bleu" in measured:
            bleu = hf_evaluate.load(str(module / "bleu"))
            out[key + "bleu"] = round(bleu.compute(predictions=answers[name], references=references)["bleu"], 4)
            _put(out, key + "bleu_delta", _bleu_delta_ci(answers[name], answers["tuned"], references, seed, level))
        if name in nlls and "tuned" in nlls:
            out[key + "perplexity"] = round(perplexity(nlls[name]), 4)
            _put(out, key + "perplexity_delta", perplexity_delta_ci(nlls[name], nlls["tuned"], seed, level))
        out[key + "changed"] = round(_mean([float(a != b) for a, b in zip(answers[name], answers["tuned"],
                                                                          strict=True)]), 4)
        out[key + "bytes"] = float(shipped[fmt]["bytes"])
    return out


def _lineage_sides(ancestors: Path | None) -> dict[str, list[str]] | None:
    """The pair hashes per side (`judge`, `policy`) of the lineage the candidate's weights continue: none without
    one; None for a lineage that does not record them (logged before they were, or a curated folder)."""
    if ancestors is None:
        return NO_ANCESTORS
    sides = ancestors / "pairs.json"
    recorded = json.loads(sides.read_text()) if sides.exists() else None
    return None if recorded is None or recorded.get("unknown") else recorded  # unknown: carried down the lineage


NO_ANCESTORS: dict[str, list[str]] = {"judge": [], "policy": []}  # a run that continues no lineage (read only)


def judge_independence(reward: dict[str, Any], dpo: dict[str, Any],
                       lineage: dict[str, list[str]] | None = NO_ANCESTORS) -> tuple[bool, str]:
    """(whether the reward model judges the policy independently, why not). From what the two stages say they
    trained on: the pairs both learned (hashes as tokenize's heldout_pair_hashes), and whether dpo's own reward was
    the reward model. Manifests without the lists (made before they existed) trained both on every pair.
    `lineage`: the pairs the ancestors' judges and policies trained on (a retrain continues the champion's
    weights, so its policy learned theirs too): the judge must not have learned a pair any ancestor's policy
    learned, nor the policy one any ancestor's judge learned; None: a lineage whose sides are unknown."""
    if dpo.get("optimised_against_reward_model"):
        return False, "dpo optimised the policy against this reward model (dpo.rewards has reward_model)"
    judge, policy = reward.get("trained_pair_hashes"), dpo.get("trained_pair_hashes")
    if judge is None or policy is None:
        return False, "the reward and dpo manifests do not list the pairs they trained on"
    common = set(judge) & set(policy)
    if common:
        return False, (f"reward and dpo trained on {len(common)} common preference pairs "
                       f"(reward.pairs={reward.get('pairs', 'shared')})")
    if lineage is None:
        return False, ("the lineage of the weights dpo continued does not list the pairs its judges and policies "
                       "trained on (logged before it did)")
    inherited = set(judge) & set(lineage.get("policy", []))
    if inherited:
        return False, (f"reward trained on {len(inherited)} preference pairs that an ancestor's policy trained on "
                       f"(the lineage of the weights dpo continued)")
    taught = set(policy) & set(lineage.get("judge", []))
    if taught:
        return False, (f"dpo trained on {len(taught)} preference pairs that an ancestor's judge trained on "
                       f"(the lineage of the weights dpo continued)")
    return True, ""


def _harness_metrics(harness: dict[str, HarnessResult], seed: int, level: float = LEVEL) -> dict[str, float]:
    """`lm_eval.<task>.<metric>` for the tuned model, `_base` / `_champion` for the others, the direction, and the
    paired interval of tuned - champion where both have per-document values over the same documents."""
    tuned = harness["tuned"]
    metrics: dict[str, float] = {}
    for name, value in tuned.metrics.items():
        key = f"lm_eval.{name}"
        metrics[key] = round(value, 4)
        metrics[f"{key}_higher_is_better"] = float(tuned.higher_is_better[name])
        for other in ("base", "champion"):
            if other in harness and name in harness[other].metrics:
                metrics[f"{key}_{other}"] = round(harness[other].metrics[name], 4)
        champion = harness.get("champion")
        if champion is not None and name in tuned.per_doc and name in champion.per_doc:
            docs = sorted(set(tuned.per_doc[name]) & set(champion.per_doc[name]))
            _put(metrics, f"{key}_delta", delta_ci([tuned.per_doc[name][d] for d in docs],
                                                    [champion.per_doc[name][d] for d in docs], seed, level))
        elif champion is not None and name in champion.metrics:  # an aggregate with no per-document values
            delta = round(value - champion.metrics[name], 4)
            metrics[f"{key}_delta_ci_low"] = metrics[f"{key}_delta_ci_high"] = delta
    return metrics


def gain(name: str, candidate: list[float], other: list[float], seed: int,
         level: float = LEVEL) -> dict[str, float]:
    """`name`: mean(candidate) - mean(other) over the same prompts, with its 95 % paired-bootstrap interval
    (`name_ci_low`, `name_ci_high`); positive when the candidate scores higher."""
    low, high = delta_ci(candidate, other, seed, level)
    return {name: round(_mean(candidate) - _mean(other), 4), f"{name}_ci_low": low, f"{name}_ci_high": high}


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _put(metrics: dict[str, float], name: str, interval: tuple[float, float]) -> None:
    metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = interval


def _bleu_delta_ci(candidate: list[str], other: list[str], references: list[str], seed: int,
                   level: float = LEVEL) -> tuple[float, float]:
    """Paired interval of corpus BLEU(candidate) - BLEU(other). Corpus BLEU is not a mean of per-prompt values:
    each resample sums the prompts' n-gram statistics and scores them with sacrebleu, the library behind
    metrics/bleu (same 13a tokenisation and exp smoothing), without re-running the module 2,000 times."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(smooth_method="exp")
    stats = {name: scorer._extract_corpus_statistics(hyps, [references])  # per-prompt n-gram counts
             for name, hyps in (("candidate", candidate), ("other", other))}

    def score(name: str, idx: Any) -> float:
        summed = [sum(stats[name][i][k] for i in idx) for k in range(len(stats[name][0]))]
        return float(scorer._compute_score_from_stats(summed).score) / 100.0

    return bootstrap_ci(len(candidate), lambda idx: score("candidate", idx) - score("other", idx), seed, level=level)
