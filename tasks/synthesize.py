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

Every generated record then passes the same checks as real data (curate's validation, PII scrub, quality
filters, exact and near dedup against the curated data, decontamination against eval), counted under
`sft.dropped.<reason>` / `preference.dropped.<reason>` in this stage's metrics.

Teachers: `teacher: base` (the local base model, batched generation) or an OpenAI-compatible HTTP endpoint
(vLLM, TGI, llama.cpp server, ...): `teacher: {url: http://host:8000/v1, model: NAME, api_key_env: VAR}` with
concurrency, a timeout and bounded retries. The key is read from the environment variable *named* in the
recipe, so it never appears in params, manifests or artifacts.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.curate import CurateConfig, filter_synthetic
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.training import seed_everything

Messages = list[dict[str, str]]
JUDGE_LABEL = {"reference": "rougeL_vs_reference", "teacher": "teacher_both_orders", "reward_model": "reward_model"}


class TeacherEndpoint(BaseModel):
    """An OpenAI-compatible chat-completions server."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., pattern=r"^https?://", description="base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., min_length=1, description="model name the server expects")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight")
    timeout_s: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(3, ge=0, description="retries per request on timeouts, 429 and 5xx")


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
    curate_cfg: CurateConfig = CurateConfig()  # the recipe's curate section: the same filters apply
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


def shard_dir(inputs: SynthesizeInputs, index: int) -> Path:
    return inputs.out_dir / "shards" / f"{index:03d}"


def run_shard(cfg: SynthesizeConfig, inputs: SynthesizeInputs, index: int) -> Path:
    """Shard `index` of `cfg.shards`: every shards-th instruction request and preference prompt.

    Writes raw (not yet cross-shard deduplicated or curated) instructions and judged pairs into its own folder,
    with its own completion journal, so shards run anywhere in any order and each one resumes on its own.
    """
    from rouge_score import rouge_scorer

    out = shard_dir(inputs, index)
    if (out / "stats.json").exists():  # finished in an earlier attempt
        return out
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(inputs.seed + index)
    asks, picked = _plan(cfg, inputs)
    asks, picked = asks[index :: cfg.shards], picked[index :: cfg.shards]
    existing = [_first_user(r["messages"]) for r in read_jsonl(inputs.curated / "sft.jsonl")]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    started = time.time()
    teacher = Teacher(cfg, inputs.base, inputs.dtype, out / "generations.jsonl")
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
    dirs = [shard_dir(inputs, i) for i in range(cfg.shards)]
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


class Teacher:
    """Completions for chat prompts: from the journal if already made, else from the local model or endpoint."""

    def __init__(self, cfg: SynthesizeConfig, base: Path, dtype: str, journal: Path) -> None:
        self.cfg, self.base, self.dtype, self.journal = cfg, base, dtype, journal
        self.done: dict[str, list[str]] = {}
        if journal.exists():  # a previous, interrupted attempt of this stage
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.done[row["key"]] = row["outputs"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut off by the kill
        self.resumed, self.generated, self.chars = 0, 0, 0
        self._file = open(journal, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._local: tuple[Any, Any] | None = None

    def complete(self, prompts: list[Messages], *, n: int, sample: bool, desc: str) -> list[list[str]]:
        settings = {"n": n, "sample": sample, "max_new_tokens": self.cfg.max_new_tokens,
                    "temperature": self.cfg.temperature if sample else 0.0, "top_p": self.cfg.top_p if sample else 1.0}
        keys = [sha256_json({"messages": p, **settings}) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.done}
        self.resumed += sum(1 for k in set(keys) if k not in todo)
        if todo:
            if self.cfg.teacher == "base":
                self._complete_local(todo, n, sample, desc)
            else:
                self._complete_remote(todo, n, sample, desc)
        return [self.done[k] for k in keys]

    def _record(self, key: str, outputs: list[str]) -> None:
        with self._lock:
            self.done[key] = outputs
            self.generated += 1
            self.chars += sum(len(o) for o in outputs)
            self._file.write(json.dumps({"key": key, "outputs": outputs}, ensure_ascii=False) + "\n")
            self._file.flush()  # on disk before the next request: a kill loses at most the one in flight

    def _complete_local(self, todo: dict[str, Messages], n: int, sample: bool, desc: str) -> None:
        from alignflow.tasks.lib.inference import generate
        from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

        if self._local is None:
            self._local = (load_causal_lm(self.base, self.dtype), load_tokenizer(self.base))
        model, tok = self._local
        items = list(todo.items())
        for i in range(0, len(items), self.cfg.batch_size):
            chunk = items[i : i + self.cfg.batch_size]
            outputs = generate(model, tok, [p for _, p in chunk], max_new_tokens=self.cfg.max_new_tokens,
                               batch_size=self.cfg.batch_size, do_sample=sample, temperature=self.cfg.temperature,
                               top_p=self.cfg.top_p, num_return_sequences=n, desc=f"{desc} {i}/{len(items)}")
            for (key, _), out in zip(chunk, outputs, strict=True):
                self._record(key, out)

    def _complete_remote(self, todo: dict[str, Messages], n: int, sample: bool, desc: str) -> None:
        import httpx
        from tqdm.auto import tqdm

        endpoint = self.cfg.teacher
        assert isinstance(endpoint, TeacherEndpoint)
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key_env and os.environ.get(endpoint.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[endpoint.api_key_env]}"
        url = endpoint.url.rstrip("/") + "/chat/completions"

        def one(item: tuple[str, Messages]) -> None:
            key, messages = item
            body = {"model": endpoint.model, "messages": messages, "max_tokens": self.cfg.max_new_tokens, "n": n,
                    "temperature": self.cfg.temperature if sample else 0.0, "top_p": self.cfg.top_p if sample else 1.0}
            last_error = ""
            for attempt in range(endpoint.max_retries + 1):
                try:
                    r = client.post(url, json=body, headers=headers, timeout=endpoint.timeout_s)
                    if r.status_code == 429 or r.status_code >= 500:
                        last_error = f"HTTP {r.status_code}"
                    elif r.status_code >= 400:
                        raise StageError(f"synthesize: teacher {url} refused the request: HTTP {r.status_code} "
                                         f"{r.text[:200]}")
                    else:
                        choices = r.json()["choices"]
                        self._record(key, [(c.get("message") or {}).get("content", "").strip() for c in choices])
                        return
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last_error = type(e).__name__
                time.sleep(min(2**attempt * 0.5, 8.0))  # exponential backoff, capped at 8 s
            raise StageError(f"synthesize: teacher {url} failed after {endpoint.max_retries + 1} attempts "
                             f"({last_error}); completions so far are kept and a re-run resumes")

        with httpx.Client() as client, ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
            futures = [pool.submit(one, item) for item in todo.items()]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="request"):
                    future.result()
            except BaseException:
                for future in futures:  # stop queued requests; those in flight finish and are journaled
                    future.cancel()
                raise

    def close(self) -> None:
        self._file.close()


JUDGE_PROMPT = ("Question:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
                "Which answer is better: more correct, more helpful, better formatted? Reply with one letter, A or B.")


def teacher_scores(teacher: Teacher, prompt: Messages, answers: list[str]) -> list[float]:
    """Each answer's share of pairwise wins; a win needs the teacher's preference in both presentation orders."""
    question = "\n".join(m["content"] for m in prompt if m["role"] == "user")
    pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
    asks = []
    for i, j in pairs:
        asks.append([{"role": "user", "content": JUDGE_PROMPT.format(question=question, a=answers[i], b=answers[j])}])
        asks.append([{"role": "user", "content": JUDGE_PROMPT.format(question=question, a=answers[j], b=answers[i])}])
    verdicts = [_letter(c[0]) for c in teacher.complete(asks, n=1, sample=False, desc="synthesize: judge")]
    wins = [0] * len(answers)
    for k, (i, j) in enumerate(pairs):
        first, swapped = verdicts[2 * k], verdicts[2 * k + 1]
        if first == "A" and swapped == "B":
            wins[i] += 1
        elif first == "B" and swapped == "A":
            wins[j] += 1  # otherwise the two orders disagree (position bias) or no verdict: nobody wins
    return [w / max(len(answers) - 1, 1) for w in wins]


def _letter(text: str) -> str | None:
    found = re.search(r"\b([AB])\b", text.strip()[:20])
    return found.group(1) if found else None


def _first_user(messages: Messages) -> str:
    return next(m["content"] for m in messages if m["role"] == "user")


def _clean_instruction(text: str) -> str:
    """First non-empty line, without list numbering or wrapping quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(\d+[.)]|[-*]|task:)\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip('"').strip()
