"""Exact match as an `evaluate` metric module, shipped with alignflow (nothing loads from a hub).

A prediction matches when it equals its reference after stripping and collapsing whitespace and (by
default) lower-casing. Returns `exact_match`, the fraction of matches in [0, 1].
"""

import re
from typing import Any

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to their reference (whitespace-normalised, case-insensitive)."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    ignore_case: compare lower-cased (default True).
    per_example: return 1.0 / 0.0 per prediction instead of the fraction (default False).
Returns:
    {"exact_match": fraction in [0, 1]}
"""


def _norm(text: str, ignore_case: bool) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.lower() if ignore_case else text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str], ignore_case: bool = True,
                 per_example: bool = False) -> dict[str, Any]:
        hits = [_norm(p, ignore_case) == _norm(r, ignore_case) for p, r in zip(predictions, references, strict=True)]
        if per_example:  # 1.0 / 0.0 per prediction (what a paired bootstrap over prompts resamples)
            return {"exact_match": [float(h) for h in hits]}
        return {"exact_match": sum(hits) / max(len(hits), 1)}
