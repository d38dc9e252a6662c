"""What each stage reads, and the cache key made of exactly that. The one place that answers "what makes X re-run?".

A stage's key is the hash of
- the recipe settings it reads: its own section, plus the named fields of other sections it uses (`SETTINGS`);
- the *content* hashes of the upstream files it reads (`READS`), taken from the manifest the upstream stage
  wrote (each file is hashed once, when it is written; a cached run re-hashes no weights);
- the base model's identity (`model.base` resolved: an embedded package version, a folder listing, a hub model's
  file hashes at `model.revision`, not its commit) with `model.dtype`, for the stages that load it; quantization
  reaches them as `quantization.json`'s hash;
- the source of the stage's module and of every `alignflow.tasks` module it imports (`package_modules`);
- the seed, for the stages that draw random numbers;
- what lies outside the recipe and the upstream files (`outside`): the data files' content (curate), semantic
  dedup's embedding model (curate, synthesize: a local folder's contents, an embedded one's package version), a
  judge reward model's weights (synthesize), an adapter to continue (sft), the reward sources' schema files and
  python modules with the Python sources of their folders, or an installed module's distribution version (dpo
  with grpo / rloo), the registry champion and the LLM judge (evaluate), the tracking server (register
  registers there).

Keying on what a stage reads, not on upstream keys, gives early cutoff (as in Bazel or Nix): an upstream stage
that re-ran but wrote byte-identical files leaves the stages after it cached. So `quantize.eval_samples` (its
report only) re-runs quantize and nothing else, and a new preference file leaves sft cached.
The contract, one row per recipe key, is the table in tests/test_cache_keys.py (and README "What re-runs").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel

from alignflow.tasks.lib.hashing import package_modules, sha256_bytes, sha256_json, sha256_tree, sha256_weights
from alignflow.tasks.lib.losses import ONLINE, ONLINE_SETTINGS, UNPAIRED
from alignflow.tasks.lib.manifest import MANIFEST, read_manifest

Stage = Literal["curate", "synthesize", "tokenize", "quantize", "sft", "reward", "dpo", "evaluate", "register"]
STAGES: tuple[Stage, ...] = get_args(Stage)  # the nine stages, in order: the one list

# Upstream files each stage reads: {upstream stage: names}. A name is an output listed in the upstream manifest
# (its content hash is used), `weights` (a training stage's product: `adapter` or `model`), or a dotted field of
# the upstream manifest (`max_length`, `metrics.decontaminated`).
READS: dict[Stage, dict[Stage, tuple[str, ...]]] = {
    "curate": {},
    "synthesize": {"curate": ("sft.jsonl", "preference.jsonl", "eval.jsonl")},
    "tokenize": {"curate": ("sft.jsonl", "preference.jsonl", "unpaired.jsonl"),
                 "synthesize": ("sft.jsonl", "preference.jsonl")},
    "quantize": {"curate": ("eval.jsonl",)},
    "sft": {"tokenize": ("sft", "tokenizer", "max_length", "packing"), "quantize": ("quantization.json",)},
    "reward": {"tokenize": ("preference", "preference_heldout", "tokenizer", "max_length"),
               "quantize": ("quantization.json",)},
    # dpo reads what its loss trains on (`dpo_reads` narrows this): pairs; kto also the unpaired feedback;
    # grpo / rloo the prompts, and the reward model when `reward_model` is one of dpo.rewards
    "dpo": {"tokenize": ("preference", "preference_heldout", "unpaired", "unpaired_heldout", "prompts", "tokenizer",
                         "max_length"),
            "quantize": ("quantization.json",), "sft": ("weights",), "reward": ("weights",)},
    # the pairs reward and dpo trained on (digests) and dpo's rewards: whether the judge is independent
    "evaluate": {"tokenize": ("tokenizer", "preference_heldout"), "curate": ("eval.jsonl",), "sft": ("weights",),
                 "dpo": ("weights", "trained_pairs_sha256", "optimised_against_reward_model"),
                 "reward": ("weights", "trained_pairs_sha256")},
    # evaluate's `shipped`: each measured artifact's sha256 (tagged on the version) and file (register.log_shipped)
    "register": {"dpo": ("weights",), "evaluate": ("metrics", "eval_config_hash", "shipped"),
                 "curate": ("metrics.decontaminated",)},
}

# Recipe settings each stage reads, as dotted paths into the recipe; a section name means all of it.
SETTINGS: dict[Stage, tuple[str, ...]] = {
    "curate": ("curate",),
    # synthesize passes its records through curate's record checks (not its drop limit, reject samples or shards)
    "synthesize": ("synthesize", "curate.dedup", "curate.quality", "curate.decontaminate", "curate.pii",
                   "curate.max_chars", "model.dtype", "seed"),
    "tokenize": ("tokenize", "reward.eval_fraction"),  # the held-out preference split neither reward nor dpo sees
    "quantize": ("quantize", "model.dtype"),
    "sft": ("sft", "model.dtype", "seed"),
    "reward": ("reward", "model.dtype", "seed"),
    # sft.lora: the adapter dpo trains over a fully fine-tuned SFT model; sft.method tells which
    # reward.pairs: which side of the training pairs dpo trains on (disjoint from the judge's, or all of them)
    "dpo": ("dpo", "sft.lora", "sft.method", "reward.pairs", "model.dtype", "seed"),
    # register.ship: the artifacts evaluate builds and measures besides the adapter
    "evaluate": ("evaluate", "register.ship", "model.dtype", "seed"),
    # model.base: the spec is written into the logged model (served over that base) and its version tags
    "register": ("register", "model.base", "model.dtype"),
}
# Settings in a stage's section that change how it works, never what it makes: checkpoint cadence (a resumed run
# continues to the same result), log cadence, curate's shards (tests/test_scale_out.py: sharded results equal the
# single pass). Dropped from the sections above.
# synthesize.shards is not one of them: each shard samples from its own seed. reward.eval_fraction is read by
# tokenize (the held-out split), not by reward.
# dpo.sample_every: how often the sampled-completion tables are logged (TRL samples them anyway).
NOT_RESULTS: frozenset[str] = frozenset({"curate.shards", "sft.save_steps", "sft.logging_steps", "reward.save_steps",
                                         "dpo.save_steps", "dpo.sample_every", "reward.eval_fraction"})
# Stages that load the base model's weights or tokenizer: the resolved base's identity is in their key.
LOADS_BASE: frozenset[Stage] = frozenset({"synthesize", "tokenize", "quantize", "sft", "reward", "dpo", "evaluate",
                                          "register"})
# Files a stage loads by path rather than by import: evaluate's metric modules (relative to metrics/).
EXTRA_SOURCES: dict[Stage, tuple[str, ...]] = {
    "evaluate": ("rouge/rouge.py", "bleu/bleu.py", "exact_match/exact_match.py", "lm_eval_tasks/loader.py",
                 "lm_eval_tasks/alignflow_sentiment.yaml", "lm_eval_tasks/alignflow_sentiment.jsonl"),
}
# Modules a stage hands on by file rather than importing them: register logs served_model.py as the model's code.
EXTRA_MODULES: dict[Stage, tuple[str, ...]] = {"register": ("alignflow.tasks.lib.served_model",)}
TRAINING: frozenset[Stage] = frozenset({"sft", "reward", "dpo"})
LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "trl", "accelerate", "bitsandbytes", "datasets",
             "evaluate", "rouge_score", "sacrebleu", "datasketch", "langid", "mlflow")


def setting(recipe: BaseModel, path: str) -> Any:
    """The recipe value at a dotted path, as JSON (`sft.lora` -> {"r": 16, ...}), without NOT_RESULTS."""
    node: Any = recipe
    for part in path.split("."):
        node = getattr(node, part)
    if not isinstance(node, BaseModel):
        return node
    value = node.model_dump(mode="json")
    for dropped in NOT_RESULTS:
        if dropped.startswith(path + "."):
            value.pop(dropped.removeprefix(path + "."), None)  # one level below a section: all NOT_RESULTS are
    return value


# Settings of a training stage that only `keep: best` reads: under keep: last (no evaluation) they change nothing.
KEEP_BEST_ONLY = ("eval_steps", "early_stopping_patience")


def sft_reads(recipe: Any) -> dict[Stage, tuple[str, ...]]:
    """READS["sft"], and under sft.keep: best the rows tokenize holds out of SFT (trained on under keep: last)."""
    if recipe.sft.keep != "best":
        return READS["sft"]
    return {**READS["sft"], "tokenize": (*READS["sft"]["tokenize"], "sft_heldout_rows_sha256")}


def dpo_reads(recipe: Any) -> dict[Stage, tuple[str, ...]]:
    """The part of READS["dpo"] the recipe's loss reads: a pair loss does not re-run when prompts or unpaired
    feedback change, nor an online loss when pairs do."""
    loss = recipe.dpo.loss
    common = ("tokenizer", "max_length")
    if loss in ONLINE:
        reads: dict[Stage, tuple[str, ...]] = {"tokenize": ("prompts", *common)}
        if any(s.reward_model for s in recipe.dpo.rewards):
            reads["reward"] = ("weights",)
    elif loss in UNPAIRED:
        reads = {"tokenize": ("preference", "preference_heldout", "unpaired", "unpaired_heldout", *common)}
    else:
        reads = {"tokenize": ("preference", "preference_heldout", *common)}
    return {**reads, "quantize": ("quantization.json",), "sft": ("weights",)}


def dpo_settings(recipe: Any) -> dict[str, Any]:
    """The dpo section as its key sees it: the online-RL settings only for grpo / rloo (they do nothing else)."""
    value = setting(recipe, "dpo")
    if recipe.dpo.loss not in ONLINE:
        for name in ONLINE_SETTINGS:
            value.pop(name, None)
    for source in value.get("rewards", []):  # files by name here (by content in `outside`), not by where they lie
        for kind in ("json_schema", "python"):
            if source.get(kind):
                source[kind] = Path(source[kind]).name
    return value


def data_hashes(recipe: Any) -> dict[str, str]:
    """data.sft / preference / eval -> hash of their files' (or `datasets` folders') contents, in order."""
    # the suffix too: the same bytes named .json or .csv are read differently
    return {name: sha256_json([[Path(f).suffix.lower(), sha256_tree(Path(f))] for f in getattr(recipe.data, name)])
            for name in ("sft", "preference", "eval")}


def upstream_value(manifest: dict[str, Any], name: str) -> Any:
    """What a stage reads of one upstream manifest: an output's content hash, or a manifest field."""
    outputs = manifest.get("outputs", {})
    if name == "weights":
        name = "model" if "model" in outputs else "adapter"
    if name in outputs:
        return outputs[name]
    node: Any = manifest
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{manifest.get('stage')} manifest has no output or field '{name}'")
        node = node[part]
    return node


@cache  # one process, one checkout: the sources do not change under a running pipeline
def code_hash(stage: Stage) -> str:
    """Hash of the stage's module, every alignflow.tasks module it imports, and the metric modules it loads."""
    import importlib.util

    files = list(package_modules(f"alignflow.tasks.{stage}").values())
    spec = importlib.util.find_spec("alignflow.metrics")
    assert spec is not None and spec.submodule_search_locations
    metrics = Path(next(iter(spec.submodule_search_locations)))
    files += [metrics / f for f in EXTRA_SOURCES.get(stage, ())]
    for module in EXTRA_MODULES.get(stage, ()):
        found = importlib.util.find_spec(module)
        assert found is not None and found.origin
        files.append(Path(found.origin))
    return sha256_json({"sources": [[f.name, sha256_bytes(f.read_bytes())] for f in files],
                        "libraries": library_versions()})


@cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code the stages run: an upgrade (or another machine's environment on the
    same work dir) re-runs them instead of reusing what older code made."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@dataclass(frozen=True)
class RunFacts:
    """What a run knows beyond the recipe and the upstream files, found before the stages run."""

    base_key: str = ""  # the resolved base's identity (embedded package version, folder listing, hub file hashes)
    data: dict[str, str] = field(default_factory=dict)  # data.sft / preference / eval -> content hash
    tracking_uri: str = ""  # where register registers
    champion: dict[str, str] = field(default_factory=dict)  # the registry version evaluate compares with
    init_adapter: str | None = None  # content hash of the weights sft continues (retraining), if any
    sft_unchanged: bool = False  # sft hands init_adapter on untrained (a retrain with no new SFT records)
    # content hash of the lineage of the weights a retrain continues (flows/lineage.py), if any: tokenize never
    # holds out what it trained on, and evaluate's judge_independent reads its sides
    ancestors: str | None = None
    selection_trials: int = 1  # a sweep's winner among k trials: evaluate's intervals at the familywise level
    device: str = ""  # cpu, or cuda with bf16 or not: decides `model.dtype: auto` and the training precision


def outside(stage: Stage, recipe: Any, facts: RunFacts) -> dict[str, Any]:
    """The inputs of a stage that are neither recipe settings nor upstream files."""
    # curate's record checks, which synthesize applies too: semantic dedup's embedding model by what it is
    semantic = recipe.curate.dedup.semantic
    embedding = {"semantic_model": embedding_identity(semantic.model)} if semantic.enabled else {}
    if stage == "curate":
        return {"data": facts.data, **embedding}
    if stage == "synthesize":  # a judge reward model from an earlier run: its weights are an input
        judge = recipe.synthesize.reward_model
        return {"judge_reward_model": weights_hash(Path(judge), "adapter") if judge else None, **embedding}
    if stage == "tokenize":  # (only when set: a run that continues no weights keeps its key)
        return {"trained_before": facts.ancestors} if facts.ancestors else {}
    if stage == "sft":
        return {"init_adapter": facts.init_adapter, **({"unchanged": True} if facts.sft_unchanged else {})}
    if stage == "dpo":  # grpo / rloo: the reward sources' files (a JSON schema, a python module), by content
        from alignflow.tasks.lib.rewards import source_identity

        if recipe.dpo.loss not in ONLINE:
            return {}
        return {"reward_files": [source_identity(s) for s in recipe.dpo.rewards]}
    if stage == "evaluate":  # the optional LLM judge is the recipe's teacher
        return {"champion": facts.champion,
                **({"selection_trials": facts.selection_trials} if facts.selection_trials > 1 else {}),
                **({"ancestors": facts.ancestors} if facts.ancestors else {}),
                "judge_teacher": setting(recipe, "synthesize.teacher") if recipe.evaluate.judge else None,
                **({"lm_eval": harness_identity(recipe.evaluate.lm_eval.include_path)} if recipe.evaluate.lm_eval
                   else {}),
                **({"ship": ship_identity(recipe)} if recipe.register.ship else {})}
    if stage == "register":  # a side effect: keyed on where it lands, so a new server gets its version; and on
        # the champion evaluate compared with (register refuses to promote over another one)
        return {"tracking_uri": without_credentials(facts.tracking_uri), "champion": facts.champion}
    return {}


def ship_identity(recipe: Any) -> dict[str, Any]:
    """What the artifacts of register.ship evaluate builds and reads back depend on beyond evaluate's own inputs:
    the writers' and readers' libraries that are in no other key (the `gguf` package writes and dequantizes GGUF
    files, `safetensors` saves a merged folder) and, where a GGUF is shipped, the base's spec, written into the
    file as its `general.name` (`./base` and `base` are one base folder, but two GGUF files)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("gguf", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    gguf = any(f.startswith("gguf_") for f in recipe.register.ship)
    return {"libraries": found, **({"gguf_name_spec": recipe.model.base} if gguf else {})}


def embedding_identity(spec: str) -> dict[str, str]:
    """`curate.dedup.semantic.model` by what it is, not by its name: an embedded model by the version of the package
    that ships it, a local folder by its files' contents (hashed only when semantic dedup is on)."""
    from importlib.metadata import PackageNotFoundError, version

    from alignflow.tasks.records.dedup import EMBEDDINGS

    if spec in EMBEDDINGS:
        package = EMBEDDINGS[spec][0]
        try:
            return {"package": f"{package}=={version(package)}"}
        except PackageNotFoundError:
            return {"package": f"{package} absent"}  # curate refuses to run without it
    folder = Path(spec).expanduser()
    return {"folder": sha256_tree(folder) if folder.is_dir() else "absent"}


def harness_identity(include_path: str | None) -> dict[str, str | None]:
    """What the lm-eval tasks' definitions come from beyond the recipe: the harness's version (its built-in tasks
    and metrics) and the contents of the recipe's task folder. (The shipped tasks are in evaluate's code hash.)"""
    from importlib.metadata import PackageNotFoundError, version

    try:
        harness = version("lm_eval")
    except PackageNotFoundError:
        harness = "absent"
    if not include_path:
        return {"lm_eval": harness, "include_path": None}
    root = Path(include_path).expanduser()
    files = sorted(f for f in root.rglob("*") if f.is_file() and "__pycache__" not in f.parts)  # lm-eval imports
    return {"lm_eval": harness,  # a task's `!function` module, which writes bytecode beside it
            "include_path": sha256_json([[f.relative_to(root).as_posix(), sha256_tree(f)] for f in files])}


def without_credentials(uri: str) -> str:
    """The URI without `user:password@` (keys and their inputs are written into manifests and MLflow)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def weights_hash(folder: Path, name: str) -> str:
    """Content hash of a stage folder's weights, as its manifest recorded them (no re-hashing of weights)."""
    if (folder / MANIFEST).exists():
        return str(upstream_value(read_manifest(folder), name))
    return sha256_weights(folder / name)


def resolved_dtype(name: str, device: str) -> str:
    """The dtype a stage computes in (tasks/lib/models.torch_dtype): `auto` is bfloat16 on a CUDA device that has
    it and float32 elsewhere, so a recipe saying `auto` and one saying `float32` share their CPU stages."""
    if name != "auto":
        return name
    return "bfloat16" if device == "cuda-bf16" else "float32"


def stage_settings(stage: Stage, recipe: Any, device: str) -> dict[str, Any]:
    """The recipe settings in a stage's key, as the stage uses them (`model.dtype` resolved on this device)."""
    paths = SETTINGS[stage]
    if stage == "dpo" and recipe.dpo.loss in ONLINE:  # grpo / rloo sample prompts and read no pairs: which side
        paths = tuple(p for p in paths if p != "reward.pairs")  # of the split dpo would take is report-only there
    settings = {path: dpo_settings(recipe) if path == "dpo" else setting(recipe, path) for path in paths}
    if stage in TRAINING and settings[stage].get("keep", "last") == "last":
        for name in KEEP_BEST_ONLY:
            settings[stage].pop(name, None)
    if "model.dtype" in settings:
        settings["model.dtype"] = resolved_dtype(settings["model.dtype"], device)
    # register.ship is a set: the artifacts are measured and tagged each on its own, so their order changes nothing
    if "register.ship" in settings:
        settings["register.ship"] = sorted(settings["register.ship"])
    if stage == "register":
        settings["register"]["ship"] = sorted(settings["register"]["ship"])
    return settings


def stage_inputs(stage: Stage, recipe: Any, folders: dict[str, Path], facts: RunFacts) -> dict[str, Any]:
    """Everything the stage's key covers, as a JSON-able dict (also written into its manifest as `inputs`).
    `folders`: the finished upstream stage folders."""
    files: dict[str, Any] = {}
    reads = dpo_reads(recipe) if stage == "dpo" else sft_reads(recipe) if stage == "sft" else READS[stage]
    for upstream, names in reads.items():
        manifest = read_manifest(folders[upstream])
        for name in names:
            files[f"{upstream}/{name}"] = upstream_value(manifest, name)
    launch = setting(recipe, "launch")
    if launch["config_file"]:  # an accelerate config file: its contents, not just its path
        launch["config_file_sha256"] = sha256_tree(Path(launch["config_file"]))
    return {
        "settings": stage_settings(stage, recipe, facts.device),
        "files": files,
        "base": facts.base_key if stage in LOADS_BASE else None,
        "device": facts.device if stage in LOADS_BASE and stage != "tokenize" else None,
        # several training processes change the effective batch; one process is the default, keyed as before
        "launch": launch if stage in TRAINING and launch["num_processes"] > 1 else None,
        "outside": outside(stage, recipe, facts),
    }


def stage_key(stage: Stage, inputs: dict[str, Any]) -> str:
    return sha256_json({"stage": stage, "inputs": inputs, "code": code_hash(stage)})
