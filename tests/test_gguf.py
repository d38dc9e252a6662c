"""GGUF export: the file transformers' own GGUF loader reads back is the model that was written.

The CLI path (`alignflow export MODEL_URI --gguf`) on a registered smoke model is in tests/test_registry.py; here
the writer itself on the tiny Llama (and a tiny Qwen2), with weights moved off their initialisation so that a
wrong q/k permutation or a dropped tensor shows in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.gguf_file import write_gguf

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["List the fruits in: 'pears and figs'", "Rewrite the date 'May 2, 2024' in ISO 8601 format.",
           "Extract the name: Dana Ortiz lives in Lyon."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    base = resolve_base("tiny:llama", tmp_path_factory.mktemp("base"), [ROOT / "data" / "sft.jsonl"])
    model = load_causal_lm(base.path, "float32").eval()
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking model: every weight moved, q/k heads no longer alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, load_tokenizer(base.path)


def _read_back(path: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _compare(model: Any, tok: Any, back: Any, back_tok: Any) -> tuple[float, int]:
    """(largest logit difference, prompts whose 24-token greedy continuation is identical)."""
    worst, same = 0.0, 0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the chat template and the tokenizer travelled in the file's metadata
        assert back_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            worst = max(worst, float((back(ids).logits - model(ids).logits).abs().max()))
            want = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            got = back.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        same += int(torch.equal(want, got))
    return worst, same


def test_llama_round_trips_through_transformers_gguf_loader(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny
    sizes = {}
    for kind in ("f32", "f16", "q8_0"):
        out = tmp_path / f"tiny-{kind}.gguf"
        info = write_gguf(model, tok, out, kind)  # type: ignore[arg-type]
        assert info["architecture"] == "llama" and info["tokenizer_pre"] == "gpt-2"
        back, back_tok = _read_back(out)
        assert back_tok.eos_token == tok.eos_token and back_tok.pad_token == tok.pad_token
        worst, same = _compare(model, tok, back, back_tok)
        print(f"{kind}: {info['bytes']} bytes, max |logit difference| {worst:.3g}, greedy identical {same}/3")
        sizes[kind] = info["bytes"]
        if kind == "f32":
            assert worst == 0.0  # bit-exact: same weights, q/k permuted and un-permuted
        if kind in ("f32", "f16"):
            assert same == len(PROMPTS)
        if kind == "f16":
            assert 0 < worst < 5e-3
        if kind == "q8_0":
            assert worst < 0.1  # 8-bit blocks: measured 0.027 on this model
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_qwen2_round_trips_and_other_architectures_are_refused_by_name(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    _, tok = tiny
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(  # untied head, q/k/v biases, no permutation in llama.cpp's layout
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    out = tmp_path / "qwen.gguf"
    assert write_gguf(qwen, tok, out, "f32")["architecture"] == "qwen2"
    back, back_tok = _read_back(out)
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert _compare(qwen, tok, back, back_tok) == (0.0, len(PROMPTS))

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)))
    with pytest.raises(StageError, match="architecture 'gpt2' \\(GPT2LMHeadModel\\) is not supported"):
        write_gguf(gpt2, tok, tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists()
    # a tokenizer llama.cpp would have to read as something else (here word-level) is refused, not guessed
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(StageError, match="is not a byte-level BPE tokenizer"):
        write_gguf(qwen, words, tmp_path / "words.gguf")
