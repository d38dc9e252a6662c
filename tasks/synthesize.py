"""synthesize: the teacher writes new SFT examples and sampled preference pairs.

Instructions (self-instruct): the teacher is shown a few seed tasks and asked for a new one; answers that
are empty, too short, or near-copies of an existing instruction (ROUGE-L F1 above `max_similarity`) are
dropped and counted. The teacher then answers each kept instruction (greedy).

Preference pairs: for `preference_prompts` curated SFT prompts the teacher samples `samples_per_prompt`
answers, and a judge scores them; best vs worst is kept with the score margin recorded, and pairs with a
margin below `min_margin` are dropped as ties. Judges: `reference` scores each answer by its ROUGE-L F1
against the prompt's reference answer. `reward_model` scores them with a reward model trained by an earlier
run's reward stage (say the champion's), when one exists. `teacher` makes the teacher compare every two answers in both
orders (A/B, then B/A), which controls position bias: an answer wins a comparison only if it is preferred in
both orders. Its score is its share of wins.

Every generated record then passes the same checks as real data (tasks/records/checks.py, as in curate:
validation, PII scrub, quality filters, exact and near dedup against the curated data, decontamination against
eval), counted under `sft.dropped.<reason>` / `preference.dropped.<reason>` in this stage's metrics.

Teachers: `teacher: base` (the local base model, batched generation) or an OpenAI-compatible HTTP endpoint
(vLLM, TGI, llama.cpp server, ...): `teacher: {url: http://host:8000/v1, model: NAME, api_key_env: VAR}` with
concurrency, a timeout and bounded retries. The key is read from the environment variable *named* in the
recipe, so it never appears in params, manifests or artifacts. The client and the judge: tasks/lib/teacher.py.

Sharded: the requests (drawn once from the seed) are split into `shards` slices. Each shard writes its own
folder `shards/NNN/`; `merge` joins them in order and drops near-copies across shards. The pipeline flow runs
the shards as mapped Prefect tasks (on threads, or Dask processes / a Dask cluster), `run` one after another.

Resumable: every completion is appended to the shard's `generations.jsonl` as it arrives, keyed by a hash of
the prompt and the sampling settings. A killed run, re-run, reads that journal and generates only what is
missing (`teacher.resumed` counts the completions it reused); a finished shard is not run again.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.teacher import Messages, Teacher, TeacherEndpoint, teacher_scores
from alignflow.tasks.lib.training import seed_everything
from alignflow.tasks.records.checks import RecordChecks, filter_synthetic

JUDGE_LABEL = {"reference": "rougeL_vs_reference", "teacher": "teacher_both_orders", "reward_model": "reward_model"}


class SynthesizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: Literal["base"] | TeacherEndpoint = "base"
    instructions: int = Field(8, ge=0, description="new instructions the teacher attempts (0: none)")
    seeds_per_prompt: int = Field(3, ge=1, description="seed tasks shown to the teacher per new instruction")
    max_similarity: float = Field(0.7, ge=0, le=1, description="ROUGE-L F1 above which a new one is a near-copy")
    preference_prompts: int = Field(8, ge=0, description="curated prompts that get sampled response pairs")
    samples_per_prompt: int = Field(2, ge=2, description="sampled answers per prompt; best vs worst is kept")
    judge: Literal["reference", "teacher", "reward_model"] = Field(
        "reference", description="how sampled answers are scored: ROUGE-L vs the reference, the teacher in both "
        "orders, or a reward model from an earlier run (reward_model)")
    reward_model: Path | None = Field(
        None, description="judge=reward_model: a reward stage folder of an earlier run on the same base "
        "(e.g. the champion's), holding adapter/")
    min_margin: float = Field(0.05, ge=0, description="judge-score margin under which a pair is a tie")
    max_new_tokens: int = Field(48, gt=0, description="tokens per generated instruction or answer")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, gt=0, description="prompts per generate() call (local teacher)")
    shards: int = Field(1, ge=1, le=256, description="independent slices of the requests; the pipeline fans them "
                        "out with Prefect task mapping (see the recipe's scale_out section)")

    @model_validator(mode="after")
    def _judge_has_a_model(self) -> SynthesizeConfig:
        if self.judge == "reward_model":
            if self.reward_model is None:
                raise ValueError("judge=reward_model needs synthesize.reward_model (a reward stage folder)")
            if not (Path(self.reward_model) / "adapter" / "adapter_config.json").exists():
                raise ValueError(f"synthesize.reward_model: no reward adapter at {self.reward_model}/adapter")
        return self


class SynthesizeInputs(BaseModel):
    base: Path
    dtype: str
    curated: Path
    curate_cfg: RecordChecks = RecordChecks()  # the recipe's curate section (a CurateConfig validates): same checks
    out_dir: Path
    seed: int


def run(cfg: SynthesizeConfig, inputs: SynthesizeInputs) -> dict[str, Any]:
    """All shards one after another, then the merge. The pipeline flow instead fans the shards out with
    Prefect task mapping (threads, or Dask worker processes / a Dask cluster) and then calls `merge`."""
    for index in range(cfg.shards):
        run_shard(cfg, inputs, index)
    return merge(cfg, inputs)


def _plan(cfg: SynthesizeConfig, inputs: SynthesizeInputs) -> tuple[list[Messages], list[dict[str, Any]]]:
    """The whole stage's teacher requests, drawn from the seed: the same in every shard and every re-run."""
    rng = random.Random(inputs.seed)
    sft = list(read_jsonl(inputs.curated / "sft.jsonl"))
    existing = [_first_user(r["messages"]) for r in sft]
    asks: list[Messages] = []
    for _ in range(cfg.instructions if existing else 0):
        shown = rng.sample(existing, min(cfg.seeds_per_prompt, len(existing)))
        listing = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(shown))
        asks.append([{"role": "user", "content": f"Here are some tasks:\n{listing}\n"
                      "Write one new task of the same kind. Reply with the task only."}])
    picked = rng.sample(sft, min(cfg.preference_prompts, len(sft))) if cfg.preference_prompts > 0 else []
    return asks, picked


def shard_dir(inputs: SynthesizeInputs, index: int, shards: int) -> Path:
    # The shard count is in the name: a resumed run with another count must not take these slices as its own.
    return inputs.out_dir / "shards" / f"{index:03d}-of-{shards:03d}"


def run_shard(cfg: SynthesizeConfig, inputs: SynthesizeInputs, index: int) -> Path:
    """Shard `index` of `cfg.shards`: every shards-th instruction request and preference prompt.

    Writes raw (not yet cross-shard deduplicated or curated) instructions and judged pairs into its own folder,
    with its own completion journal, so shards run anywhere in any order and each one resumes on its own.
    """
    from rouge_score import rouge_scorer

    out = shard_dir(inputs, index, cfg.shards)
    if (out / "stats.json").exists():  # finished in an earlier attempt
        return out
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(inputs.seed + index)
    asks, picked = _plan(cfg, inputs)
    asks, picked = asks[index :: cfg.shards], picked[index :: cfg.shards]
    existing = [_first_user(r["messages"]) for r in read_jsonl(inputs.curated / "sft.jsonl")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    started = time.time()
    teacher = Teacher(cfg.teacher, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                      batch_size=cfg.batch_size, base=inputs.base, dtype=inputs.dtype,
                      journal=out / "generations.jsonl")
    stats: dict[str, Any] = {"instructions.attempted": len(asks), "instructions.dropped.empty": 0,
                             "instructions.dropped.near_copy": 0, "pairs.attempted": len(picked),
                             "pairs.dropped.tie": 0}

    # --- new instructions: near-copies of the seed data or of this shard's earlier ones are dropped -------
    instructions: list[dict[str, Any]] = []
    if asks:
        raw = [c[0] for c in teacher.complete(asks, n=1, sample=True, desc=f"synthesize[{index}]: instructions")]
        kept: list[str] = []
        for text in raw:
            text = _clean_instruction(text)
            if len(text) < 10:
                stats["instructions.dropped.empty"] += 1
                continue
            pool = existing + kept
            if pool and max(scorer.score(p, text)["rougeL"].fmeasure for p in pool) > cfg.max_similarity:
                stats["instructions.dropped.near_copy"] += 1
                continue
            kept.append(text)
        answers = teacher.complete([[{"role": "user", "content": k}] for k in kept], n=1, sample=False,
                                   desc=f"synthesize[{index}]: answers") if kept else []
        for instruction, (answer,) in zip(kept, answers, strict=True):
            if answer.strip():
                instructions.append({"messages": [{"role": "user", "content": instruction},
                                                  {"role": "assistant", "content": answer}], "source": "synthetic"})
            else:
                stats["instructions.dropped.empty"] += 1

    # --- sampled preference pairs, judged against the reference or by the teacher ------------------------
    pairs: list[dict[str, Any]] = []
    if picked:
        judge_model = None
        if cfg.judge == "reward_model":
            from alignflow.tasks.lib.inference import score_answers
            from alignflow.tasks.lib.models import load_reward_model, load_tokenizer

            assert cfg.reward_model is not None
            judge_model = (load_reward_model(inputs.base, inputs.dtype, cfg.reward_model / "adapter"),
                           load_tokenizer(cfg.reward_model / "adapter"))
        prompts = [r["messages"][:-1] for r in picked]
        samples = teacher.complete(prompts, n=cfg.samples_per_prompt, sample=True, desc=f"synthesize[{index}]: pairs")
        for record, prompt, answers in zip(picked, prompts, samples, strict=True):
            answers = [a for a in answers if a.strip()]
            if cfg.judge == "teacher":
                scores = teacher_scores(teacher, prompt, answers)
            elif judge_model is not None:  # reward-model scores (logits): the margin is in the same units
                scores = score_answers(judge_model[0], judge_model[1], [prompt] * len(answers), answers)
            else:
                reference = record["messages"][-1]["content"]
                scores = [scorer.score(reference, a)["rougeL"].fmeasure for a in answers]
            scored = sorted(zip(scores, answers, strict=True), key=lambda s: s[0])
            if len(scored) < 2 or scored[-1][0] - scored[0][0] < cfg.min_margin:
                stats["pairs.dropped.tie"] += 1
                continue
            pairs.append({"prompt": prompt, "chosen": scored[-1][1], "rejected": scored[0][1],
                          "margin": round(scored[-1][0] - scored[0][0], 4),
                          "judge": JUDGE_LABEL[cfg.judge],
                          "source": "synthetic"})
    teacher.close()
    write_jsonl(out / "instructions.jsonl", instructions)
    write_jsonl(out / "pairs.jsonl", pairs)
    stats.update({"teacher.completions": teacher.generated, "teacher.resumed": teacher.resumed,
                  "generated_chars": teacher.chars, "started": started, "ended": time.time(), "pid": os.getpid()})
    (out / "stats.json").write_text(json.dumps(stats, indent=2))  # written last: marks the shard finished
    return out


def merge(cfg: SynthesizeConfig, inputs: SynthesizeInputs) -> dict[str, Any]:
    """Join the shards in order: drop cross-shard near-copies, then curate's checks; sum the counts."""
    from rouge_score import rouge_scorer

    out = inputs.out_dir
    dirs = [shard_dir(inputs, i, cfg.shards) for i in range(cfg.shards)]
    missing = [str(d) for d in dirs if not (d / "stats.json").exists()]
    if missing:
        raise StageError(f"synthesize: shard(s) not finished: {', '.join(missing)}")
    stats = [json.loads((d / "stats.json").read_text()) for d in dirs]
    metrics: dict[str, float] = {}
    for key in ("instructions.attempted", "instructions.dropped.empty", "instructions.dropped.near_copy",
                "pairs.attempted", "pairs.dropped.tie", "teacher.completions", "teacher.resumed", "generated_chars"):
        metrics[key] = sum(s[key] for s in stats)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    new_records: list[dict[str, Any]] = []
    kept: list[str] = []
    for d in dirs:  # shards could not see each other's instructions: near-copies across shards go here
        for record in read_jsonl(d / "instructions.jsonl"):
            text = _first_user(record["messages"])
            if kept and max(scorer.score(k, text)["rougeL"].fmeasure for k in kept) > cfg.max_similarity:
                metrics["instructions.dropped.near_copy"] += 1
                continue
            kept.append(text)
            new_records.append(record)
    if cfg.instructions > 0:
        metrics["instructions.answered"] = len(new_records)
    new_records, dropped = filter_synthetic("sft", new_records, inputs.curate_cfg, inputs.curated)
    metrics.update({f"sft.dropped.{k}": v for k, v in dropped.items()})
    metrics["sft.kept"] = len(new_records)
    write_jsonl(out / "sft.jsonl", new_records)

    pairs = [p for d in dirs for p in read_jsonl(d / "pairs.jsonl")]
    metrics["pairs.judged"] = len(pairs)
    pairs, dropped = filter_synthetic("preference", pairs, inputs.curate_cfg, inputs.curated)
    metrics.update({f"preference.dropped.{k}": v for k, v in dropped.items()})
    metrics["preference.kept"] = len(pairs)
    write_jsonl(out / "preference.jsonl", pairs)

    with open(out / "generations.jsonl", "w", encoding="utf-8") as journal:  # one artifact with every completion
        for d in dirs:
            journal.write((d / "generations.jsonl").read_text(encoding="utf-8"))
    seconds = max(s["ended"] for s in stats) - min(s["started"] for s in stats)  # wall clock over all shards
    metrics.update({"shards": cfg.shards, "shard_processes": len({s["pid"] for s in stats}),
                    "seconds": round(seconds, 2),
                    "chars_per_s": round(metrics["generated_chars"] / seconds, 2) if seconds > 0 else 0.0})
    files = ["sft.jsonl", "preference.jsonl", "generations.jsonl"]
    return write_manifest(out, {"stage": "synthesize", "outputs": files, "artifacts": files,
                                "teacher": "base" if cfg.teacher == "base" else cfg.teacher.model_dump(),
                                "metrics": metrics})


def _first_user(messages: Messages) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def _clean_instruction(text: str) -> str:
    """First non-empty line, without list numbering or wrapping quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(\d+[.)]|[-*]|task:)\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip('"').strip()
