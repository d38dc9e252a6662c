"""Corpus BLEU as an `evaluate` metric module, shipped with alignflow (nothing loads from a hub).

Computed with `sacrebleu` (13a tokenisation, exponential smoothing), one reference per prediction.
Returns `bleu` in [0, 1] (sacrebleu's score / 100).
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU (sacrebleu, 13a tokenisation, exp smoothing) between predictions and references."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
Returns:
    {"bleu": corpus BLEU in [0, 1]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score / 100.0}
