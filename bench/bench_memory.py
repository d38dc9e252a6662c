"""P5: QLoRA NF4 peak memory / LoRA bf16 peak memory, both through `tasks.sft.run`; on CUDA also LoRA MFU.

Both variants train the same LoRA (r 16, all-linear) on the same tokenized data for the same steps, in bf16;
QLoRA loads the base through bitsandbytes NF4 with double quantization and bf16 compute. Each variant runs in
its own process, so that neither sees the other's peak:
- CUDA: `torch.cuda.max_memory_allocated()` over the stage (weights, adapter, optimizer, activations);
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the stage)
  minus its resident set at that moment (imports excluded). A rougher figure: the allocator keeps freed pages.
Two peaks per variant: over the whole stage (loading included), and from the first training step on (the
peak is reset when training begins). On CPU, bitsandbytes quantizes after loading the bf16 weights in host
memory, so the stage peak of QLoRA holds both copies for a moment; the training peak is the one to compare.

The base is SmolLM2-135M (embedded) with `--shape 135m`, or a Llama of random weights in a bigger shape
(memory does not depend on the values), with SmolLM2's tokenizer and chat template:
  python bench/bench_memory.py                        # CPU, 135m: ~1 min on 2 cores (1b: ~4 min)
  python bench/bench_memory.py --shape 1b --steps 20  # a GPU: TinyLlama-1.1B's shape, MFU too
MFU = trained tokens/s x 6 x parameters / the GPU's dense bf16 peak (the PaLM convention; LoRA skips the
weight gradients of frozen layers, so the work done is nearer 4N per token and 6N overstates it by ~1.5x).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import curated  # noqa: E402

from alignflow.tasks import quantize, sft, tokenize  # noqa: E402
from alignflow.tasks.lib.base_model import resolve_base  # noqa: E402

# Llama shapes: hidden, intermediate, layers, attention heads, key/value heads
SHAPES = {"1b": (2048, 5632, 22, 32, 4), "3b": (3072, 8192, 28, 24, 8)}
# dense bf16 peak of the GPUs we have met, FLOP/s (NVIDIA datasheets, without sparsity)
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
VARIANTS = {
    "lora-bf16": quantize.QuantizeConfig(bits=None, eval_samples=0),
    "qlora-nf4": quantize.QuantizeConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16",
                                         eval_samples=0),
}


def build_base(shape: str, dest: Path) -> Path:
    """The embedded SmolLM2-135M, or a random-weight Llama of a bigger shape with its tokenizer."""
    smol = resolve_base("embedded:smollm2-135m-instruct", dest / "base", []).path
    if shape == "135m":
        return smol
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hidden, inter, layers, heads, kv = SHAPES[shape]
    config = AutoConfig.from_pretrained(smol)
    config.update({"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hidden // heads,
                   "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = dest / f"llama-{shape}"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smol).save_pretrained(folder)
    return folder


def child(base: Path, tokenized: Path, work: Path, steps: int) -> dict[str, float]:
    """One variant's sft stage in this process (its quantize folder is ready): peak memory and speed."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    import trl  # noqa: F401  (imported now, so that its memory is not counted as the stage's)
    from transformers import TrainerCallback

    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS from here on
    before = _status_bytes("VmRSS")
    train_start: dict[str, int] = {}

    class ResetPeakAtTrainBegin(TrainerCallback):  # put in place of the stage's (here idle) progress callback
        def on_train_begin(self, *args: object, **kwargs: object) -> None:
            train_start["stage_peak"] = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")

    sft.progress_callback = ResetPeakAtTrainBegin
    cfg = sft.SftConfig(max_steps=steps, batch_size=4, lr=2e-4, save_steps=10_000,
                        lora=sft.LoraSpec(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    metrics = sft.run(cfg, sft.SftInputs(base=base, dtype="bfloat16", tokenized=tokenized, quantized=work / "q",
                                         out_dir=work / "sft", seed=0))["metrics"]
    train_peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
    stage_peak = max(train_start["stage_peak"], train_peak)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # count parameters without allocating them
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).parameters())
    base_level = 0 if cuda else before  # on CPU: above the level before the stage (imports excluded)
    return {"stage_peak_bytes": float(stage_peak - base_level), "train_peak_bytes": float(train_peak - base_level),
            "tokens_per_s": metrics["tokens_per_s"], "params": params,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (reported in kB)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["135m", *SHAPES], default="135m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant (batch 4 x <=256 tokens)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not in the table")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # base,tokenized,work
    args = parser.parse_args()
    if args.child:
        base, tokenized, work = args.child.split(",")
        print("RESULT " + json.dumps(child(Path(base), Path(tokenized), Path(work), args.steps)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="alignflow-bench-mem-"))
    figures: dict[str, float | str] = {"shape": args.shape, "steps": args.steps}
    try:
        base = build_base(args.shape, tmp)
        c = curated(tmp / "c", skewed=False)
        tokenize.run(tokenize.TokenizeConfig(max_length=256), tokenize.TokenizeInputs(
            base=base, curated=c, synthesized=c / "empty", out_dir=tmp / "t"))
        results = {}
        for variant, qcfg in VARIANTS.items():
            # quantize here, not in the child: its own peak (reports, a second load) must not hide the training's
            quantize.run(qcfg, quantize.QuantizeInputs(base=base, dtype="bfloat16", curated=c,
                                                       out_dir=tmp / variant / "q"))
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child",
                                   f"{base},{tmp / 't'},{tmp / variant}"], capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
            results[variant] = json.loads(lines[-1].removeprefix("RESULT "))
        lora, qlora = results["lora-bf16"], results["qlora-nf4"]
        figures["device"] = lora["device"]
        figures["params"] = lora["params"]
        for scope in ("train", "stage"):
            figures[f"P5_{scope}_lora_bf16_peak_MiB"] = round(lora[f"{scope}_peak_bytes"] / 2**20, 1)
            figures[f"P5_{scope}_qlora_nf4_peak_MiB"] = round(qlora[f"{scope}_peak_bytes"] / 2**20, 1)
            figures[f"P5_{scope}_ratio"] = round(qlora[f"{scope}_peak_bytes"] / lora[f"{scope}_peak_bytes"], 3)
        figures["lora_bf16_tokens_per_s"] = lora["tokens_per_s"]
        figures["qlora_nf4_tokens_per_s"] = qlora["tokens_per_s"]
        if lora["device"] != "cpu":
            peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
                (v for k, v in PEAK_BF16.items() if k in lora["device"]), None)
            if peak is None:
                figures["lora_mfu"] = "unknown GPU: pass --peak-tflops"
            else:
                figures["lora_mfu_6N"] = round(lora["tokens_per_s"] * 6 * lora["params"] / peak, 4)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
