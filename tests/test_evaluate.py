"""evaluate's reference check of what preference tuning added: exact match of the tuned model minus the SFT-only
model's, per prompt through the shipped exact-match module, with a paired interval."""

from __future__ import annotations

from importlib import resources


def _exact(predictions: list[str], references: list[str]) -> list[float]:
    import evaluate as hf_evaluate

    em = hf_evaluate.load(str(resources.files("alignflow.metrics") / "exact_match"))
    return em.compute(predictions=predictions, references=references, per_example=True)["exact_match"]


def test_exact_match_gain_vs_sft_is_tuned_minus_sft_with_a_paired_interval() -> None:
    from alignflow.tasks.evaluate import gain

    references = ["sentiment: negative", "2021-03-05", "fruits: fig, lychee", "sentiment: neutral"] * 6
    # the SFT-only model answers the first two in the sentence form; preference tuning shortens one, breaks none
    sft = ["The sentiment of this review is negative.", "The date in ISO 8601 format is 2021-03-05.",
           "fruits: fig, lychee", "sentiment: neutral"] * 6
    tuned = ["sentiment: negative", "The date in ISO 8601 format is 2021-03-05.", "fruits: fig, lychee",
             "sentiment: neutral"] * 6
    em_tuned, em_sft = _exact(tuned, references), _exact(sft, references)
    assert sum(em_sft) / 24 == 0.5 and sum(em_tuned) / 24 == 0.75

    up = gain("exact_match_gain_vs_sft", em_tuned, em_sft, seed=0)
    assert set(up) == {"exact_match_gain_vs_sft", "exact_match_gain_vs_sft_ci_low", "exact_match_gain_vs_sft_ci_high"}
    assert up["exact_match_gain_vs_sft"] == 0.25  # tuned - SFT, not the other way round
    # no prompt got worse, so every resample's gain is >= 0; 6 of 24 better keeps the low end above 0
    assert 0 < up["exact_match_gain_vs_sft_ci_low"] < 0.25 < up["exact_match_gain_vs_sft_ci_high"] <= 0.5
    # paired: the same answers from both models give a gain of exactly 0 in every resample
    same = gain("exact_match_gain_vs_sft", em_sft, em_sft, seed=0)
    assert same == {"exact_match_gain_vs_sft": 0.0, "exact_match_gain_vs_sft_ci_low": 0.0,
                    "exact_match_gain_vs_sft_ci_high": 0.0}
    down = gain("exact_match_gain_vs_sft", em_sft, em_tuned, seed=0)
    assert down["exact_match_gain_vs_sft"] == -0.25 and down["exact_match_gain_vs_sft_ci_high"] < 0
