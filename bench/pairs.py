"""What every bench does with its alternating pairs: how many it takes (at least one) and how it reports a series
of samples (median and range, never one sample)."""

from __future__ import annotations

import argparse
import statistics


def at_least_one(text: str) -> int:
    """An argparse type for `--pairs`: a median needs a sample."""
    if int(text) < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (a median needs a sample)")
    return int(text)


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    """Median, min and max of a series of samples, rounded to `digits`."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}
