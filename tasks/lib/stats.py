"""Confidence intervals for the gate: a paired bootstrap over eval prompts.

Every gate metric is a statistic of per-prompt values (a win score of 1 / 0.5 / 0, a ROUGE-L F1, an exact match,
a reward, an answer's negative log-likelihood and token count). The bootstrap resamples the *prompts* with
replacement, the same indices for both models being compared (paired: a hard prompt is hard for both), recomputes
the statistic, and takes the 2.5th and 97.5th percentiles of the resampled values: a 95 % interval. With 48 prompts
that is wide, and honest about what 48 prompts can show.

A run that was *selected* as the best of k (a sweep's winner, picked on the same eval prompts) would pass far
more often than 5 % by luck (0.020 for one trial, 0.153 for the best of 8, simulated with `delta_ci`); its
intervals are taken at the familywise level 1 - 0.05/k (Bonferroni: the chance that any of the k trials'
intervals misses is at most 0.05), `familywise_level(k)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 0.01 between seeds at this count
LEVEL = 0.95


def familywise_level(trials: int, level: float = LEVEL) -> float:
    """The per-interval level that keeps `level` for the family of `trials` candidates (Bonferroni)."""
    return 1.0 - (1.0 - level) / max(trials, 1)


def bootstrap_ci(n: int, statistic: Callable[[Sequence[int]], float], seed: int = 0,
                 resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) of `statistic(indices)` over `resamples` resamples of range(n) with replacement."""
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    values = [statistic([rng.randrange(n) for _ in range(n)]) for _ in range(resamples)]
    if any(math.isnan(v) for v in values):  # a missing score: no interval (the gate then fails closed)
        return float("nan"), float("nan")
    values.sort()
    tail = (1.0 - level) / 2
    low = values[int(tail * (resamples - 1))]
    high = values[round((1.0 - tail) * (resamples - 1))]
    return round(low, 4), round(high, 4)


def mean_ci(values: Sequence[float], seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mean of per-prompt values (e.g. win scores)."""
    return bootstrap_ci(len(values), lambda idx: sum(values[i] for i in idx) / len(idx), seed, level=level)


def delta_ci(candidate: Sequence[float], other: Sequence[float], seed: int = 0,
             level: float = LEVEL) -> tuple[float, float]:
    """Paired interval of mean(candidate) - mean(other) over the same prompts."""
    assert len(candidate) == len(other)
    return bootstrap_ci(len(candidate), lambda idx: sum(candidate[i] - other[i] for i in idx) / len(idx), seed,
                        level=level)


def perplexity_delta_ci(candidate: Sequence[tuple[float, int]], other: Sequence[tuple[float, int]],
                        seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Paired interval of perplexity(candidate) - perplexity(other); each item is (answer NLL sum, tokens)."""
    def ppl(items: Sequence[tuple[float, int]], idx: Sequence[int]) -> float:
        return math.exp(sum(items[i][0] for i in idx) / max(sum(items[i][1] for i in idx), 1))

    return bootstrap_ci(len(candidate), lambda idx: ppl(candidate, idx) - ppl(other, idx), seed, level=level)


def win_scores(answers: Sequence[str], rewards: Sequence[float], others: Sequence[str],
               other_rewards: Sequence[float]) -> list[float]:
    """Per prompt: 1 when the answer out-scores the other, 0 when it scores lower, 1/2 for the same text or score."""
    scores = []
    for a, r, o, ro in zip(answers, rewards, others, other_rewards, strict=True):
        scores.append(0.5 if a == o or r == ro else float(r > ro))
    return scores


def wilson_low(successes: int, n: int, z: float = 1.96, level: float | None = None) -> float:
    """Lower end of the Wilson score interval (95 % at z=1.96) of a proportion: all 35 of 35 right gives 0.90,
    2 of 2 gives 0.34, so a judge right on a handful of pairs by luck is not trusted. `level` (two-sided) sets z."""
    if n == 0:
        return float("nan")
    if level is not None:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1.0 - (1.0 - level) / 2)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round((centre - spread) / (1 + z * z / n), 4)
