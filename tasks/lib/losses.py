"""The preference stage's losses by what they learn from: the names the dpo stage trains with and the cache key
contract (flows/keys.py: what dpo reads follows its loss) both read, so the key depends on no stage module."""

from __future__ import annotations

REFERENCE_FREE = ("simpo", "orpo")  # no reference model: trl.experimental's CPO (SimPO) and ORPO trainers
ONLINE = ("grpo", "rloo")  # sample from the policy and score with dpo.rewards
UNPAIRED = ("kto",)  # learns from single rated completions (and from pairs, each side rated)
# dpo settings only the online losses read (a pair loss keeps its key when they change)
ONLINE_SETTINGS = ("num_generations", "max_completion_length", "temperature", "rewards", "sample_every")
