"""Decontamination: which training records contain an eval item, and so are dropped as `contaminated`.

A training record (SFT or preference) that contains at least `threshold` of the word n-grams of any eval item
(prompt + reference) is dropped, so that the eval set measures generalisation rather than recall. The curate
manifest records `decontaminated` = 1 when this ran, which `register.gate.require_decontaminated` checks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.records.dedup import words


class DecontaminateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    ngram: int = Field(8, gt=0, description="words per n-gram")
    threshold: float = Field(0.5, gt=0, le=1, description="drop when this share of an eval item's n-grams appears")


class EvalIndex:
    """Word n-grams of every eval item, to find training records that contain a large share of one."""

    def __init__(self, records: list[dict[str, Any]], n: int) -> None:
        self.n = n
        self.grams_per_item: list[int] = []
        self.items_of: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            grams = self.grams(words(" ".join(m["content"] for m in r["prompt"]) + " " + r["reference"]))
            self.grams_per_item.append(len(grams))
            for g in grams:
                self.items_of[g].append(i)

    def grams(self, tokens: list[str]) -> set[tuple[str, ...]]:
        """The word n-grams of a text's `words()` (a text shorter than n words is one gram)."""
        if len(tokens) < self.n:
            return {tuple(tokens)} if tokens else set()
        return {tuple(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1)}

    def contaminated(self, tokens: list[str], threshold: float) -> bool:
        """Whether a training text (its `words()`) holds `threshold` of some eval item's n-grams."""
        hits: Counter[int] = Counter()
        n, items_of = self.n, self.items_of
        grams = ({tuple(tokens)} if tokens else set()) if len(tokens) < n else \
            {g for g in (tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)) if g in items_of}
        for g in grams:  # the text's distinct n-grams that some eval item has
            for i in self.items_of.get(g, ()):
                hits[i] += 1
        return any(count >= threshold * self.grams_per_item[i] for i, count in hits.items())
