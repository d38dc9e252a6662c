"""Quality filters: which training records are dropped as too short, repetitive, junk or in the wrong language.

Applied to sft and preference records, not to eval (its items are the benchmark). Each check names the reason
it drops a record under; the first failing check wins.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.records.text import answer_texts, record_text


class QualityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_answer_chars: int = Field(1, ge=1, description="shorter answers are dropped as too_short")
    max_repetition: float = Field(0.5, gt=0, le=1, description="max share of repeated word 3-grams in an answer")
    max_nonprintable: float = Field(0.05, ge=0, le=1, description="max share of non-printable characters")
    languages: list[str] | None = Field(None, description="keep only these langid codes, e.g. [en]; None: all")


def quality_problem(record: dict[str, Any], q: QualityConfig) -> str | None:
    """The reason `record` fails the quality filters (too_short, repetitive, junk_characters, wrong_language),
    or None when it passes."""
    answers = answer_texts(record)
    if any(len(a.strip()) < q.min_answer_chars for a in answers):
        return "too_short"
    for a in answers:
        words = a.lower().split()
        grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(grams) >= 10 and 1 - len(set(grams)) / len(grams) > q.max_repetition:
            return "repetitive"
    text = record_text(record)
    # isprintable() of the whole text first: one C call for the common case of no junk at all
    junk = 0 if text.isprintable() else sum(1 for c in text if not c.isprintable() and c not in "\n\t\r")
    if text and junk / len(text) > q.max_nonprintable:
        return "junk_characters"
    if q.languages:
        import langid

        if langid.classify(text)[0] not in q.languages:
            return "wrong_language"
    return None
