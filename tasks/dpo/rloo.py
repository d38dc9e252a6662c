"""RLOO (`dpo.loss: rloo`), with `trl.RLOOTrainer`: for each prompt it samples `dpo.num_generations` completions
(`dpo.max_completion_length` tokens, `dpo.temperature`), scores them with `dpo.rewards` (online.py), and takes
each completion's advantage against the mean reward of the other completions of its group (leave one out).
`dpo.beta` is the KL coefficient: TRL then keeps a frozen copy of the SFT adapter, named `ref`, as the
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
    args = trl.RLOOConfig(**online.sampling(cfg), **common)
    made = trl.RLOOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=prompts,
                           processing_class=tok, callbacks=callbacks)
    online.watch(made, recorder, inputs.out_dir, cfg)
    return made
