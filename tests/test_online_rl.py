"""Online RL (GRPO, RLOO) and unpaired feedback (KTO) in the preference stage, on the smoke recipe's tiny model:
each loss runs the whole pipeline and registers a version; the rewards reach TRL's advantages; unpaired
feedback records go through curate into KTO; every reward source is checked before training starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

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

    if loss == "kto":  # learned from every rated completion: the feedback and both sides of every pair
        tokenized = read_manifest(Path(result["stages"]["tokenize"]["folder"]))["metrics"]
        assert dpo["metrics"]["kto_unpaired_rows"] == tokenized["preference.unpaired"] > 0
        assert dpo["metrics"]["kto_rows"] == tokenized["preference.unpaired"] + 2 * tokenized["preference.pairs"]
        assert len(steps("kl")) == 2 and len(steps("rewards/margins")) == 2
        return
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
    from alignflow.tasks.lib.inference import score_answers
    from alignflow.tasks.lib.models import load_causal_lm, load_reward_model, load_tokenizer

    feedback = _feedback(shared_work / "feedback.jsonl")  # the data of the runs above: their stages are cached
    result = pipeline(recipe=load_recipe(SMOKE, [f"data.preference=[data/pairs.jsonl, {feedback}]"]),
                      work_dir=str(shared_work), until="reward")
    folders = {s: Path(info["folder"]) for s, info in result["stages"].items()}
    base = next((shared_work / "base").glob("tiny-*"))
    quant = _json.loads((folders["quantize"] / "quantization.json").read_text())
    policy = PeftModel.from_pretrained(load_causal_lm(base, "float32", quant), folders["sft"] / "adapter",
                                       is_trainable=True)
    policy.train()  # as the trainer holds it while it samples and scores
    cfg = dpo.DpoConfig(loss="grpo", rewards=["reward_model"])
    inputs = dpo.DpoInputs(base=base, dtype="float32", tokenized=folders["tokenize"], quantized=folders["quantize"],
                           sft=folders["sft"], reward=folders["reward"], out_dir=shared_work / "unused", seed=0)
    params = sum(p.numel() for p in policy.parameters())
    score = dpo._reward_model_scorer(cfg, inputs, quant, policy, full=False)
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
