"""Reward sources for online RL (`dpo.loss: grpo | rloo`): the recipe's `dpo.rewards` list, checked before any
work starts, and turned into reward functions with TRL's signature (`prompts, completions, **columns ->
list[float]`), one per source. TRL sums them with the sources' weights and turns the sums into advantages.

Sources:
  reward_model      the reward stage's model: its scalar score of (prompt, completion) under the chat template
  reference         ROUGE-L F1 of the completion against the prompt's reference answer (SFT prompts have one;
                    a prompt without one gets None, which TRL leaves out of that source's mean and sum)
  {regex: P}        1.0 when the whole completion (stripped) matches P, else 0.0
  {json_schema: F}  1.0 when the completion parses as JSON and validates against the schema in file F
  {python: "m:f"}   a user function with TRL's reward-function signature, from the recipe's directory
Each takes an optional `weight` (default 1.0). Each source is named by its kind (`regex`, a second one `regex_2`,
...): TRL logs `rewards/<name>/mean`, and the dpo stage adds `reward.<name>_mean`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.lib.hashing import sha256_file, sha256_json, sha256_tree

KINDS = ("reward_model", "reference", "regex", "json_schema", "python")


class RewardSource(BaseModel):
    """One weighted reward source. Written as `reward_model`, `reference`, `{regex: PATTERN}`,
    `{json_schema: FILE}` or `{python: "module:function"}`, with an optional `weight`."""

    model_config = ConfigDict(extra="forbid")
    reward_model: bool = Field(False, description="the reward stage's model scores each completion")
    reference: bool = Field(False, description="ROUGE-L F1 against the prompt's reference answer")
    regex: str | None = Field(None, description="1.0 when the whole completion matches this pattern")
    json_schema: str | None = Field(None, description="a JSON Schema file: 1.0 when the completion validates")
    python: str | None = Field(None, description="module:function with TRL's reward signature (recipe's folder)")
    weight: float = Field(1.0, description="multiplies this source's reward before the sources are summed")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value in ("reward_model", "reference"):  # `- reward_model` in the YAML list
            return {value: True}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"a reward source names exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(given) or 'none'})")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        if self.python is not None and (":" not in self.python or not all(self.python.split(":", 1))):
            raise ValueError(f"python reward {self.python!r} must be written module:function")
        if not math.isfinite(self.weight):
            raise ValueError("weight must be a finite number")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


def source_names(sources: list[RewardSource]) -> list[str]:
    """`regex`, `regex_2`, ...: one metric name per source, in order."""
    names: list[str] = []
    for s in sources:
        n = sum(1 for other in names if other == s.kind or other.startswith(f"{s.kind}_"))
        names.append(s.kind if n == 0 else f"{s.kind}_{n + 1}")
    return names


# --- checks before training (recipe validation) -------------------------------------------------------------

def resolve_sources(sources: list[RewardSource], recipe_dir: Path, where: str = "dpo.rewards",
                    roots: list[Path] | None = None) -> tuple[list[RewardSource], list[str]]:
    """The sources with their files made absolute (a schema file; a python module found in the recipe's folder
    becomes `/abs/path/module.py:function`), and every problem found: a schema that does not parse or is not a
    valid JSON Schema, a function that does not import or lacks the signature TRL calls it with.

    `roots` (a recipe submitted through a deployment): every file must lie inside these folders, and is checked
    before it is read or imported; a `python` source must then be such a file, never an installed module (an
    import runs its code on the worker)."""

    def outside(path: Path) -> bool:
        real = path.resolve()
        return roots is not None and not any(real == r or real.is_relative_to(r) for r in roots)

    resolved: list[RewardSource] = []
    problems: list[str] = []
    for i, s in enumerate(sources):
        at = where if len(sources) == 1 and where.endswith("]") else f"{where}[{i}]"
        if s.json_schema is not None:
            path = _find(s.json_schema, recipe_dir)
            if path is None:
                problems.append(f"{at}.json_schema: no file at '{s.json_schema}' (looked relative to the current "
                                f"folder and to {recipe_dir})")
            elif outside(path):
                problems.append(f"{at}.json_schema: '{s.json_schema}' is outside the allowed folders")
                continue
            else:
                problem = _schema_problem(path)
                if problem:
                    problems.append(f"{at}.json_schema: {problem}")
                s = s.model_copy(update={"json_schema": str(path)})
        if s.python is not None:
            spec = s.python
            module, _, name = spec.rpartition(":")
            if not module.endswith(".py"):  # `module:function` or `pkg.module:function`, from the recipe's folder
                candidate = recipe_dir / (module.replace(".", "/") + ".py")
                if candidate.is_file():
                    spec = f"{candidate.resolve()}:{name}"
            else:
                found = _find(module, recipe_dir)
                spec = f"{found}:{name}" if found else spec
            file = spec.rpartition(":")[0]
            if roots is not None and (not file.endswith(".py") or outside(Path(file))):
                problems.append(f"{at}.python: '{s.python}' is not a file inside the allowed folders (a recipe "
                                "submitted through a deployment may run only code the operator placed there)")
                continue
            try:
                python_function(spec)
            except (ImportError, AttributeError, TypeError, SyntaxError, OSError) as e:
                problems.append(f"{at}.python: {e}")
            except Exception as e:  # the user's module raised while importing
                problems.append(f"{at}.python: importing {module!r} failed: {type(e).__name__}: {e}")
            s = s.model_copy(update={"python": spec})
        resolved.append(s)
    return resolved, problems


def _find(entry: str, recipe_dir: Path) -> Path | None:
    for root in (Path.cwd(), recipe_dir):
        path = (root / Path(entry).expanduser())
        if path.is_file():
            return path.resolve()
    return None


def _schema_problem(path: Path) -> str | None:
    import jsonschema

    try:
        schema = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        # the position, never the text: the message reaches whoever submitted the recipe
        return f"{path} is not valid JSON (line {getattr(e, 'lineno', '?')}, column {getattr(e, 'colno', '?')})"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return f"{path} is not a valid JSON Schema (at {'/'.join(map(str, e.path)) or 'the top level'})"
    return None


def python_function(spec: str) -> Callable[..., Any]:
    """Import `module:function` (or `/path/to/file.py:function`) and check that TRL can call it:
    `f(prompts=..., completions=..., **columns)`. Raises ImportError / AttributeError / TypeError."""
    module_name, _, name = spec.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ImportError(f"no module file at {path}")
        # named by place and contents: an edited module or helper is loaded anew in a process that ran it before
        contents = sha256_json([str(path.resolve()), sha256_file(path), folder_sources(path.parent)])
        unique = f"alignflow_reward_{path.stem}_{contents[:16]}"
        module = sys.modules.get(unique)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            with _own_folder_imports(path.parent):  # its own helper modules beside it import too
                loader_spec.loader.exec_module(module)
            sys.modules[unique] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ImportError(f"cannot import {module_name!r} (not in the recipe's folder, not installed): {e}") \
                from None
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{module_name} has no function {name!r}")
    if not callable(fn):
        raise TypeError(f"{module_name}:{name} is not callable")
    params = inspect.signature(fn).parameters
    kinds = {p.kind for p in params.values()}
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        raise TypeError(f"{module_name}:{name} must take **kwargs (TRL passes the dataset's columns, completion_ids, "
                        "trainer_state, ...): def f(prompts, completions, **kwargs) -> list[float]")
    missing = [p for p in ("prompts", "completions") if p not in params]
    if missing:
        raise TypeError(f"{module_name}:{name} must have the parameters prompts and completions (TRL passes them "
                        f"by name); missing: {', '.join(missing)}")
    return fn  # type: ignore[no-any-return]


@contextmanager
def _own_folder_imports(folder: Path) -> Iterator[None]:
    """Imports made while a reward module from `folder` loads come from `folder`, and stay that module's own.

    The folder goes first on sys.path; modules already loaded under a name the folder defines (another reward
    folder's `helpers`) are set aside, so `import helpers` reads this folder's file; afterwards the names the
    folder defines leave sys.modules again (the reward module keeps its references) and what was set aside comes
    back. Two reward folders with a `helpers.py` each get each their own."""
    names = local_module_names(folder)

    def ours(name: str) -> bool:
        return name.split(".")[0] in names

    aside = {name: sys.modules.pop(name) for name in [n for n in sys.modules if ours(n)]}
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if ours(n)]:
            del sys.modules[name]
        sys.modules.update(aside)


def local_module_names(folder: Path) -> set[str]:
    """Top-level names `import` finds in `folder`: its `.py` files and its package folders."""
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir() and
                                                     (p / "__init__.py").is_file()}


def folder_sources(folder: Path) -> str:
    """Hash of the Python sources a module in `folder` can import from it (its helpers beside it, packages below
    it): every `.py` file under it, by relative name and content, not bytecode caches, hidden folders or virtual
    environments. Other files there (recipes, data) are not read by an import, and leave the hash as it is."""

    def skipped(f: Path) -> bool:
        parts = f.relative_to(folder).parts[:-1]
        return any(p == "__pycache__" or p.startswith(".") for p in parts) or any(
            (folder.joinpath(*parts[: i + 1]) / "pyvenv.cfg").exists() for i in range(len(parts)))

    files = sorted(f for f in folder.rglob("*.py") if f.is_file() and not skipped(f))
    return sha256_json([[f.relative_to(folder).as_posix(), sha256_file(f)] for f in files])


def source_identity(source: RewardSource) -> Any:
    """What a source reads beyond the recipe, as the cache key sees it (None for the built-in sources):
    - a JSON schema file: its content hash;
    - a reward module file: its content hash and the Python sources of its folder (it imports helpers from there);
    - an installed module: its file's content hash and the version of the distribution(s) that installed its
      top-level package (the module may import any part of it); a module on sys.path that no distribution
      installed: the Python sources of its top-level package's folder."""
    if source.json_schema is not None:
        path = Path(source.json_schema)
        return sha256_tree(path) if path.exists() else None
    if source.python is None:
        return None
    module = source.python.rpartition(":")[0]
    if module.endswith(".py"):
        path = Path(module)
        return {"module": sha256_file(path), "folder": folder_sources(path.parent)} if path.is_file() else None
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        return None
    top = module.split(".")[0]
    dists = sorted(set(importlib.metadata.packages_distributions().get(top, [])))
    identity: dict[str, Any] = {"module": sha256_file(Path(spec.origin))}
    if dists:
        identity["distributions"] = [f"{d}=={importlib.metadata.version(d)}" for d in dists]
    else:
        top_spec = importlib.util.find_spec(top)
        locations = list(top_spec.submodule_search_locations or []) if top_spec else []
        identity["package"] = [folder_sources(Path(p)) for p in locations]
    return identity


# --- the reward functions -----------------------------------------------------------------------------------

def completion_text(completion: Any) -> str:
    """A completion as TRL passes it: a string, or (conversational data) a list of messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


class Recorder:
    """The last batch each reward function scored (prompts, completions, each source's rewards), for the
    sample tables: every function sees the same batch, in order, so the lists line up."""

    def __init__(self, names: list[str], weights: list[float]) -> None:
        self.names, self.weights = names, weights
        self.prompts: list[Any] = []
        self.completions: list[str] = []
        self.rewards: dict[str, list[float | None]] = {}

    def record(self, name: str, prompts: list[Any], completions: list[Any], rewards: list[float | None]) -> None:
        if name == self.names[0]:
            self.prompts, self.completions, self.rewards = list(prompts), [completion_text(c) for c in completions], {}
        self.rewards[name] = list(rewards)

    def rows(self, limit_prompts: int) -> list[dict[str, Any]]:
        """Up to `limit_prompts` prompts' completions with each source's reward and the weighted sum."""
        rows: list[dict[str, Any]] = []
        seen: list[str] = []
        for i, (prompt, completion) in enumerate(zip(self.prompts, self.completions, strict=False)):
            text = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt)
            if text not in seen:
                if len(seen) == limit_prompts:
                    continue
                seen.append(text)
            per = {n: (self.rewards.get(n) or [None] * (i + 1))[i] for n in self.names}
            valid = [(w, r) for w, r in zip(self.weights, per.values(), strict=True)
                     if r is not None and not math.isnan(r)]
            rows.append({"prompt": text, "completion": completion,
                         "reward": round(sum(w * r for w, r in valid), 4) if valid else None,
                         **{f"reward.{n}": None if r is None or math.isnan(r) else round(r, 4)
                            for n, r in per.items()}})
        return rows


def reward_functions(sources: list[RewardSource], recorder: Recorder | None = None,
                     reward_model: Callable[[list[Any], list[str]], list[float]] | None = None,
                     ) -> list[Callable[..., list[float | None]]]:
    """One function per source with TRL's reward signature, named after the source (TRL's metric names).
    `reward_model(prompts, completion_texts) -> scores` serves the `reward_model` source. A user's function gets
    the completions as TRL passes them (messages, for conversational prompts); the built-in sources read text."""
    funcs = []
    for name, source in zip(source_names(sources), sources, strict=True):
        score = _scorer(source, reward_model)

        def func(prompts: list[Any], completions: list[Any], _name: str = name, _score: Any = score,
                 **columns: Any) -> list[float | None]:
            rewards = _score(prompts, completions, columns)
            if recorder is not None:
                recorder.record(_name, prompts, completions, rewards)
            return rewards

        func.__name__ = name  # TRL names the source by the function: rewards/<name>/mean
        funcs.append(func)
    return funcs


def _scorer(source: RewardSource, reward_model: Callable[[list[Any], list[str]], list[float]] | None,
            ) -> Callable[[list[Any], list[Any], dict[str, Any]], list[float | None]]:
    kind = source.kind
    if kind == "regex":
        pattern = re.compile(source.regex or "")
        return lambda _p, done, _c: [1.0 if pattern.fullmatch(completion_text(c).strip()) else 0.0 for c in done]
    if kind == "json_schema":
        import jsonschema

        schema = json.loads(Path(source.json_schema or "").read_text())
        validator = jsonschema.validators.validator_for(schema)(schema)

        def valid(text: str) -> float:
            try:
                return 1.0 if validator.is_valid(json.loads(text.strip())) else 0.0
            except (json.JSONDecodeError, RecursionError):
                return 0.0

        return lambda _p, done, _c: [valid(completion_text(c)) for c in done]
    if kind == "reference":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

        def rouge(_p: list[Any], done: list[Any], columns: dict[str, Any]) -> list[float | None]:
            refs = columns.get("reference") or [None] * len(done)
            return [None if not ref else scorer.score(ref, completion_text(c).strip())["rougeL"].fmeasure
                    for ref, c in zip(refs, done, strict=True)]

        return rouge
    if kind == "reward_model":
        if reward_model is None:
            raise ValueError("the reward_model source needs the reward stage's model")
        rm = reward_model
        return lambda prompts, done, _c: list(rm(prompts, [completion_text(c) for c in done]))
    fn = python_function(source.python or "")
    return lambda prompts, done, columns: [None if r is None else float(r)
                                           for r in fn(prompts=prompts, completions=done, **columns)]
