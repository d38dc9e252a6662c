"""synthesize: the teacher writes new SFT examples and sampled preference pairs.

Instructions (self-instruct): the teacher is shown a few seed tasks and asked for a new one; answers that
are empty, too short, or near-copies of an existing instruction (ROUGE-L F1 above `max_similarity`) are
dropped and counted. The teacher then answers each kept instruction (greedy).

Preference pairs: for `preference_prompts` curated SFT prompts the teacher samples `samples_per_prompt`
answers; a rule judge scores each by ROUGE-L F1 against the prompt's reference answer; best vs worst is kept
with the score margin recorded, pairs with a margin below `min_margin` are dropped as ties.

Every generated record then passes the same checks as real data (curate's validation, PII scrub, quality
filters, exact and near dedup against the curated data, decontamination against eval), counted under
`sft.dropped.<reason>` / `preference.dropped.<reason>` in this stage's metrics.

The teacher is the base model (`teacher: base`). Outputs: `sft.jsonl`, `preference.jsonl` in the curated
internal schema; the tokenize stage merges them with the curated data.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import read_jsonl, seed_everything, write_jsonl, write_manifest
from tasks.curate import CurateConfig, filter_synthetic


class SynthesizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: Literal["base"] = "base"
    instructions: int = Field(8, ge=0, description="new instructions the teacher attempts (0: none)")
    seeds_per_prompt: int = Field(3, ge=1, description="seed tasks shown to the teacher per new instruction")
    max_similarity: float = Field(0.7, ge=0, le=1, description="ROUGE-L F1 above which a new one is a near-copy")
    preference_prompts: int = Field(8, ge=0, description="curated prompts that get sampled response pairs")
    samples_per_prompt: int = Field(2, ge=2, description="sampled answers per prompt; best vs worst is kept")
    min_margin: float = Field(0.05, ge=0, description="judge-score margin under which a pair is a tie")
    max_new_tokens: int = Field(48, gt=0, description="tokens per generated instruction or answer")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    batch_size: int = Field(8, gt=0, description="prompts per generate() call")


class SynthesizeInputs(BaseModel):
    base: Path
    dtype: str
    curated: Path
    curate_cfg: CurateConfig = CurateConfig()  # the recipe's curate section: the same filters apply
    out_dir: Path
    seed: int


def run(cfg: SynthesizeConfig, inputs: SynthesizeInputs) -> dict[str, Any]:
    from rouge_score import rouge_scorer

    from tasks.modeling import generate, load_causal_lm, load_tokenizer

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(inputs.seed)
    rng = random.Random(inputs.seed)
    sft = list(read_jsonl(inputs.curated / "sft.jsonl"))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    generated_chars = 0

    need_teacher = cfg.instructions > 0 or cfg.preference_prompts > 0
    model = load_causal_lm(inputs.base, inputs.dtype) if need_teacher else None
    tok = load_tokenizer(inputs.base) if need_teacher else None

    # --- new instructions -------------------------------------------------------------------------------
    existing = [_first_user(r["messages"]) for r in sft]
    new_records: list[dict[str, Any]] = []
    if cfg.instructions > 0:
        asks = []
        for _ in range(cfg.instructions):
            shown = rng.sample(existing, min(cfg.seeds_per_prompt, len(existing)))
            listing = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(shown))
            asks.append([{"role": "user", "content": f"Here are some tasks:\n{listing}\n"
                          "Write one new task of the same kind. Reply with the task only."}])
        raw = [c[0] for c in generate(model, tok, asks, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                      do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                      desc="synthesize: instructions")]
        generated_chars += sum(len(r) for r in raw)
        kept: list[str] = []
        drops = {"empty": 0, "near_copy": 0}
        for text in raw:
            text = _clean_instruction(text)
            if len(text) < 10:
                drops["empty"] += 1
                continue
            pool = existing + kept
            best = max(scorer.score(p, text)["rougeL"].fmeasure for p in pool) if pool else 0.0
            if best > cfg.max_similarity:
                drops["near_copy"] += 1
                continue
            kept.append(text)
        answers = generate(model, tok, [[{"role": "user", "content": k}] for k in kept],
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           desc="synthesize: answers") if kept else []
        for instruction, (answer,) in zip(kept, answers, strict=True):
            generated_chars += len(answer)
            if answer.strip():
                new_records.append({"messages": [{"role": "user", "content": instruction},
                                                 {"role": "assistant", "content": answer}],
                                    "source": "synthetic"})
            else:
                drops["empty"] += 1
        metrics.update({"instructions.attempted": cfg.instructions, "instructions.kept": len(new_records),
                        **{f"instructions.dropped.{k}": v for k, v in drops.items()}})
    new_records, dropped = filter_synthetic("sft", new_records, inputs.curate_cfg, inputs.curated)
    metrics.update({f"sft.dropped.{k}": v for k, v in dropped.items()})
    metrics["sft.kept"] = len(new_records)
    write_jsonl(out / "sft.jsonl", new_records)

    # --- sampled preference pairs, judged by ROUGE-L against the reference ------------------------------
    pairs: list[dict[str, Any]] = []
    if cfg.preference_prompts > 0 and sft:
        picked = rng.sample(sft, min(cfg.preference_prompts, len(sft)))
        prompts = [r["messages"][:-1] for r in picked]
        samples = generate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                           num_return_sequences=cfg.samples_per_prompt, desc="synthesize: pairs")
        ties = 0
        for record, prompt, answers in zip(picked, prompts, samples, strict=True):
            generated_chars += sum(len(a) for a in answers)
            reference = record["messages"][-1]["content"]
            scored = sorted(((scorer.score(reference, a)["rougeL"].fmeasure, a) for a in answers if a.strip()),
                            key=lambda s: s[0])
            if len(scored) < 2 or scored[-1][0] - scored[0][0] < cfg.min_margin:
                ties += 1
                continue
            pairs.append({"prompt": prompt, "chosen": scored[-1][1], "rejected": scored[0][1],
                          "margin": round(scored[-1][0] - scored[0][0], 4), "judge": "rougeL_vs_reference",
                          "source": "synthetic"})
        metrics.update({"pairs.attempted": len(picked), "pairs.kept": len(pairs), "pairs.dropped.tie": ties})
    pairs, dropped = filter_synthetic("preference", pairs, inputs.curate_cfg, inputs.curated)
    metrics.update({f"preference.dropped.{k}": v for k, v in dropped.items()})
    metrics["preference.kept"] = len(pairs)
    write_jsonl(out / "preference.jsonl", pairs)

    seconds = time.perf_counter() - started
    metrics["generated_chars"] = generated_chars
    metrics["seconds"] = round(seconds, 2)
    return write_manifest(out, {"stage": "synthesize", "outputs": ["sft.jsonl", "preference.jsonl"],
                                "artifacts": ["sft.jsonl", "preference.jsonl"], "metrics": metrics})


def _first_user(messages: list[dict[str, str]]) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def _clean_instruction(text: str) -> str:
    """First non-empty line, without list numbering or wrapping quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(\d+[.)]|[-*]|task:)\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip('"').strip()
