"""Memory preflight: estimate a training step's peak memory before the model loads, and refuse a run that cannot
fit with a suggestion, instead of dying in its first step (or an hour in, at the first long batch).

The estimate, per process, in bytes:
- weights: every parameter in the load dtype; 4-bit layers at 0.5 byte per weight plus their quantization
  constants (~0.56 byte in all with double quantization), 8-bit at ~1.03;
- trainable state: AdamW holds fp32 weights, gradients and two moments: 16 bytes per trainable parameter (LoRA:
  r x (in + out) per adapted Linear; full fine-tuning: every parameter, whose fp32 weights are this state);
- activations kept for the backward pass, per token and decoder layer: ~(6 h + 3 i) values for a Llama-style
  block (h hidden, i MLP width) with sdpa / flash attention (no s^2 score matrix; Korthikanti et al. 2022's
  34 s b h bytes for i = 4h, in 16-bit); with gradient checkpointing one h-vector per layer plus one layer's;
- logits: transformers computes the loss on fp32 logits: tokens x vocabulary x 4 bytes, and their gradient;
- a fixed overhead (CUDA context and allocator slack: 10 % + 0.5 GiB; on CPU the Python process itself).
Pair losses (reward, dpo) run chosen and rejected rows together: twice the rows. FSDP shards weights and
optimizer state over the processes. The estimate is logged as `memory_estimate_bytes` beside the measured
`peak_memory_bytes`, so each run shows how good it was.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignflow.tasks.lib.errors import StageError

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    params: int  # every parameter
    linear: list[tuple[int, int]]  # (out, in) of each decoder Linear (what LoRA adapts and bitsandbytes quantizes)
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def model_shape(folder: Path) -> ModelShape:
    """The shape of the model in `folder`, from its config and its safetensors headers (no weights are read)."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    config = config.get("text_config", config)
    params, linear = 0, []
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not iterable)
                shape = list(f.get_slice(name).get_shape())
                params += math.prod(shape)
                if len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name:
                    linear.append((shape[0], shape[1]))
    if not params:  # no safetensors (a shape-only check): the Llama formula from the config
        h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        kv = h * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
        linear = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * n
        params = sum(o * k for o, k in linear) + config["vocab_size"] * h * (
            1 if config.get("tie_word_embeddings") else 2)
    return ModelShape(params=params, linear=linear, hidden=config["hidden_size"],
                      intermediate=config.get("intermediate_size", 4 * config["hidden_size"]),
                      layers=config["num_hidden_layers"], vocab=config["vocab_size"])


def estimate(shape: ModelShape, *, dtype_bytes: int, bits: int | None, method: str, lora_r: int,
             seq_len: int, rows: int, gradient_checkpointing: bool, lm_logits: bool = True,
             shards: int = 1, cuda: bool = True) -> dict[str, int]:
    """Peak bytes of one training step, by part. `dtype_bytes`: the recipe dtype's size (weights of a LoRA base,
    activations); `rows`: sequences per device step (pairs count twice)."""
    linear_params = sum(o * i for o, i in shape.linear)
    other = shape.params - linear_params
    if method == "full":
        weights = 0  # the fp32 weights are part of the 16 bytes per trainable parameter below
        trainable = shape.params
    else:
        per_weight = {4: 0.5625, 8: 1.03}.get(bits or 0, float(dtype_bytes))
        weights = int(linear_params * per_weight + other * dtype_bytes)
        trainable = sum(lora_r * (o + i) for o, i in shape.linear)
    optimizer = trainable * 16
    tokens = rows * seq_len
    # activations in the compute dtype (a full fine-tune keeps fp32 weights but computes under the recipe's autocast)
    per_layer = (6 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    if gradient_checkpointing:
        activations = tokens * (shape.layers * shape.hidden * dtype_bytes + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * 4 * 2 if lm_logits else 0
    parts = {"weights": weights // shards, "optimizer": optimizer // shards, "activations": activations,
             "logits": logits}
    subtotal = sum(parts.values())
    parts["overhead"] = int(subtotal * 0.10) + (GiB // 2 if cuda else 0)
    parts["total"] = subtotal + parts["overhead"]
    return parts


def available_bytes() -> tuple[int, str]:
    """Free memory of this process's device: the GPU's free memory, or the machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", 0))
        free, _ = torch.cuda.mem_get_info(index)
        return int(free), f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "RAM"
    return 1 << 62, "RAM"  # unknown: never refuse


def preflight(stage: str, parts: dict[str, int], available: int, where: str, *, method: str, bits: int | None,
              batch_size: int, grad_accum: int, gradient_checkpointing: bool) -> None:
    """Refuse a step that cannot fit, naming what to change (ALIGNFLOW_SKIP_MEMORY_CHECK=1 trains anyway)."""
    if parts["total"] <= available or os.environ.get("ALIGNFLOW_SKIP_MEMORY_CHECK") == "1":
        return
    detail = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if k != "total")
    tips = []
    if batch_size > 1:
        tips.append(f"{stage}.batch_size: {max(batch_size // 2, 1)} with {stage}.grad_accum: {grad_accum * 2} "
                    "(the same effective batch, half the activations)")
    if not gradient_checkpointing:
        tips.append(f"{stage}.gradient_checkpointing: true (activations shrink to about one layer's)")
    if method == "full":
        tips.append("sft.method: lora (16 bytes of optimizer state per adapter weight instead of per weight)")
    elif bits is None:
        tips.append("quantize.bits: 4 (QLoRA: the base at ~0.56 byte per weight)")
    raise StageError(
        f"{stage}: a training step needs about {parts['total'] / GiB:.1f} GiB ({detail} GiB) but {where} has "
        f"{available / GiB:.1f} GiB free. Try " + "; or ".join(tips or ["a device with more memory"]) +
        ". Set ALIGNFLOW_SKIP_MEMORY_CHECK=1 to train anyway.")


def check_training_memory(stage: str, base: Path, quant: dict[str, Any], *, dtype: str, method: str, lora_r: int,
                          seq_len: int, batch_size: int, grad_accum: int, gradient_checkpointing: bool,
                          pairs: bool, lm_logits: bool = True) -> int:
    """Estimate this stage's step on this device, refuse it when it cannot fit, and return the estimate."""
    import torch

    from alignflow.tasks.lib.models import torch_dtype

    bits = 4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None
    shards = int(os.environ.get("WORLD_SIZE", 1)) if os.environ.get("ACCELERATE_USE_FSDP") == "true" else 1
    parts = estimate(model_shape(base), dtype_bytes=torch_dtype(dtype).itemsize,
                     bits=bits, method=method, lora_r=lora_r, seq_len=seq_len,
                     rows=batch_size * (2 if pairs else 1), gradient_checkpointing=gradient_checkpointing,
                     lm_logits=lm_logits, shards=shards, cuda=torch.cuda.is_available())
    available, where = available_bytes()
    preflight(stage, parts, available, where, method=method, bits=bits, batch_size=batch_size,
              grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing)
    return parts["total"]
