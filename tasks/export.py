"""export: a registered model as plain files that need neither alignflow nor MLflow.

- merged: the LoRA update folded into the base weights (PEFT `merge_and_unload`), saved as safetensors with
  config, generation config and tokenizer (chat template included): `AutoModelForCausalLM.from_pretrained(OUT)`
  loads it anywhere transformers runs.
- adapter: the PEFT adapter folder + tokenizer, and `base_model.json` naming the base it applies to.
- gguf: the merged weights as one GGUF file for llama.cpp / Ollama (`tasks/lib/gguf_file.py`: Llama-family
  architectures, byte-level BPE tokenizers, tokenizer and chat template in the metadata), in f32, f16 or q8_0.

A full fine-tune was registered as complete weights: `merged` copies them; it has no adapter to export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from alignflow.tasks.lib.errors import StageError


class ExportInputs(BaseModel):
    adapter: Path  # the registered weights: a PEFT adapter, or a complete model (full fine-tune)
    base_path: Path
    base_spec: str
    dtype: str = "float32"
    out_dir: Path
    kind: Literal["merged", "adapter", "gguf"] = "merged"
    gguf_type: Literal["f32", "f16", "q8_0"] = "f16"  # kind gguf: how the 2-D weights are stored


def run(inputs: ExportInputs) -> dict[str, Any]:
    from alignflow.tasks.lib.models import is_adapter

    out = inputs.out_dir
    if inputs.kind == "gguf":
        return _gguf(inputs)
    if not is_adapter(inputs.adapter):
        if inputs.kind == "adapter":
            raise StageError("export: this model is a full fine-tune (complete weights, no adapter); use --merged")
        shutil.copytree(inputs.adapter, out, dirs_exist_ok=True)  # already plain transformers files
        return {"kind": "merged", "out_dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    if inputs.kind == "adapter":
        shutil.copytree(inputs.adapter, out, dirs_exist_ok=True)
        (out / "base_model.json").write_text(json.dumps({"base_spec": inputs.base_spec,
                                                         "base_path": str(inputs.base_path)}, indent=2))
        return {"kind": "adapter", "out_dir": str(out)}

    from peft import PeftModel

    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    base = load_causal_lm(inputs.base_path, inputs.dtype)
    merged = PeftModel.from_pretrained(base, inputs.adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(inputs.adapter).save_pretrained(out)
    return {"kind": "merged", "out_dir": str(out), "params": sum(p.numel() for p in merged.parameters())}


def _gguf(inputs: ExportInputs) -> dict[str, Any]:
    """Merge in memory (the adapter over the base, or the full weights as they are), then write one GGUF file.
    Merging happens in float32 whatever the recipe's dtype, so the file's f16 / q8_0 rounding happens once."""
    from alignflow.tasks.lib.gguf_file import write_gguf
    from alignflow.tasks.lib.models import is_adapter, load_causal_lm, load_tokenizer

    if is_adapter(inputs.adapter):
        from peft import PeftModel

        base = load_causal_lm(inputs.base_path, "float32")
        model = PeftModel.from_pretrained(base, inputs.adapter).merge_and_unload()
    else:
        model = load_causal_lm(inputs.adapter, "float32")
    tok = load_tokenizer(inputs.adapter)
    name = inputs.base_spec.removeprefix("embedded:").replace("/", "-") or model.config.model_type
    written = write_gguf(model.eval(), tok, inputs.out_dir, inputs.gguf_type, name=name)
    return {"kind": "gguf", "out_dir": str(inputs.out_dir), **written}

