"""Every training option trains on the smoke recipe (tiny model): LoRA variants, QLoRA NF4 / FP4, 8-bit,
target modules, gradient checkpointing + accumulation, packing, schedules, DPO loss variants, SimPO and ORPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    "rslora-qv": (["sft.lora.use_rslora=true", "sft.lora.target_modules=[q_proj,v_proj]"], "sft"),
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
def shared_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("options")  # one work dir: curate/synthesize/tokenize are cached across cases


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
    sft = read_manifest(Path(result["stages"]["sft"]["folder"]))
    assert sft["metrics"]["global_step"] == recipe.sft.max_steps
    assert sft["metrics"]["train_loss"] > 0
    adapter = json.loads((Path(result["stages"]["sft"]["folder"]) / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] == recipe.sft.lora.use_dora and adapter["use_rslora"] == recipe.sft.lora.use_rslora
    if case == "rslora-qv":
        assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert sft["quantized"] == (recipe.quantize.bits is not None)
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
