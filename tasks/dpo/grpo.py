"""GRPO (`dpo.loss: grpo`), with `trl.GRPOTrainer`: for each prompt it samples `dpo.num_generations` completions
(`dpo.max_completion_length` tokens, `dpo.temperature`), scores them with `dpo.rewards` (online.py), and pushes
the policy towards the completions that beat their group's mean reward (advantages normalised by the group's
spread). `dpo.beta` is the KL coefficient: TRL then keeps a frozen copy of the SFT adapter, named `ref`, as the
reference. `dpo.batch_size` counts completions (whole groups).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignflow.tasks.dpo import online

if TYPE_CHECKING:
    from alignflow.tasks.dpo import DpoConfig, DpoInputs


def trainer(cfg: DpoConfig, inputs: DpoInputs, model: Any, tok: Any, common: dict[str, Any], callbacks: list[Any],
            quant: dict[str, Any], full: bool) -> Any:
    import trl

    prompts = online.prompts(inputs)
    recorder, funcs = online.rewards(cfg, inputs, quant, model, full)
    args = trl.GRPOConfig(**online.sampling(cfg), **common)
    made = trl.GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=prompts,
                           processing_class=tok, callbacks=callbacks)
    online.watch(made, recorder, inputs.out_dir, cfg)
    return made
