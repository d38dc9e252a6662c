"""Verifiable rewards for configs/demo-grpo.yaml: does a completion have the answer format its task asks for?

A reward function in alignflow (and TRL) takes the batch's prompts and sampled completions, plus the prompt
dataset's columns as keyword arguments, and returns one float per completion (or None: "not scored by this
source"). The demo has four tasks, told apart by how the prompt starts; each answer format is one regular
expression. These check the *form* only; the recipe's `reference` reward (ROUGE-L against the SFT answer) checks
the content. A format check alone is easy to hack (`sentiment: positive` for every review); that is why the two
are summed, and why the dpo child run keeps tables of sampled completions to read.
"""

from __future__ import annotations

import re
from typing import Any

# prompt start -> the whole answer must match this
FORMATS = {
    "Extract the person's name and city": r"name: [A-Z][\w'-]*(?: [A-Z][\w'-]*)*\ncity: [A-Z][\w'-]*(?: [A-Z][\w'-]*)*",
    "Classify the sentiment": r"sentiment: (?:positive|negative|neutral)",
    "Rewrite the date": r"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])",  # ISO 8601: YYYY-MM-DD
    "List the fruits": r"fruits: [a-z]+(?:, [a-z]+)*",
}


def _text(message_or_text: Any) -> str:
    """Conversational data comes as message lists ([{"role": ..., "content": ...}]); plain data as strings."""
    if isinstance(message_or_text, list):
        return str(message_or_text[-1]["content"]) if message_or_text else ""
    return str(message_or_text)


def format_matches_task(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion is exactly in its task's answer format, 0.0 when not, None for a prompt of none
    of the four tasks (a synthesized instruction): TRL leaves those out of this source's mean."""
    rewards: list[float | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        question, answer = _text(prompt), _text(completion).strip()
        pattern = next((p for start, p in FORMATS.items() if question.startswith(start)), None)
        rewards.append(None if pattern is None else float(re.fullmatch(pattern, answer) is not None))
    return rewards
