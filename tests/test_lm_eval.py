"""lm-evaluation-harness in evaluate: the real harness on the tiny model, a task folder written on the fly, the
shipped task, names that cannot be found. The pipeline and gate side (metrics for tuned / base / champion, a
regression rule refusing promotion) runs in tests/test_registry.py on the runs it already makes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.harness import run_harness, task_manager

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    base = resolve_base("tiny:llama", tmp_path_factory.mktemp("base"), [ROOT / "data" / "sft.jsonl"])
    return load_causal_lm(base.path, "float32").eval(), load_tokenizer(base.path)


def test_a_task_folder_written_on_the_fly_and_the_adapter_switched_off(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    folder = tmp_path / "tasks"
    folder.mkdir()
    docs = [{"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "gold": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (7, 2)]]
    (folder / "sums.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'sums.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    manager = task_manager(["tiny_sums", "alignflow_sentiment"], str(folder))  # local only: no hub index built
    plain = run_harness(model, tok, ["tiny_sums", "alignflow_sentiment"], manager, num_fewshot=None, limit=None,
                        batch_size=4, seed=0)
    assert set(plain.metrics) >= {"tiny_sums.acc", "alignflow_sentiment.acc", "alignflow_sentiment.acc_norm"}
    assert len(plain.per_doc["tiny_sums.acc"]) == len(docs)  # one value per document, keyed by doc_id
    assert len(plain.per_doc["alignflow_sentiment.acc"]) == 24
    for name, values in plain.per_doc.items():  # the aggregate is the mean of the per-document values
        assert plain.metrics[name] == pytest.approx(sum(values.values()) / len(values))
    assert plain.higher_is_better["tiny_sums.acc"] is True
    assert plain.raw["n-samples"]["tiny_sums"]["effective"] == len(docs)

    # The base is measured on the same object an adapter is put on: with the adapter switched off the harness sees
    # the base exactly; with it on (weights moved so it matters) the log-likelihoods differ.
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    on = run_harness(adapted, tok, ["tiny_sums"], manager, num_fewshot=None, limit=None, batch_size=4, seed=0)
    with adapted.disable_adapter():
        off = run_harness(adapted, tok, ["tiny_sums"], manager, num_fewshot=None, limit=None, batch_size=4, seed=0)
    adapted.unload()
    assert off.metrics == {k: v for k, v in plain.metrics.items() if k.startswith("tiny_sums.")}
    resps = {n: [s["resps"] for s in r.samples["tiny_sums"]] for n, r in (("on", on), ("off", off))}
    assert resps["on"] != resps["off"]


def test_a_task_that_cannot_be_found_is_named(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no lm-eval task named 'alignflow_sentimnt' \\(did you mean "
                                         "'alignflow_sentiment'\\?\\)"):
        task_manager(["alignflow_sentimnt"], None)
    from alignflow.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:  # at validation, with the other problems, before any work
        load_recipe(ROOT / "configs" / "smoke.yaml", ["evaluate.lm_eval={tasks: [alignflow_sentimnt]}",
                                                      f"evaluate.lm_eval.include_path={tmp_path / 'absent'}",
                                                      "register.gate.max_regression={lm_eval.arc_easy.acc: 0.01}"])
    said = " | ".join(e.value.problems)
    assert "evaluate.lm_eval.include_path: folder not found" in said
    assert "lm_eval.arc_easy.acc names a task evaluate.lm_eval.tasks does not run" in said
