"""The model card of a registered version: `MODEL_CARD.md`, in the Hugging Face model-card layout.

Built only from what register reads anyway, the stage folders' manifests (curate's counts and drop reasons, PII and
decontamination counts, synthesize's teacher, every training stage's settings, evaluate's metrics), and the gate's
outcome. Every number in it is copied from a manifest, never recomputed: the eval results are the evaluate stage's
metrics, which the evaluate MLflow run holds too.

- YAML front matter (rendered with huggingface_hub's `ModelCardData`, offline): `base_model` where the base is a
  hub model, `library_name: peft` for an adapter (`transformers` for full weights), `tags`, `datasets` by digest,
  and `model-index` with this version's scores.
- Markdown: the evaluation, the lineage, the gate's decision with its intervals, what shipped, the known limits.

register logs the card with the version's model (so `alignflow export` finds it in the registry alone and writes it
as the folder's README.md) and into the register run, and sets the version's description to it (without the front
matter; truncated to MLflow's limit with a pointer to the artifact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CARD = "MODEL_CARD.md"
# characters: MLflow 3.17's SQL store keeps a version's description in model_versions.description, VARCHAR(5000)
# (mlflow/store/model_registry/dbmodels/models.py); PostgreSQL and MySQL refuse longer text, SQLite does not check
DESCRIPTION_LIMIT = 5000
# The hub models behind alignflow's embedded bases (tasks/lib/base_model.py: EMBEDDED). The embedded file is a
# Q4_1 GGUF of it, dequantized, so the weights are that model's, rounded.
HUB_IDS = {"embedded:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# evaluate's figures for the models measured beside this one (`rougeL_base`, `win_rate_vs_sft` is this one's)
OTHERS = ("base", "sft", "champion")
INTERVAL_ENDS = ("_ci_low", "_ci_high")
# evaluate metrics that are no score of this version (sizes, and the judge's own accuracy): shown under "Known
# limits", not in the model-index
NOT_OWN = frozenset({"eval_examples", "judge_heldout_pairs", "judge_heldout_accuracy"})
TRAINING = ("tokenize", "quantize", "sft", "reward", "dpo")  # stages whose settings shaped the weights


def scores(metrics: dict[str, Any]) -> dict[str, float]:
    """This version's own scores among the evaluate stage's metrics, as the model-index lists them: finite numbers,
    without interval ends, directions (`_higher_is_better`), counts, the judge's accuracy, or the base's / SFT's /
    champion's figures, or the shipped artifacts' (`shipped.*`)."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            continue
        if name in NOT_OWN or name.endswith((*INTERVAL_ENDS, "_higher_is_better")) or _other(name) \
                or name.startswith("shipped."):  # a merged / GGUF artifact's scores: "What shipped"
            continue
        out[name] = float(value)
    return out


def _other(name: str) -> str | None:
    """The model a figure belongs to when it is not this version (`rougeL_base` -> base), else None."""
    for other in OTHERS:
        if name.endswith(f"_{other}") and not name.endswith(f"_vs_{other}"):
            return other
    return None


def base_model_id(base: dict[str, Any]) -> str | None:
    """The base as a hub id (front matter `base_model`), or None where it is no hub model (a local folder, the tiny
    test model): a path of the training machine means nothing on a hub."""
    if base.get("kind") == "hub":
        return str(base["spec"])
    return HUB_IDS.get(str(base.get("spec", "")))


def dataset_digests(stages: dict[str, dict[str, Any]]) -> dict[str, str]:
    """`<dataset>` -> its sha256, for the curated files the version trained and was evaluated on (the MLflow
    dataset inputs' digests are their first 32 characters) and the synthetic ones it trained on."""
    out: dict[str, str] = {}
    curated = stages.get("curate", {}).get("outputs", {})
    for file in ("sft.jsonl", "preference.jsonl", "eval.jsonl"):
        if isinstance(curated, dict) and file in curated:
            out[file.removesuffix(".jsonl")] = str(curated[file])
    if _synthetic_used(stages):
        made = stages["synthesize"].get("outputs", {})
        kept = stages["synthesize"].get("metrics", {})
        for file, count in (("sft.jsonl", "sft.kept"), ("preference.jsonl", "preference.kept")):
            if isinstance(made, dict) and file in made and kept.get(count, 0):
                out[f"synthetic-{file.removesuffix('.jsonl')}"] = str(made[file])
    return out


def _synthetic_used(stages: dict[str, dict[str, Any]]) -> bool:
    """True when tokenize took the synthesize stage's records and there were any."""
    synth = stages.get("synthesize")
    if not synth:
        return False
    included = stages.get("tokenize", {}).get("config", {}).get("include_synthetic", True)
    m = synth.get("metrics", {})
    return bool(included) and (m.get("sft.kept", 0) or 0) + (m.get("preference.kept", 0) or 0) > 0


def front_matter(model_name: str, version: str, base: dict[str, Any], weights: str,
                 stages: dict[str, dict[str, Any]]) -> str:
    """The card's YAML block (without the `---` lines), through huggingface_hub's ModelCardData, which writes
    `model-index` from the eval results in the hub's layout."""
    from huggingface_hub import EvalResult, ModelCardData

    evaluation = stages.get("evaluate", {})
    digest = dataset_digests(stages).get("eval")
    results = [EvalResult(task_type="text-generation", dataset_type="json", dataset_name="eval",
                          dataset_split="eval", dataset_revision=digest, metric_type=name, metric_name=name,
                          metric_value=value)
               for name, value in scores(evaluation.get("metrics", {})).items()]
    data = ModelCardData(
        base_model=base_model_id(base),
        library_name="peft" if weights == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=_tags(weights, stages),
        datasets=[f"{name}@sha256:{sha}" for name, sha in dataset_digests(stages).items()] or None,
        model_name=f"{model_name}-v{version}",
        eval_results=results or None,
    )
    return data.to_yaml()


def _tags(weights: str, stages: dict[str, dict[str, Any]]) -> list[str]:
    tags = ["alignflow", "trl", "text-generation"]
    tags.append("lora" if weights == "adapter" else "full-fine-tune")
    if stages.get("quantize", {}).get("config", {}).get("bits") and weights == "adapter":
        tags.append("qlora")
    loss = stages.get("dpo", {}).get("config", {}).get("loss")
    if loss:
        tags.append("dpo" if loss == "sigmoid" else str(loss))
    return tags


def build_card(*, model_name: str, version: str, alias: str, reasons: list[str], bounds: list[str],
               gate: dict[str, Any], base: dict[str, Any], weights: str, adapter_sha256: str,
               lineage: dict[str, str], stages: dict[str, dict[str, Any]]) -> str:
    """The whole MODEL_CARD.md. `stages`: stage name -> its manifest (curate ... evaluate; missing ones are
    said to be missing); `lineage`: the version's lineage tags (parent run, recipe hash, data hashes); `bounds`:
    every check the gate made, with the interval end it compared (register.gate)."""
    evaluation = stages.get("evaluate", {})
    metrics = evaluation.get("metrics", {})
    spec = str(base.get("spec", ""))
    hub = base_model_id(base)
    lines = [f"# {model_name} version {version}", ""]
    kind = "A LoRA adapter (PEFT)" if weights == "adapter" else "Full fine-tuned weights"
    lines += [f"{kind} over `{spec}`" + (f" ({hub} on the Hugging Face hub)" if hub else "")
              + f", trained and registered by alignflow. Alias at registration: **{alias}** "
              f"(gate {'passed' if not reasons else 'failed'}). Weights hash `{adapter_sha256}`.", ""]

    # the lineage last: its training settings are the longest part, and the description keeps the card's start
    lines += ["## Evaluation", "", _eval_table(metrics, evaluation.get("compared", [])), ""]
    lines += ["## Gate decision", "", *_gate(alias, reasons, bounds, gate, metrics), ""]
    lines += ["## What shipped", "", *_shipped(weights, spec, stages), ""]
    lines += ["## Known limits", "", *_limits(metrics, stages), ""]
    lines += ["## Lineage", "", *_lineage(lineage, stages), ""]
    return f"---\n{front_matter(model_name, version, base, weights, stages)}\n---\n\n" + "\n".join(lines)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    return str(value)  # as the manifest recorded it (evaluate rounds; the MLflow run holds the same number)


def _eval_table(metrics: dict[str, Any], compared: list[str]) -> str:
    """One row per score of this version: its value (exactly as evaluate recorded it), the 95% interval where
    evaluate computed one, and the same figure of the models measured beside it."""
    own = scores(metrics)
    if not own:
        return "No evaluation metrics were recorded."
    others = [o for o in OTHERS if o in compared or any(k.endswith(f"_{o}") for k in metrics)]
    head = ["metric", "this version", "95% interval", *others]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in own:
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        interval = f"[{_num(low)}, {_num(high)}]" if low is not None and high is not None else \
            (f"≥ {_num(low)}" if low is not None else "")
        rows.append("| " + " | ".join([f"`{name}`", _num(metrics[name]), interval,
                                       *[_num(metrics.get(f"{name}_{o}")) for o in others]]) + " |")
    return "\n".join(rows) + f"\n\nMeasured on {_num(metrics.get('eval_examples'))} held-out eval prompts " \
        "(evaluate stage; intervals are 95% paired bootstrap, the judge's accuracy a Wilson bound)."


def _lineage(lineage: dict[str, str], stages: dict[str, dict[str, Any]]) -> list[str]:
    out = [f"- recipe hash: `{lineage.get('alignflow.recipe_hash', 'unknown')}`",
           f"- pipeline run (MLflow): `{lineage.get('alignflow.parent_run_id', 'unknown')}`"]
    raw = {k.removeprefix("alignflow.data_hash."): v for k, v in lineage.items()
           if k.startswith("alignflow.data_hash.")}
    if raw:
        out.append("- recipe data files (sha256 of their contents): "
                   + ", ".join(f"{k} `{v}`" for k, v in sorted(raw.items())))
    digests = dataset_digests(stages)
    if digests:
        out.append("- datasets trained / evaluated on (sha256): "
                   + ", ".join(f"{k} `{v}`" for k, v in digests.items()))
    out += ["", "### Curation", ""]
    curate = stages.get("curate")
    if curate is None:
        out.append("The curate stage's manifest was not available to register.")
    else:
        m = curate.get("metrics", {})
        out += ["| dataset | records in | kept | dropped, by reason | PII replaced, by type |", "|---|---|---|---|---|"]
        for name in ("sft", "preference", "eval"):
            if f"{name}.records_in" not in m:
                continue
            dropped = {k.removeprefix(f"{name}.dropped."): v for k, v in m.items() if k.startswith(f"{name}.dropped.")}
            pii = {k.removeprefix(f"{name}.pii."): v for k, v in m.items() if k.startswith(f"{name}.pii.")}
            out.append(f"| {name} | {m[f'{name}.records_in']} | {m.get(f'{name}.records_kept', '-')} | "
                       f"{_counts(dropped)} | {_counts(pii)} |")
        config = curate.get("config", {})
        contaminated = sum(v for k, v in m.items() if k.endswith(".dropped.contaminated"))
        decon = config.get("decontaminate", {})
        out += ["", f"PII replacement: {'on' if config.get('pii', True) else 'off'}; decontamination against the "
                f"eval set: {'on' if m.get('decontaminated') else 'off'}"
                + (f" ({decon.get('ngram')}-gram overlap, threshold {decon.get('threshold')}): "
                   f"{contaminated} training records removed" if m.get("decontaminated") else "") + "."]
    out += ["", "### Synthetic data", ""]
    synth = stages.get("synthesize")
    if synth is None:
        out.append("The synthesize stage's manifest was not available to register.")
    elif _synthetic_used(stages):
        teacher = synth.get("teacher", "base")
        who = "the base model itself" if teacher == "base" else \
            f"`{teacher.get('model')}` at {teacher.get('url')}" if isinstance(teacher, dict) else str(teacher)
        sm = synth.get("metrics", {})
        out.append(f"Teacher: {who}. Kept: {sm.get('sft.kept', 0)} instructions with answers (of "
                   f"{sm.get('instructions.attempted', '-')} attempted), {sm.get('preference.kept', 0)} preference "
                   f"pairs (of {sm.get('pairs.attempted', '-')} prompts); judge: "
                   f"{synth.get('config', {}).get('judge', '-')}.")
    else:
        out.append("None used: the synthesize stage kept no records"
                   + (" (tokenize.include_synthetic is off)" if not stages.get("tokenize", {}).get("config", {})
                      .get("include_synthetic", True) else "") + ".")
    out += ["", "### Training stages", "", "Each stage's settings, as its manifest recorded them:", "", "```yaml"]
    import yaml

    for stage in TRAINING:
        manifest = stages.get(stage)
        if manifest is None:
            out.append(f"{stage}: null  # not available to register")
            continue
        headline = {k: v for k, v in manifest.get("metrics", {}).items()
                    if k in ("train_loss", "global_step", "heldout_accuracy", "reward_accuracy", "sft.examples",
                             "preference.pairs", "perplexity_before", "perplexity_after")}
        block = {stage: {"config": manifest.get("config", {}), **({"results": headline} if headline else {})}}
        out += yaml.safe_dump(json.loads(json.dumps(block, default=str)), sort_keys=True,
                              default_flow_style=None, width=110).rstrip().splitlines()
    out.append("```")
    return out


def _counts(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v) or "none"


def _gate(alias: str, reasons: list[str], bounds: list[str], gate: dict[str, Any],
          metrics: dict[str, Any]) -> list[str]:
    holds = "holds no alias" if alias == "no alias" else f"holds `{alias}`"  # (register's word for none)
    out = [f"**{'Passed' if not reasons else 'Failed'}**: this version {holds}."
           + ("" if not reasons else " Reasons:")]
    out += [f"- {r}" for r in reasons]
    out += ["", "Every check, with the interval end it compared (the 95% intervals are below):", ""]
    out += [f"- `{b}`" for b in bounds] or ["- (no check was configured)"]
    intervals = []
    for name in sorted({k.removesuffix("_ci_low") for k in metrics if k.endswith("_ci_low")}):
        high = metrics.get(f"{name}_ci_high")
        intervals.append(f"- {name}: {_num(metrics.get(name))} [{_num(metrics.get(f'{name}_ci_low'))}, "
                         f"{_num(high)}]" if high is not None else
                         f"- {name}: {_num(metrics.get(name))} (lower bound {_num(metrics.get(f'{name}_ci_low'))})")
    if intervals:
        out += ["", "Intervals (95%):", "", *intervals]
    out += ["", f"Gate settings: `{json.dumps(gate, sort_keys=True)}`"]
    return out


def _shipped(weights: str, spec: str, stages: dict[str, dict[str, Any]]) -> list[str]:
    """`shipped.*` metrics (a merged or GGUF artifact measured after training) where any stage recorded them."""
    shipped = {k: v for manifest in stages.values() for k, v in manifest.get("metrics", {}).items()
               if k.startswith("shipped.")}
    if not shipped:
        what = "adapter only" if weights == "adapter" else "full weights only"
        return [f"{what.capitalize()}: the version holds the {'PEFT adapter' if weights == 'adapter' else 'weights'}"
                + (f" for `{spec}`" if weights == "adapter" else "") + "; no merged or GGUF artifact was measured. "
                "`alignflow export --merged` / `--adapter` / `--gguf` make them from the registry."]
    return ["| metric | value |", "|---|---|", *[f"| `{k}` | {_num(v)} |" for k, v in sorted(shipped.items())]]


def _limits(metrics: dict[str, Any], stages: dict[str, dict[str, Any]]) -> list[str]:
    n = metrics.get("eval_examples")
    out = [f"- Eval set: {_num(n)} prompts"
           + (f" (a rate measured on {n} prompts is uncertain by up to ±{1.96 * math.sqrt(0.25 / n):.2f} at 95%)"
              if isinstance(n, int | float) and n > 0 else "") + "."]
    if "judge_heldout_accuracy" in metrics:
        out.append("- Judge (the reward model behind the win-rates): accuracy "
                   f"{_num(metrics['judge_heldout_accuracy'])} on {_num(metrics.get('judge_heldout_pairs'))} "
                   "held-out preference pairs, 95% lower bound "
                   f"{_num(metrics.get('judge_heldout_accuracy_ci_low'))}.")
    else:
        out.append("- Judge: no reward model was scored (rm_win_rate not among evaluate.metrics).")
    if stages.get("evaluate", {}).get("judge_dependence"):  # the gate did not count its win-rates
        out.append(f"- The judge is not independent of this model: {stages['evaluate']['judge_dependence']}.")
    if not stages.get("curate", {}).get("metrics", {}).get("decontaminated"):
        out.append("- The training data was not decontaminated against the eval set: scores may be inflated.")
    if _synthetic_used(stages) and stages["synthesize"].get("teacher", "base") == "base":
        out.append("- Synthetic data was written by the base model itself: it adds no knowledge the base lacked.")
    return out


def description(card: str, where: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a version's description: the Markdown without the front matter (the registry UI renders
    Markdown, not YAML), cut at a line to fit `limit` characters, ending with a pointer to the full card."""
    body = card
    if body.startswith("---\n"):
        end = body.find("\n---\n", 4)
        body = body[end + 5:].lstrip("\n") if end >= 0 else body
    if len(body) <= limit:
        return body
    pointer = f"\n\n… (cut to {limit} characters: the full card is {CARD} in {where})"
    room = limit - len(pointer) - len("\n```")  # and a code block cut open is closed again
    cut = body.rfind("\n", 0, room)
    kept = body[: cut if cut > 0 else room]
    if kept.count("```") % 2:
        kept += "\n```"
    return kept + pointer


def publish_card(client: Any, model_name: str, version: str, card: str, folder: Path, run_id: str) -> Path:
    """Write the card into `folder`, log it with the version's model (beside MLmodel: `alignflow export` and anyone
    downloading the version get it) and into the register run, and set the version's description."""
    path = Path(folder) / CARD
    path.write_text(card, encoding="utf-8")
    held = client.get_model_version(model_name, version)
    source = str(held.source or "")
    # MLflow 3: the version's files are a logged model's artifacts (`models:/m-<id>`; ModelVersion.model_id is
    # None when read back from the SQL store, the source names it); an older version's, a run's `runs:/<id>/<path>`
    model_id = getattr(held, "model_id", None) or (source.removeprefix("models:/") if source.startswith("models:/m-")
                                                   else None)
    if model_id:
        client.log_model_artifact(model_id, str(path))
    elif source.startswith("runs:/"):
        source_run, _, where = source.removeprefix("runs:/").partition("/")
        client.log_artifact(source_run, str(path), where or None)
    client.log_artifact(run_id, str(path))
    client.update_model_version(model_name, version,
                                description=description(card, f"the artifacts of models:/{model_name}/{version}"))
    return path
