"""The promotion gate's settings (`register.gate.*`): one model shared by the register stage, which applies them, and
the registered model's promotion policy (tasks/lib/policy.py), which is checked and merged against them. Stages
never import each other, and the policy is not a stage: so the settings live here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

LOWER_IS_BETTER = {"perplexity"}
GATED_METRICS = {"perplexity", "rouge1", "rouge2", "rougeL", "bleu", "exact_match", "reward_mean"}
# what evaluate measures on each artifact of register.ship (`shipped.<format>.<metric>`; no reward model there):
# evaluate.metrics entry -> the metrics it gives a shipped artifact (tasks/evaluate.py `_shipped_metrics`)
SHIPPED_BY_METRIC: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",), "rouge": ("rouge1", "rouge2", "rougeL"), "bleu": ("bleu",),
    "perplexity": ("perplexity",)}
SHIPPED_GATED = {m for metrics in SHIPPED_BY_METRIC.values() for m in metrics}


class GateConfig(BaseModel):
    # allow_inf_nan=False: every threshold (and every max_regression / min_gain_vs_champion value) must be a finite
    # number. A NaN (YAML `.nan`, JSON `NaN`, or the string "nan" a deployment form sends) compares False both ways,
    # so it would silently pass its check and win over the model's policy in merge(): refused here, per dotted key.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    min_win_rate: float | None = Field(
        0.5, ge=0, le=1, description="the lower 95% bound of the reward-model win-rate vs the base must exceed this "
        "(None: not checked). A reward model that is not independent of the policy (evaluate's judge_independent) "
        "gives no evidence: the check then fails")
    min_win_rate_vs_champion: float | None = Field(
        0.5, ge=0, le=1, description="the lower 95% bound of the win-rate vs the current champion must exceed this "
        "(checked when one exists): a candidate that is not measurably better never takes champion")
    min_rougeL_gain: float | None = Field(
        0.0, description="the lower 95% bound of rougeL - rougeL_base must exceed this (None: not checked)")
    max_regression: dict[str, float] = Field(
        {}, description="metric -> largest allowed loss vs the champion, checked on the loss's upper 95% bound, "
        "e.g. {rougeL: 0.02, perplexity: 0.1, lm_eval.arc_easy.acc: 0.01} (lm_eval.<task>.<metric>: a metric of "
        "evaluate.lm_eval)")
    min_gain_vs_champion: dict[str, float] = Field(
        {}, description="metric -> smallest gain over the current champion, by the references: the lower 95% bound "
        "of the paired difference (candidate - champion; champion - candidate where lower is better) must exceed "
        "it, e.g. {exact_match: 0.0} (checked when a champion exists). Every rule set must pass: to decide against "
        "the champion by references instead of the reward model, also set min_win_rate_vs_champion: null")
    max_shipped_regression: dict[str, float] = Field(
        {}, description="metric -> largest allowed loss of each artifact of register.ship vs the adapter model "
        "evaluate measured, checked on the loss's upper 95% bound (`shipped.<format>.<metric>_delta_ci_*`), e.g. "
        "{exact_match: 0.1, perplexity: 0.5} (size it to the eval set: on 48 prompts one lost answer bounds the loss "
        "at 0.0625); needs register.ship")
    require_decontaminated: bool = Field(False, description="fail unless curate removed eval overlap from training")
    min_judge_accuracy: float | None = Field(
        0.6, ge=0, le=1, description="the lower 95% (Wilson) bound of the reward model's accuracy on held-out pairs "
        "that neither reward nor dpo trained on, below which its win-rates are not trusted and the gate fails "
        "(None: not checked)")

    @field_validator("max_regression", "min_gain_vs_champion")
    @classmethod
    def _known_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = {k for k in v if k not in GATED_METRICS and not _harness_metric(k)}
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; gateable: {sorted(GATED_METRICS)} and "
                             "lm_eval.<task>.<metric> for a task of evaluate.lm_eval")
        return v

    @field_validator("max_shipped_regression")
    @classmethod
    def _shipped_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(k for k in v if k not in SHIPPED_GATED)
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; measured on a shipped artifact: {sorted(SHIPPED_GATED)}")
        return v


def _harness_metric(name: str) -> bool:
    """`lm_eval.<task>.<metric>[.<filter>]`: a metric of the lm-evaluation-harness tasks evaluate runs."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[0] == "lm_eval" and all(parts[1:])
