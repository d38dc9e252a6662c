"""Writing a transformers causal LM as one GGUF file, the format llama.cpp and Ollama load.

What goes in, in the layout llama.cpp's `convert_hf_to_gguf.py` writes (and transformers' GGUF loader reads back):
- metadata: `general.architecture` and the `<arch>.*` hyper-parameters (context, widths, heads, rope base, norm
  epsilon), `general.file_type`;
- the tokenizer as llama.cpp spells a byte-level BPE one: `tokenizer.ggml.model = "gpt2"`, `tokenizer.ggml.pre`
  (llama.cpp's name for the pre-tokenizer's split rule), every token (`[PAD<i>]` for ids the tokenizer lacks), its
  type (1 normal, 3 control = a special added token, 4 user-defined = a plain added token, 5 unused), the merges,
  the bos / eos / unk / pad ids, `add_bos_token`, and the chat template;
- the weights under GGUF's tensor names (`blk.<i>.attn_q.weight`, ...). Llama-family attention stores q and k
  with each head's rotary halves interleaved (llama.cpp's `permute`), which this writes and the loader undoes;
  Qwen2 keeps them as they are, with its q/k/v biases. Tied embeddings write no `output.weight`.

Tensor types: `f32` every tensor in float32 (bit-exact); `f16` 2-D tensors in float16 and 1-D ones (norms,
biases) in float32, as llama.cpp's MOSTLY_F16 does; `q8_0` 2-D tensors whose rows are a multiple of 32 in
ggml's Q8_0 blocks (32 int8 values + one fp16 scale: 8.5 bits a weight), the rest as in `f16`.

Only what this file knows how to write is accepted; anything else is refused by name (architecture, rope
scaling, tokenizer kind, pre-tokenizer) instead of writing a file llama.cpp would misread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from alignflow.tasks.lib.errors import StageError

GgufType = Literal["f32", "f16", "q8_0"]
# transformers model_type -> (GGUF architecture, q/k rows permuted as llama.cpp's LlamaModel does). Mistral is
# written as llama, as llama.cpp writes it.
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                              "qwen2": ("qwen2", False)}
# llama.cpp's `tokenizer.ggml.pre` names for the split rules byte-level BPE tokenizers use. A tokenizer whose
# pre-tokenizer is a plain ByteLevel with its built-in regex splits as GPT-2 does.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
Q8_BLOCK = 32  # values per Q8_0 block: a row must be a whole number of blocks


def write_gguf(model: Any, tok: Any, out: Path, gguf_type: GgufType = "f16", name: str = "") -> dict[str, Any]:
    """Write `model` (a plain transformers causal LM, weights merged) and its tokenizer to `out` as GGUF."""
    import gguf
    import numpy as np

    config = model.config
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise StageError(f"export --gguf: architecture '{model_type}' ({type(model).__name__}) is not supported; "
                         f"it writes {', '.join(sorted(ARCHITECTURES))} (Llama-family) models")
    arch_name, permute_qk = ARCHITECTURES[model_type]
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise StageError(f"export --gguf: rope scaling '{rope['rope_type']}' is not written yet (only plain RoPE)")
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tokens, types, merges, pre = _vocab(tok, config.vocab_size)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tok, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # whether the tokenizer puts BOS in front of a text by itself (SmolLM2's and the tiny model's do not)
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and
                                  tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    written = 0
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the loader ties it back to token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue  # computed from the rope settings
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise StageError(f"export --gguf: tensor '{hf_name}' has no GGUF name for architecture {arch_name}")
        data = tensor.detach().to("cpu").float().numpy()
        if permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head, n_head)
        elif permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_head, n_kv)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and gguf_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
            qtype = gguf.GGMLQuantizationType.Q8_0
        elif data.ndim == 2 and gguf_type in ("f16", "q8_0"):
            qtype = gguf.GGMLQuantizationType.F16
        writer.add_tensor(gguf_name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
        written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch_name, "gguf_type": gguf_type, "tensors": written, "vocab": len(tokens),
            "tokenizer_pre": pre, "bytes": out.stat().st_size}


def _permute(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """llama.cpp's `LlamaModel.permute`: within each head, rows (r0, r1, ..., r_{d/2}, ...) -> interleaved
    rotary halves. transformers' GGUF loader applies the inverse."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocab(tok: Any, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre-tokenizer name) of a byte-level BPE tokenizer, as llama.cpp writes them."""
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(spec.get("pre_tokenizer")):
        raise StageError(f"export --gguf: tokenizer {type(tok).__name__} ({model.get('type', 'no fast tokenizer')}) "
                         "is not a byte-level BPE tokenizer; only those (GPT-2 style, as SmolLM2, Llama 3 and Qwen2 "
                         "use) are written")
    pre = _pre_name(spec.get("pre_tokenizer"))
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise StageError(f"export --gguf: the tokenizer has ids up to {max(vocab.values())}, beyond the model's "
                         f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED: the embedding matrix is wider than the vocabulary
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if added[i].special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges, pre


def _byte_level(pre: dict[str, Any] | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, or a refusal naming what it found."""
    assert pre is not None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # SmolLM's original tokenizer: digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLITS:
            return SPLITS[regex]
    raise StageError(f"export --gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or pre.get('type')})"
                     " has no llama.cpp name this exporter knows (gpt-2, smollm, llama-bpe, qwen2)")
