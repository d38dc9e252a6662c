"""The model card of a registered version (issue 29 part 3): MODEL_CARD.md with the version, its description, and
`alignflow export --merged/--adapter` writing it as README.md. Its numbers are checked against the MLflow runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from alignflow.tasks.lib.model_card import DESCRIPTION_LIMIT, build_card, description, scores

ROOT = Path(__file__).resolve().parents[1]


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def _model_index(front: dict[str, Any]) -> dict[str, float]:
    [entry] = front["model-index"]
    [result] = entry["results"]
    return {m["type"]: m["value"] for m in result["metrics"]}


def _stages(**extra_metrics: float) -> dict[str, dict[str, Any]]:
    """Manifests as the stages write them (the fields the card reads), with known numbers."""
    return {
        "curate": {"outputs": {"sft.jsonl": "a" * 64, "preference.jsonl": "b" * 64, "eval.jsonl": "c" * 64},
                   "config": {"pii": True, "decontaminate": {"enabled": True, "ngram": 8, "threshold": 0.5}},
                   "metrics": {"decontaminated": 1.0, "sft.records_in": 318, "sft.records_kept": 290,
                               "sft.dropped.contaminated": 17, "sft.dropped.duplicate": 11, "sft.pii.email": 3,
                               "preference.records_in": 40, "preference.records_kept": 40, "eval.records_in": 48,
                               "eval.records_kept": 48}},
        "synthesize": {"teacher": {"url": "http://127.0.0.1:8000/v1", "model": "big-teacher"},
                       "outputs": {"sft.jsonl": "d" * 64, "preference.jsonl": "e" * 64},
                       "config": {"judge": "reference"},
                       "metrics": {"sft.kept": 5, "preference.kept": 0, "instructions.attempted": 8}},
        "tokenize": {"config": {"max_length": 128, "include_synthetic": True}, "metrics": {"sft.examples": 295}},
        "quantize": {"config": {"bits": 4, "quant_type": "nf4"}, "metrics": {}},
        "sft": {"config": {"lr": 0.001, "lora": {"r": 8}}, "metrics": {"train_loss": 6.9}},
        "reward": {"config": {"lr": 0.0005}, "metrics": {"heldout_accuracy": 0.85}},
        "dpo": {"config": {"beta": 0.1, "loss": "sigmoid"}, "metrics": {"train_loss": 0.69}},
        "evaluate": {"compared": ["base", "sft"], "metrics": {
            "rougeL": 0.3125, "rougeL_base": 0.25, "rougeL_sft": 0.3, "rougeL_gain": 0.0625,
            "rougeL_gain_ci_low": 0.01, "rougeL_gain_ci_high": 0.12, "perplexity": 971.1923,
            "perplexity_base": 1045.6979, "win_rate_vs_base": 0.6875, "win_rate_vs_base_ci_low": 0.55,
            "win_rate_vs_base_ci_high": 0.8, "judge_heldout_accuracy": 0.8182,
            "judge_heldout_accuracy_ci_low": 0.6561, "judge_heldout_pairs": 33, "eval_examples": 16,
            "lm_eval.task.acc": 0.5, "lm_eval.task.acc_higher_is_better": 1.0, "bleu": float("nan"),
            **extra_metrics}},
    }


def _card(stages: dict[str, dict[str, Any]], **over: Any) -> str:
    kwargs: dict[str, Any] = {
        "model_name": "demo-assistant", "version": "3", "alias": "challenger",
        "reasons": ["win_rate_vs_base_ci_low=0.55 does not exceed min_win_rate=0.6 (win_rate_vs_base=0.6875)"],
        "bounds": ["win_rate_vs_base_ci_low=0.55 > min_win_rate=0.6"], "gate": {"min_win_rate": 0.6},
        "base": {"kind": "embedded", "spec": "embedded:smollm2-135m-instruct"}, "weights": "adapter",
        "adapter_sha256": "f" * 64,
        "lineage": {"alignflow.recipe_hash": "9" * 64, "alignflow.parent_run_id": "p" * 32,
                    "alignflow.data_hash.sft": "1" * 64}}
    return build_card(**{**kwargs, **over}, stages=stages)


def test_card_layout_from_manifests() -> None:
    """Front matter in the hub's layout, every number from the manifests, and the sections the issue names."""
    from huggingface_hub import ModelCard

    stages = _stages()
    card = _card(stages)
    front = _front_matter(card)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["library_name"] == "peft"
    assert {"alignflow", "lora", "qlora", "dpo"} <= set(front["tags"])
    assert front["datasets"] == [f"sft@sha256:{'a' * 64}", f"preference@sha256:{'b' * 64}",
                                 f"eval@sha256:{'c' * 64}", f"synthetic-sft@sha256:{'d' * 64}"]
    # the model-index holds this version's own scores, exactly as evaluate recorded them: not the base's or the
    # SFT model's figures, interval ends, directions, counts, the judge's accuracy, or a NaN
    assert _model_index(front) == {"rougeL": 0.3125, "rougeL_gain": 0.0625, "perplexity": 971.1923,
                                   "win_rate_vs_base": 0.6875, "lm_eval.task.acc": 0.5}
    assert scores(stages["evaluate"]["metrics"]) == _model_index(front)
    # huggingface_hub reads it back (offline): the hub's own parser agrees on the eval results
    parsed = ModelCard(card)
    assert {r.metric_type: r.metric_value for r in parsed.data.eval_results} == _model_index(front)
    assert parsed.data.eval_results[0].dataset_revision == "c" * 64

    body = card[card.index("\n---\n", 4):]
    assert "| `rougeL` | 0.3125 |  | 0.25 | 0.3 |" in body  # value, interval (none), base, sft
    assert "| `win_rate_vs_base` | 0.6875 | [0.55, 0.8] |" in body
    assert "| sft | 318 | 290 | contaminated 17, duplicate 11 | email 3 |" in body  # curation counts and reasons
    assert "17 training records removed" in body  # decontamination
    assert "Teacher: `big-teacher` at http://127.0.0.1:8000/v1" in body  # synthetic data was used
    assert "lr: 0.001" in body and "beta: 0.1" in body  # every training stage's settings
    assert "**Failed**: this version holds `challenger`" in body
    assert "`win_rate_vs_base_ci_low=0.55 > min_win_rate=0.6`" in body and "win_rate_vs_base: 0.6875 [0.55, 0.8]" \
        in body  # the gate's checks with their intervals
    assert "Adapter only" in body and "shipped." not in body  # nothing shipped was measured
    assert "- Eval set: 16 prompts" in body and "accuracy 0.8182 on 33 held-out preference pairs" in body
    assert f"recipe hash: `{'9' * 64}`" in body


def test_card_variants_shipped_full_weights_local_base() -> None:
    """What shipped appears only with `shipped.*` metrics; full weights are `transformers`; a base that is no hub
    model is left out of `base_model` rather than naming a path of the training machine; no synthetic data, no
    teacher."""
    stages = _stages(**{"shipped.gguf_q8_0.rougeL": 0.3, "shipped.gguf_q8_0.bytes": 145.0})
    stages["synthesize"]["metrics"] = {"sft.kept": 0, "preference.kept": 0}
    card = _card(stages, weights="full", base={"kind": "artifact", "spec": "/home/me/base"}, alias="champion",
                 reasons=[])
    front = _front_matter(card)
    assert front["library_name"] == "transformers" and "base_model" not in front
    assert "lora" not in front["tags"] and "full-fine-tune" in front["tags"]
    assert not any(d.startswith("synthetic") for d in front["datasets"])
    assert not any(k.startswith("shipped.") for k in _model_index(front))
    body = card[card.index("\n---\n", 4):]
    assert "| `shipped.gguf_q8_0.rougeL` | 0.3 |" in body and "Adapter only" not in body
    assert "Teacher:" not in body and "None used" in body
    assert "not independent" not in body
    stages["evaluate"]["judge_dependence"] = "it trained on 12 of the policy's pairs"
    assert "- The judge is not independent of this model: it trained on 12 of the policy's pairs." in _card(stages)
    assert "**Passed**: this version holds `champion`." in body
    hub = _front_matter(_card(stages, base={"kind": "hub", "spec": "org/model", "revision": "abc"}))
    assert hub["base_model"] == "org/model"


def test_description_fits_the_registry() -> None:
    """The description is the card without its front matter; a long one is cut at a line to MLflow's limit (its
    SQL column holds 5000 characters) and points at the artifact."""
    card = _card(_stages())
    short = description(card, "models:/demo-assistant/3")
    assert short.startswith("# demo-assistant version 3") and "model-index" not in short
    assert short == card[card.index("\n---\n", 4) + 5:].lstrip("\n")  # whole: it fits
    long = card + "\n".join(f"| row {i} | {'x' * 80} |" for i in range(200))
    cut = description(long, "models:/demo-assistant/3")
    assert len(cut) <= DESCRIPTION_LIMIT
    assert cut.endswith("the full card is MODEL_CARD.md in models:/demo-assistant/3)")
    kept = cut.split("\n\n… (cut")[0]
    whole = description(long, "x", limit=10**6)
    assert whole.startswith(kept) and whole[len(kept)] == "\n"  # cut at a line, nothing else changed
    assert "| row 0 |" in kept and "| row 199 |" not in kept
    # cut inside the settings' code block: the block is closed before the pointer (else the pointer is code)
    inside = description(card, "x", limit=card.index("lr: 0.001") - card.index("\n---\n", 4) + 60)
    assert inside.count("```") == 2 and inside.split("\n\n… (cut")[0].endswith("\n```")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "alignflow.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_registered_version_card_matches_mlflow_and_exports_as_readme(smoke_seed: dict[str, Any], in_root: Path,
                                                                       tmp_path: Path) -> None:
    import mlflow
    import yaml
    from conftest import warm_copy  # tests/ is on sys.path under pytest
    from mlflow import MlflowClient

    from alignflow.flows.keys import resolved_dtype
    from alignflow.flows.pipeline import pipeline
    from alignflow.recipe import load_recipe
    from alignflow.tasks.lib.models import device_kind

    # the session's smoke seed (tests/conftest.py) trained the stages: this run registers them in its own store
    work = warm_copy(smoke_seed, tmp_path / "work")
    result = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(work))
    assert {s for s, info in result["stages"].items() if not info["cached"]} == {"register"}
    name, version = result["registered"]["model_name"], result["registered"]["version"]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)

    def child(stage: str) -> Any:
        return client.search_runs([result["experiment_id"]], filter_string=(
            f"tags.mlflow.parentRunId = '{result['parent_run_id']}' and tags.alignflow.stage = '{stage}'"))[0]

    # the card travels with the version's model (what export downloads) and is in the register run
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    card = (local / "MODEL_CARD.md").read_text()
    # served in the recipe's dtype as written (`auto`: resolved where it is loaded, float32 on a CPU host even for a
    # version trained on a bf16 GPU); merged by export in the dtype evaluate computed in (float32 on this CPU)
    config = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["config"]
    assert (config["dtype"], config["merge_dtype"]) == ("auto", resolved_dtype("auto", device_kind()))
    assert "MODEL_CARD.md" in {a.path for a in client.list_artifacts(child("register").info.run_id)}
    held = client.get_model_version(name, version)
    assert held.description == description(card, f"the artifacts of models:/{name}/{version}")
    assert held.description.startswith(f"# {name} version {version}") and len(held.description) <= 5000

    # the front matter parses as YAML; its eval numbers are the evaluate run's metrics, all of this version's
    front = _front_matter(card)
    assert front["library_name"] == "peft" and "base_model" not in front  # tiny:llama is on no hub
    evaluated = child("evaluate").data.metrics
    index = _model_index(front)
    assert index and all(value == evaluated[metric] for metric, value in index.items())
    own = {k for k, v in evaluated.items() if v == v and not k.endswith(("_ci_low", "_ci_high", "_higher_is_better"))
           and not re.search(r"(?<!_vs)_(base|sft|champion)$", k)} - {
        "stage_seconds", "eval_examples", "judge_heldout_pairs", "judge_heldout_accuracy"}
    assert set(index) == own and {"rougeL", "perplexity", "win_rate_vs_base"} <= own
    # datasets by digest: the curated files' sha256, whose first 32 characters are the MLflow dataset digests
    digests = {d.dataset.name: d.dataset.digest  # this run's curated files (the lineage-* inputs are the union)
               for d in client.get_run(result["parent_run_id"]).inputs.dataset_inputs
               if not d.dataset.name.startswith("lineage-")}
    listed = dict(d.split("@sha256:") for d in front["datasets"])
    assert {k: listed[k][:32] for k in digests} == digests
    body = card[card.index("\n---\n", 4):]
    assert f"| `perplexity` | {evaluated['perplexity']} |" in body
    curated = child("curate").data.metrics
    assert f"| sft | {int(curated['sft.records_in'])} | {int(curated['sft.records_kept'])} |" in body
    register = child("register")
    assert all(f"`{b}`" in body for b in register.data.tags["alignflow.gate_bounds"].split("; "))
    assert "**Passed**: this version holds `champion`" in body and "Adapter only" in body
    assert f"pipeline run (MLflow): `{result['parent_run_id']}`" in body

    # export writes it as the folder's README.md, from the registry alone
    merged = _cli("export", f"models:/{name}@champion", "--merged", str(tmp_path / "merged"), "--work-dir", str(work))
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "README.md").read_text() == card
    assert "README.md" in " ".join(merged.stdout.split())
    assert (tmp_path / "merged" / "model.safetensors").exists()
    adapter = _cli("export", name, "--adapter", str(tmp_path / "adapter"), "--work-dir", str(work))
    assert adapter.returncode == 0, adapter.stderr
    assert (tmp_path / "adapter" / "README.md").read_text() == card  # not PEFT's template
