"""Chat formatting: the ChatML template of the tiny test model, and a conversation encoded into token ids with
labels on the assistant turns only.
"""

from __future__ import annotations

from typing import Any

# ChatML, the template the tiny test model uses (SmolLM2 ships the same markers in its own template).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

def encode_conversation(tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (-100 outside assistant turns); None if the template does not render prefixes."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            return None
        spans.append((len(before), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= s < end for start, end in spans) else -100
        for token, (s, _e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return list(enc["input_ids"]), labels
