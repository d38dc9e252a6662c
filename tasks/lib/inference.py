"""Inference helpers shared by synthesize, quantize and evaluate: batched chat generation, reward-model
scores, and the perplexity of reference answers.
"""

from __future__ import annotations

from typing import Any

from alignflow.tasks.lib.chat import encode_conversation


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
    """Batched chat generation (left padding). Returns, per prompt, `num_return_sequences` completions.

    The registered model's own code (tasks/lib/served_model.py `generate_chat`, which travels with every version
    and cannot import alignflow): a served version answers exactly what evaluate measured."""
    from tqdm.auto import tqdm

    from alignflow.tasks.lib.served_model import generate_chat

    found = generate_chat(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          do_sample=do_sample, temperature=temperature, top_p=top_p,
                          num_return_sequences=num_return_sequences,
                          progress=lambda starts: tqdm(starts, desc=desc, unit="batch"))
    return [[g.text for g in completions] for completions in found]


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

def answer_nlls(model: Any, tok: Any, prompts: list[list[dict[str, str]]], references: list[str],
                batch_size: int = 8) -> list[tuple[float, int]]:
    """Per prompt: (summed negative log-likelihood in nats, token count) of the reference answer's tokens given the
    prompt. A template that cannot mark the answer gives (0.0, 0).

    Batched: rows are right-padded (a causal model's logits at real positions never see the padding after them)
    and the loss is summed per row over the answer tokens only."""
    import torch
    import torch.nn.functional as F

    encoded = [encode_conversation(tok, [*p, {"role": "assistant", "content": r}])
               for p, r in zip(prompts, references, strict=True)]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    todo = [i for i, e in enumerate(encoded) if e is not None]
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in rows)  # type: ignore[index]
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            row_ids, row_labels = encoded[i]  # type: ignore[misc]
            ids[j, : len(row_ids)] = torch.tensor(row_ids)
            labels[j, : len(row_labels)] = torch.tensor(row_labels)
            mask[j, : len(row_ids)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        target = labels[:, 1:].to(logits.device)  # position t predicts token t+1
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        for j, i in enumerate(rows):
            out[i] = (float(nll[j].sum()), int((target[j] != -100).sum()))
    return out


def perplexity(nlls: list[tuple[float, int]]) -> float:
    """exp(mean NLL per answer token) over the given (NLL sum, tokens) items."""
    import math

    return math.exp(sum(s for s, _ in nlls) / max(sum(n for _, n in nlls), 1))


def answer_perplexity(model: Any, tok: Any, prompts: list[list[dict[str, str]]], references: list[str]) -> float:
    """exp(mean NLL per answer token) of the references given their prompts (answer tokens only)."""
    return perplexity(answer_nlls(model, tok, prompts, references))
