"""Inference helpers on the tiny model: batched answer perplexity equals the one-at-a-time computation."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_batched_answer_nlls_equal_one_at_a_time(tmp_path: Path) -> None:
    import torch

    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.chat import encode_conversation
    from alignflow.tasks.lib.inference import answer_nlls
    from alignflow.tasks.lib.jsonl import read_jsonl
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    model, tok = load_causal_lm(base.path, "float32"), load_tokenizer(base.path)
    records = list(read_jsonl(ROOT / "data" / "eval.jsonl"))[:11]  # 11: the last batch of 4 is short
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in records]
    # answers of very different lengths, so rows are padded
    refs = [r["reference"] * (1 + i % 3) for i, r in enumerate(records)]
    batched = answer_nlls(model, tok, prompts, refs, batch_size=4)
    # the reference: one unpadded row at a time, through the model's own (mean) loss
    one = []
    for p, ref in zip(prompts, refs, strict=True):
        ids, labels = encode_conversation(tok, [*p, {"role": "assistant", "content": ref}])
        n = sum(1 for label in labels[1:] if label != -100)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        one.append((float(loss) * n, n))
    assert [n for _, n in one] == [n for _, n in batched] and all(n > 0 for _, n in one)
    assert len({n for _, n in one}) > 1  # the rows really differ in length, so padding is exercised
    for (a, _), (b, _) in zip(one, batched, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-3)
