"""KTO: learns from single rated completions (thumbs up / down), not pairs, with `trl.KTOTrainer`.

Its rows are the unpaired feedback and each training pair's two sides (chosen: desirable, rejected:
undesirable), all on the policy's side by prompt (the judge learned the other side's pairs, some made from this
feedback; tasks/lib/pairs.py). Measured on the held-out feedback and the held-out pairs' sides. `dpo.beta` is
KTO's KL strength.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignflow.tasks.lib import pairs as pair_split
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json

if TYPE_CHECKING:
    from alignflow.tasks.dpo import DpoConfig, DpoInputs


def trainer(cfg: DpoConfig, inputs: DpoInputs, model: Any, tok: Any, common: dict[str, Any], callbacks: list[Any],
            max_length: int) -> tuple[Any, Any, Any, dict[str, int]]:
    """(the trainer, the pairs whose sides it trains on, the held-out rated completions, row counts for the
    manifest's metrics)."""
    import trl
    from datasets import load_from_disk

    # the policy's side, by prompt: the judge learned the other side's pairs, some made from this feedback
    unpaired = pair_split.select(load_from_disk(str(inputs.tokenized / "unpaired")), "policy", inputs.pairs)
    pairs = pair_split.select(load_from_disk(str(inputs.tokenized / "preference")), "policy", inputs.pairs)
    rated = rows(unpaired, pairs, inputs.seed)
    heldout = rows(load_from_disk(str(inputs.tokenized / "unpaired_heldout")),
                   load_from_disk(str(inputs.tokenized / "preference_heldout")), inputs.seed)
    if len(rated) < 2:
        raise StageError(f"dpo: kto needs rated completions to learn from; found {len(rated)}")
    counts = {"kto_rows": len(rated), "kto_unpaired_rows": len(unpaired), "kto_desirable_rows": sum(rated["label"])}
    args = trl.KTOConfig(loss_type="kto", max_length=max_length, **common)
    made = trl.KTOTrainer(model=model, args=args, train_dataset=rated, eval_dataset=heldout,
                          processing_class=tok, callbacks=callbacks)
    return made, pairs, heldout, counts


def rows(unpaired: Any, pairs: Any, seed: int) -> Any:
    """KTO's rows (prompt, completion, label): the unpaired feedback, then every pair as its chosen answer
    (desirable) and its rejected one (undesirable), shuffled with the seed. KTOTrainer reads its data in order
    (its KL term pairs each completion with a neighbour's prompt), so desirable and undesirable rows must mix.
    A pair side that is already a rated row (tokenize makes a pair of a prompt's thumbs-up and thumbs-down
    answers, for the reward model) is not added again: each rating counts once."""
    from datasets import Dataset

    found = [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])} for r in unpaired]
    seen = {sha256_json([r["prompt"], r["completion"], r["label"]]) for r in found}
    for p in pairs:
        for side, label in ((p["chosen"], True), (p["rejected"], False)):
            if sha256_json([p["prompt"], side, label]) not in seen:
                found.append({"prompt": p["prompt"], "completion": side, "label": label})
    return Dataset.from_list(found).shuffle(seed=seed) if found else Dataset.from_list(found)
