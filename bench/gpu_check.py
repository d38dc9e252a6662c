"""The prepared GPU check: one run, one table. `bash bench/gpu_check.sh` calls it (see there for the rows).

    python bench/gpu_check.py [--dry-run] [--out DIR]

Nothing is downloaded: the model is the Llama-3-8B *shape* (bench/shapes/llama-3-8b.json) with random weights,
built on the GPU and saved once; the data are random token ids of a fixed length (no padding, so tokens/s and
MFU count only real tokens). Every measured configuration runs in its own process, so each peak memory is its
own. `--dry-run` (CPU machines, CI) runs the same code on a reduced shape in fp32 and prints the same table,
marked as a dry run: it proves the script, not the figures.

P5: QLoRA NF4 peak memory / LoRA bf16 peak memory, same batch, through alignflow's sft stage (target <= 0.45).
P8: LoRA tokens/s through alignflow's sft stage and through a plain TRL SFTTrainer script with the same settings
    on the same data in the same run, their ratio (target >= 0.97), and MFU with the 6N convention (6 x
    parameters x tokens/s / the card's dense bf16 peak; target >= 45 %).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peak, FLOP/s, from the vendors' data sheets (SXM parts)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

# (batch, sequence length, gradient checkpointing, optimizer steps) per measurement
P5_SHAPE = {"gpu": (2, 1024, True, 4), "dry": (2, 64, True, 2)}
P8_SHAPE = {"gpu": (2, 2048, False, 10), "dry": (2, 64, False, 3)}
DRY_CONFIG = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 4096}


def environment() -> dict[str, str]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "device": "cpu", "driver": "-"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "unknown"
    for name in ("transformers", "trl", "peft", "bitsandbytes", "accelerate"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # absent: reported as such
            info[name] = "absent"
    return info


def build_base(work: Path, dry: bool) -> Path:
    """A random-weight model of the Llama-3-8B shape (or the reduced dry-run shape), saved once, with a small
    tokenizer (the data are token ids; the tokenizer only names the pad and end tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignflow.tasks.lib.base_model import resolve_base

    folder = work / ("base-dry" if dry else "base-llama-3-8b")
    if (folder / "config.json").exists():
        return folder
    tiny = resolve_base("tiny:llama", work / "tokenizer-source", [ROOT / "data" / "sft.jsonl"])
    raw = json.loads((ROOT / "bench" / "shapes" / "llama-3-8b.json").read_text())
    if dry:
        raw.update(DRY_CONFIG)
    raw.update(pad_token_id=0, eos_token_id=2, bos_token_id=None)
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype")})
    dtype = torch.float32 if dry else torch.bfloat16
    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tiny.path.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp / f.name)
    del model
    os.replace(tmp, folder)
    return folder


def make_data(work: Path, base: Path, name: str, rows: int, seq: int, vocab: int) -> Path:
    """A tokenize-stage folder: `rows` random rows of exactly `seq` tokens, the loss on the last three quarters."""
    import random

    from datasets import Dataset

    folder = work / f"data-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(0)
    examples = []
    for _ in range(rows):
        ids = [rng.randrange(3, vocab) for _ in range(seq)]
        examples.append({"input_ids": ids, "labels": [-100] * (seq // 4) + ids[seq // 4:]})
    Dataset.from_list(examples).save_to_disk(str(folder / "sft"))
    (folder / "tokenizer").mkdir()
    for f in base.glob("*"):
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / "tokenizer" / f.name)
    (folder / "manifest.json").write_text(json.dumps({"stage": "tokenize", "max_length": seq, "packing": False}))
    return folder


def quant_folder(work: Path, bits: int | None, dry: bool) -> Path:
    from alignflow.tasks.quantize import QuantizeConfig, settings

    folder = work / f"quant-{bits}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = QuantizeConfig(bits=bits, compute_dtype="float32" if dry else "bfloat16") if bits else QuantizeConfig()
    (folder / "quantization.json").write_text(json.dumps(settings(cfg), default=str))
    return folder


def one_run(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: `ours` (alignflow's sft stage) or `plain` (TRL's SFTTrainer, nothing else)."""
    import torch

    batch, seq, ckpt, steps = args["batch"], args["seq"], args["ckpt"], args["steps"]
    dtype = "float32" if args["dry"] else "bfloat16"
    if kind == "ours":
        from alignflow.tasks.lib.lora import LoraSpec
        from alignflow.tasks.sft import SftConfig, SftInputs, run

        out = Path(args["out"])
        shutil.rmtree(out, ignore_errors=True)
        manifest = run(SftConfig(lora=LoraSpec(r=16, alpha=32, dropout=0.0), max_steps=steps, batch_size=batch,
                                 lr=1e-4, gradient_checkpointing=ckpt, save_steps=10_000),
                       SftInputs(base=Path(args["base"]), dtype=dtype, tokenized=Path(args["data"]),
                                 quantized=Path(args["quant"]), out_dir=out, seed=0))
        m = manifest["metrics"]
        return {"seconds": m["train_runtime_s"], "peak_bytes": m["peak_memory_bytes"],
                "estimate_bytes": m.get("memory_estimate_bytes"), "steps": m["global_step"]}
    import trl
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(args["data"]) / "tokenizer")
    tok.pad_token = tok.pad_token or tok.eos_token
    device = "cpu" if args["dry"] else "cuda"
    model = AutoModelForCausalLM.from_pretrained(args["base"], dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa").to(device)
    config = trl.SFTConfig(output_dir=args["out"], max_steps=steps, per_device_train_batch_size=batch,
                           learning_rate=1e-4, lr_scheduler_type="constant", gradient_checkpointing=ckpt,
                           logging_steps=1, save_strategy="no", report_to="none", max_length=seq, packing=False,
                           bf16=not args["dry"], use_cpu=args["dry"], seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=load_from_disk(str(Path(args["data"]) / "sft")),
                             processing_class=tok, peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                          target_modules="all-linear",
                                                                          task_type="CAUSAL_LM"))
    result = trainer.train()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"seconds": float(result.metrics["train_runtime"]), "peak_bytes": peak, "steps": trainer.state.global_step}


def measure(kind: str, **args: Any) -> dict[str, Any]:
    """`one_run` in a child process (its own CUDA context: peak memory is this configuration's alone)."""
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args, default=str)],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"{kind} failed (exit {proc.returncode}): " + " | ".join(tail)}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="reduced shape on the CPU (CI): proves the script")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "alignflow-gpu-check")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(args.child[0], json.loads(args.child[1]))), flush=True)
        return 0

    import torch

    from alignflow.tasks.lib.memory import model_shape

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    mode = "dry" if dry else "gpu"
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = environment()
    base = build_base(args.work, dry)
    config = json.loads((base / "config.json").read_text())
    params = model_shape(base).params  # from the safetensors headers, as the memory preflight counts
    rows: list[tuple[str, str, str]] = []

    b5, s5, ck5, n5 = P5_SHAPE[mode]
    data5 = make_data(args.work, base, "p5", b5 * n5, s5, config["vocab_size"])
    p5 = {name: measure("ours", dry=dry, base=base, data=data5, quant=quant_folder(args.work, bits, dry),
                        out=args.work / f"run-p5-{name}", batch=b5, seq=s5, ckpt=ck5, steps=n5)
          for name, bits in (("lora", None), ("qlora", 4))}
    if all("error" not in r for r in p5.values()) and p5["lora"]["peak_bytes"]:
        ratio = p5["qlora"]["peak_bytes"] / p5["lora"]["peak_bytes"]
        rows.append(("P5 QLoRA NF4 / LoRA bf16 peak memory", f"{ratio:.3f}",
                     f"target <= 0.45; {p5['qlora']['peak_bytes'] / 2**30:.2f} / {p5['lora']['peak_bytes'] / 2**30:.2f}"
                     f" GiB (estimates {_gib(p5['qlora'].get('estimate_bytes'))} / "
                     f"{_gib(p5['lora'].get('estimate_bytes'))}); batch {b5} x {s5} tokens, checkpointing {ck5}"))
    else:
        rows.append(("P5 QLoRA NF4 / LoRA bf16 peak memory", "not measured",
                     "; ".join(r.get("error", "") for r in p5.values() if "error" in r)[:400]))

    b8, s8, ck8, n8 = P8_SHAPE[mode]
    data8 = make_data(args.work, base, "p8", b8 * n8, s8, config["vocab_size"])
    lora_quant = quant_folder(args.work, None, dry)
    p8 = {kind: measure(kind, dry=dry, base=base, data=data8, quant=lora_quant, out=args.work / f"run-p8-{kind}",
                        batch=b8, seq=s8, ckpt=ck8, steps=n8) for kind in ("plain", "ours")}
    tokens = b8 * s8 * n8
    if all("error" not in r for r in p8.values()):
        ours_tps, plain_tps = tokens / p8["ours"]["seconds"], tokens / p8["plain"]["seconds"]
        peak = next((v for k, v in PEAK_BF16.items() if k in env["device"]), None)
        mfu = f"{6 * params * ours_tps / peak:.1%}" if peak and not dry else "n/a"
        rows.append(("P8 LoRA tokens/s: alignflow sft", f"{ours_tps:,.0f}", f"MFU (6N) {mfu}, target >= 45 %"))
        rows.append(("P8 LoRA tokens/s: plain TRL SFTTrainer", f"{plain_tps:,.0f}",
                     f"same model, data and settings; batch {b8} x {s8}, {n8} steps, checkpointing {ck8}"))
        rows.append(("P8 alignflow / plain TRL", f"{ours_tps / plain_tps:.3f}", "target >= 0.97"))
    else:
        rows.append(("P8 LoRA tokens/s", "not measured",
                     "; ".join(r.get("error", "") for r in p8.values() if "error" in r)[:400]))

    for recipe in ("smoke", "demo"):
        rows.append(_pipeline_row(recipe, args.work, dry))

    title = "dry run: CPU, reduced shape (proves the script, not the figures)" if dry else "GPU check"
    lines = [f"# alignflow {title}", "",
             f"device: {env['device']}; driver {env['driver']}; torch {env['torch']} (CUDA {env['cuda']}); "
             f"transformers {env['transformers']}, trl {env['trl']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}; model: {'reduced' if dry else 'Llama-3-8B'} shape, "
             f"{params / 1e9:.3f} B parameters, random weights", "",
             "| measurement | value | notes |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
             f"total wall time: {time.perf_counter() - started:.0f} s; command: `bash bench/gpu_check.sh"
             f"{' --dry-run' if dry else ''}`"]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check-dry-run.md" if dry else f"gpu_check-{time.strftime('%Y%m%d-%H%M')}.md"
    (args.out / name).write_text(table)
    (args.out / name.replace(".md", ".json")).write_text(json.dumps(
        {"environment": env, "p5": p5, "p8": p8, "rows": rows}, indent=2, default=str))
    return 0


def _gib(value: Any) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, int | float) else "-"


def _pipeline_row(recipe: str, work: Path, dry: bool) -> tuple[str, str, str]:
    """`alignflow run configs/<recipe>.yaml` end to end on a fresh work dir, timed (not in a dry run)."""
    label = f"{recipe} pipeline end to end (cold)"
    if dry:
        return label, "skipped", "dry run"
    missing = [m for m in ("mlflow", "prefect", "trl", "bitsandbytes") if _absent(m)]
    if missing:
        return label, "not run", f"missing here: {', '.join(missing)}"
    folder = work / f"pipeline-{recipe}"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    argv = [sys.executable, "-c", "from alignflow.cli import main; main()", "run", f"configs/{recipe}.yaml",
            "--work-dir", str(folder)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return label, "failed", " | ".join(proc.stderr.strip().splitlines()[-3:])[:300]
    target = "target <= 180 s" if recipe == "demo" else ""
    return label, f"{seconds:.0f} s", target


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
