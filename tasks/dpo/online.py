"""What the two online losses, GRPO (grpo.py) and RLOO (rloo.py), share: they sample `dpo.num_generations`
completions per prompt from the policy, score them with the weighted `dpo.rewards` sources (tasks/lib/rewards.py;
the reward model's scorer is judge.py), and learn from the group's rewards. Here: the prompts, the reward
functions, the sampling settings, the per-step metric names and the tables of sampled completions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignflow.tasks.dpo.judge import reward_model_scorer
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.rewards import Recorder, reward_functions, source_names

if TYPE_CHECKING:
    from alignflow.tasks.dpo import DpoConfig, DpoInputs


def prompts(inputs: DpoInputs) -> Any:
    """Tokenize's prompts (every SFT prompt, with its answer as the `reference` reward's target)."""
    from datasets import load_from_disk

    found = load_from_disk(str(inputs.tokenized / "prompts"))
    if len(found) == 0:
        raise StageError("dpo: no prompts to sample from (tokenize wrote none that fit tokenize.max_length)")
    return found


def rewards(cfg: DpoConfig, inputs: DpoInputs, quant: dict[str, Any], policy: Any,
            full: bool) -> tuple[Recorder, list[Any]]:
    """The recorder of every sampled completion's rewards, and one TRL reward function per dpo.rewards source."""
    recorder = Recorder(source_names(cfg.rewards), [s.weight for s in cfg.rewards])
    return recorder, reward_functions(cfg.rewards, recorder, reward_model_scorer(cfg, inputs, quant, policy, full))


def sampling(cfg: DpoConfig) -> dict[str, Any]:
    """The GRPOConfig / RLOOConfig settings of the sampling and the reward sum."""
    return dict(num_generations=cfg.num_generations,  # completions per prompt: the group
                max_completion_length=cfg.max_completion_length,  # tokens per completion
                temperature=cfg.temperature, reward_weights=[s.weight for s in cfg.rewards])


def watch(trainer: Any, recorder: Recorder, out: Path, cfg: DpoConfig) -> None:
    """The sample tables every `dpo.sample_every` steps, and the dpo child run's per-step names."""
    trainer.add_callback(sample_tables(recorder, out, cfg.sample_every))
    metric_names(trainer, source_names(cfg.rewards))


def metric_names(trainer: Any, names: list[str]) -> None:
    """The dpo child run's per-step names for online RL, beside TRL's own (`reward`, `rewards/<name>/mean`,
    `completions/mean_length`): `reward_mean`, `reward.<source>_mean`, `completion_length_mean`; `reward_std`
    and `kl` keep TRL's names. Inserted first, so the step-metrics callback sends the extended dict."""
    from transformers import TrainerCallback

    aliases = {"reward": "reward_mean", "completions/mean_length": "completion_length_mean",
               **{f"rewards/{n}/mean": f"reward.{n}_mean" for n in names}}

    class OnlineNames(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs is None:
                return
            extra = {new: logs[old] for old, new in aliases.items() if logs.get(old) is not None}
            logs.update(extra)
            if state.log_history and extra:
                state.log_history[-1].update(extra)

    trainer.callback_handler.callbacks.insert(0, OnlineNames())


def sample_tables(recorder: Recorder, out: Path, every: int) -> Any:
    """Every `every` steps: a table of a few prompts with their sampled completions and rewards (per source and
    summed), written to `samples/step_N.json` in the stage folder (the flow logs them as tables to the stage's MLflow
    run when it records the stage, so that no training step waits for the tracking server): what RL
    practitioners read to catch reward hacking."""
    from transformers import TrainerCallback

    class SampleTables(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero or state.global_step % every or not recorder.prompts:
                return
            rows = recorder.rows(limit_prompts=4)
            name = f"samples/step_{state.global_step:05d}.json"
            (out / "samples").mkdir(exist_ok=True)
            (out / name).write_text(json.dumps(rows, indent=2, ensure_ascii=False))  # MLflow: when recorded

    return SampleTables()
