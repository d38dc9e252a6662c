"""Every training option trains on the smoke recipe (tiny model): LoRA variants, QLoRA NF4 / FP4, 8-bit,
target modules, gradient checkpointing + accumulation, packing, schedules, DPO loss variants, SimPO and ORPO."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import load_recipe
from alignflow.tasks.lib.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "lora-plain": (["quantize.bits=null"], "sft"),
    "qlora-fp4": (["quantize.bits=4", "quantize.quant_type=fp4", "quantize.double_quant=false"], "sft"),
    "int8": (["quantize.bits=8"], "sft"),
    "dora": (["quantize.bits=null", "sft.lora.use_dora=true"], "sft"),
    # with keep: best (the pipeline's wiring: the held-out SFT rows, MLflow's kept_step)
    "rslora-qv": (["sft.lora.use_rslora=true", "sft.lora.target_modules=[q_proj,v_proj]", "sft.keep=best",
                   "sft.eval_steps=3"], "sft"),
    "checkpointing-accum": (["sft.gradient_checkpointing=true", "sft.grad_accum=2"], "sft"),
    "packing-eager-cosine": (["tokenize.packing=true", "sft.attn_implementation=eager", "sft.scheduler=cosine",
                              "sft.warmup_ratio=0.2"], "sft"),
    "dpo-ipo": (["dpo.loss=ipo"], "dpo"),
    "dpo-hinge": (["dpo.loss=hinge", "dpo.beta=0.5"], "dpo"),
    "simpo": (["dpo.loss=simpo", "dpo.beta=2.0", "dpo.simpo_gamma=0.5"], "dpo"),
    "orpo": (["dpo.loss=orpo"], "dpo"),
    "llm-judge": (["evaluate.judge=true"], "evaluate"),
}


@pytest.fixture(scope="module")
def shared_work(smoke_seed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One work dir: curate/synthesize/tokenize are cached across cases. It starts as a warm copy of the session's
    smoke seed (tests/conftest.py), so the plain smoke stages a case does not change (the dpo and evaluate cases'
    sft and reward, for one) come from its cache; each case's own stage is trained here, and checked as before."""
    from conftest import warm_copy  # tests/ is on sys.path under pytest

    return warm_copy(smoke_seed, tmp_path_factory.mktemp("options"))


@pytest.mark.parametrize("case", list(CASES))
def test_option_trains(case: str, prefect_server: None, in_root: Path, shared_work: Path,
                       caplog: pytest.LogCaptureFixture) -> None:
    overrides, until = CASES[case]
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml", overrides)
    with caplog.at_level("WARNING", logger="alignflow"):
        result = pipeline(recipe=recipe, work_dir=str(shared_work), until=until)
    # packing under eager attention is slower than padding (bench P4): said once, and only then
    warned = [r for r in caplog.records if "packing with attn_implementation 'eager'" in r.getMessage()]
    assert len(warned) == (case == "packing-eager-cosine")
    # the shared work dir starts as a warm copy of the smoke seed: this option's own stage must have run here
    assert not result["stages"][until]["cached"], f"{case}: {until} came from the cache"
    sft = read_manifest(Path(result["stages"]["sft"]["folder"]))
    assert sft["metrics"]["global_step"] == recipe.sft.max_steps
    assert sft["metrics"]["train_loss"] > 0
    adapter = json.loads((Path(result["stages"]["sft"]["folder"]) / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] == recipe.sft.lora.use_dora and adapter["use_rslora"] == recipe.sft.lora.use_rslora
    if case == "rslora-qv":
        assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert sft["quantized"] == (recipe.quantize.bits is not None)
    history = json.loads((Path(result["stages"]["sft"]["folder"]) / "log_history.json").read_text())
    losses = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    if recipe.sft.keep == "last":  # today's behaviour: no evaluation, the last step's weights
        assert not losses and (sft["kept_step"], sft["kept_by"]) == (recipe.sft.max_steps, "last")
    else:  # evaluated at steps 3 and 6; the lower held-out loss chose the step, and MLflow's run records it
        from mlflow import MlflowClient

        assert sorted(losses) == [3, 6] and sft["kept_step"] == min(losses, key=losses.get)
        assert sft["kept_by"] == "eval_loss" and sft["metrics"]["heldout_examples"] > 0
        run = MlflowClient(result["tracking_uri"]).search_runs(
            [result["experiment_id"]], f"tags.mlflow.parentRunId = '{result['parent_run_id']}' and "
            "attributes.run_name = 'sft'")[0]
        assert run.data.metrics["kept_step"] == sft["kept_step"]
        assert [m.step for m in MlflowClient(result["tracking_uri"]).get_metric_history(run.info.run_id,
                                                                                       "eval_loss")] == [3, 6]
    if until == "evaluate":  # every prompt judged in both orders; each scores 0, 1/2 (orders disagree) or 1
        from alignflow.tasks.lib.teacher import JUDGE_PROMPT

        evaluated = Path(result["stages"]["evaluate"]["folder"])
        metrics = read_manifest(evaluated)["metrics"]
        rows = [json.loads(line) for line in (evaluated / "samples.jsonl").read_text().splitlines()]
        asks = {JUDGE_PROMPT.format(question=r["prompt"], a=a, b=b)
                for r in rows for a, b in ((r["base"], r["tuned"]), (r["tuned"], r["base"]))}
        assert len((evaluated / "judge.jsonl").read_text().splitlines()) == len(asks)  # both orders, each asked once
        n = int(metrics["eval_examples"])
        assert (2 * n * metrics["judge_win_rate_vs_base"]) == pytest.approx(round(2 * n * metrics[
            "judge_win_rate_vs_base"]), abs=1e-3)
    if until == "dpo":
        dpo = read_manifest(Path(result["stages"]["dpo"]["folder"]))
        assert dpo["metrics"]["global_step"] == recipe.dpo.max_steps
        assert dpo["config"]["loss"] == recipe.dpo.loss
        history = json.loads((Path(result["stages"]["dpo"]["folder"]) / "log_history.json").read_text())
        steps = [h for h in history if "rewards/chosen" in h]
        assert len(steps) == recipe.dpo.max_steps
        if case == "orpo":  # ORPOTrainer's own quantities
            assert all("log_odds_ratio" in h and "nll_loss" in h for h in steps)
        if case == "simpo":  # CPOTrainer with SimPO: reward = beta * log-prob averaged over the answer's tokens
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(Path(result["stages"]["tokenize"]["folder"]) / "tokenizer"))
            for h in steps:
                assert h["rewards/chosen"] == pytest.approx(recipe.dpo.beta * h["logps/chosen"], rel=1e-3)
                # a per-token mean stays near log(vocab) (6.9 nats here, 6.8 seen); a sum over the answers (3+
                # tokens, as sigmoid-CPO takes it) would be several times that
                assert -h["logps/chosen"] < 1.5 * math.log(vocab)


def test_reference_logprobs_are_computed_once_and_reused_by_a_run_with_another_beta(
        prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    work = tmp_path / "w"
    first = load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.precompute_ref_log_probs=true"])
    second = load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.precompute_ref_log_probs=true", "dpo.beta=0.3"])
    for recipe, reused in ((first, False), (second, True)):
        result = pipeline(recipe=recipe, work_dir=str(work), until="dpo")
        folder = Path(result["stages"]["dpo"]["folder"])
        dpo = read_manifest(folder)
        assert dpo["metrics"]["global_step"] == recipe.dpo.max_steps
        assert dpo["ref_logprobs_cached"] is reused  # computed by the first run, loaded by the second
        # before the first update the policy is the reference: with the right reference log-probs attached to
        # the right pairs, the implicit rewards of the first step are zero, up to float noise (other padding
        # in the precompute batches, 4-bit kernels); a pair given another pair's values is off by whole nats
        first_step = json.loads((folder / "log_history.json").read_text())[0]
        for side in ("chosen", "rejected"):
            assert abs(first_step[f"rewards/{side}"]) / recipe.dpo.beta < 0.05  # nats
        client = MlflowClient(result["tracking_uri"])
        runs = client.search_runs([result["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{result['parent_run_id']}' and "
                                  "attributes.run_name = 'dpo'")
        assert runs[0].data.tags["alignflow.ref_logprobs_cached"] == str(reused).lower()
    # one file for the training pairs and one for the held-out pairs (the metrics), both reused by the second run
    assert len(list((work / "cache" / "ref_logps").glob("ref-logps-*.safetensors"))) == 2


def test_full_fine_tune_goes_through_every_stage(prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    """sft.method: full trains every weight; dpo tunes an adapter over it and merges it; evaluate compares with
    a full champion; the registry serves the full weights; export copies them and refuses an adapter."""
    import subprocess
    import sys

    import mlflow
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    work = tmp_path / "w"
    overrides = ["sft.method=full", "quantize.bits=null", "sft.lr=1e-3", "register.model_name=smoke-full"]
    first = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", overrides), work_dir=str(work))
    sft_dir, dpo_dir = (Path(first["stages"][s]["folder"]) for s in ("sft", "dpo"))
    assert (sft_dir / "model" / "config.json").exists() and not (sft_dir / "adapter").exists()
    base = AutoModelForCausalLM.from_pretrained(next((work / "base").glob("tiny-*")))
    assert read_manifest(sft_dir)["metrics"]["trainable_params"] == sum(p.numel() for p in base.parameters())
    sft_model = AutoModelForCausalLM.from_pretrained(sft_dir / "model")
    moved = [n for (n, p), q in zip(base.named_parameters(), sft_model.parameters(), strict=True)
             if not torch.equal(p, q)]
    assert len(moved) == len(list(base.parameters()))  # every tensor trained, not just adapter targets

    # with model.dtype bfloat16 the master weights stay fp32 (AdamW updating bf16 weights loses small steps)
    bf16 = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", [*overrides, "model.dtype=bfloat16"]),
                    work_dir=str(work), until="sft")
    from safetensors import safe_open

    with safe_open(str(Path(bf16["stages"]["sft"]["folder"]) / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118

    assert (dpo_dir / "model" / "config.json").exists() and not (dpo_dir / "adapter").exists()
    dpo_model = AutoModelForCausalLM.from_pretrained(dpo_dir / "model")
    assert any(not torch.equal(p, q) for p, q in zip(sft_model.parameters(), dpo_model.parameters(), strict=True))
    assert first["registered"]["alias"] == "champion"

    # a second candidate (another beta) is evaluated against the full champion's own weights
    second = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", [*overrides, "dpo.beta=0.3"]),
                      work_dir=str(work))
    evaluated = Path(second["stages"]["evaluate"]["folder"])
    rows = [json.loads(line) for line in (evaluated / "samples.jsonl").read_text().splitlines()]
    assert rows and all("champion" in r for r in rows)  # the champion's own answers, scored by the judge
    wins = [0.5 if r["tuned"] == r["champion"] or r["reward_tuned"] == r["reward_champion"]
            else float(r["reward_tuned"] > r["reward_champion"]) for r in rows]
    # (rewards are rounded to 4 decimals in the table: allow one prompt's worth of difference)
    assert read_manifest(evaluated)["metrics"]["win_rate_vs_champion"] == pytest.approx(sum(wins) / len(wins),
                                                                                          abs=1.01 / len(rows))
    assert [p.name for p in (work / "champions").glob("smoke-full-v1-*/model/config.json")]

    client = MlflowClient(first["tracking_uri"])
    assert client.get_model_version("smoke-full", "1").tags["alignflow.weights"] == "full"
    mlflow.set_tracking_uri(first["tracking_uri"])
    served = mlflow.pyfunc.load_model("models:/smoke-full/1")
    answers = served.predict(["List the fruits in: 'pears and figs'", "hi"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "alignflow.cli", *args, "--work-dir", str(work)],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)

    proc = cli("export", "models:/smoke-full/1", "--merged", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(torch.equal(p, q) for p, q in zip(exported.parameters(), dpo_model.parameters(), strict=True))
    proc = cli("export", "models:/smoke-full/1", "--adapter", str(tmp_path / "a"))
    assert proc.returncode != 0 and "full fine-tune" in proc.stderr + proc.stdout

    # retraining from the full champion starts where the champion's training ended, not from the base
    champion = next((work / "champions").glob("smoke-full-v1-*")) / "model"
    again = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", overrides), work_dir=str(work),
                     until="sft", init_adapter=str(champion))
    first_losses = [h["loss"] for h in json.loads((sft_dir / "log_history.json").read_text()) if "loss" in h]
    again_start = json.loads((Path(again["stages"]["sft"]["folder"]) / "log_history.json").read_text())[0]["loss"]
    assert abs(again_start - first_losses[-1]) < abs(again_start - first_losses[0]), (first_losses, again_start)
    with pytest.raises(Exception, match="holds full weights"):  # a LoRA recipe cannot continue full weights
        pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", ["quantize.bits=null"]), work_dir=str(work),
                 until="sft", init_adapter=str(champion))


# --- keep: best (issue 29): the stages' own run() on the tiny model, no pipeline -------------------------------

@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the training stages read, made without a pipeline: the tiny base, tokenize's folder (the first 120 SFT
    records and 80 pairs of data/) and a quantize folder asking for no quantization."""
    from alignflow.tasks import tokenize
    from alignflow.tasks.lib.base_model import resolve_base

    tmp = tmp_path_factory.mktemp("keep")
    base = resolve_base("tiny:llama", tmp / "base", [ROOT / "data" / "sft.jsonl"]).path
    curated, synthesized, quantized = tmp / "curated", tmp / "synthesized", tmp / "quantized"
    for folder in (curated, synthesized, quantized):
        folder.mkdir()
    (curated / "sft.jsonl").write_text("".join((ROOT / "data" / "sft.jsonl").read_text().splitlines(True)[:120]))
    pairs = [json.loads(line) for line in (ROOT / "data" / "pairs.jsonl").read_text().splitlines()[:80]]
    (curated / "preference.jsonl").write_text("".join(
        json.dumps({**p, "prompt": [{"role": "user", "content": p["prompt"]}]}) + "\n" for p in pairs))
    for name in ("sft.jsonl", "preference.jsonl"):
        (synthesized / name).write_text("")
    (quantized / "quantization.json").write_text("{}")
    tokenize.run(tokenize.TokenizeConfig(max_length=128), tokenize.TokenizeInputs(
        base=base, curated=curated, synthesized=synthesized, out_dir=tmp / "tokenized", sft_heldout=True))
    return {"base": base, "tokenized": tmp / "tokenized", "quantized": quantized}


# Full fine-tuning of the tiny model, warming up to a learning rate it diverges at: the held-out loss falls for the
# first steps, then climbs far above (measured: lowest at step 2 of 8, 5.5 nats, then 9-11)
DIVERGING = {"method": "full", "max_steps": 8, "batch_size": 8, "lr": 0.5, "scheduler": "constant_with_warmup",
             "warmup_ratio": 0.5, "keep": "best", "eval_steps": 1}


def _sft_inputs(upstream: dict[str, Path], out: Path) -> Any:
    from alignflow.tasks import sft

    return sft.SftInputs(base=upstream["base"], dtype="float32", tokenized=upstream["tokenized"],
                         quantized=upstream["quantized"], out_dir=out, seed=0)


def _evals(folder: Path, key: str) -> dict[int, float]:
    return {h["step"]: h[key] for h in json.loads((folder / "log_history.json").read_text()) if key in h}


@pytest.fixture(scope="module")
def best_sft(upstream: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted keep: best run with the diverging learning rate; its checkpoints are kept for comparison."""
    from types import SimpleNamespace

    from alignflow.tasks import sft

    out = tmp_path_factory.mktemp("best") / "sft"
    with pytest.MonkeyPatch.context() as m:  # the stage deletes its checkpoints at the end: not this once
        m.setattr(sft, "shutil", SimpleNamespace(rmtree=lambda *a, **k: None))
        manifest = sft.run(sft.SftConfig(**DIVERGING), _sft_inputs(upstream, out))
    return {"manifest": manifest, "folder": out}


def test_sft_keep_best_hands_on_the_best_held_out_step_not_the_last(best_sft: dict[str, Any],
                                                                    upstream: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    manifest, folder = best_sft["manifest"], best_sft["folder"]
    losses = _evals(folder, "eval_loss")
    last = manifest["metrics"]["global_step"]
    assert sorted(losses) == list(range(1, last + 1))  # evaluated every eval_steps (1)
    kept = manifest["kept_step"]
    assert kept == min(losses, key=losses.get) and kept != last and losses[kept] < losses[last] - 1.0
    assert manifest["kept_by"] == "eval_loss" and manifest["metrics"]["kept_step"] == kept
    assert manifest["metrics"]["kept_eval_loss"] == pytest.approx(losses[kept])
    # the product is the kept checkpoint's weights, not the last step's
    product = load_file(str(folder / "model" / "model.safetensors"))
    at_kept = load_file(str(folder / "checkpoints" / f"checkpoint-{kept}" / "model.safetensors"))
    at_last = load_file(str(folder / "checkpoints" / f"checkpoint-{last}" / "model.safetensors"))
    assert sorted(product) == sorted(at_kept)
    assert all(torch_equal(product[k], at_kept[k]) for k in product)
    assert not all(torch_equal(product[k], at_last[k]) for k in product)
    # loss.png marks the kept step: the same curves drawn without the mark make another picture
    from alignflow.tasks.lib.training import plot_curves

    history = json.loads((folder / "log_history.json").read_text())
    unmarked, marked = folder / "unmarked.png", folder / "marked.png"
    plot_curves(unmarked, history, ["loss", "eval_loss", "learning_rate", "grad_norm"], "sft")
    plot_curves(marked, history, ["loss", "eval_loss", "learning_rate", "grad_norm"], "sft", kept_step=kept)
    assert (folder / "loss.png").read_bytes() == marked.read_bytes() != unmarked.read_bytes()
    # the held-out rows were measured, not trained on
    held = read_manifest(upstream["tokenized"])["sft_heldout_rows"]
    assert manifest["metrics"]["heldout_examples"] == len(held) > 0


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_kill_9_during_a_keep_best_sft_run_then_rerun_keeps_the_same_step(
        best_sft: dict[str, Any], upstream: dict[str, Path], tmp_path: Path) -> None:
    """Killed after a checkpoint past the best step: the re-run resumes there and still keeps the best step, which
    only the checkpoint's trainer state remembers (the steps after it are all worse)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from alignflow.tasks import sft
    from alignflow.tasks.lib.training import last_complete_checkpoint

    kept = best_sft["manifest"]["kept_step"]
    out = tmp_path / "sft"
    cfg, inputs = sft.SftConfig(**DIVERGING), _sft_inputs(upstream, out)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "inputs.json").write_text(inputs.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "alignflow.tasks.lib.launch", "alignflow.tasks.sft",
                             str(tmp_path / "cfg.json"), str(tmp_path / "inputs.json")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    past_best = kept + 2
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = last_complete_checkpoint(out / "checkpoints")
        if found and int(found.rsplit("-", 1)[-1]) >= past_best:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before a checkpoint past the best step was written"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()

    manifest = sft.run(cfg, inputs)
    assert manifest["resumed_from"] is not None and manifest["resumed_from"] >= past_best
    assert manifest["kept_step"] == kept and manifest["kept_by"] == "eval_loss"
    losses = _evals(out, "eval_loss")  # the history before the kill came back with the checkpoint
    assert sorted(losses) == list(range(1, DIVERGING["max_steps"] + 1)) and min(losses, key=losses.get) == kept


def test_reward_keep_best_hands_on_the_most_accurate_step(upstream: dict[str, Path], tmp_path: Path) -> None:
    from alignflow.tasks import reward

    out = tmp_path / "reward"
    # 10 steps asked; early stopping after 2 evaluations without a higher accuracy ends the run at step 6 (the
    # accuracy was 1.0 at step 2 already: nothing can beat it)
    manifest = reward.run(reward.RewardConfig(max_steps=10, batch_size=8, lr=5e-3, keep="best", eval_steps=2,
                                              early_stopping_patience=2),
                          reward.RewardInputs(base=upstream["base"], dtype="float32", tokenized=upstream["tokenized"],
                                              quantized=upstream["quantized"], out_dir=out, seed=0))
    accuracy, margin = _evals(out, "eval_accuracy"), _evals(out, "eval_margin")
    assert sorted(accuracy) == [2, 4, 6] and manifest["metrics"]["global_step"] == 6  # stopped early
    kept = manifest["kept_step"]
    assert kept == max(accuracy, key=accuracy.get)  # the first of the most accurate (ties keep the earlier)
    assert manifest["kept_by"] == "eval_accuracy" and manifest["metrics"]["kept_step"] == kept
    # the product is the kept step's model: its held-out margin, scored after training, is that step's evaluation
    # (measured: kept step 2 with margin 0.24, the last step 1.31)
    assert kept != 6
    assert abs(manifest["metrics"]["heldout_margin_mean"] - margin[kept]) < 0.02 < abs(
        manifest["metrics"]["heldout_margin_mean"] - margin[6])


def test_the_recipe_refuses_keep_settings_that_make_no_sense_listing_every_problem(in_root: Path) -> None:
    from alignflow.recipe import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "configs" / "smoke.yaml", ["sft.eval_steps=0", "sft.early_stopping_patience=2",
                                                      "reward.keep=best", "reward.eval_steps=10", "seed=x"])
    problems = "\n".join(e.value.problems)
    assert "sft.eval_steps: Input should be greater than or equal to 1" in problems
    assert "sft.early_stopping_patience: 2 needs sft.keep: best" in problems
    assert "reward.eval_steps: 10 is more than reward.max_steps (4)" in problems  # keep: best would never evaluate
    assert "seed:" in problems  # listed with the rest of the recipe's problems
    # the same checks when every key is valid on its own (the recipe-wide check, as a deployment's form meets it)
    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "configs" / "smoke.yaml", ["reward.early_stopping_patience=1", "sft.keep=best"])
    assert "reward.early_stopping_patience: 1 needs reward.keep: best" in e.value.problems[0]
    assert "sft.eval_steps: 50 is more than sft.max_steps (6)" in e.value.problems[0]
    assert load_recipe(ROOT / "configs" / "smoke.yaml", ["sft.keep=best", "sft.eval_steps=2",
                                                         "sft.early_stopping_patience=2"]).sft.keep == "best"


def test_dpo_keep_best_hands_on_the_step_with_the_best_held_out_reward_accuracy(upstream: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    import shutil
    from types import SimpleNamespace

    from alignflow.recipe import RecipeError
    from alignflow.tasks import dpo, sft

    sft.run(sft.SftConfig(lora={"r": 8, "alpha": 16, "dropout": 0.0}, max_steps=1, batch_size=8),
            _sft_inputs(upstream, tmp_path / "sft"))
    out = tmp_path / "dpo"
    with pytest.MonkeyPatch.context() as m:  # keep the checkpoints (the stage deletes them at its end)
        m.setattr(dpo, "shutil", SimpleNamespace(rmtree=lambda path, **k: None if Path(path).name == "checkpoints"
                                                 else shutil.rmtree(path, **k)))
        manifest = dpo.run(dpo.DpoConfig(max_steps=6, batch_size=4, lr=5e-3, keep="best", eval_steps=2),
                           dpo.DpoInputs(base=upstream["base"], dtype="float32", tokenized=upstream["tokenized"],
                                         quantized=upstream["quantized"], sft=tmp_path / "sft", out_dir=out, seed=0))
    accuracy = _evals(out, "eval_rewards/accuracies")
    assert sorted(accuracy) == [2, 4, 6]  # evaluated every eval_steps; no extra evaluation after training
    kept = manifest["kept_step"]
    assert kept == max(accuracy, key=accuracy.get)  # the first of the most accurate (ties keep the earlier)
    assert manifest["kept_by"] == "eval_rewards/accuracies" and manifest["metrics"]["kept_step"] == kept
    assert kept != 6  # measured: accuracy 1.0 at step 2, 0.94 at steps 4 and 6
    # the product is the kept checkpoint's adapter, not the last step's
    from safetensors.torch import load_file

    product = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    at_kept, at_last = (load_file(str(out / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
                        for step in (kept, 6))
    assert sorted(product) == sorted(at_kept) and all(torch_equal(product[k], at_kept[k]) for k in product)
    assert not all(torch_equal(product[k], at_last[k]) for k in product)
    # the held-out metrics are the kept step's evaluation, not the last step's
    margins = _evals(out, "eval_rewards/margins")
    assert manifest["metrics"]["reward_accuracy"] == pytest.approx(accuracy[kept], abs=1e-5)
    assert manifest["metrics"]["reward_margin"] == pytest.approx(margins[kept], abs=1e-5)
    # online losses have no held-out pairs to choose by: refused
    with pytest.raises(RecipeError, match="keep: best chooses a checkpoint by held-out pairs"):
        load_recipe(ROOT / "configs" / "smoke.yaml", ["dpo.loss=grpo", "dpo.keep=best", "dpo.eval_steps=2"])


def test_sft_holds_out_the_prompts_the_pairs_hold_out_and_at_least_two_rows() -> None:
    from alignflow.tasks.lib.pairs import prompt_key
    from alignflow.tasks.tokenize import MIN_SFT_HELDOUT, _held_out, _sft_heldout_rows

    def key(i: int) -> str:
        return prompt_key([{"role": "user", "content": f"question {i}"}])

    keys = [key(i) for i in range(40)] + [key(3)]  # two rows of prompt 3
    by_hash = [i for i in range(41) if _held_out([{"role": "user", "content": f"question {i % 40}"}], 0.15)]
    held = _sft_heldout_rows(keys, {key(3)}, 0.15)
    assert {3, 40} <= set(held) and set(by_hash) <= set(held)  # the pairs' held-out prompt, every row of it
    assert set(held) == set(by_hash) | {3, 40}  # and otherwise the prompt-hash rule, nothing more
    # a small data set: the prompts with the next-lowest hashes join until MIN_SFT_HELDOUT rows, while 2 train
    few = [key(i) for i in range(5)]
    assert len(_sft_heldout_rows(few, set(), 0.01)) == MIN_SFT_HELDOUT
    assert _sft_heldout_rows(few[:2], set(), 0.01) == []  # nothing to spare: tokenize refuses keep: best then
    # a retrain: a prompt the continued weights' lineage trained on is never held out, by hash or to fill up
    trained = {keys[i] for i in by_hash}
    assert not set(_sft_heldout_rows(keys, set(), 0.15, trained)) & set(by_hash)
    assert not {few[i] for i in _sft_heldout_rows(few, set(), 0.01, set(few[:2]))} & set(few[:2])
