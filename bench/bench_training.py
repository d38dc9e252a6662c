"""Training-stage benchmarks, each a ratio against a baseline measured in the same run.

  P3  SFT train tokens/s through `tasks.sft.run`  /  a plain TRL SFTTrainer script, same model, data, settings
  P4  SFT tokens/s with packing (padding-free)  /  padded batches, on data with skewed lengths
  P6  wall time of a DPO run whose reference log-probs come from cache  /  a DPO run with a live reference
      (TRL's default, no precompute), same steps; and the cached run  /  the first run, which computed them

Each ratio is taken over `--pairs` alternating pairs (A, B, A, B, ...: both warm) and printed as median and range.

Uses the embedded SmolLM2-135M when installed (else the tiny model); tokens/s count non-padding tokens.
  python bench/bench_training.py            # ~12 min on 2 idle cores with SmolLM2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pairs import at_least_one, spread  # noqa: E402  (bench/pairs.py)

from alignflow.tasks import dpo, quantize, sft, tokenize  # noqa: E402
from alignflow.tasks.lib.base_model import embedded_available, resolve_base  # noqa: E402
from alignflow.tasks.lib.jsonl import write_jsonl  # noqa: E402
from alignflow.tasks.lib.manifest import read_manifest  # noqa: E402

STEPS, BATCH = 6, 8


def curated(folder: Path, skewed: bool) -> Path:
    """A curated folder; with `skewed`, 85% short answers and 15% long ones (what packing is for)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows, pairs = [], []
    for i in range(200):
        long = skewed and rng.random() < 0.15
        answer = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(90 if long else 6))
        rows.append({"messages": [{"role": "user", "content": f"Item {i}: list some words."},
                                  {"role": "assistant", "content": answer}]})
        pairs.append({"prompt": [{"role": "user", "content": f"Item {i}: say yes."}], "chosen": "yes",
                      "rejected": f"no, never, item {i}"})
    write_jsonl(folder / "sft.jsonl", rows)
    write_jsonl(folder / "preference.jsonl", pairs)
    write_jsonl(folder / "eval.jsonl", [])
    (folder / "empty").mkdir(exist_ok=True)
    write_jsonl(folder / "empty" / "sft.jsonl", [])
    write_jsonl(folder / "empty" / "preference.jsonl", [])
    return folder


def plain_trl(base: Path, tokenized: Path, out: Path) -> float:
    """The baseline: a plain TRL SFTTrainer script with the same settings as the sft stage."""
    import torch
    import trl
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenized / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = trl.SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                         lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
                         max_length=256, include_num_input_tokens_seen="non_padding", seed=0, data_seed=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=load_from_disk(str(tokenized / "sft")),
                             processing_class=tok, peft_config=lora)
    result = trainer.train()
    return trainer.state.num_input_tokens_seen / result.metrics["train_runtime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--pairs", type=at_least_one, default=3, help="alternating pairs per ratio (median and range)")
    parser.add_argument("--only", default="P3,P4,P6", help="which figures, comma-separated (default: all three)")
    parser.add_argument("--p4-attn", default="sdpa", help="P4 under each of these sft.attn_implementation values, "
                        "comma-separated (e.g. sdpa,eager: how much of packing's gain the kernel decides)")
    parser.add_argument("--base", default=None, help="model.base to use (default: SmolLM2 when installed, else "
                        "tiny:llama; tiny:llama checks the script in a minute, its ratios say little)")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",")}
    if not only <= {"P3", "P4", "P6"}:
        parser.error(f"--only: unknown figure(s) {', '.join(sorted(only - {'P3', 'P4', 'P6'}))}")
    attns = [x.strip() for x in args.p4_attn.split(",")]
    spec = args.base or ("embedded:smollm2-135m-instruct" if embedded_available("embedded:smollm2-135m-instruct")
                         else "tiny:llama")
    tmp = Path(tempfile.mkdtemp(prefix="alignflow-bench-train-"))
    base = resolve_base(spec, tmp / "base", [ROOT / "data" / "sft.jsonl"]).path
    cfg = sft.SftConfig(max_steps=STEPS, batch_size=BATCH, lr=1e-3, save_steps=1000,
                        lora=sft.LoraSpec(r=16, alpha=32, dropout=0.05))
    figures: dict[str, object] = {"model": spec, "pairs": args.pairs}
    try:
        quantize.run(quantize.QuantizeConfig(eval_samples=0),
                     quantize.QuantizeInputs(base=base, dtype="float32", curated=curated(tmp / "c", False),
                                             out_dir=tmp / "q"))
        # the tokenized folders: even lengths, and skewed lengths padded / packed
        for name, skewed, packing in (("plain", False, False), ("skewed-padded", True, False),
                                      ("skewed-packed", True, True)):
            c = curated(tmp / f"c-{name}", skewed)
            tokenize.run(tokenize.TokenizeConfig(max_length=256, packing=packing), tokenize.TokenizeInputs(
                base=base, curated=c, synthesized=c / "empty", out_dir=tmp / f"t-{name}"))
        # P3: the stage vs plain TRL on the same tokenized data, alternating (stage, plain, stage, plain, ...)
        stage_rates, plain_rates = [], []
        for i in range(args.pairs if "P3" in only else 0):
            stage_rates.append(sft.run(cfg, sft.SftInputs(
                base=base, dtype="float32", tokenized=tmp / "t-plain", quantized=tmp / "q",
                out_dir=tmp / f"sft-plain-{i}", seed=0))["metrics"]["tokens_per_s"])
            plain_rates.append(plain_trl(base, tmp / "t-plain", tmp / f"trl-{i}"))
            print(f"P3 pair {i + 1}: stage {stage_rates[-1]:.1f}, plain TRL {plain_rates[-1]:.1f} tokens/s", flush=True)
        if "P3" in only:
            figures["P3_stage_tokens_per_s"] = spread(stage_rates)
            figures["P3_plain_trl_tokens_per_s"] = spread(plain_rates)
            figures["P3_ratio"] = spread([a / b for a, b in zip(stage_rates, plain_rates, strict=True)])
        # P4: packed vs padded on skewed lengths, alternating; with several attention kernels, each pair runs all
        # of them in turn (padded and packed under sdpa, then under eager, ...), so the load falls on all alike
        padded: dict[str, list[float]] = {a: [] for a in attns}
        packed: dict[str, list[float]] = {a: [] for a in attns}
        for i in range(args.pairs if "P4" in only else 0):
            for attn in attns:
                for name, rates in (("skewed-padded", padded[attn]), ("skewed-packed", packed[attn])):
                    rates.append(sft.run(cfg.model_copy(update={"attn_implementation": attn}), sft.SftInputs(
                        base=base, dtype="float32", tokenized=tmp / f"t-{name}", quantized=tmp / "q",
                        out_dir=tmp / f"sft-{name}-{attn}-{i}", seed=0))["metrics"]["tokens_per_s"])
                print(f"P4 pair {i + 1} ({attn}): padded {padded[attn][-1]:.1f}, packed {packed[attn][-1]:.1f} "
                      "tokens/s", flush=True)
        for attn in attns if "P4" in only else []:
            suffix = "" if attn == "sdpa" else f"_{attn}"  # sdpa (the default) keeps the published names
            figures[f"P4_padded_tokens_per_s{suffix}"] = spread(padded[attn])
            figures[f"P4_packed_tokens_per_s{suffix}"] = spread(packed[attn])
            figures[f"P4_ratio{suffix}"] = spread([a / b for a, b in zip(packed[attn], padded[attn], strict=True)])
        if "P6" in only and "P3" not in only:  # P6 starts from P3's first SFT adapter
            sft.run(cfg, sft.SftInputs(base=base, dtype="float32", tokenized=tmp / "t-plain", quantized=tmp / "q",
                                       out_dir=tmp / "sft-plain-0", seed=0))
        if "P6" in only:
            # P6: DPO on the same data and SFT adapter. The first run computes the reference log-probs and caches
            # them; then alternating pairs of a run served from that cache (another beta) and TRL's default, a live
            # reference (the frozen `ref` adapter run on every batch), same steps
            dcfg = dpo.DpoConfig(max_steps=STEPS, batch_size=4, precompute_ref_log_probs=True, save_steps=1000)

            train_s: dict[str, float] = {}  # the Trainer's own train_runtime: the training steps only

            def dpo_seconds(name: str, update: dict[str, object]) -> float:
                t0 = time.perf_counter()
                m = dpo.run(dcfg.model_copy(update=update), dpo.DpoInputs(
                    base=base, dtype="float32", tokenized=tmp / "t-plain", quantized=tmp / "q", sft=tmp / "sft-plain-0",
                    out_dir=tmp / name, seed=0, ref_cache=tmp / "ref-cache"))
                train_s[name] = m["metrics"]["train_runtime_s"]
                return time.perf_counter() - t0

            first = dpo_seconds("dpo-first", {"beta": 0.1})
            figures["P6_first_ref_cached"] = str(read_manifest(tmp / "dpo-first")["ref_logprobs_cached"])
            cached, live = [], []
            for i in range(args.pairs):
                cached.append(dpo_seconds(f"dpo-cached-{i}", {"beta": 0.3}))
                assert read_manifest(tmp / f"dpo-cached-{i}")["ref_logprobs_cached"], "the cache was not used"
                live.append(dpo_seconds(f"dpo-live-{i}", {"beta": 0.3, "precompute_ref_log_probs": False}))
                print(f"P6 pair {i + 1}: cached reference {cached[-1]:.1f} s, live reference {live[-1]:.1f} s "
                      f"(first run, which computed them: {first:.1f} s)", flush=True)
            figures["P6_first_s"] = round(first, 2)
            figures["P6_cached_s"] = spread(cached)
            figures["P6_live_reference_s"] = spread(live)
            figures["P6_ratio"] = round(statistics.median(cached) / first, 3)
            figures["P6_cached_over_live_ratio"] = spread([a / b for a, b in zip(cached, live, strict=True)])
            # the same over the training steps alone (wall time also holds loading, the held-out evaluation, saving)
            figures["P6_cached_over_live_train_runtime_ratio"] = spread(
                [train_s[f"dpo-cached-{i}"] / train_s[f"dpo-live-{i}"] for i in range(args.pairs)])
            # the first run precomputes the log-probs of every training pair, not only of the steps' batches: the
            # reuses it takes before the cache has paid for itself against live references
            figures["P6_first_over_live"] = round(first / statistics.median(live), 3)
            figures["P6_reuses_to_break_even"] = round(
                (first - statistics.median(live)) / max(statistics.median(live) - statistics.median(cached), 1e-9), 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(figures, args.out)


def _report(figures: dict[str, object], out: str | None) -> None:
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    from machine import describe  # bench/machine.py

    print(describe("at start"), flush=True)
    main()
    print(describe("at end"))
