"""quantize: decide how the base weights are held during training, and measure what it saves.

With `bits: 4` (QLoRA) or `bits: 8`, the base model is loaded through bitsandbytes with the recipe's settings
(NF4 or FP4, double quantization, compute dtype) and its memory footprint is compared with the unquantized
load. The settings are written to `quantization.json`; sft and dpo load the base with exactly those settings.
With `bits: null` (plain LoRA) the stage only records the base footprint and writes an empty settings file.
bitsandbytes 0.50 quantizes and runs forward passes on CPU too, so QLoRA is exercised without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.common import write_manifest


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: Literal[4, 8] | None = None  # None: train LoRA on the unquantized base
    quant_type: Literal["nf4", "fp4"] = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # matmul dtype of 4-bit layers


class QuantizeInputs(BaseModel):
    base: Path
    dtype: str
    out_dir: Path


def settings(cfg: QuantizeConfig) -> dict[str, Any]:
    """The BitsAndBytesConfig as a plain dict (what quantization.json holds); {} when not quantizing."""
    if cfg.bits is None:
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True).to_dict()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=cfg.compute_dtype,
    ).to_dict()


def run(cfg: QuantizeConfig, inputs: QuantizeInputs) -> dict[str, Any]:
    from tasks.modeling import load_causal_lm

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    quant = settings(cfg)
    (out / "quantization.json").write_text(json.dumps(quant, indent=2, default=str))

    base = load_causal_lm(inputs.base, inputs.dtype)
    before = int(base.get_memory_footprint())  # bytes, parameters + buffers
    del base
    metrics: dict[str, float] = {"memory_before_bytes": before}
    if quant:
        quantized = load_causal_lm(inputs.base, inputs.dtype, quant)
        after = int(quantized.get_memory_footprint())
        metrics.update({"memory_after_bytes": after, "memory_ratio": round(after / before, 4)})
        del quantized
    report = {"bits": cfg.bits, "settings": quant, **metrics}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return write_manifest(out, {"stage": "quantize", "bits": cfg.bits, "outputs": ["quantization.json", "report.json"],
                                "artifacts": ["report.json"], "metrics": metrics})
