"""What the three training stages (sft, reward, dpo) share around the Trainer: seeding, precision flags,
optimizer checks, resume points, step metrics, peak memory, loss plots and summaries.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.models import torch_dtype

# Which weights a training stage hands on: those after its last step, or the checkpoint that scored best on the
# stage's held-out split (evaluated every `eval_steps`).
Keep = Literal["last", "best"]

# transformers' attention kernels. All three train packed (padding-free) rows: sdpa and eager through the
# block-diagonal mask transformers 5 builds from position_ids, flash_attention_2 through its varlen kernel.
Attention = Literal["sdpa", "flash_attention_2", "eager"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def train_precision(dtype: str) -> dict[str, Any]:
    """Trainer precision flags from the recipe's dtype.

    TRL's configs default to bf16=True even on CPU, where bf16 matmuls made a LoRA step ~5x slower here
    (environment notes): mixed precision only on a GPU, and only when the recipe asks for it.
    """
    import torch

    cuda = torch.cuda.is_available()
    resolved = torch_dtype(dtype)
    return {
        "use_cpu": not cuda,
        "bf16": cuda and resolved == torch.bfloat16,
        "fp16": cuda and resolved == torch.float16,
    }

def save_trained(trainer: Any, folder: Path) -> None:
    """Write the trained adapter (or model) into `folder` in Hugging Face format. Every rank must call this.

    Under FSDP the launch checkpoints with SHARDED_STATE_DICT (each rank its shard: fast resume), and with that
    type `Trainer.save_model` writes no weights at all; the product must be a loadable folder, so the full state
    dict is gathered here (a collective: all ranks take part, the main one writes). Under DeepSpeed ZeRO-3 the
    Trainer consolidates the 16-bit weights itself; under DDP or one process only the main one writes.
    """
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(folder))
    if trainer.is_world_process_zero():  # the Trainer also pickles its arguments there; they are in MLflow already
        (Path(folder) / "training_args.bin").unlink(missing_ok=True)

def keep_problems(stage: str, keep: Any, eval_steps: Any, patience: Any, max_steps: Any) -> list[str]:
    """What is wrong with a stage's `keep`, `eval_steps` and `early_stopping_patience` together (plain values, so
    that a recipe whose other keys fail the schema still lists these problems too)."""
    problems = []  # (eval_steps < 1 is the schema's: Field(ge=1))
    if patience is not None and keep != "best":
        problems.append(f"{stage}.early_stopping_patience: {patience} needs {stage}.keep: best (early stopping "
                        "compares held-out evaluations, which only keep: best makes)")
    if keep == "best" and isinstance(eval_steps, int) and isinstance(max_steps, int) and 0 < max_steps < eval_steps:
        problems.append(f"{stage}.eval_steps: {eval_steps} is more than {stage}.max_steps ({max_steps}): keep: best "
                        "would never evaluate; lower eval_steps")
    return problems

def keep_arguments(keep: Keep, eval_steps: int, save_steps: int, metric: str, greater_is_better: bool,
                   ) -> dict[str, Any]:
    """Trainer arguments for `keep`. last: checkpoints every `save_steps` only, no evaluation (no eval cost).
    best: evaluate on the eval dataset every `eval_steps`, checkpoint at each evaluation (so every evaluated step
    can be the one kept; `save_steps` then does not apply), and load the best checkpoint by `metric` at the end
    (`load_best_model_at_end`; the Trainer never rotates that checkpoint away). The best metric, its step and its
    checkpoint are in every checkpoint's trainer_state.json, so a run resumed after a kill goes on comparing
    against the same best-so-far (as does EarlyStoppingCallback's count, a stateful callback)."""
    if keep == "last":
        return {"save_strategy": "steps", "save_steps": save_steps, "eval_strategy": "no"}
    return {"eval_strategy": "steps", "eval_steps": eval_steps, "save_strategy": "steps", "save_steps": eval_steps,
            "load_best_model_at_end": True, "metric_for_best_model": metric, "greater_is_better": greater_is_better}

def keep_callbacks(patience: int | None) -> list[Any]:
    """EarlyStoppingCallback when the recipe asks for early stopping (keep: best only; the recipe checks it)."""
    if patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=patience)]

def kept(trainer: Any, keep: Keep) -> dict[str, Any]:
    """{"kept_step", "kept_by", "kept_metric"}: the step whose weights the stage hands on and the figure that chose
    it. Under keep: best that is the checkpoint the Trainer loaded at the end (`best_model_checkpoint`), read from
    its name rather than from `best_global_step`, which can name a step whose checkpoint is gone."""
    import logging

    state = trainer.state
    if keep == "best" and state.best_model_checkpoint:
        metric = str(trainer.args.metric_for_best_model)  # the Trainer compares `eval_<metric>`
        return {"kept_step": int(str(state.best_model_checkpoint).rstrip("/").rsplit("-", 1)[-1]),
                "kept_by": metric if metric.startswith("eval_") else f"eval_{metric}",
                "kept_metric": float(state.best_metric)}
    if keep == "best":  # (still trained without the held-out rows: not `last`, which the lineage reads as "all")
        logging.getLogger("alignflow").warning(
            "keep: best, but no evaluated checkpoint was found (no evaluation ran): the last step's weights are kept")
        return {"kept_step": int(state.global_step), "kept_by": "last (no evaluation ran)", "kept_metric": None}
    return {"kept_step": int(state.global_step), "kept_by": "last", "kept_metric": None}

def check_kernels(stage: str, attn_implementation: str, use_liger_kernel: bool) -> None:
    """flash-attention and Liger's Triton kernels need a CUDA GPU and their packages: say so before loading."""
    import importlib.util

    import torch

    if attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise StageError(f"{stage}.attn_implementation 'flash_attention_2' needs a CUDA GPU; use sdpa here")
        if importlib.util.find_spec("flash_attn") is None:
            raise StageError(f"{stage}.attn_implementation 'flash_attention_2' needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation); sdpa needs nothing")
    if use_liger_kernel:
        if not torch.cuda.is_available():
            raise StageError(f"{stage}.use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton)")
        if importlib.util.find_spec("liger_kernel") is None:
            raise StageError(f"{stage}.use_liger_kernel needs liger-kernel: pip install 'alignflow[gpu]'")

def check_optimizer(optim: str) -> None:
    """bitsandbytes' paged / 8-bit optimizers need CUDA; say so before training starts."""
    import torch


    if ("paged" in optim or "8bit" in optim) and not torch.cuda.is_available():
        raise StageError(f"optimizer '{optim}' needs a CUDA GPU; use adamw_torch on this machine")

def last_complete_checkpoint(folder: Path, below: int | None = None) -> str | None:
    """Newest `checkpoint-N` the Trainer finished writing (with N < `below`, if given), or None.

    The Trainer writes a checkpoint's model, optimizer, scheduler and RNG state first and `trainer_state.json`
    last, so a checkpoint whose state file is missing or unreadable was cut short (a kill -9 mid-save) and is
    skipped, never resumed from.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                         and (below is None or int(p.name.split("-")[-1]) < below)),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in candidates:
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(ckpt)
    return None

def train_resuming(trainer: Any, checkpoints: Path) -> tuple[Any, str | None]:
    """`trainer.train()`, resumed from the newest complete checkpoint in `checkpoints` when a killed run left one
    (same data order, optimizer, LR schedule and RNG); returns the train result and the checkpoint resumed from.

    Resuming keeps the adapter's dtype. Over a quantized base TRL trains the LoRA weights in bf16 (QLoRA), and
    the Trainer reloads a checkpoint's adapter through PEFT's `load_adapter`, which by default upcasts bf16 adapter
    weights to fp32: the resumed steps would run in another precision than the uninterrupted run and the product
    would be an fp32 adapter (measured with transformers 5.23 / PEFT 0.21: a killed and resumed QLoRA dpo run
    ended with float32 weights, the uninterrupted one with bfloat16). Loading without the upcast puts the saved
    values into the parameters as they are.

    A checkpoint at the last step (`max_steps`; the run was killed after it, before the stage's outputs were
    written) is not resumed from: the Trainer (transformers 5.23) resumed there trains one step beyond max_steps
    (it checks the step count only after a step). The checkpoint before it is used, and the last steps are
    trained again.
    """
    import functools

    resume = last_complete_checkpoint(checkpoints, trainer.args.max_steps if trainer.args.max_steps > 0 else None)
    model = trainer.model
    # the Trainer calls model.load_adapter(checkpoint, name, ...) on resume, and for the best checkpoint at the end
    patched = (resume is not None or trainer.args.load_best_model_at_end) and hasattr(model, "load_adapter")
    if patched:
        model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)
    try:
        return trainer.train(resume_from_checkpoint=resume), resume
    finally:
        if patched:
            del model.load_adapter  # the instance attribute: PEFT's method again

def add_step_metrics(trainer: Any) -> None:
    """Add `tokens_per_s` (non-padding tokens since the previous log) and `peak_memory_bytes` to every step log.

    The callback goes first in the Trainer's list: the logs dict it extends is then the one the step-metrics callback
    sends to the stage's child run; the copy already kept in `state.log_history` gets the same values.
    """
    from transformers import TrainerCallback

    from alignflow.tasks.lib.training import peak_memory_bytes

    class StepMetrics(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.last: tuple[float, int] | None = None  # (monotonic seconds, tokens seen) at the previous log

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.last = (time.monotonic(), int(state.num_input_tokens_seen or 0))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs is None or "loss" not in logs:  # the end-of-training summary has its own figures
                return
            now, tokens = time.monotonic(), int(state.num_input_tokens_seen or 0)
            extra: dict[str, float] = {"peak_memory_bytes": float(peak_memory_bytes())}
            if self.last is not None and now > self.last[0] and tokens > self.last[1]:
                extra["tokens_per_s"] = round((tokens - self.last[1]) / (now - self.last[0]), 2)
            self.last = (now, tokens)
            logs.update(extra)
            if state.log_history:
                state.log_history[-1].update(extra)

    trainer.callback_handler.callbacks.insert(0, StepMetrics())

def peak_memory_bytes() -> int:
    """Peak accelerator memory of this process (CUDA), or its peak resident set size on CPU-only machines."""
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.exists():  # VmHWM: this process's own peak. ru_maxrss survives exec, so a child reports its parent's
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

def plot_curves(path: Path, history: list[dict[str, Any]], keys: list[str], title: str,
                kept_step: int | None = None) -> list[str]:
    """Plot the given Trainer `log_history` keys against step into one PNG; returns the keys found. `kept_step`
    (keep: best) is marked on every panel with a dashed vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    found = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, max(len(found), 1), figsize=(4 * max(len(found), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], found, strict=False):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        if kept_step is not None:
            ax.axvline(kept_step, color="tab:red", linestyle="--", label=f"kept step {kept_step}")
            ax.legend(fontsize="small")
        ax.set_xlabel("step")
        ax.set_title(key)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return found

def run_loss(history: list[dict[str, Any]], result: Any) -> float:
    """The mean training loss over the whole run, resumed or not: the logged losses, each weighted by the steps it
    covers. The Trainer's own `training_loss` covers the steps of its `train()` call only, so after a resume it
    would be the mean since the checkpoint (the history, restored from the checkpoint, holds every step)."""
    total, steps, previous = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and "step" in entry and entry["step"] > previous:
            total += float(entry["loss"]) * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return round(total / steps if steps else float(result.training_loss), 5)

def trainer_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Headline numbers from a Trainer's `log_history`: the last value of each logged scalar."""
    last: dict[str, float] = {}
    for entry in history:
        for k, v in entry.items():
            if isinstance(v, int | float) and k not in ("epoch",):
                last[k] = float(v)
    return last
