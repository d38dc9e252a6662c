"""quantize: decide how the base weights are held during training, and measure what it costs and saves.

With `bits: 4` (QLoRA: NF4 or FP4, optional double quantization, a compute dtype) or `bits: 8`, the base is
loaded through bitsandbytes and compared with the unquantized load:
- memory footprint before / after (bytes, parameters + buffers);
- perplexity of the held-out reference answers before / after (same prompts, answer tokens only);
- a per-layer table of the real quantization error: each quantized Linear's weights are dequantized again
  and compared with the originals (relative Frobenius error), in `layers.csv`.
The settings go to `quantization.json`; sft and dpo load the base with exactly those. With `bits: null`
(plain LoRA) the file is empty and only the unquantized figures are recorded.

Always, from first principles on the base weights (`first_principles.json`): int8 per-output-channel
*symmetric* (scale = max|w|/127) vs *affine* (scale and zero point from min/max) error, and per-tensor
symmetric int8 with *min-max* vs *99.9th-percentile* calibration (clipping outliers trades their error for
finer steps everywhere else). bitsandbytes 0.50 quantizes and runs forward passes on CPU too.

Memory: the report streams the original weights from the base's safetensors files one layer at a time (at most
one layer in fp32, a few temporaries of its size: ~1.2 GB for the largest Llama-3-8B layer), never a copy of
every layer; the unquantized model is loaded only to measure `perplexity_before` (`eval_samples` > 0) and is
freed before the quantized one loads. Nothing trains from this stage but `quantization.json`, and sft's key
reads only that file, so a report setting never re-runs training.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.manifest import write_manifest


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: Literal[4, 8] | None = None  # None: train LoRA on the unquantized base
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (~0.4 bit/param saved)
    # matmul dtype of 4-bit layers; auto: bf16 on GPUs that have it, else fp32 (resolved into quantization.json)
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    eval_samples: int = Field(16, ge=0, description="held-out records for the perplexity before/after")


class QuantizeInputs(BaseModel):
    base: Path
    dtype: str
    curated: Path  # eval.jsonl: held-out text for perplexity
    out_dir: Path


def settings(cfg: QuantizeConfig) -> dict[str, Any]:
    """The BitsAndBytesConfig as a plain dict (what quantization.json holds); {} when not quantizing."""
    if cfg.bits is None:
        return {}
    from transformers import BitsAndBytesConfig

    from alignflow.tasks.lib.models import torch_dtype

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True).to_dict()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(cfg.compute_dtype),
    ).to_dict()


def run(cfg: QuantizeConfig, inputs: QuantizeInputs) -> dict[str, Any]:
    from alignflow.tasks.lib.inference import answer_perplexity
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer, torch_dtype

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    quant = settings(cfg)
    (out / "quantization.json").write_text(json.dumps(quant, indent=2, default=str))
    held_out = list(read_jsonl(inputs.curated / "eval.jsonl"))[: cfg.eval_samples]
    prompts, refs = [r["prompt"] for r in held_out], [r["reference"] for r in held_out]
    tok = load_tokenizer(inputs.base)
    originals = _WeightFiles(inputs.base)  # the base's tensors, read one at a time

    metrics: dict[str, float] = {"memory_before_bytes": originals.bytes_in(torch_dtype(inputs.dtype))}
    if held_out:  # the unquantized model only for its perplexity; freed before the quantized one loads
        base = load_causal_lm(inputs.base, inputs.dtype)
        metrics["memory_before_bytes"] = int(base.get_memory_footprint())
        metrics["perplexity_before"] = round(answer_perplexity(base, tok, prompts, refs), 4)
        del base
    linear = [n for n in originals.names() if n.endswith(".weight") and originals.ndim(n) == 2
              and "lm_head" not in n and "embed" not in n]  # what bitsandbytes replaces (the LM head stays)
    first = _first_principles(originals.tensor(n) for n in linear)
    (out / "first_principles.json").write_text(json.dumps(first, indent=2))
    metrics.update({f"int8.{k}": v["mean_relative_error"] for k, v in first.items()})

    outputs = ["quantization.json", "first_principles.json"]
    if quant:
        quantized = load_causal_lm(inputs.base, inputs.dtype, quant)
        metrics["memory_after_bytes"] = int(quantized.get_memory_footprint())
        metrics["memory_ratio"] = round(metrics["memory_after_bytes"] / metrics["memory_before_bytes"], 4)
        # Before any forward pass: bitsandbytes' CPU backend repacks 4-bit weights into another layout on the
        # first forward, after which dequantizing them no longer gives the weights back.
        rows = _layer_errors(quantized, originals)
        if held_out:
            metrics["perplexity_after"] = round(answer_perplexity(quantized, tok, prompts, refs), 4)
        with open(out / "layers.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["layer", "shape", "relative_error"])
            writer.writeheader()
            writer.writerows(rows)
        errors = [r["relative_error"] for r in rows]
        if errors:
            metrics["layer_error_mean"] = round(sum(errors) / len(errors), 6)
            metrics["layer_error_max"] = round(max(errors), 6)
        outputs.append("layers.csv")
        del quantized
    report = {"bits": cfg.bits, "settings": quant, **metrics}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    outputs.append("report.json")
    return write_manifest(out, {"stage": "quantize", "bits": cfg.bits, "outputs": outputs,
                                "artifacts": [o for o in outputs if o != "quantization.json"], "metrics": metrics})


class _WeightFiles:
    """The tensors of a model folder's safetensors files, by name, loaded one at a time (as fp32)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[list[int], str]] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                    self._where[name] = file
                    view = f.get_slice(name)
                    self._meta[name] = (list(view.get_shape()), str(view.get_dtype()))

    def names(self) -> list[str]:
        return list(self._where)

    def ndim(self, name: str) -> int:
        return len(self._meta[name][0])

    def tensor(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name).float()

    def bytes_in(self, dtype: Any) -> int:
        """Parameter bytes in `dtype` (what the model takes in memory, buffers aside)."""
        import math

        return sum(math.prod(shape) for shape, _ in self._meta.values()) * dtype.itemsize


def _layer_errors(quantized: Any, originals: _WeightFiles) -> list[dict[str, Any]]:
    import bitsandbytes.functional as bnbf
    import torch

    known = set(originals.names())
    rows = []
    for name, module in quantized.named_modules():
        if f"{name}.weight" not in known:
            continue
        w = module.weight
        if type(module).__name__ == "Linear4bit":
            restored = bnbf.dequantize_4bit(w.data, w.quant_state).float()
        elif type(module).__name__ == "Linear8bitLt":
            scb = getattr(w, "SCB", None)
            scb = scb if scb is not None else getattr(module.state, "SCB", None)
            if scb is None:
                continue
            restored = w.data.float() * scb.float().unsqueeze(1) / 127.0  # row-wise absmax int8
        else:
            continue
        original = originals.tensor(f"{name}.weight").to(restored.device)  # one layer in memory at a time
        error = float(torch.linalg.norm(restored.reshape(original.shape) - original) / torch.linalg.norm(original))
        rows.append({"layer": name, "shape": "x".join(map(str, original.shape)), "relative_error": round(error, 6)})
        del original, restored
    return rows


def _first_principles(weights: Iterable[Any]) -> dict[str, dict[str, float]]:
    """int8 round-trip error of four textbook schemes, averaged over the layers (relative Frobenius error).
    `weights` yields one layer at a time; only that layer is held."""
    import torch

    def rel(w: Any, wq: Any) -> float:
        return float(torch.linalg.norm(w - wq) / torch.linalg.norm(w))

    def symmetric(w: Any, absmax: Any) -> Any:  # absmax broadcasts: per channel or per tensor
        scale = (absmax / 127.0).clamp(min=1e-12)
        return torch.clamp(torch.round(w / scale), -127, 127) * scale

    def affine_per_channel(w: Any) -> Any:
        lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
        scale = ((hi - lo) / 255.0).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, 255)
        return (q - zero) * scale

    schemes = {
        "per_channel_symmetric": lambda w: symmetric(w, w.abs().max(dim=1, keepdim=True).values),
        "per_channel_affine": affine_per_channel,
        "per_tensor_minmax": lambda w: symmetric(w, w.abs().max()),
        # 99.9th percentile of |w| (on a sample: torch.quantile caps its input size) clips the rare outliers
        "per_tensor_percentile": lambda w: symmetric(
            w, torch.quantile(w.abs().flatten()[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))
                                                [:1_000_000]], 0.999)),
    }
    errors: dict[str, list[float]] = {scheme: [] for scheme in schemes}
    for w in weights:
        for scheme, fn in schemes.items():
            errors[scheme].append(rel(w, fn(w)))
    return {scheme: {"mean_relative_error": round(sum(e) / max(len(e), 1), 6), "layers": len(e)}
            for scheme, e in errors.items()}
