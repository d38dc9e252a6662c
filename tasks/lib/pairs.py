"""Which training preference pairs the judge (reward) and the policy (dpo) learn from, and how a pair is named.

tokenize holds out a share of the prompts (`preference_heldout/`); the rest (`preference/`) is for training.
With `reward.pairs: disjoint` (the default) those training pairs are split once more by the hash of their
*prompt* into a judge half (reward trains on it) and a policy half (dpo trains on it): no pair, and no prompt,
is learned by both, so the reward model's win-rates measure the policy on preferences it was not fitted to.
With `shared` both train on every training pair (the judge's win-rates are then not independent evidence).

The side is decided by bits 32-63 of `prompt_key(prompt)`, independent of the held-out decision (bits 0-31 in
tokenize), so every pair of one prompt lands on one side and the split stays put when data is added. The key is
the *normalised* prompt (each message's text lower-cased, white space runs folded, as curate's exact dedup
compares text): "How do I reset my password?", the same with a trailing newline and with doubled spaces are one
prompt, so its variants cannot land on both sides of a split (judge / policy, held-out / training).
A pair is named by sha256 of [prompt, chosen text, rejected text], the same hash as tokenize's
`heldout_pair_hashes`, so a manifest's `trained_pair_hashes` and `heldout_pair_hashes` compare directly.
"""

from __future__ import annotations

from typing import Any, Literal

from alignflow.tasks.lib.hashing import sha256_json

PairsMode = Literal["disjoint", "shared"]
Side = Literal["judge", "policy"]
JUDGE_SHARE = 0.5  # of the training prompts, on the judge's side under `disjoint`


MIN_SIDE_PAIRS = 2  # training pairs each side needs under `disjoint`: reward (judge) and dpo's pair losses refuse fewer


def normalised(text: str) -> str:
    """`text` lower-cased with white space runs folded to one space and trimmed: the rule of curate's exact dedup
    (tasks/records/dedup.exact_key), applied to the message text itself (exact_key folds the record's JSON, where a
    newline is the escape `\\n`, not white space)."""
    return " ".join(text.lower().split())


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """sha256 of the prompt's messages (role, normalised text): what every split by prompt is keyed on."""
    return sha256_json([[m["role"], normalised(m["content"])] for m in prompt])


def judge_side(prompt: list[dict[str, str]]) -> bool:
    """Whether a prompt's pairs (and rated completions) belong to the judge under `disjoint`."""
    return int(prompt_key(prompt)[8:16], 16) / 0x1_0000_0000 < JUDGE_SHARE


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
