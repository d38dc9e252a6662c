"""Gate, registry aliases, promote / rollback, compare and export, against a real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import warm_copy  # tests/ is on sys.path under pytest
from mlflow import MlflowClient

from alignflow.flows.pipeline import pipeline
from alignflow.recipe import Recipe, load_recipe
from alignflow.tasks.register import GateConfig, gate

ROOT = Path(__file__).resolve().parents[1]


def test_gate_decides_on_interval_bounds() -> None:
    good = {"win_rate_vs_base": 0.8, "win_rate_vs_base_ci_low": 0.66, "win_rate_vs_base_ci_high": 0.9,
            "rougeL_gain": 0.3, "rougeL_gain_ci_low": 0.2, "rougeL_gain_ci_high": 0.4,
            "judge_heldout_accuracy": 0.9, "judge_heldout_accuracy_ci_low": 0.8, "judge_heldout_pairs": 35}
    reasons, decided = gate(GateConfig(), good, True)
    assert reasons == [] and any("win_rate_vs_base_ci_low=0.66 > min_win_rate=0.5" in d for d in decided)
    # a good point estimate with a wide interval is not enough: the lower bound decides
    wide = {**good, "win_rate_vs_base_ci_low": 0.45}
    said = " ".join(gate(GateConfig(), wide, True)[0])
    assert "win_rate_vs_base_ci_low=0.45 does not exceed min_win_rate=0.5" in said
    # a judge whose held-out accuracy may be chance (its lower bound) is not trusted; a missing one neither
    assert "not trusted" in " ".join(gate(GateConfig(), {**good, "judge_heldout_accuracy_ci_low": 0.55}, True)[0])
    assert "not trusted" in " ".join(gate(GateConfig(), {**good, "judge_heldout_accuracy_ci_low": float("nan")},
                                          True)[0])
    assert gate(GateConfig(min_judge_accuracy=None), {**good, "judge_heldout_accuracy_ci_low": 0.55}, True)[0] == []

    champion = {**good, "win_rate_vs_champion": 0.7, "win_rate_vs_champion_ci_low": 0.55,
                "win_rate_vs_champion_ci_high": 0.8, "rougeL_delta_ci_low": -0.01, "rougeL_delta_ci_high": 0.05,
                "perplexity_delta_ci_low": -0.2, "perplexity_delta_ci_high": 0.3}
    cfg = GateConfig(min_win_rate=0.9, max_regression={"rougeL": 0.05, "perplexity": 0.1}, require_decontaminated=True)
    text = " | ".join(gate(cfg, champion, False)[0])
    assert "win_rate_vs_base_ci_low=0.66 does not exceed min_win_rate=0.9" in text
    assert "rougeL" not in text  # its loss is at most 0.01, within 0.05
    assert "perplexity may have regressed by up to 0.3000" in text  # lower is better: the upper bound of a rise
    assert "did not decontaminate" in text
    assert len(gate(cfg, champion, False)[0]) == 3
    assert gate(GateConfig(max_regression={"rougeL": 0.0}), champion, True)[0]  # the loss may reach 0.01 > 0
    with pytest.raises(ValueError, match="unknown metric"):
        GateConfig(max_regression={"vibes": 0.1})
    # harness metrics gate like the others; their direction comes from the harness (higher_is_better)
    harness = {**champion, "lm_eval.arc_easy.acc_delta_ci_low": -0.03, "lm_eval.arc_easy.acc_delta_ci_high": 0.02,
               "lm_eval.arc_easy.acc_higher_is_better": 1.0, "lm_eval.wiki.word_perplexity_delta_ci_low": -0.5,
               "lm_eval.wiki.word_perplexity_delta_ci_high": 0.4, "lm_eval.wiki.word_perplexity_higher_is_better": 0.0}
    rules = GateConfig(max_regression={"lm_eval.arc_easy.acc": 0.01, "lm_eval.wiki.word_perplexity": 0.5})
    said = " | ".join(gate(rules, harness, True)[0])
    assert "lm_eval.arc_easy.acc may have regressed by up to 0.0300" in said and "word_perplexity" not in said
    said = " | ".join(gate(GateConfig(max_regression={"lm_eval.wiki.word_perplexity": 0.3}), harness, True)[0])
    assert "lm_eval.wiki.word_perplexity may have regressed by up to 0.4000" in said  # lower is better: the rise
    assert "not measured against the champion" in " ".join(gate(rules, champion, True)[0])  # absent: fails closed


def test_a_tie_with_the_champion_is_not_promoted() -> None:
    """Identical answers to every prompt: win-rate exactly 0.5 with no spread, which used to meet 0.5."""
    from alignflow.tasks.lib.stats import mean_ci, win_scores

    answers = ["sentiment: positive"] * 48
    wins = win_scores(answers, [1.0] * 48, answers, [1.0] * 48)
    low, high = mean_ci(wins)
    assert (low, high) == (0.5, 0.5)
    tie = {"win_rate_vs_base": 0.9, "win_rate_vs_base_ci_low": 0.8, "judge_heldout_accuracy_ci_low": 0.9,
           "rougeL_gain_ci_low": 0.1, "win_rate_vs_champion": 0.5, "win_rate_vs_champion_ci_low": low,
           "win_rate_vs_champion_ci_high": high}
    reasons, _ = gate(GateConfig(), tie, True)
    assert reasons and "not measurably better than the champion" in reasons[0]


def test_a_candidate_that_ties_the_base_is_not_promoted() -> None:
    """Answers identical to the base's: win-rate 0.5 with no spread and no ROUGE gain. Nothing was learned."""
    tie = {"win_rate_vs_base": 0.5, "win_rate_vs_base_ci_low": 0.5, "win_rate_vs_base_ci_high": 0.5,
           "rougeL_gain_ci_low": 0.0, "judge_heldout_accuracy_ci_low": 0.9}
    reasons = " ".join(gate(GateConfig(), tie, True)[0])
    assert "win_rate_vs_base_ci_low=0.5 does not exceed min_win_rate=0.5" in reasons
    assert "rougeL_gain_ci_low=0.0 does not exceed min_rougeL_gain=0.0" in reasons


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if args[0] == "run" and PREFECT_API_URL.value():  # the session's server: no temporary one per command
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return subprocess.run([sys.executable, "-m", "alignflow.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_challenger_promote_rollback_compare_export(prefect_server: None, in_root: Path, tmp_path: Path) -> None:
    # the shipped lm-eval task runs on the tuned model, the base and (second run) the champion
    smoke: Recipe = load_recipe(ROOT / "configs" / "smoke.yaml",
                                ["evaluate.lm_eval={tasks: [alignflow_sentiment], batch_size: 8}"])
    work = tmp_path / "work"
    first = pipeline(recipe=smoke, work_dir=str(work))
    assert first["registered"]["alias"] == "champion"
    _served_answers_as_evaluated(first, work, smoke, tmp_path)

    # A different candidate (other dpo.beta) facing an impossible gate stays challenger; champion is unchanged.
    # The harness metric's rule (it must gain at least 0.01 over the champion: an allowed loss of -0.01) refuses
    # it on its own bound, computed from the 24 documents' paired values.
    strict = smoke.model_copy(update={
        "dpo": smoke.dpo.model_copy(update={"beta": 0.5}),
        "register": smoke.register.model_copy(update={"gate": GateConfig(
            min_win_rate=0.0, min_rougeL_gain=5.0, max_regression={"lm_eval.alignflow_sentiment.acc": -0.01})})})
    second = pipeline(recipe=strict, work_dir=str(work))
    assert second["registered"]["alias"] == "challenger" and second["registered"]["version"] == "2"
    assert any("rougeL_gain_ci_low" in r for r in second["registered"]["gate_reasons"])
    assert any(r.startswith("lm_eval.alignflow_sentiment.acc may have regressed by up to")
               for r in second["registered"]["gate_reasons"])
    assert "win_rate_vs_champion" in second["metrics"]  # evaluated against the registered champion
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    evaluated = {}
    for result, others in ((first, ("base",)), (second, ("base", "champion"))):
        run = client.search_runs([result["experiment_id"]], filter_string=(
            f"tags.mlflow.parentRunId = '{result['parent_run_id']}' and tags.alignflow.stage = 'evaluate'"))[0]
        evaluated[result["parent_run_id"]] = run.data.metrics
        for suffix in ("", *[f"_{o}" for o in others]):
            assert 0.0 <= run.data.metrics[f"lm_eval.alignflow_sentiment.acc{suffix}"] <= 1.0
        assert "lm_eval_results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    measured = evaluated[second["parent_run_id"]]
    low, high = (measured[f"lm_eval.alignflow_sentiment.acc_delta_ci_{e}"] for e in ("low", "high"))
    point = measured["lm_eval.alignflow_sentiment.acc"] - measured["lm_eval.alignflow_sentiment.acc_champion"]
    assert low <= point + 1e-9 and point - 1e-9 <= high
    # the champion re-measured in the second run is the first run's tuned model
    assert measured["lm_eval.alignflow_sentiment.acc_champion"] == \
        evaluated[first["parent_run_id"]]["lm_eval.alignflow_sentiment.acc"]
    name = "smoke-assistant"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "2").tags["alignflow.gate"] == "failed"

    # Promote by hand, then roll back: aliases move and the moves are recorded as tags.
    proc = _cli("promote", name, "2", "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == "1"
    proc = _cli("rollback", name, "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert "rollback" in client.get_registered_model(name).tags["alignflow.last_alias_change"]
    assert _cli("promote", name, "99", "--work-dir", str(work)).returncode == 1

    # compare: dpo config differs, upstream stages were cached in the second run.
    proc = _cli("compare", first["parent_run_id"], second["parent_run_id"], "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert "dpo.beta: 0.1 -> 0.5" in proc.stdout and "cached: false / true" in proc.stdout

    # export merged weights: plain transformers loads them, and the logits match base + adapter.
    out = tmp_path / "merged"
    proc = _cli("export", f"models:/{name}@champion", "--merged", str(out), "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert "is_gradient_checkpointing" not in proc.stdout + proc.stderr  # PEFT's FutureWarning, filtered by the CLI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    base_dir = next((work / "base").glob("tiny-*"))
    adapter = Path(first["stages"]["dpo"]["folder"]) / "adapter"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "List the fruits in: 'pears and figs'"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, reference(ids).logits, atol=1e-4)
        assert exported.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    # export GGUF (f16): transformers' GGUF loader reads it back, with the tokenizer and chat template from its
    # metadata, and greedy continuations equal the merged export's
    gguf_out = tmp_path / "gguf" / "smoke.gguf"
    proc = _cli("export", f"models:/{name}@champion", "--gguf", str(gguf_out), "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert "f16" in proc.stdout
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_out.parent, gguf_file=gguf_out.name).eval()
    gguf_tok = AutoTokenizer.from_pretrained(gguf_out.parent, gguf_file=gguf_out.name)
    for prompt in ("List the fruits in: 'pears and figs'", "Rewrite the date 'May 2, 2024' in ISO 8601 format."):
        chat = [{"role": "user", "content": prompt}]
        ids = gguf_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
        assert ids.tolist() == tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True)["input_ids"].tolist()
        with torch.no_grad():
            assert torch.equal(from_gguf.generate(ids, max_new_tokens=16, do_sample=False),
                               exported.generate(ids, max_new_tokens=16, do_sample=False))
    assert _cli("export", f"models:/{name}@champion", "--adapter", str(tmp_path / "a"),
                "--work-dir", str(work)).returncode == 0
    assert (tmp_path / "a" / "adapter_config.json").exists() and (tmp_path / "a" / "base_model.json").exists()
    _travels(work, tmp_path, name)
    # a bare name is its champion; a misspelt one says so and names what is registered
    assert _cli("export", name, "--adapter", str(tmp_path / "b"), "--work-dir", str(work)).returncode == 0
    typo = _cli("export", "smoke-asistant", "--merged", str(tmp_path / "c"), "--work-dir", str(work))
    said = " ".join((typo.stderr + typo.stdout).split())  # rich wraps long lines
    assert typo.returncode != 0 and "no registered model named 'smoke-asistant'" in said
    assert "did you mean 'smoke-assistant'?" in said


def _served_answers_as_evaluated(result: dict, work: Path, recipe: Recipe, tmp_path: Path) -> None:
    """A registered version, loaded with MLflow (its own code, tasks/lib/served_model.py), answers evaluate's
    prompts exactly as evaluate's generation answers them for the same weights: one greedy implementation.

    The pipeline's tiny model echoes the newline that ends the generation prompt (tied embeddings), so every
    answer in evaluate's samples is "" and agrees with anything that also answers "". So a second candidate, a
    random LoRA over the same base that answers each prompt with different text, goes through register.run and
    is compared with evaluate's generation (tasks/lib/inference.generate, called as evaluate calls it, on the
    model as evaluate loads it)."""
    import json
    import shutil

    import mlflow
    from peft import LoraConfig, PeftModel, get_peft_model

    from alignflow.tasks import register
    from alignflow.tasks.lib.inference import generate
    from alignflow.tasks.lib.manifest import read_manifest, write_manifest
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    stages = {name: Path(stage["folder"]) for name, stage in result["stages"].items()}
    samples = [json.loads(line) for line in (stages["evaluate"] / "samples.jsonl").read_text().splitlines()]
    conversations = [r["prompt"] for r in map(json.loads, (stages["curate"] / "eval.jsonl").read_text().splitlines())]
    conversations = conversations[: len(samples)]
    # one user message each: the served model's list-of-strings input makes the same conversations
    assert conversations == [[{"role": "user", "content": s["prompt"]}] for s in samples]
    prompts = [s["prompt"] for s in samples]
    max_tokens = {"max_tokens": recipe.evaluate.max_new_tokens}
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = result["registered"]["version"]
    served = mlflow.pyfunc.load_model(client.get_model_version_download_uri("smoke-assistant", version))
    assert served.predict(prompts, params=max_tokens) == [s["tuned"] for s in samples]

    # a candidate whose answers differ from prompt to prompt: a random LoRA (not the zero init) over the same base
    base = next((work / "base").glob("tiny-*"))
    candidate = tmp_path / "random-candidate"
    shutil.copytree(stages["dpo"], candidate, ignore=shutil.ignore_patterns("adapter"))
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(load_causal_lm(base, "float32"), lora).save_pretrained(candidate / "adapter")
    tok = load_tokenizer(stages["tokenize"] / "tokenizer")
    tok.save_pretrained(candidate / "adapter")  # as dpo saves it
    manifest = read_manifest(candidate)
    manifest.pop("outputs", None)  # register hashes these weights itself (not the pipeline's adapter's hash)
    write_manifest(candidate, manifest)
    model = PeftModel.from_pretrained(load_causal_lm(base, recipe.model.dtype), candidate / "adapter")
    evaluated = [a[0] for a in generate(model, tok, conversations, max_new_tokens=recipe.evaluate.max_new_tokens,
                                        batch_size=recipe.evaluate.batch_size)]
    assert len(set(evaluated)) == len(evaluated) and all(evaluated), evaluated  # distinct, non-empty answers

    mlflow.set_tracking_uri(uri)  # where the pipeline logged (register logs into the run below)
    run_id = client.create_run(result["experiment_id"]).info.run_id
    inputs = register.RegisterInputs(base_path=base, base_spec=recipe.model.base, dtype=recipe.model.dtype,
                                     candidate=candidate, evaluation=stages["evaluate"], curated=stages["curate"],
                                     run_id=run_id, out_dir=tmp_path / "random-register")
    registered = register.run(recipe.register.model_copy(update={"model_name": "served-check"}), inputs)
    client.set_terminated(run_id)
    uri_of = client.get_model_version_download_uri("served-check", registered["version"])
    # with no max_tokens in the request: the version carries evaluate's max_new_tokens (16 in the smoke recipe;
    # the served model's own default is 64) and batch size
    assert mlflow.pyfunc.load_model(uri_of).predict(prompts) == evaluated


LOAD_AND_PREDICT = """
import json, sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
answers = model.predict(["List the fruits in: 'pears and figs'", "Say hi"])
chat = model.predict({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5})
print(json.dumps({"answers": answers, "chat": chat}))
"""


def _travels(work: Path, tmp_path: Path, name: str) -> None:
    """No pickles anywhere; the champion loads and answers from the registry alone, also through MLflow's scoring
    server, once the work dir's stage folders and base models are gone."""
    import json
    import shutil
    import urllib.request

    from test_security import pickles_under  # tests/ is on sys.path under pytest

    from alignflow.tasks.lib.launch import free_port

    assert pickles_under(work) == []  # stage folders, caches, Prefect results, the MLflow artifact store
    assert any((work / "mlartifacts").rglob("MLmodel"))  # (the artifact store is under the work dir here)
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(name, "champion")
    # the curated data is in MLflow: artifacts of the curate run and dataset inputs with digests
    parent = client.get_run(champion.tags["alignflow.parent_run_id"])
    names = {d.dataset.name for d in parent.inputs.dataset_inputs}
    # this run's curated data, and the lineage (what it and its ancestors trained on, flows/lineage.py)
    assert {"sft", "preference", "eval"} <= names and all(n.startswith("lineage-") for n in names
                                                          - {"sft", "preference", "eval"}), names
    assert {"lineage-sft", "lineage-preference"} <= names
    assert all(len(d.dataset.digest) == 32 for d in parent.inputs.dataset_inputs)

    shutil.rmtree(work / "stages")
    shutil.rmtree(work / "base")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    fresh = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, f"models:/{name}@champion"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    said = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert len(said["answers"]) == 2 and all(isinstance(a, str) for a in said["answers"])
    chat = said["chat"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] <= 5
    # export too reads only the registry: the merged weights need the base, which comes from the version
    assert _cli("export", name, "--merged", str(tmp_path / "m2"), "--work-dir", str(work)).returncode == 0
    assert (tmp_path / "m2" / "model.safetensors").exists()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": uri},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def post(body: dict) -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as r:
                return json.loads(r.read())

        import time

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:] \
                    if server.poll() is not None else "scoring server did not start"
                time.sleep(1)
        chat = post({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
        assert chat["choices"][0]["message"]["content"] == said["chat"]["choices"][0]["message"]["content"][:len(
            chat["choices"][0]["message"]["content"])]
        assert chat["choices"][0]["finish_reason"] in ("stop", "length")
        assert post({"inputs": ["List the fruits in: 'pears and figs'", "Say hi"]})["predictions"] == said["answers"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_champion_on_another_base_is_refused(smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path) -> None:
    import shutil

    work = warm_copy(smoke_seed, tmp_path / "work")  # the first run's stages are cached: it registers them
    first = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(work))
    assert _rerun_stages(first) == {"register"}
    assert first["registered"]["alias"] == "champion"
    copy = tmp_path / "base-copy"  # the same weights, but another model.base: its adapter must not be mixed in
    shutil.copytree(next((work / "base").glob("tiny-*")), copy)
    with pytest.raises(Exception, match="was trained on base 'tiny:llama'"):
        pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml", [f"model.base={copy}"]), work_dir=str(work))


def _tiny_adapter(dest: Path, base_path: str, seed: int = 0, r: int = 4) -> Path:
    """A real PEFT LoRA adapter over a tiny Llama, saved as PEFT saves it (config naming the base by path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    base.config.name_or_path = base_path
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = base_path
    model.save_pretrained(dest)
    return dest


def test_adapter_hash_is_of_the_weights_not_of_paths(tmp_path: Path) -> None:
    """Bit-identical weights saved from two work dirs (adapter_config.json names the base's absolute path and lists
    target_modules in no fixed order; the model card names the path too) hash the same; other tensors or another
    rank / alpha do not."""
    import json

    from alignflow.tasks.lib.hashing import sha256_tree, sha256_weights

    a = _tiny_adapter(tmp_path / "a", "/work/one/base/tiny-1")
    b = _tiny_adapter(tmp_path / "b", "/home/two/base/tiny-1")
    config = json.loads((b / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(sorted(config["target_modules"])))
    (b / "adapter_config.json").write_text(json.dumps(config, indent=3))
    assert sha256_tree(a) != sha256_tree(b)  # the bytes differ: what the tag used to hash
    assert sha256_weights(a) == sha256_weights(b)
    assert sha256_weights(a) != sha256_weights(_tiny_adapter(tmp_path / "c", "/work/one/base/tiny-1", seed=1))
    alpha = json.loads((a / "adapter_config.json").read_text())
    (tmp_path / "d").mkdir()
    for f in a.iterdir():
        (tmp_path / "d" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**alpha, "lora_alpha": 16}))
    assert sha256_weights(tmp_path / "d") != sha256_weights(a)  # the same tensors scaled otherwise


def test_two_work_dirs_with_the_same_weights_share_keys(smoke_seed: dict[str, Any], in_root: Path,
                                                        tmp_path: Path) -> None:
    """sft's adapter names its base by the work dir's absolute path: keyed by that, dpo's key (it reads sft's
    weights hash) and everything after it differed between work dirs holding bit-identical weights."""
    from alignflow.tasks.lib.manifest import read_manifest

    # two cold runs in two work dirs: the session's smoke seed (trained in its own work dir) and one here
    two = pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(tmp_path / "two"), until="dpo")
    assert _rerun_stages(two) == {"curate", "synthesize", "tokenize", "quantize", "sft", "reward", "dpo"}
    assert not any(info["cached"] for info in smoke_seed["result"]["stages"].values())
    runs = [smoke_seed["result"], two]
    sft, dpo = ([Path(r["stages"][s]["folder"]) for r in runs] for s in ("sft", "dpo"))
    assert (sft[0] / "adapter" / "adapter_config.json").read_text() != \
        (sft[1] / "adapter" / "adapter_config.json").read_text()  # the base's path differs
    assert read_manifest(sft[0])["outputs"]["adapter"] == read_manifest(sft[1])["outputs"]["adapter"]
    assert dpo[0].name == dpo[1].name  # the stage folder is named by its key
    assert read_manifest(dpo[0])["outputs"]["adapter"] == read_manifest(dpo[1])["outputs"]["adapter"]


def test_min_gain_vs_champion_decides_by_the_references_on_the_interval() -> None:
    # issue 28 item 4: a candidate better by exact match, whose reward model cannot see content, can be promoted by
    # the references; every rule set must pass (the reward-model rule is switched off to decide by references alone)
    base = {"win_rate_vs_base": 0.8, "win_rate_vs_base_ci_low": 0.66, "judge_heldout_accuracy_ci_low": 0.8,
            "rougeL_gain_ci_low": 0.2, "win_rate_vs_champion": 0.5, "win_rate_vs_champion_ci_low": 0.4,
            "exact_match_champion": 0.6, "exact_match_delta": 0.21,
            "exact_match_delta_ci_low": 0.06, "exact_match_delta_ci_high": 0.35,
            "perplexity_delta_ci_low": -0.3, "perplexity_delta_ci_high": -0.1}
    by_refs = GateConfig(min_win_rate_vs_champion=None, min_gain_vs_champion={"exact_match": 0.0})
    reasons, decided = gate(by_refs, base, True)
    assert reasons == [] and any("exact_match gain vs champion lower bound=0.0600 > min_gain_vs_champion=0.0" in d
                                 for d in decided)
    # the lower bound decides, not the point estimate (+0.21 here)
    tie = {**base, "exact_match_delta_ci_low": -0.02}
    said = " ".join(gate(by_refs, tie, True)[0])
    assert "exact_match gain over the champion has a 95% lower bound of -0.0200" in said
    assert gate(GateConfig(min_win_rate_vs_champion=None, min_gain_vs_champion={"exact_match": 0.1}), base, True)[0]
    # lower is better: the gain is the champion's perplexity minus the candidate's (at least 0.1 here)
    assert gate(GateConfig(min_win_rate_vs_champion=None, min_gain_vs_champion={"perplexity": 0.05}), base,
                True)[0] == []
    assert gate(GateConfig(min_win_rate_vs_champion=None, min_gain_vs_champion={"perplexity": 0.1}), base, True)[0]
    # both rules set: both must pass (the judge's 0.4 lower bound fails it)
    both = GateConfig(min_gain_vs_champion={"exact_match": 0.0})
    assert "not measurably better than the champion" in " ".join(gate(both, base, True)[0])
    # no champion yet: nothing to gain over; a gain that was not measured fails closed
    first = {k: v for k, v in base.items() if "champion" not in k and "delta" not in k}
    assert gate(by_refs, first, True)[0] == []
    unmeasured = {k: v for k, v in base.items() if not k.startswith("exact_match_delta")}
    assert "not measured against the champion" in " ".join(gate(by_refs, unmeasured, True)[0])
    with pytest.raises(ValueError, match="unknown metric"):
        GateConfig(min_gain_vs_champion={"vibes": 0.0})


def _holds(client: MlflowClient, registered: dict, name: str = "smoke-assistant") -> dict[str, str]:
    """What the run reported is what the registry holds: the version's alias and the champion."""
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases.get("champion") == registered["champion"], (aliases, registered)
    assert aliases.get(registered["alias"]) == registered["version"], (aliases, registered)
    return aliases


def test_the_registry_tells_the_truth_after_rollback_delete_and_a_killed_register(
        smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path) -> None:
    """Run A, run B with the gate opened, rollback, re-run B: the champion stays where rollback put it and B says
    why. Delete the registered model, re-run A: a new version, champion. A version a killed register left without
    tags or alias is found by its weights, not registered twice. (Register was cached: the re-runs printed the
    registry as it had been.)"""
    smoke = ROOT / "configs" / "smoke.yaml"
    work = warm_copy(smoke_seed, tmp_path / "work")  # run A's stages are cached: it registers them
    name = "smoke-assistant"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    a = pipeline(recipe=load_recipe(smoke), work_dir=str(work))
    assert _rerun_stages(a) == {"register"}
    assert (a["registered"]["version"], a["registered"]["alias"]) == ("1", "champion")
    _holds(client, a["registered"])
    opened = ["dpo.beta=0.3", "register.gate.min_win_rate_vs_champion=null"]
    b = pipeline(recipe=load_recipe(smoke, opened), work_dir=str(work))
    assert (b["registered"]["version"], b["registered"]["alias"]) == ("2", "champion")
    _holds(client, b["registered"])

    proc = _cli("rollback", name, "--work-dir", str(work))
    assert proc.returncode == 0, proc.stderr
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert "rollback: champion v2 -> v1" in client.get_model_version(name, "2").tags["alignflow.rolled_back"]

    proc = _cli("run", "configs/smoke.yaml", *[x for o in opened for x in ("--set", o)], "--work-dir", str(work))
    said = " ".join(proc.stdout.split())  # rich wraps long lines
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered smoke-assistant version 2 as challenger (version 2 was demoted by rollback: champion v2 -> v1" \
        in said
    assert "`alignflow promote smoke-assistant 2` does); champion: version 1" in said
    aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
    assert aliases["champion"] == "1" and aliases["challenger"] == "2"
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    client.delete_registered_model(name)
    proc = _cli("run", "configs/smoke.yaml", "--work-dir", str(work))
    said = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered smoke-assistant version 1 as champion (gate passed)" in said
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # what a kill -9 between creating the version and tagging it left: a version with no tags and no alias
    version = client.get_model_version(name, "1")
    for key in version.tags:
        client.delete_model_version_tag(name, "1", key)
    client.delete_registered_model_alias(name, "champion")
    again = pipeline(recipe=load_recipe(smoke), work_dir=str(work))
    assert not again["stages"]["register"]["cached"]  # a side effect: it acts every run
    assert (again["registered"]["version"], again["registered"]["alias"]) == ("1", "champion")
    _holds(client, again["registered"])
    assert len(client.search_model_versions(f"name='{name}'")) == 1  # adopted, not registered twice
    tags = client.get_model_version(name, "1").tags
    assert tags["alignflow.adapter_sha256"] == _recorded_hash(Path(a["stages"]["dpo"]["folder"]))
    assert tags["alignflow.gate"] == "passed"


def _recorded_hash(dpo_folder: Path) -> str:
    from alignflow.tasks.lib.manifest import read_manifest

    return read_manifest(dpo_folder)["outputs"]["adapter"]


TAKE_LOCK = """
import sys, time
from mlflow import MlflowClient
from alignflow.tasks.lib.registry import LockPermissionError, alias_lock
started = time.monotonic()
try:
    with alias_lock(MlflowClient(sys.argv[1]), sys.argv[2], timeout_s=float(sys.argv[3])):
        print("TOOK")
except (LockPermissionError, TimeoutError) as e:
    print(type(e).__name__, round(time.monotonic() - started, 1), e)
"""


def test_the_alias_lock_of_another_mlflow_user_is_one_clear_error(tmp_path: Path) -> None:
    """A stale lock another MLflow user created: deleting it answers 403. Every MlflowException used to `continue`
    the loop without its sleep or deadline, so the worker hammered the server forever; now it says whose lock it
    is, at once. A lock that is held and fresh ends in a TimeoutError at the deadline."""
    import base64
    import json
    import secrets
    import time
    import urllib.request

    from alignflow.tasks.lib.launch import free_port

    port, password = free_port(), "admin-" + secrets.token_hex(8)
    ini = tmp_path / "auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--workers", "1"],
        env={**env, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
             "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(1)
        token = base64.b64encode(f"admin:{password}".encode()).decode()
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/users/create", method="POST",
                                         data=json.dumps({"username": "bob", "password": "bob-pw-1234567"}).encode(),
                                         headers={"Authorization": f"Basic {token}",
                                                  "Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30)
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:  # the admin holds two locks: one left stale by a dead process, one fresh
            admin = MlflowClient(url)
            admin.create_registered_model("stale.alias-lock", tags={
                "alignflow.lock_taken_at": str(time.time() - 3600), "alignflow.lock_owner": "admin / ops@host1 pid 7"})
            admin.create_registered_model("held.alias-lock", tags={"alignflow.lock_taken_at": str(time.time() + 600)})
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        bob = {**env, "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "bob-pw-1234567"}

        def take(model: str, timeout_s: float) -> str:
            proc = subprocess.run([sys.executable, "-c", TAKE_LOCK, url, model, str(timeout_s)], env=bob,
                                  capture_output=True, text=True, timeout=90, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return proc.stdout.strip().splitlines()[-1]

        said = take("stale", 60)  # the old loop never returned (the subprocess timed out)
        assert said.startswith("LockPermissionError"), said
        assert float(said.split()[1]) < 10  # at once, not at the 60 s deadline
        assert "'stale.alias-lock'" in said and "held by admin / ops@host1 pid 7" in said
        said = take("held", 2)
        assert said.startswith("TimeoutError"), said
        assert 2 <= float(said.split()[1]) < 10
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_compare_says_when_evaluations_do_not_compare(tmp_path: Path) -> None:
    """Two runs whose evaluate measured other prompts (another eval_config_hash): their metrics side by side are
    not a comparison, and compare says so; the same eval config says nothing."""
    from alignflow.flows.registry import compare

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))

    def pipeline_run(eval_hash: str, rouge: float) -> str:
        parent = client.create_run(experiment).info.run_id
        child = client.create_run(experiment, run_name="evaluate", tags={
            "mlflow.parentRunId": parent, "alignflow.eval_config_hash": eval_hash}).info.run_id
        client.log_metric(child, "rougeL", rouge)
        return parent

    a, b, c = pipeline_run("a" * 64, 0.2), pipeline_run("b" * 64, 0.4), pipeline_run("a" * 64, 0.3)
    lineage, rows = compare(client, a, b)
    assert any("eval_config_hash: aaaaaaaaaaaa -> bbbbbbbbbbbb" in line and "do not compare" in line
               for line in lineage)
    assert rows[0].metrics == [("rougeL", 0.2, 0.4)]
    assert not any("eval_config_hash" in line for line in compare(client, a, c)[0])


def _versions(tmp_path: Path, hashes: list[str], name: str = "m") -> MlflowClient:
    """A registered model whose versions 1.. hold weights with these hashes (as register tags them); champion 1."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(name)
    for h in hashes:
        client.create_model_version(name, str(tmp_path), tags={"alignflow.adapter_sha256": h})
    client.set_registered_model_alias(name, "champion", "1")
    return client


def _aliases(client: MlflowClient, name: str = "m") -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_a_persons_demotion_is_kept_on_the_model_and_only_promote_clears_it(tmp_path: Path) -> None:
    """Issue 26 findings 1, 2, 6: promote of another version and rollback mark the displaced weights on the
    registered model (by hash: a deleted version does not undo it); promote clears the mark of what it promotes;
    the version that becomes champion loses `challenger`."""
    from alignflow.flows.registry import promote, rollback
    from alignflow.tasks.lib.registry import demotion

    client = _versions(tmp_path, ["h1", "h2", "h3"])
    client.set_registered_model_alias("m", "challenger", "2")
    promote(client, "m", "2")  # a challenger promoted by hand: champion only
    assert _aliases(client) == {"champion": "2", "previous-champion": "1"}
    assert "promote: champion v1 -> v2" in demotion(client, "m", "h1")
    assert demotion(client, "m", "h2") is None
    rollback(client, "m")  # back to 1: its mark cleared, 2's set
    assert _aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert demotion(client, "m", "h1") is None
    assert "rollback: champion v2 -> v1" in demotion(client, "m", "h2")
    client.delete_model_version("m", "2")  # the mark lives on the model, not on the version
    assert "rollback: champion v2 -> v1" in demotion(client, "m", "h2")
    promote(client, "m", "3")
    assert "promote: champion v1 -> v3" in demotion(client, "m", "h1")


def test_an_interrupted_rollback_is_completed_or_refused_never_rolled_forward(tmp_path: Path) -> None:
    """The states a kill inside `alignflow rollback` can leave now: (a) the demotion marked, no alias moved: running
    rollback again completes it; (b) previous-champion moved onto the champion but the champion not yet moved (inside
    move_champion): rollback refuses, it does not print "v1 -> v1" nor roll anywhere."""
    from alignflow.flows.registry import rollback
    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.registry import demoted_key, demotion

    client = _versions(tmp_path, ["h1", "h2"])
    client.set_registered_model_alias("m", "champion", "2")
    client.set_registered_model_alias("m", "previous-champion", "1")
    # (a) killed after marking v2 demoted, before moving an alias
    client.set_registered_model_tag("m", demoted_key("h2"), "rollback: champion v2 -> v1 by x at t")
    client.set_model_version_tag("m", "2", "alignflow.rolled_back", "rollback: champion v2 -> v1 by x at t")
    said = rollback(client, "m")
    assert said.startswith("rollback: champion v2 -> v1")
    assert _aliases(client) == {"champion": "1", "previous-champion": "2"}
    assert demotion(client, "m", "h2") and demotion(client, "m", "h1") is None
    # running it again is a rollback of that rollback (a person's choice), still consistent: no roll forward
    # past what previous-champion says
    # (b) previous-champion == champion
    client.set_registered_model_alias("m", "previous-champion", "1")
    with pytest.raises(StageError, match="is the champion"):
        rollback(client, "m")
    assert _aliases(client) == {"champion": "1", "previous-champion": "1"}


def test_rerunning_after_promote_rollback_and_deletion_keeps_what_a_person_decided(
        smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path) -> None:
    """Issue 26 findings 1 and 6 through the pipeline, checking "printed = held" after every step: a champion
    re-run under a stricter gate keeps champion and its tags, and says so; a challenger that later passes loses
    `challenger`; weights demoted by rollback stay demoted after their version is deleted (re-registered as a new
    version, challenger); weights demoted by promote of another version stay demoted on the next run."""
    from alignflow.cli import _registered_line
    from alignflow.flows.registry import promote, rollback

    smoke = ROOT / "configs" / "smoke.yaml"
    work = warm_copy(smoke_seed, tmp_path / "work")  # run A's stages are cached: it registers them
    name = "smoke-assistant"
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    a = pipeline(recipe=load_recipe(smoke), work_dir=str(work))
    assert _rerun_stages(a) == {"register"}
    assert (a["registered"]["version"], a["registered"]["alias"]) == ("1", "champion")
    passed = client.get_model_version(name, "1").tags
    assert passed["alignflow.gate"] == "passed"

    # the champion's recipe under a stricter gate: champion stays (the gate never demotes), its tags stay, and the
    # run says both
    strict = pipeline(recipe=load_recipe(smoke, ["register.gate.min_rougeL_gain=5.0"]), work_dir=str(work))
    _holds(client, strict["registered"])
    line = _registered_line(strict["registered"])
    assert "version 1 as [bold]champion[/] (version 1 already holds champion and keeps it" in line
    assert "recorded on this run only (the version's gate: passed)" in line
    assert "rougeL_gain_ci_low" in line
    kept = client.get_model_version(name, "1").tags
    assert {k: kept[k] for k in ("alignflow.gate", "alignflow.gate_reasons")} == \
        {k: passed[k] for k in ("alignflow.gate", "alignflow.gate_reasons")}
    register_run = client.search_runs([strict["experiment_id"]], filter_string=(
        f"tags.mlflow.parentRunId = '{strict['parent_run_id']}' and tags.alignflow.stage = 'register'"))[0]
    assert register_run.data.tags["alignflow.gate"] == "failed"

    # B fails a gate (challenger), then passes it: champion, and no longer challenger
    opened = ["dpo.beta=0.3", "register.gate.min_win_rate_vs_champion=null"]
    b = pipeline(recipe=load_recipe(smoke, [*opened, "register.gate.min_rougeL_gain=5.0"]), work_dir=str(work))
    assert (b["registered"]["version"], b["registered"]["alias"]) == ("2", "challenger")
    _holds(client, b["registered"])
    b = pipeline(recipe=load_recipe(smoke, opened), work_dir=str(work))
    assert (b["registered"]["version"], b["registered"]["alias"]) == ("2", "champion")
    assert _holds(client, b["registered"]) == {"champion": "2", "previous-champion": "1"}

    # rollback, then delete the demoted version: the same weights come back as a new version, not champion
    rollback(client, name)
    client.delete_model_version(name, "2")
    b = pipeline(recipe=load_recipe(smoke, opened), work_dir=str(work))
    assert (b["registered"]["version"], b["registered"]["alias"], b["registered"]["champion"]) == \
        ("3", "challenger", "1")
    _holds(client, b["registered"])
    assert "version 3 was demoted by rollback: champion v2 -> v1" in _registered_line(b["registered"])

    # promote 3 (a person: clears its mark, ends its challenger alias), then promote 1: the next run leaves 1
    promote(client, name, "3")
    assert _aliases(client, name) == {"champion": "3", "previous-champion": "1"}
    promote(client, name, "1")
    b = pipeline(recipe=load_recipe(smoke, opened), work_dir=str(work))
    assert (b["registered"]["version"], b["registered"]["alias"], b["registered"]["champion"]) == \
        ("3", "challenger", "1")
    _holds(client, b["registered"])
    assert "version 3 was demoted by promote: champion v3 -> v1" in _registered_line(b["registered"])

    # the window a kill inside register can leave now: the version (tagged with its hash in the creating call)
    # holds champion, but its gate tags were not written yet. A re-run of its recipe writes them.
    for key in ("alignflow.gate", "alignflow.gate_reasons", "alignflow.gate_bounds"):
        client.delete_model_version_tag(name, "1", key)
    again = pipeline(recipe=load_recipe(smoke), work_dir=str(work))
    assert (again["registered"]["version"], again["registered"]["alias"]) == ("1", "champion")
    _holds(client, again["registered"])
    # (it is compared with itself as champion now, which a gate may fail: then no verdict goes on the champion)
    said = again["registered"]["gate_reasons"]
    assert client.get_model_version(name, "1").tags.get("alignflow.gate") == (None if said else "passed")
    assert not said or "the version's gate: not recorded" in said[0]


def test_lora_dropout_is_part_of_the_weights_hash(tmp_path: Path) -> None:
    """Issue 26 finding 11: weights trained further (sft's init adapter, dpo) behave otherwise under another
    dropout, so the hash tells them apart; the older hash (without it) is still computable for old versions."""
    import json

    from alignflow.tasks.lib.hashing import LEGACY_SKIPPED_FIELDS, sha256_weights

    a = _tiny_adapter(tmp_path / "a", "/base")
    b = tmp_path / "b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    config = json.loads((a / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": config["lora_dropout"] + 0.1}))
    assert sha256_weights(a) != sha256_weights(b)
    assert sha256_weights(a, LEGACY_SKIPPED_FIELDS) == sha256_weights(b, LEGACY_SKIPPED_FIELDS)


def test_find_version_skips_unreadable_orphans_once_and_checks_the_base(tmp_path: Path) -> None:
    """Issue 26 findings 10 and 11: a register-made version without a hash whose weights cannot be read is tagged
    unreadable (not raised every run, not downloaded every run); a version with the same hash over another base is
    not a match."""
    import mlflow

    from alignflow.tasks.lib.registry import HASH_TAG, UNREADABLE, find_version

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp, tags={"alignflow.stage": "register"})
    client.set_terminated(run.info.run_id)
    client.create_registered_model("m")
    # an orphan of a register run whose artifacts are not there (the download fails)
    client.create_model_version("m", str(tmp_path / "gone"), run_id=run.info.run_id)
    client.create_model_version("m", str(tmp_path), tags={HASH_TAG: "h", "alignflow.base_key": "base-a"})
    assert find_version(client, "m", "h", {}, tmp_path / "scratch", base_key="base-b") is None
    assert client.get_model_version("m", "1").tags[HASH_TAG] == UNREADABLE
    assert find_version(client, "m", "h", {}, tmp_path / "scratch", base_key="base-a") == "2"
    assert find_version(client, "m", "h", {}, tmp_path / "scratch") == "2"  # no base given: by hash alone


def _rerun_stages(result: dict[str, Any]) -> set[str]:
    return {s for s, info in result["stages"].items() if not info["cached"]}
