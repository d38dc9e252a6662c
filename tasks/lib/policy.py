"""A registered model's promotion policy: the `register.gate.*` floor its owner sets, which a recipe may tighten
but never loosen.

The policy lives on the registered model as tags named like the recipe keys (`register.gate.min_win_rate_vs_champion`
= `0.5`, values as JSON); `alignflow policy set` writes them (flows/policy.py), the register stage only reads them.
Stricter, key by key:
  min_* thresholds          the larger wins; a recipe's None (unchecked) never disables a check the policy sets
  max_regression            union of the metrics; per metric the smaller allowed loss
  max_shipped_regression    the same, for the artifacts of register.ship
  min_gain_vs_champion      union of the metrics; per metric the larger required gain
  require_decontaminated    either one asking for it
"""

from __future__ import annotations

import json
import math
from typing import Any

from alignflow.tasks.lib.gate_config import GateConfig

PREFIX = "register.gate."
THRESHOLDS = ("min_win_rate", "min_win_rate_vs_champion", "min_rougeL_gain", "min_judge_accuracy")


def policy_from_tags(tags: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The policy held in a registered model's tags (GateConfig field -> value), and the problems with tags that do
    not parse or validate. A problem is never skipped silently: the caller fails the gate with it."""
    policy: dict[str, Any] = {}
    problems: list[str] = []
    for tag, text in sorted(tags.items()):
        if not tag.startswith(PREFIX):
            continue
        key = tag.removeprefix(PREFIX)
        try:
            value = json.loads(text)
            GateConfig.model_validate({key: value})  # unknown keys and out-of-range values are refused
        except (json.JSONDecodeError, ValueError) as e:
            problems.append(f"the model's policy tag {tag}={text!r} is not valid ({' '.join(str(e).split())[:200]})")
            continue
        if value is not None:  # None: the policy asks nothing of this key
            policy[key] = value
    return policy, problems


def merge(recipe: GateConfig, policy: dict[str, Any]) -> tuple[GateConfig, dict[str, str]]:
    """The stricter of the recipe's gate and the policy, key by key; and, for every check the policy decided
    (its value is the one used: stricter than or equal to the recipe's), `key -> "register.gate.<key>=<value>"`."""
    merged = recipe.model_dump()
    decided: dict[str, str] = {}
    # A recipe value that is not a finite number counts as absent where the policy sets the key (GateConfig refuses
    # them; this guards a config built without validation): NaN would win every `>=` / `<=` below by comparing
    # False. Where the policy is silent it stays, and the GateConfig.model_validate at the end refuses it.
    for key in THRESHOLDS:
        floor = policy.get(key)
        if floor is not None and (_absent(merged[key]) or float(floor) >= merged[key]):
            merged[key] = float(floor)
            decided[key] = f"{PREFIX}{key}={floor}"
    for rule in ("max_regression", "max_shipped_regression"):
        for metric, allowed in (policy.get(rule) or {}).items():
            if _absent(merged[rule].get(metric)) or float(allowed) <= merged[rule][metric]:
                merged[rule][metric] = float(allowed)
                decided[f"{rule}.{metric}"] = f"{PREFIX}{rule}.{metric}={allowed}"
    for metric, needed in (policy.get("min_gain_vs_champion") or {}).items():
        if _absent(merged["min_gain_vs_champion"].get(metric)) or \
                float(needed) >= merged["min_gain_vs_champion"][metric]:
            merged["min_gain_vs_champion"][metric] = float(needed)
            decided[f"min_gain_vs_champion.{metric}"] = f"{PREFIX}min_gain_vs_champion.{metric}={needed}"
    if policy.get("require_decontaminated"):
        merged["require_decontaminated"] = True
        decided["require_decontaminated"] = f"{PREFIX}require_decontaminated=true"
    return GateConfig.model_validate(merged), decided


def _absent(value: float | None) -> bool:
    """The recipe does not set this threshold: None, or a value that is not a finite number."""
    return value is None or not math.isfinite(value)


def cite(lines: list[str], decided: dict[str, str], model_name: str) -> list[str]:
    """Each gate reason (or bound) the policy decided, with the policy named: `... [policy of MODEL:
    register.gate.KEY=VALUE]`. Matched on what every check of `gate()` writes: the threshold's name, or for a
    per-metric rule the metric first and the rule's name (or its "cannot be checked" wording)."""

    def about(key: str, line: str) -> bool:
        rule, _, metric = key.partition(".")
        if rule == "max_regression":
            return line.startswith(f"{metric} ") and ("max_regression" in line or "regression cannot" in line)
        if rule == "min_gain_vs_champion":
            return line.startswith(f"{metric} ") and ("min_gain_vs_champion" in line or "gain cannot" in line)
        if rule == "max_shipped_regression":  # "shipped <format>: <metric> may lose" / "... <metric> loss upper",
            # or the fail-closed line when nothing shipped was measured (any metric the policy set decides it)
            return (line.startswith("shipped ") and f" {metric} " in line) or \
                line.startswith("max_shipped_regression is set but no shipped artifact")
        if rule == "require_decontaminated":
            return line.startswith("curate did not decontaminate")
        return f"{rule}=" in line

    cited = []
    for line in lines:
        hits = [citation for key, citation in decided.items() if about(key, line)]
        cited.append(f"{line} [policy of {model_name}: {', '.join(hits)}]" if hits else line)
    return cited


def model_policy(client: Any, model_name: str) -> tuple[dict[str, Any], list[str]]:
    """The policy on the registered model (none when the model does not exist yet). Any other error is raised:
    a gate must not read "server unreachable" or "no permission" as "no policy"."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(model_name).tags
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, []
        raise
    return policy_from_tags(tags or {})


def gate_with_policy(client: Any, model_name: str, recipe: GateConfig) -> tuple[GateConfig, dict[str, str], list[str]]:
    """The gate register applies: the recipe's, tightened by the model's policy; which checks the policy decided;
    and the problems with the policy's tags (each one fails the gate)."""
    policy, problems = model_policy(client, model_name)
    merged, decided = merge(recipe, policy)
    return merged, decided, problems
