"""Online RL (GRPO, RLOO) and unpaired feedback (KTO) in the preference stage, on the smoke recipe's tiny model:
each loss runs the whole pipeline and registers a version; the rewards reach TRL's advantages; unpaired
feedback records go through curate into KTO; every reward source is checked before training starts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import RecipeError, load_recipe
from alignflow.tasks.lib.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# cheap online settings: 2 completions of 8 tokens per prompt, 2 prompts per step, 2 steps; a table every step
ONLINE = ["dpo.num_generations=2", "dpo.max_completion_length=8", "dpo.batch_size=4", "dpo.max_steps=2",
          "dpo.sample_every=1", "dpo.rewards=[reward_model, reference, {regex: '.*e.*', weight: 0.5}]"]
SOURCES = {"reward_model": 1.0, "reference": 1.0, "regex": 0.5}


def _feedback(path: Path) -> Path:
    """Thumbs-up / thumbs-down records in the three accepted shapes, on prompts of their own (not copies of the
    seed pairs, which dedup would drop); each prompt is rated up once and down once."""
    rows = []
    for i in range(24):
        prompt = f"Name a colour for the garden shed number {i} in the valley."
        good, bad = f"colour: {['red', 'blue', 'green'][i % 3]}", f"I would rather not say, shed {i} is fine."
        if i % 3 == 0:
            rows += [{"prompt": prompt, "completion": good, "label": True},
                     {"prompt": prompt, "completion": bad, "label": False}]
        elif i % 3 == 1:
            rows += [{"prompt": prompt, "completion": good, "thumbs_up": True},
                     {"prompt": prompt, "completion": bad, "thumbs_up": False}]
        else:
            rows += [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
                      "label": "true"},
                     {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
                      "label": "false"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _upstream(work: Path) -> tuple[dict[str, Path], Path]:
    """The stage folders up to reward (and the tiny base) for the data of the end-to-end runs above, which left
    them cached in `work`: a test of the dpo stage alone starts from them."""
    feedback = _feedback(work / "feedback.jsonl")
    result = pipeline(recipe=load_recipe(SMOKE, [f"data.preference=[data/pairs.jsonl, {feedback}]"]),
                      work_dir=str(work), until="reward")
    return {s: Path(info["folder"]) for s, info in result["stages"].items()}, next((work / "base").glob("tiny-*"))


def _dpo_alone(loss: str, work: Path, out: Path, **launch: Any) -> tuple[Any, Any]:
    """The dpo stage's config and inputs for `loss` over the cached upstream folders, with ONLINE's cheap settings
    (6 steps, a checkpoint every 2), as the pipeline would pass them."""
    from alignflow.tasks import dpo

    folders, base = _upstream(work)
    cfg = dpo.DpoConfig(loss=loss, num_generations=2, max_completion_length=8, batch_size=4, max_steps=6,
                        save_steps=2, rewards=["reward_model", "reference", {"regex": ".*e.*", "weight": 0.5}])
    inputs = dpo.DpoInputs(base=base, dtype="auto", tokenized=folders["tokenize"], quantized=folders["quantize"],
                           sft=folders["sft"], reward=folders["reward"], out_dir=out, seed=0, launch=launch)
    return cfg, inputs


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("online")  # curate … reward are cached across the three losses


@pytest.mark.parametrize("loss", ["grpo", "rloo", "kto"])
def test_each_loss_runs_end_to_end_and_registers(loss: str, prefect_server: None, in_root: Path,
                                                 shared_work: Path) -> None:
    from mlflow import MlflowClient

    feedback = _feedback(shared_work / "feedback.jsonl")
    overrides = [f"dpo.loss={loss}", f"data.preference=[data/pairs.jsonl, {feedback}]", *ONLINE]
    recipe = load_recipe(SMOKE, overrides)
    result = pipeline(recipe=recipe, work_dir=str(shared_work))
    assert result["registered"]["version"] is not None
    folder = Path(result["stages"]["dpo"]["folder"])
    dpo = read_manifest(folder)
    assert dpo["metrics"]["global_step"] == 2 and dpo["config"]["loss"] == loss
    assert (folder / "adapter" / "adapter_config.json").exists()
    client = MlflowClient(result["tracking_uri"])
    run = client.search_runs([result["experiment_id"]], f"tags.mlflow.parentRunId = '{result['parent_run_id']}' "
                             "and attributes.run_name = 'dpo'")[0]

    def steps(metric: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run.info.run_id, metric)]

    evaluated = read_manifest(Path(result["stages"]["evaluate"]["folder"]))
    evaluate_run = client.search_runs([result["experiment_id"]], f"tags.mlflow.parentRunId = "
                                      f"'{result['parent_run_id']}' and attributes.run_name = 'evaluate'")[0]
    if loss == "kto":  # learned from every rated completion on the policy's side: feedback and both sides of pairs
        tokenized = read_manifest(Path(result["stages"]["tokenize"]["folder"]))["metrics"]
        # reward.pairs: disjoint (the default): the judge learned the other half of the prompts, feedback included
        assert 0 < dpo["metrics"]["kto_unpaired_rows"] < tokenized["preference.unpaired"]
        assert 0 < dpo["metrics"]["trained_pairs"] < tokenized["preference.pairs"]
        # each rating once: every rating of this feedback is also a side of a pair made from it (each prompt is
        # rated up and down), so the rows are the pairs' two sides, not those plus the ratings again
        assert dpo["metrics"]["kto_rows"] == 2 * dpo["metrics"]["trained_pairs"]
        judge = read_manifest(Path(result["stages"]["reward"]["folder"]))["trained_pair_hashes"]
        assert dpo["trained_pair_hashes"] and judge and not set(dpo["trained_pair_hashes"]) & set(judge)
        assert evaluated["judge_independent"] is True
        assert evaluate_run.data.tags["alignflow.judge_independent"] == "true"
        # KTO logs a margin only for a batch that holds both a desirable and an undesirable row (4 shuffled rows)
        assert len(steps("kl")) == 2 and 1 <= len(steps("rewards/margins")) <= 2
        return
    # optimised against the reward model (reward_model is one of dpo.rewards): its win-rates are no evidence
    assert dpo["optimised_against_reward_model"] is True and dpo["trained_pair_hashes"] == []
    assert evaluated["judge_independent"] is False and evaluated["metrics"]["judge_independent"] == 0
    assert evaluate_run.data.tags["alignflow.judge_independent"] == "false"
    assert result["registered"]["alias"] == "challenger"  # smoke's min_win_rate 0.0 is not met without evidence
    assert any("not independent of the policy" in r and "dpo optimised the policy against this reward model" in r
               for r in result["registered"]["gate_reasons"])
    # the per-step metrics the issue names, one value per step, beside TRL's own
    for name in ["reward_mean", "reward_std", "completion_length_mean", "kl", "reward.reward_model_mean",
                 "reward.regex_mean"]:
        assert len(steps(name)) == 2, name
    # `reference` scores only prompts that have a reference answer (the SFT prompts): a step that sampled none
    # has no mean for it
    assert len(steps("reward.reference_mean")) <= 2
    assert all(0.0 <= v <= 1.0 for v in steps("reward.reference_mean"))  # a ROUGE-L F1
    assert steps("reward_mean") == pytest.approx(steps("reward"))  # TRL's own total, renamed
    assert all(0.0 <= v <= 8.0 for v in steps("completion_length_mean"))
    # a table of sampled completions every step, in the stage folder and in the run's artifacts
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/step_00001.json", "samples/step_00002.json"}
    rows = json.loads((folder / "samples" / "step_00002.json").read_text())
    assert rows and {"prompt", "completion", "reward", *(f"reward.{s}" for s in SOURCES)} <= set(rows[0])
    for row in rows:  # the total is the weighted sum of the sources that scored the completion
        parts = [(w, row[f"reward.{s}"]) for s, w in SOURCES.items() if row[f"reward.{s}"] is not None]
        assert row["reward"] == pytest.approx(sum(w * r for w, r in parts), abs=1e-3)
        assert row["reward.regex"] == float(re.fullmatch(".*e.*", row["completion"].strip()) is not None)
    assert dpo["metrics"]["prompts"] > 0 and "reward_mean_last_quarter" in dpo["metrics"]


# Data shapes on their own and together: `pairs` (the seed pairs), `thumbs` (data/thumbs.jsonl: 24 rated answers,
# 10 prompts rated both up and down, 4 rated once) and `both`; each shape's curate ... reward stages are shared by
# its losses. A pair loss on thumbs alone is refused at validation (test_pair_losses_refuse_...).
SHAPES = {"pairs": "data/pairs.jsonl", "thumbs": "data/thumbs.jsonl", "both": "[data/pairs.jsonl, data/thumbs.jsonl]"}
LIBRARY_WARNINGS = ("can be interpreted in multiple ways", "Add type hints to the `predict` method")


@pytest.fixture(scope="module")
def shape_work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {shape: tmp_path_factory.mktemp(f"shape-{shape}") for shape in SHAPES}


@pytest.mark.parametrize("shape,loss", [("pairs", "kto"), ("thumbs", "kto"), ("pairs", "grpo"), ("thumbs", "rloo"),
                                        ("both", "sigmoid"), ("pairs", "sigmoid")])
def test_each_data_shape_runs_through_register(shape: str, loss: str, prefect_server: None, in_root: Path,
                                               shape_work: dict[str, Path]) -> None:
    """kto on pairs alone used to crash (an empty `unpaired` folder that datasets 5.2 cannot load) and kto on thumbs
    alone stopped in tokenize (no held-out pair for the judge). Every shape now trains, is judged by a reward model
    measured on held-out pairs, and registers; no run prints MLflow's two warnings about the dataset source and
    the served model's `predict`."""
    import warnings

    from datasets import load_from_disk

    overrides = [f"dpo.loss={loss}", f"data.preference={SHAPES[shape]}", *(ONLINE if loss in ("grpo", "rloo") else [])]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = pipeline(recipe=load_recipe(SMOKE, overrides), work_dir=str(shape_work[shape]))
    said = [str(w.message) for w in seen if any(text in str(w.message) for text in LIBRARY_WARNINGS)]
    assert not said, said
    assert result["registered"]["version"] is not None
    folders = {s: Path(info["folder"]) for s, info in result["stages"].items()}
    tok = read_manifest(folders["tokenize"])["metrics"]
    dpo = read_manifest(folders["dpo"])["metrics"]
    judged = read_manifest(folders["evaluate"])["metrics"]
    assert tok["preference.pairs"] >= 4 and tok["preference.heldout_pairs"] >= 2
    assert judged["judge_heldout_pairs"] == tok["preference.heldout_pairs"] >= 2  # the judge was measured
    assert read_manifest(folders["reward"])["metrics"]["heldout_pairs"] == tok["preference.heldout_pairs"]
    rated = tok["preference.unpaired"] + tok["preference.unpaired_heldout"]
    if shape == "pairs":
        assert rated == 0 and tok["preference.pairs_from_unpaired"] == 0
        assert len(load_from_disk(str(folders["tokenize"] / "unpaired"))) == 0  # empty, and it loads
    else:
        assert rated == 24 and tok["preference.pairs_from_unpaired"] == 10  # 10 prompts rated up and down
    if loss == "kto":  # the policy's side of the prompts (reward.pairs: disjoint), each rating once
        assert dpo["kto_unpaired_rows"] <= tok["preference.unpaired"] and dpo["trained_pairs"] > 0
        assert dpo["kto_rows"] <= dpo["kto_unpaired_rows"] + 2 * dpo["trained_pairs"]
        if shape == "pairs":
            assert dpo["kto_unpaired_rows"] == 0 and dpo["kto_rows"] == 2 * dpo["trained_pairs"]
        assert dpo["heldout_rated"] > 0 and dpo["global_step"] == 4
    if loss in ("grpo", "rloo"):  # sampled from the shape's prompts (and the SFT prompts)
        prompts = {p[-1]["content"] for p in load_from_disk(str(folders["tokenize"] / "prompts"))["prompt"]}
        source = [r["prompt"] for r in map(json.loads, (ROOT / SHAPES[shape]).read_text().splitlines())]
        assert prompts & set(source) and dpo["prompts"] == len(prompts)


def test_a_regex_reward_gives_the_matching_completion_the_higher_advantage(tmp_path: Path) -> None:
    """Through TRL's own GRPO step: two fixed completions of one prompt (TRL's rollout hook supplies them instead
    of sampling), scored by the stage's regex reward; only one matches, so it gets the positive advantage."""
    import trl
    from datasets import Dataset

    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer
    from alignflow.tasks.lib.rewards import Recorder, RewardSource, reward_functions

    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"]).path
    tok = load_tokenizer(base)
    model = load_causal_lm(base, "float32")
    fixed = ["answer: 42", "no idea, sorry"]  # the regex matches only the first, as a whole
    sources = [RewardSource(regex=r"answer: \d+")]
    recorder = Recorder(["regex"], [1.0])

    def rollout(prompts: list, trainer: object) -> dict:
        ids = [tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"] for p in prompts]
        done = [tok(fixed[i % 2], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for i in range(len(prompts))]
        return {"prompt_ids": ids, "completion_ids": done, "logprobs": None}

    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=2,
                          max_steps=1, max_completion_length=8, beta=0.0, use_cpu=True, bf16=False,
                          report_to=[], logging_steps=1, save_strategy="no", shuffle_dataset=False)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "What is six times seven?"}],
                                  "reference": None}] * 4)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_functions(sources, recorder), args=args,
                              train_dataset=prompts, processing_class=tok, rollout_func=rollout)
    trainer.train()
    completions = [c[0]["content"] if isinstance(c, list) else c for c in trainer._logs["completion"]]
    advantages = list(trainer._logs["advantages"])
    assert sorted(completions) == sorted(fixed)
    by_text = dict(zip(completions, advantages, strict=True))
    assert by_text["answer: 42"] > 0 > by_text["no idea, sorry"]
    assert recorder.rewards["regex"] == [1.0 if c == "answer: 42" else 0.0 for c in recorder.completions]


def test_every_reward_source_is_checked_before_training(tmp_path: Path, in_root: Path) -> None:
    (tmp_path / "bad.json").write_text('{"type": 5}')
    (tmp_path / "good.json").write_text('{"type": "object", "required": ["name"]}')
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **kwargs):\n    return [1.0] * len(prompts)\n"
        "def wrong(prompts):\n    return []\n")
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["data"] = {k: str(ROOT / v) for k, v in recipe["data"].items()}
    recipe["dpo"].update(loss="grpo", num_generations=2, rewards=[
        {"json_schema": "bad.json"}, {"python": "my_rewards:wrong"}, {"python": "absent_module:f"},
        {"json_schema": "missing.json"}, {"regex": "("}, {"python": "my_rewards:short", "weight": 0.5},
        {"json_schema": "good.json"}, "reward_model", {"reference": True, "regex": "x"}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    problems = "\n".join(e.value.problems)
    for expected in ["dpo.rewards[0].json_schema: ", "not a valid JSON Schema",
                     "dpo.rewards[1].python: ", "must take **kwargs",
                     "dpo.rewards[2].python: cannot import 'absent_module'",
                     "dpo.rewards[3].json_schema: no file at 'missing.json'",
                     "dpo.rewards.4: regex '(' does not compile", "dpo.rewards.8: a reward source names exactly one"]:
        assert expected in problems, (expected, problems)
    assert "rewards[5]" not in problems and "rewards[6]" not in problems  # the good ones pass
    recipe["dpo"]["rewards"] = recipe["dpo"]["rewards"][5:8]
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    assert [s.kind for s in loaded.dpo.rewards] == ["python", "json_schema", "reward_model"]
    assert loaded.dpo.rewards[0].python == f"{(tmp_path / 'my_rewards.py').resolve()}:short"  # from the recipe's dir
    assert loaded.dpo.rewards[1].json_schema == str((tmp_path / "good.json").resolve())


def test_pair_losses_refuse_unpaired_only_data_and_suggest_kto(tmp_path: Path, in_root: Path) -> None:
    feedback = _feedback(tmp_path / "feedback.jsonl")
    with pytest.raises(RecipeError) as e:
        load_recipe(SMOKE, [f"data.preference={feedback}"])
    assert any("unpaired feedback" in p and "use dpo.loss: kto" in p for p in e.value.problems), e.value.problems
    assert load_recipe(SMOKE, [f"data.preference={feedback}", "dpo.loss=kto"]).dpo.loss == "kto"
    # one pair among the feedback is enough for a pair loss
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(feedback.read_text() + (ROOT / "data" / "pairs.jsonl").read_text().splitlines()[0] + "\n")
    assert load_recipe(SMOKE, [f"data.preference={mixed}"]).dpo.loss == "sigmoid"


def test_curate_reads_unpaired_feedback_and_tokenize_pairs_it(tmp_path: Path) -> None:
    from alignflow.tasks import curate, tokenize
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.jsonl import read_jsonl

    feedback = _feedback(tmp_path / "feedback.jsonl")
    bad = tmp_path / "bad.jsonl"  # a label that is not a yes/no, and a rated record with no completion
    bad.write_text('{"prompt": "p", "completion": "c", "label": "maybe"}\n{"prompt": "q", "label": true}\n')
    curated = curate.run(curate.CurateConfig(max_drop_fraction=0.9), curate.CurateInputs(
        sft=[ROOT / "data" / "sft.jsonl"], preference=[ROOT / "data" / "pairs.jsonl", feedback, bad],
        eval=[ROOT / "data" / "eval.jsonl"], out_dir=tmp_path / "curated"))
    m = curated["metrics"]
    assert m["preference.unpaired"] == 48  # 24 prompts rated up and down, in three shapes
    assert m["preference.dropped.bad_label"] == 1 and m["preference.dropped.wrong_schema"] >= 1
    rated = list(read_jsonl(tmp_path / "curated" / "unpaired.jsonl"))
    assert sum(r["label"] for r in rated) == 24 and all(isinstance(r["label"], bool) for r in rated)
    assert not any("label" in r for r in read_jsonl(tmp_path / "curated" / "preference.jsonl"))
    synth = tmp_path / "synth"
    synth.mkdir()
    for name in ("sft.jsonl", "preference.jsonl"):
        (synth / name).write_text("")
    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"]).path
    tok = tokenize.run(tokenize.TokenizeConfig(max_length=128), tokenize.TokenizeInputs(
        base=base, curated=tmp_path / "curated", synthesized=synth, out_dir=tmp_path / "tok"))["metrics"]
    assert tok["preference.pairs_from_unpaired"] == 24  # each prompt's thumbs-up vs its thumbs-down
    assert tok["preference.unpaired"] + tok["preference.unpaired_heldout"] == 48
    from datasets import load_from_disk

    prompts = load_from_disk(str(tmp_path / "tok" / "prompts"))
    held = {json.dumps(p) for p in load_from_disk(str(tmp_path / "tok" / "preference_heldout"))["prompt"]}
    assert held and not held & {json.dumps(p) for p in prompts["prompt"]}  # no held-out prompt is sampled from
    evals = {json.dumps(r["prompt"]) for r in read_jsonl(tmp_path / "curated" / "eval.jsonl")}
    assert not evals & {json.dumps(p) for p in prompts["prompt"]}
    assert sum(r is not None for r in prompts["reference"]) >= tok["sft.examples"] * 0.9  # SFT answers kept


def test_the_reward_model_reward_shares_the_policys_base(prefect_server: None, in_root: Path,
                                                         shared_work: Path) -> None:
    """The `reward_model` source scores through the policy's own base (the reward adapter loaded beside the SFT
    adapter), and gives the scores the reward stage's model gives on its own (4-bit base, as in the smoke recipe)."""
    import json as _json

    from peft import PeftModel

    from alignflow.tasks import dpo
    from alignflow.tasks.dpo.judge import reward_model_scorer
    from alignflow.tasks.lib.inference import score_answers
    from alignflow.tasks.lib.models import load_causal_lm, load_reward_model, load_tokenizer

    folders, base = _upstream(shared_work)
    quant = _json.loads((folders["quantize"] / "quantization.json").read_text())
    policy = PeftModel.from_pretrained(load_causal_lm(base, "float32", quant), folders["sft"] / "adapter",
                                       is_trainable=True)
    policy.train()  # as the trainer holds it while it samples and scores
    cfg = dpo.DpoConfig(loss="grpo", rewards=["reward_model"])
    inputs = dpo.DpoInputs(base=base, dtype="float32", tokenized=folders["tokenize"], quantized=folders["quantize"],
                           sft=folders["sft"], reward=folders["reward"], out_dir=shared_work / "unused", seed=0)
    params = sum(p.numel() for p in policy.parameters())
    score = reward_model_scorer(cfg, inputs, quant, policy, full=False)
    assert policy.active_adapters == ["default"] and policy.training  # the policy is left as it was
    from safetensors.torch import load_file

    lora = sum(v.numel() for k, v in load_file(folders["reward"] / "adapter" / "adapter_model.safetensors").items()
               if "lora_" in k)
    assert sum(p.numel() for p in policy.parameters()) - params == lora  # the reward LoRA only: no second base
    prompts = [[{"role": "user", "content": "List the fruits in: 'pears and figs'"}]] * 3
    texts = ["fruits: pear, fig", "I like fruit.", "pears"]
    rm = load_reward_model(base, "float32", folders["reward"] / "adapter", quant)
    alone = score_answers(rm, load_tokenizer(folders["reward"] / "adapter"), prompts, texts)
    assert score(prompts, texts) == pytest.approx(alone, abs=1e-4)
    assert policy.active_adapters == ["default"] and policy.training  # scoring switched nothing for good
    assert len(set(alone)) == 3  # three different scores: the comparison can tell a wrong token or head apart


def test_the_demo_format_reward_accepts_every_reference_answer_and_refuses_chat(in_root: Path) -> None:
    """configs/demo_rewards.py, loaded as the stage loads it: every SFT answer of the four demo tasks is in its
    format (1.0) except the sentence form of sentiment and date answers (0.0: the short form is what the preference
    pairs and references ask for), prompts of no task are not scored (None), and the seed pairs' rejected answers
    mostly are not."""
    from alignflow.tasks.lib.rewards import python_function

    fn = python_function(f"{ROOT / 'configs' / 'demo_rewards.py'}:format_matches_task")
    rows = []
    for line in (ROOT / "data" / "sft.jsonl").read_text().splitlines():
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the seed file's planted defects
        if messages[-1]["role"] == "assistant" and messages[-1]["content"].strip():
            rows.append((messages[:-1], [{"role": "assistant", "content": messages[-1]["content"]}]))
    scores = fn(prompts=[p for p, _ in rows], completions=[c for _, c in rows])
    sentence = [c[-1]["content"].startswith("The ") for _, c in rows]  # the seed data's sentence form
    assert len(rows) > 250 and all(s == (0.0 if t else 1.0) for s, t in zip(scores, sentence, strict=True)
                                   if s is not None)
    assert sum(sentence) > 50
    assert sum(s is not None for s in scores) > 250
    assert fn(prompts=[[{"role": "user", "content": "Write a poem."}]], completions=["roses"]) == [None]
    pairs = [json.loads(line) for line in (ROOT / "data" / "pairs.jsonl").read_text().splitlines()]
    chosen = fn(prompts=[p["prompt"] for p in pairs], completions=[p["chosen"] for p in pairs])
    rejected = fn(prompts=[p["prompt"] for p in pairs], completions=[p["rejected"] for p in pairs])
    assert sum(r == 1.0 for r in rejected) < 0.5 * sum(c == 1.0 for c in chosen)


def _processes_under(folder: Path) -> list[int]:
    """Pids of the processes whose command line names a file in `folder` (a stage's launch files)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder) in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            continue
    return found


# grpo in one process, kto on two (the launch path: every training process must end with the killed stage)
@pytest.mark.parametrize(("loss", "processes"), [("grpo", 1), ("kto", 2)])
def test_kill_9_mid_stage_resumes_from_the_last_checkpoint(loss: str, processes: int, prefect_server: None,
                                                           in_root: Path, shared_work: Path, tmp_path: Path) -> None:
    """The dpo stage's process group killed (-9) after a checkpoint; the stage run again continues from that
    checkpoint (its steps, data order, optimizer, RNG) to the same step count, and its adapter keeps the dtype it
    trained in (bf16 LoRA over the smoke recipe's 4-bit base: the Trainer's reload used to upcast it to fp32).
    On two processes, the killed stage's training processes (torchrun starts them in sessions of their own) end
    with it instead of training on beside the re-run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    from alignflow.tasks import dpo
    from alignflow.tasks.lib.progress import set_progress_reporter
    from alignflow.tasks.lib.training import last_complete_checkpoint

    out = tmp_path / "dpo"
    cfg, inputs = _dpo_alone(loss, shared_work, out, **({"num_processes": 2, "cpu": True} if processes > 1 else {}))
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "inputs.json").write_text(inputs.model_dump_json())
    # the stage's run() in a process of its own (the entry point of launched processes; with launch.num_processes
    # 2 it launches them, as the pipeline's process does)
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.tasks.lib.launch", "alignflow.tasks.dpo",
                             str(tmp_path / "cfg.json"), str(tmp_path / "inputs.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last_complete_checkpoint(out / "checkpoints"):
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it was killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone = time.time() + 3
    while _processes_under(out) and time.time() < gone:
        time.sleep(0.1)
    assert not _processes_under(out), "training processes outlived the killed stage"
    assert not (out / "manifest.json").exists(), "the killed stage's training processes went on and finished it"
    resume_point = last_complete_checkpoint(out / "checkpoints")
    assert resume_point is not None, "the killed stage left no checkpoint to resume from"
    checkpoint = Path(resume_point)
    step = int(checkpoint.name.rsplit("-", 1)[-1])
    assert step in (2, 4)
    trained_dtypes = {v.dtype for v in load_file(checkpoint / "adapter_model.safetensors").values()}
    logged_before = [h for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
                     if "loss" in h]

    reported: list[float] = []  # the progress the stage reports (the pipeline's Prefect progress artifact)
    set_progress_reporter(lambda fraction, detail: reported.append(fraction))
    try:
        manifest = dpo.run(cfg, inputs)
    finally:
        set_progress_reporter(None)
    assert manifest["resumed_from"] == step and manifest["metrics"]["global_step"] == 6
    if processes == 1:  # launched processes report no progress (no Prefect task in them)
        assert reported[0] == pytest.approx((step + 1) / 6) and reported[-1] == 1.0  # trained step+1 .. 6 only
    history = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # each step once: none trained twice
    assert history[:step] == logged_before  # the steps before the kill come from the checkpoint
    assert {v.dtype for v in load_file(out / "adapter" / "adapter_model.safetensors").values()} == trained_dtypes
    assert trained_dtypes == {torch.bfloat16}
    # the whole run's mean loss, not only the resumed steps' (what the Trainer reports after a resume)
    assert manifest["metrics"]["train_loss"] == pytest.approx(sum(h["loss"] for h in history) / 6, abs=1e-5)


def test_grpo_on_two_processes_samples_in_each_and_rank_0_writes(prefect_server: None, in_root: Path,
                                                                  shared_work: Path, tmp_path: Path) -> None:
    """GRPO under `accelerate launch` with two CPU processes (gloo, DDP): each process samples and scores its own
    prompts' completions, every step takes a batch per process (the epoch advances twice as fast as in one
    process), and the main process alone writes the adapter, the sample tables and the manifest."""
    from alignflow.tasks import dpo

    out = tmp_path / "dpo"
    cfg, inputs = _dpo_alone("grpo", shared_work, out, num_processes=2, cpu=True)
    cfg = cfg.model_copy(update={"max_steps": 2, "sample_every": 1})
    manifest = dpo.run(cfg, inputs)
    assert manifest["launch"] == {"num_processes": 2, "strategy": "ddp", "cpu": True}
    assert manifest["metrics"]["global_step"] == 2 and manifest["resumed_from"] is None
    assert "--num_processes 2" in (out / "launch" / "command.txt").read_text()
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "checkpoints").exists()
    # one process would take batch_size / num_generations = 2 of the prompts per step
    first = next(h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h)
    assert first["epoch"] == pytest.approx(2 * 2 / manifest["metrics"]["prompts"], rel=0.05)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00001.json", "step_00002.json"]
