"""EleutherAI's lm-evaluation-harness (`lm-eval`, the optional `lm-eval` extra) on a model already in memory.

The evaluate stage hands the model object it already holds (the base, or the base with an adapter on) to the
harness's `HFLM` and calls `lm_eval.simple_evaluate` with `log_samples=True`. What comes back, per task:
- the harness's aggregate metrics (`acc`, `acc_norm`, `exact_match`, ... and for a filter other than `none`,
  `<metric>.<filter>`);
- each metric's per-document values, where the harness logs them (`samples`), keyed by `doc_id`. Where their
  mean equals the reported aggregate, the metric is a mean over documents and the evaluate stage computes a
  paired bootstrap interval of candidate − champion over the same documents; other aggregates (corpus BLEU,
  perplexities) have no per-document interval here.

Tasks are found in the shipped folder (`alignflow/metrics/lm_eval_tasks`), the recipe's `include_path`, and the
harness's own task index (hub datasets: those work where the machine can reach the hub or has them cached).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from alignflow.tasks.lib.errors import StageError

INSTALL = "pip install 'alignflow[lm-eval]'"


def shipped_tasks() -> Path:
    return Path(str(resources.files("alignflow.metrics") / "lm_eval_tasks"))


def task_paths(include_path: str | None) -> list[str]:
    return [str(shipped_tasks()), *([str(Path(include_path).expanduser().resolve())] if include_path else [])]


def local_task_names(paths: list[str]) -> set[str]:
    """`task:` names declared by the YAML files under `paths` (a cheap scan, no import of lm-eval)."""
    names: set[str] = set()
    for root in paths:
        for yaml_file in Path(root).rglob("*.yaml"):
            match = re.search(r"^task:\s*['\"]?([^\s'\"#]+)", yaml_file.read_text(errors="replace"), re.MULTILINE)
            if match:
                names.add(match.group(1))
    return names


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager over the shipped folder and `include_path`; the harness's own index of ~15,000 tasks
    (tens of seconds to build) only when a task is not declared locally. Raises StageError naming every task it
    cannot find."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise StageError(f"evaluate.lm_eval needs lm-eval: {INSTALL}") from None
    paths = task_paths(include_path)
    local = local_task_names(paths)
    manager = TaskManager(include_path=paths, include_defaults=not set(tasks) <= local)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    missing = [t for t in tasks if t not in known]
    if missing:
        import difflib

        hints = [f"'{t}'" + (f" (did you mean '{close[0]}'?)" if (close := difflib.get_close_matches(t, known, 1))
                             else "") for t in missing]
        where = ", ".join(paths)
        raise StageError(f"evaluate.lm_eval.tasks: no lm-eval task named {', '.join(hints)} in {where} "
                         "or the harness's own tasks")
    return manager


@dataclass
class HarnessResult:
    """One model's harness results: aggregates, per-document values, and the raw JSON-able results."""

    metrics: dict[str, float] = field(default_factory=dict)  # `<task>.<metric>` -> value
    per_doc: dict[str, dict[int, float]] = field(default_factory=dict)  # `<task>.<metric>` -> doc_id -> value
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # results, higher_is_better, n-samples, versions, n-shot
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # the harness's per-document log


def run_harness(model: Any, tok: Any, tasks: list[str], manager: Any, *, num_fewshot: int | None,
                limit: int | None, batch_size: int, seed: int) -> HarnessResult:
    """The harness's tasks on `model` (a transformers or PEFT causal LM, used as it is: no copy is made)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    # bootstrap_iters=0: the harness's own stderr bootstrap is skipped; intervals are paired and computed by the
    # evaluate stage from the per-document values. Seeds: the recipe's, for the few-shot sampler too.
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                          torch_random_seed=seed, fewshot_random_seed=seed)
    assert out is not None  # one process: rank 0
    result = HarnessResult(raw={k: out.get(k) for k in ("results", "higher_is_better", "n-samples", "versions",
                                                         "n-shot", "configs")},
                           samples=out.get("samples", {}))
    for task, values in out["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}.{metric}" if filt == "none" else f"{task}.{metric}.{filt}"
            result.metrics[name] = float(value)
            result.higher_is_better[name] = bool((out.get("higher_is_better") or {}).get(task, {}).get(metric, True))
            docs = {int(s["doc_id"]): s[metric] for s in out.get("samples", {}).get(task, [])
                    if s.get("filter", "none") == filt and isinstance(s.get(metric), int | float)}
            if docs and math.isclose(sum(docs.values()) / len(docs), float(value), rel_tol=1e-9, abs_tol=1e-12):
                result.per_doc[name] = {d: float(v) for d, v in docs.items()}  # a mean over documents
    return result
