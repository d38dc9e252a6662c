"""Which training preference pairs the judge (reward) and the policy (dpo) learn from, and how a pair is named.

tokenize holds out a share of the prompts (`preference_heldout/`); the rest (`preference/`) is for training.
With `reward.pairs: disjoint` (the default) those training pairs are split once more by the hash of their
*prompt* into a judge half (reward trains on it) and a policy half (dpo trains on it): no pair, and no prompt,
is learned by both, so the reward model's win-rates measure the policy on preferences it was not fitted to.
With `shared` both train on every training pair (the judge's win-rates are then not independent evidence).

The side is decided by bits 32-63 of sha256(prompt), independent of the held-out decision (bits 0-31 in
tokenize), so every pair of one prompt lands on one side and the split stays put when data is added.
A pair is named by sha256 of [prompt, chosen text, rejected text], the same hash as tokenize's
`heldout_pair_hashes`, so a manifest's `trained_pair_hashes` and `heldout_pair_hashes` compare directly.
"""

from __future__ import annotations

from typing import Any, Literal

from alignflow.tasks.lib.hashing import sha256_json

PairsMode = Literal["disjoint", "shared"]
Side = Literal["judge", "policy"]
JUDGE_SHARE = 0.5  # of the training prompts, on the judge's side under `disjoint`


def judge_side(prompt: list[dict[str, str]]) -> bool:
    """Whether a prompt's pairs (and rated completions) belong to the judge under `disjoint`."""
    return int(sha256_json(prompt)[8:16], 16) / 0x1_0000_0000 < JUDGE_SHARE


def on_side(prompt: list[dict[str, str]], side: Side, mode: PairsMode) -> bool:
    """Whether `side` trains on this prompt's records: every one when shared, its own half when disjoint."""
    return mode == "shared" or judge_side(prompt) == (side == "judge")


def pair_hash(pair: dict[str, Any]) -> str:
    """sha256 of [prompt, chosen text, rejected text]; a tokenized pair's answers are one assistant message each."""
    def text(answer: Any) -> str:
        return answer if isinstance(answer, str) else answer[-1]["content"]

    return sha256_json([pair["prompt"], text(pair["chosen"]), text(pair["rejected"])])


def select(dataset: Any, side: Side, mode: PairsMode) -> Any:
    """The rows of a `datasets` dataset (pairs or rated completions, with a `prompt` column) that `side` trains on."""
    keep = [i for i, prompt in enumerate(dataset["prompt"]) if on_side(prompt, side, mode)]
    return dataset.select(keep)


def hashes(pairs: Any) -> list[str]:
    """Sorted `pair_hash` of every pair of a dataset (what a training stage's manifest lists)."""
    return sorted(pair_hash(p) for p in pairs)
