"""Loading models for inference and training: device and dtype, tokenizer, causal LM (optionally 4/8-bit),
the tuned weights a training stage produced (an adapter or a full model), the reward model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


class _OncePerMessage(logging.Filter):
    """bitsandbytes' 8-bit matmul logs the same warning on every call (thousands per run): keep the first."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage())

# Every model folder this process loaded weights from, in order: the pipeline records each stage's loads in its
# manifest (`model_loads`), and a test holds a cold run to one load of the base per stage.
LOADS: list[str] = []


def device() -> str:
    """This process's device: under `accelerate launch` each rank takes its own GPU (LOCAL_RANK), so a 4/8-bit
    model placed with device_map lands on that rank's GPU, not on GPU 0 for every rank."""
    import os

    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"

def device_kind() -> str:
    """`cpu`, `cuda-bf16` or `cuda`: what `model.dtype: auto` and the training precision flags depend on.
    Without a GPU device node (NVIDIA, ROCm, WSL) torch could only answer `cpu`: every run asks, a fully cached one
    too, and importing torch to hear it costs seconds."""
    if not any(Path("/dev").glob("nvidia[0-9]*")) and not any(Path(p).exists() for p in ("/dev/kfd", "/dev/dxg")):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda-bf16" if torch.cuda.is_bf16_supported() else "cuda"


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        # bf16 where the hardware has it; fp32 on CPUs, where bf16 matmuls are several times slower here.
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

def load_tokenizer(path: Path, padding_side: str = "right") -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok

def load_causal_lm(path: Path, dtype: str, quantization: dict[str, Any] | None = None,
                   attn_implementation: str | None = None) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(quantization)
        kwargs["device_map"] = {"": device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    LOADS.append(str(path))
    if not quantization:
        model.to(device())
    return model

def tuned_weights(stage_folder: Path) -> Path:
    """A training stage's product: `model/` (full fine-tune: every weight) or `adapter/` (PEFT over the base)."""
    full = stage_folder / "model"
    return full if (full / "config.json").exists() else stage_folder / "adapter"

def is_adapter(weights: Path) -> bool:
    """True for a PEFT adapter folder (applies over a base model), False for a complete model folder."""
    return (weights / "adapter_config.json").exists()

def load_tuned(base: Path, dtype: str, weights: Path) -> Any:
    """A tuned model for inference: full weights load on their own; an adapter loads over `base`."""
    if not is_adapter(weights):
        return load_causal_lm(weights, dtype)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(base, dtype), weights)

def load_reward_model(base: Path, dtype: str, adapter: Path | None,
                      quantization: dict[str, Any] | None = None) -> Any:
    """The base with a one-output classification head; with `adapter`, the trained reward LoRA + head.

    `quantization` (the quantize stage's BitsAndBytesConfig dict) holds the base in 4/8 bits for QLoRA training;
    the new `score` head stays unquantized (it is trained in full)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": torch_dtype(dtype)}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(
            {**quantization, "llm_int8_skip_modules": ["score"]})
        kwargs["device_map"] = {"": device()}
    model = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
    LOADS.append(str(base))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model.config.pad_token_id = load_tokenizer(adapter).pad_token_id
    return (model if quantization else model.to(device())).eval()

def reward_model_over(causal: Any, adapter: Path) -> Any:
    """The trained reward model (LoRA + score head in `adapter`) built over an already loaded causal LM's backbone:
    no second copy of the base in memory and no second load (an 8B base is 16 GB in bf16).

    The sequence-classification model is made on the meta device, given the causal LM's backbone module and a new
    score head, then the adapter loads over it. Its LoRA layers go into the shared backbone: call `.unload()` on
    the result when done, which puts the backbone's plain layers back (the causal LM is then as before).
    Falls back to a separate load when the architecture's classification model has other parts.
    """
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    with torch.device("meta"):
        rm = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
    backbone = getattr(causal, causal.base_model_prefix, None)
    head = getattr(rm, "score", None)
    if backbone is None or not isinstance(head, torch.nn.Linear) or rm.base_model_prefix != causal.base_model_prefix:
        return load_reward_model(Path(causal.name_or_path), str(causal.dtype).removeprefix("torch."), adapter)
    setattr(rm, rm.base_model_prefix, backbone)
    rm.score = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, device=causal.device,
                               dtype=causal.dtype)  # overwritten by the adapter's trained head
    if any(p.is_meta for p in rm.parameters()):
        return load_reward_model(Path(causal.name_or_path), str(causal.dtype).removeprefix("torch."), adapter)
    model = PeftModel.from_pretrained(rm, adapter)
    model.config.pad_token_id = load_tokenizer(adapter).pad_token_id  # pooling reads the last non-pad token
    return model.eval()
