"""ROUGE-1/2/L as an `evaluate` metric module, shipped with alignflow so that nothing loads from a hub.

Load it with `evaluate.load("<path>/metrics/rouge")`. Scores are F1 averaged over the examples (0..1), computed
with Google's `rouge_score` package (tokenised on non-alphanumerics, lower-cased, no stemming by default).
"""

from typing import Any

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-1, ROUGE-2 and ROUGE-L F1 between predictions and references, averaged over examples."
_KWARGS = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    rouge_types: subset of ["rouge1", "rouge2", "rougeL"] (default: all three).
    use_stemmer: apply the Porter stemmer before matching (default False).
    per_example: return each prediction's F1 instead of the mean (default False).
Returns:
    dict rouge type -> mean F1 in [0, 1] (or the list of F1s with per_example).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], rouge_types: list[str] | None = None,
        use_stemmer: bool = False, per_example: bool = False,
    ) -> dict[str, Any]:
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer)
        # Plain means, not rouge_score's BootstrapAggregator: its resampling makes results vary run to run.
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
        if per_example:  # one F1 per prediction (what a paired bootstrap over prompts resamples)
            return {key: [s[key].fmeasure for s in scores] for key in rouge_types}
        n = max(len(scores), 1)
        return {key: sum(s[key].fmeasure for s in scores) / n for key in rouge_types}
