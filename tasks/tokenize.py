"""tokenize: chat template, assistant-only labels, length limits, the held-out preference split, length statistics.

SFT conversations become `input_ids` + `labels`, where every token that is not part of an assistant turn
(system prompt, user turns, template markers before the answer) is -100, so the loss is taken on the answers
only. The assistant spans are found in characters: the template rendered up to turn i with the generation
prompt is a prefix of the full rendering, and the text between that prefix and the rendering up to turn i+1
is the answer (its end-of-turn marker included, so the model learns to stop). Tokens whose first character
falls in such a span are trained on. SFTTrainer accepts this pre-tokenized dataset as it is. An example longer
than `max_length` is dropped, not cut (a cut one would lose its end-of-turn token and teach the model not to
stop): counted as `sft.dropped.too_long` (and, as before, `sft.truncated`).

Preference pairs stay conversational (prompt messages, chosen/rejected answers): the reward and DPO trainers
apply the same template themselves. Pairs whose rendered prompt + longer answer exceed `max_length` tokens are
dropped (`preference.dropped.too_long`). A share of the pairs (`reward.eval_fraction`, chosen by each pair's
hash) goes to `preference_heldout/`: neither reward nor dpo trains on it; both are measured on it, and the
manifest lists those pairs' hashes. Both that split and reward / dpo's judge / policy split are keyed on the
*normalised* prompt (tasks/lib/pairs.prompt_key: lower-cased, white space folded, as curate's exact dedup), so
case and spacing variants of one prompt land on one side (manifest `split_key`). Under `reward.pairs: disjoint`
tokenize refuses data whose training pairs leave fewer than 2 on the judge's side, or (for dpo's pair losses)
on the policy's, before anything trains. Where that share is fewer than 2 pairs (a small data set), the prompts with
the next-lowest hashes are held out too, as a larger `reward.eval_fraction` would, while 4 stay for training.
A retrain continues weights that already learned pairs (`trained_before`: the champion's lineage,
flows/lineage.py): a prompt any of whose pairs or rated completions that lineage trained on (judge or policy) is
never held out, whatever its hash says, so the judge's held-out accuracy is measured on pairs no weights of the
history learned (`preference.heldout_trained_before` counts the pairs kept for training so).

The SFT examples whose prompt is held out by the same rule (`sft_heldout_rows` in the manifest: row indices
into `sft/`, which still holds every example) are what `sft.keep: best` measures held-out loss on; sft trains on
them only under `keep: last`.

Unpaired feedback (curate's `unpaired.jsonl`: a prompt, one completion, a thumbs-up/down label) stays
conversational too, for KTO: `unpaired/` and `unpaired_heldout/`, split by the same prompt hash as the pairs.
Where one prompt got both a thumbs-up and a thumbs-down completion, the two also make a pair
(`preference.pairs_from_unpaired`), so that feedback alone can train (and measure) the reward model, the judge
of every method. Either folder may be empty (pairs only): it is still written, with its columns.

`prompts/` holds the prompts online RL (dpo.loss grpo / rloo) samples from: every SFT prompt (with its answer as
`reference`, for the `reference` reward), and the training pairs' and unpaired records' prompts (no reference),
each once; never an eval prompt (curate keeps those apart) nor a held-out preference prompt.

The tokenizer itself (with the template actually used) is saved in `tokenizer/`: later stages load it from here.

`records/` holds the records behind the training rows, as curate (or synthesize) wrote them, for the lineage
(flows/lineage.py, what a version trained on): `sft.jsonl` the SFT records that became `sft/` rows;
`preference.jsonl` the training pairs (not held out, not made from feedback), with their `pair_hash` (`pairs`);
`unpaired.jsonl` every rated completion with the hashes of the training pairs it made (`pairs`) and whether it is
in `unpaired/` (`kto`). Each line is `{"record": ..., "pairs": [...], "kto": ...}`; which of them a stage trained
on is decided by reward's and dpo's `trained_pair_hashes` (flows/lineage.py), not here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignflow.tasks.lib.chat import encode_conversation
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json, sha256_tree
from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl
from alignflow.tasks.lib.manifest import write_manifest
from alignflow.tasks.lib.pairs import MIN_SIDE_PAIRS, PairsMode, judge_side, pair_hash, prompt_key


class TokenizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_length: int = Field(256, gt=8, description="tokens per example; longer ones are truncated (SFT) or dropped")
    # on by default: every sft.attn_implementation trains packed rows correctly (tasks/lib/training.py), and
    # packing measured 1.7x the tokens/s of padded rows on CPU
    packing: bool = Field(True, description="pack SFT examples into max_length rows (padding-free) in sft")
    chat_template: str | None = Field(None, description="Jinja chat template; default: the model's own")
    include_synthetic: bool = Field(True, description="add the synthesize stage's records to the training data")


class TokenizeInputs(BaseModel):
    base: Path
    curated: Path
    synthesized: Path
    out_dir: Path
    # Checked here, not keyed: they decide a refusal only, never what tokenize writes (reward and dpo still check
    # their own side when a cached tokenize made for another setting is reused)
    pairs: PairsMode = Field("disjoint", description="the recipe's reward.pairs: disjoint needs each side's minimum")
    sft_heldout: bool = Field(False, description="sft.keep is best: refuse data that holds no SFT example out")
    policy_pairs: bool = Field(True, description="dpo trains on pairs (a pair loss; not kto, grpo or rloo)")
    heldout_fraction: float = Field(0.15, gt=0, lt=1, description="the recipe's reward.eval_fraction: preference "
                                    "pairs held out from reward and dpo training, to measure both on")
    # keyed through the run's facts (flows/keys.py `ancestors`): it decides which pairs are held out
    trained_before: Path | None = Field(None, description="a lineage folder (flows/lineage.py) whose "
                                        "preference.jsonl / unpaired.jsonl prompts an ancestor trained on: never "
                                        "held out")


def run(cfg: TokenizeConfig, inputs: TokenizeInputs) -> dict[str, Any]:
    from datasets import Dataset

    from alignflow.tasks.lib.models import load_tokenizer

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(inputs.base)
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if not tok.chat_template:
        raise StageError("tokenize: the model has no chat template; set tokenize.chat_template in the recipe")
    tok.save_pretrained(out / "tokenizer")

    sft = list(read_jsonl(inputs.curated / "sft.jsonl"))
    pref = list(read_jsonl(inputs.curated / "preference.jsonl"))
    unpaired_file = inputs.curated / "unpaired.jsonl"  # absent in curate folders made before unpaired feedback
    rated = list(read_jsonl(unpaired_file)) if unpaired_file.exists() else []
    if cfg.include_synthetic:
        sft += list(read_jsonl(inputs.synthesized / "sft.jsonl"))
        pref += list(read_jsonl(inputs.synthesized / "preference.jsonl"))

    # --- SFT: input_ids + assistant-only labels --------------------------------------------------------
    rows: list[dict[str, list[int]]] = []
    row_keys: list[str] = []  # each row's prompt (its messages before the last answer), as prompt_key names it
    sft_records: list[dict[str, Any]] = []  # the records behind `rows` (records/sft.jsonl)
    truncated = template_mismatch = 0
    for record in sft:
        encoded = encode_conversation(tok, record["messages"])
        if encoded is None:
            template_mismatch += 1
            continue
        ids, labels = encoded
        if len(ids) > cfg.max_length:
            # Dropped, not cut: a cut example loses its end-of-turn token, and the model would learn not to stop.
            truncated += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
        row_keys.append(prompt_key(record["messages"][:-1]))
        sft_records.append({"record": record})
    if not rows:
        raise StageError(f"tokenize: no SFT example fits tokenize.max_length={cfg.max_length} "
                         f"({truncated} longer ones dropped)")
    Dataset.from_list(rows).save_to_disk(out / "sft")

    # --- preference pairs: conversational, dropped when too long, split into training and held-out -------
    kept: list[tuple[dict[str, Any], int]] = []  # (pair, rendered length)
    too_long = 0
    derived = _pairs_from_feedback(rated)
    for p in pref + derived:
        # Lengths as the trainers will see them: the rendered conversation, end-of-turn markers included.
        length = max(_n_tokens(tok, p["prompt"], p["chosen"]), _n_tokens(tok, p["prompt"], p["rejected"]))
        if length > cfg.max_length:
            too_long += 1
            continue
        kept.append((p, length))
    before = _trained_prompts(inputs.trained_before)
    held_keys = _held_out_prompts([prompt_key(p["prompt"]) for p, _ in kept], inputs.heldout_fraction, before)
    sft_heldout = _sft_heldout_rows(row_keys, held_keys, inputs.heldout_fraction, before)
    if inputs.sft_heldout and not sft_heldout:
        raise StageError(f"tokenize: sft.keep: best measures held-out loss, but none of the {len(rows)} SFT examples "
                         f"is held out (at least {MIN_SFT_HELDOUT + MIN_SFT_TRAIN} are needed); add SFT data, or set "
                         "sft.keep: last")
    pairs: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    heldout_hashes: list[str] = []
    pair_records: list[dict[str, Any]] = []  # records/preference.jsonl
    row_pairs: dict[int, list[str]] = {}  # rated completion (index in `rated`) -> training pairs it made
    pair_lengths = [length for _, length in kept]
    for p, _ in kept:
        pair = {"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]}
        # Held out by the hash of the pair's *prompt*, not its position: every pair of a prompt lands on the same
        # side (several pairs per prompt must not straddle the split), the same pairs stay held out when data is
        # added, and neither reward nor dpo trains on them, so the reward model's accuracy there is an honest check.
        if prompt_key(p["prompt"]) in held_keys:
            heldout.append(pair)
            heldout_hashes.append(sha256_json([p["prompt"], p["chosen"], p["rejected"]]))
        else:
            pairs.append(pair)
            if "_rows" in p:  # made from two rated completions: they are what the lineage records
                for i in p["_rows"]:
                    row_pairs.setdefault(i, []).append(pair_hash(pair))
            else:
                pair_records.append({"record": p, "pairs": [pair_hash(pair)]})
    if len(pairs) < MIN_TRAIN_PAIRS or len(heldout) < MIN_HELDOUT_PAIRS:
        both = len({prompt_key(p["prompt"]) for p in derived})
        raise StageError(
            f"tokenize: {len(pairs)} training and {len(heldout)} held-out preference pairs fit "
            f"max_length={cfg.max_length}; the reward model (the judge of every method, kto and grpo / rloo "
            f"included) needs at least {MIN_TRAIN_PAIRS} to train on and {MIN_HELDOUT_PAIRS} held out. Unpaired "
            f"feedback makes a pair only where one prompt has both a thumbs-up and a thumbs-down completion "
            f"({both} prompt(s) here): add pairs, or rate both a liked and a disliked answer for more prompts")
    judge_pairs = sum(judge_side(p["prompt"]) for p in pairs)  # the split reward / dpo make (tasks/lib/pairs.py)
    policy_pairs = len(pairs) - judge_pairs
    short = [f"{n} on the {side}'s side ({who})" for n, side, who, needed in (
        (judge_pairs, "judge", "reward trains on it", True),
        (policy_pairs, "policy", "dpo's pair loss trains on it", inputs.policy_pairs)) if needed and n < MIN_SIDE_PAIRS]
    if inputs.pairs == "disjoint" and short:
        raise StageError(
            f"tokenize: reward.pairs=disjoint splits the {len(pairs)} training preference pairs by prompt into "
            f"{judge_pairs} for the judge and {policy_pairs} for the policy; {' and '.join(short)} is fewer than "
            f"{MIN_SIDE_PAIRS}. Add preference pairs on more distinct prompts (variants of one prompt in case or "
            f"white space count once), or set reward.pairs: shared (the judge's win-rates are then not independent)")
    Dataset.from_list(pairs).save_to_disk(out / "preference")
    Dataset.from_list(heldout).save_to_disk(out / "preference_heldout")

    # --- unpaired feedback (KTO): conversational, dropped when too long, split by the same prompts ----------
    unpaired: list[dict[str, Any]] = []
    unpaired_heldout: list[dict[str, Any]] = []
    unpaired_too_long = 0
    paired_keys = {prompt_key(p["prompt"]) for p, _ in kept}
    rated_records: list[dict[str, Any]] = []  # records/unpaired.jsonl
    for i, r in enumerate(rated):
        entry = {"record": r, "pairs": row_pairs.get(i, []), "kto": False}
        rated_records.append(entry)
        if _n_tokens(tok, r["prompt"], r["completion"]) > cfg.max_length:
            unpaired_too_long += 1
            continue
        row = {"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}],
               "label": bool(r["label"])}
        key = prompt_key(r["prompt"])
        # a prompt with pairs is held out with them; one rated only (no pair) by its hash alone
        held = key in held_keys or (key not in paired_keys and key not in before
                                    and _held_out(r["prompt"], inputs.heldout_fraction))
        (unpaired_heldout if held else unpaired).append(row)
        entry["kto"] = not held
    _save(unpaired, out / "unpaired", UNPAIRED_COLUMNS)
    _save(unpaired_heldout, out / "unpaired_heldout", UNPAIRED_COLUMNS)

    # --- prompts for online RL: SFT prompts (with their answer as reference), then preference prompts -------
    held_prompts = {prompt_key(r["prompt"]) for r in [*heldout, *unpaired_heldout]}
    prompts: dict[str, dict[str, Any]] = {}
    prompts_too_long = 0
    candidates = [(m["messages"][:-1], m["messages"][-1]["content"]) for m in sft
                  if m["messages"][-1]["role"] == "assistant"]
    candidates += [(p["prompt"], None) for p in [*pairs, *unpaired]]
    for prompt, reference in candidates:
        key = prompt_key(prompt)  # a variant of a held-out prompt is held out too; variants are sampled once
        if key in held_prompts:
            continue
        if key in prompts:  # each prompt once; an SFT answer is its reference
            prompts[key]["reference"] = prompts[key]["reference"] or reference
            continue
        rendered = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if len(tok(rendered, add_special_tokens=False)["input_ids"]) > cfg.max_length:
            prompts_too_long += 1
            continue
        prompts[key] = {"prompt": prompt, "reference": reference}
    _save(list(prompts.values()), out / "prompts", PROMPT_COLUMNS)
    (out / "records").mkdir(exist_ok=True)
    write_jsonl(out / "records" / "sft.jsonl", sft_records)
    write_jsonl(out / "records" / "preference.jsonl", pair_records)
    write_jsonl(out / "records" / "unpaired.jsonl", rated_records)

    lengths = [len(r["input_ids"]) for r in rows]
    trainable = sum(sum(1 for label in r["labels"] if label != -100) for r in rows)
    _plot_lengths(out / "lengths.png", lengths, pair_lengths, cfg.max_length)
    metrics = {
        "sft.examples": len(rows),
        "sft.truncated": truncated,
        "sft.dropped.template_mismatch": template_mismatch,
        "sft.tokens": sum(lengths),
        "sft.trainable_tokens": trainable,
        "sft.length_mean": round(sum(lengths) / len(lengths), 1),
        "sft.length_max": max(lengths),
        "sft.dropped.too_long": truncated,  # the same examples as sft.truncated (kept for existing dashboards)
        "sft.heldout_examples": len(sft_heldout),  # sft_heldout_rows: measured, not trained on, under sft.keep: best
        "preference.pairs": len(pairs),
        "preference.heldout_pairs": len(heldout),
        # prompts held out beyond reward.eval_fraction's share, so that the judge is measured on 2 pairs or more
        "preference.heldout_prompts_added": sum(not _held_out(p["prompt"], inputs.heldout_fraction)
                                                for p in {prompt_key(h["prompt"]): h for h in heldout}.values()),
        # pairs whose prompt the split would hold out but the lineage of the continued weights trained on
        "preference.heldout_trained_before": sum(prompt_key(p["prompt"]) in before
                                                 and _held_out(p["prompt"], inputs.heldout_fraction) for p, _ in kept),
        "preference.judge_pairs": judge_pairs,  # the training pairs' sides under reward.pairs: disjoint
        "preference.policy_pairs": policy_pairs,
        "preference.dropped.too_long": too_long,
        "preference.length_max": max(pair_lengths),
        "preference.pairs_from_unpaired": len(derived),
        "preference.unpaired": len(unpaired),
        "preference.unpaired_heldout": len(unpaired_heldout),
        "preference.unpaired_dropped.too_long": unpaired_too_long,
        "prompts": len(prompts),
        "prompts.dropped.too_long": prompts_too_long,
    }
    return write_manifest(out, {
        "stage": "tokenize",
        "tokenizer_hash": sha256_tree(out / "tokenizer"),
        "packing": cfg.packing,
        "max_length": cfg.max_length,
        # what the held-out and judge / policy splits are keyed on (tasks/lib/pairs.prompt_key)
        "split_key": "prompt messages (role, text lower-cased with white space folded, as curate's exact dedup)",
        "heldout_pair_hashes": sorted(heldout_hashes),  # sha256 of [prompt, chosen, rejected]: never trained on
        # rows of sft/ held out by prompt (sft.keep: best trains on the others and keeps the lowest loss on these)
        "sft_heldout_rows": sft_heldout,
        "sft_heldout_rows_sha256": sha256_json(sft_heldout),  # their digest (sft's cache key reads it under best)
        "outputs": ["sft", "preference", "preference_heldout", "unpaired", "unpaired_heldout", "prompts", "tokenizer",
                    "records", "lengths.png"],
        "artifacts": ["lengths.png"],
        "metrics": metrics,
    })


UNPAIRED_COLUMNS = ("prompt", "completion", "label")
PROMPT_COLUMNS = ("prompt", "reference")
MIN_TRAIN_PAIRS = 4  # the reward stage's training pairs: fewer train nothing worth judging with
MIN_HELDOUT_PAIRS = 2  # the held-out pairs the judge's accuracy is measured on (reward, evaluate)
MIN_SFT_HELDOUT = 2  # SFT rows held out for sft.keep: best's held-out loss, when the data has enough
MIN_SFT_TRAIN = 2  # SFT rows that stay for training when more prompts are held out to reach MIN_SFT_HELDOUT


def _held_out(prompt: list[dict[str, str]], fraction: float) -> bool:
    """Whether a prompt's pairs and rated completions are held out: by the hash of the prompt, so every record
    of a prompt lands on the same side and the split stays put when data is added."""
    return int(prompt_key(prompt)[:8], 16) / 0x1_0000_0000 < fraction


def _held_out_prompts(keys: list[str], fraction: float, before: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The prompts (their `prompt_key`) whose pairs are held out: those whose hash falls below `fraction`
    (`_held_out`). When that leaves fewer than MIN_HELDOUT_PAIRS pairs (a small data set: two dozen thumbs-up /
    down records make a handful of pairs), the prompts with the next-lowest hashes join until it does, as long as
    MIN_TRAIN_PAIRS stay for training: the split a larger `reward.eval_fraction` would make. A split that already
    holds enough out is the plain one, unchanged. A prompt in `before` (trained on by the lineage of the weights
    this run continues) is never held out."""
    count = Counter(keys)  # pairs per prompt
    position = {k: int(k[:8], 16) / 0x1_0000_0000 for k in count}  # as `_held_out` places a prompt
    held = {k for k in count if position[k] < fraction and k not in before}
    for key in sorted(set(count) - held - set(before), key=lambda k: position[k]):
        n_held = sum(count[k] for k in held)
        if n_held >= MIN_HELDOUT_PAIRS or len(keys) - n_held - count[key] < MIN_TRAIN_PAIRS:
            break
        held.add(key)
    return held


def _sft_heldout_rows(keys: list[str], held_keys: set[str], fraction: float,
                      before: set[str] | frozenset[str] = frozenset()) -> list[int]:
    """Indices of the SFT rows held out (sft.keep: best measures its loss on them and trains on the rest): a prompt
    held out of the preference pairs is held out here too, any other by its hash, as `_held_out` places it (one
    rule for every split by prompt, so a prompt is never trained on by one stage and measured on by another). When
    that leaves fewer than MIN_SFT_HELDOUT rows, the prompts with the next-lowest hashes join while MIN_SFT_TRAIN
    rows stay. They are rows of curate's SFT records, which its eval-overlap check (decontamination) covers. A
    prompt in `before` (the lineage of the weights being continued trained on it) is never held out: the loss
    measured on it would be on what the weights already learned."""
    count = Counter(keys)
    position = {k: int(k[:8], 16) / 0x1_0000_0000 for k in count}
    held = {k for k in count if k in held_keys or (position[k] < fraction and k not in before)}
    for key in sorted(set(count) - held - set(before), key=lambda k: position[k]):
        n_held = sum(count[k] for k in held)
        if n_held >= MIN_SFT_HELDOUT or len(keys) - n_held - count[key] < MIN_SFT_TRAIN:
            break
        held.add(key)
    return [i for i, k in enumerate(keys) if k in held]


def _trained_prompts(lineage: Path | None) -> set[str]:
    """`prompt_key` of every pair and rated completion in a lineage folder's preference.jsonl / unpaired.jsonl (what
    the judges and policies of that history trained on); empty without one, or for a lineage logged before it
    wrote `pairs.json` (or a curated folder standing in for one): those listed held-out pairs too, so which were
    trained on is unknown, and the split stays as it was (evaluate then counts the judge as not independent)."""
    if lineage is None or not (lineage / "pairs.json").exists():
        return set()
    files = [lineage / "preference.jsonl", lineage / "unpaired.jsonl"]
    return {prompt_key(r["prompt"]) for f in files if f.exists() for r in read_jsonl(f)}


def _pairs_from_feedback(rated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs from unpaired feedback: where one prompt has a thumbs-up and a thumbs-down completion, the two make a
    pair (up chosen), in order, each completion used once. The reward stage learns only from pairs, so feedback
    alone can still train the judge. `_rows`: the two completions' positions in `rated` (for records/)."""
    up: dict[str, list[int]] = {}
    down: dict[str, list[int]] = {}
    for i, r in enumerate(rated):
        (up if r["label"] else down).setdefault(sha256_json(r["prompt"]), []).append(i)
    return [{"prompt": rated[u]["prompt"], "chosen": rated[u]["completion"], "rejected": rated[d]["completion"],
             "_rows": [u, d]}
            for key, ups in up.items() for u, d in zip(ups, down.get(key, []), strict=False)
            if rated[u]["completion"].strip() != rated[d]["completion"].strip()]


def _save(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...]) -> None:
    """Save rows as a `datasets` folder; an empty one keeps its columns (a plain from_list([]) would have none)
    and is written as one empty shard: datasets 5.2 writes no shard at all for zero rows by default, and
    `load_from_disk` of such a folder raises IndexError."""
    from datasets import Dataset

    Dataset.from_dict({c: [r[c] for r in rows] for c in columns}).save_to_disk(path, num_shards=1)


def _n_tokens(tok: Any, prompt: list[dict[str, str]], answer: str) -> int:
    """Tokens of the prompt and one answer rendered with the chat template (a str is tokenized, not a dict)."""
    text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _plot_lengths(path: Path, sft: list[int], pairs: list[int], max_length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(sft, bins=30, alpha=0.7, label=f"SFT examples ({len(sft)})")
    ax.hist(pairs, bins=30, alpha=0.7, label=f"preference pairs ({len(pairs)})")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
