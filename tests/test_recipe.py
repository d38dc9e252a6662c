"""Recipes: every shipped config validates; a wrong recipe is rejected with every problem and its path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignflow.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path, in_root: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name
    for name in ("sft", "preference", "eval"):
        files = getattr(recipe.data, name)
        assert files and all(Path(f).is_absolute() and Path(f).is_file() for f in files)


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base(tmp_path: Path) -> dict:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    return {"name": "t", "model": {"base": "tiny:llama"},
            "data": {"sft": "d.jsonl", "preference": "d.jsonl", "eval": "d.jsonl"},
            "register": {"model_name": "m"}}


def test_all_problems_listed_at_once_with_dotted_paths(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["sft"] = {"lora": {"r": -1, "bogus": 3}, "lr": "fast"}
    data["dpo"] = {"loss": "nonsense"}
    data["unknown_section"] = 1
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    text = "\n".join(e.value.problems)
    for expected in ("sft.lora.r", "sft.lora.bogus: unknown key", "sft.lr", "dpo.loss", "unknown_section: unknown key"):
        assert expected in text, text
    assert len(e.value.problems) == 5


def test_a_misspelt_key_gets_a_suggestion(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["sft"] = {"max_step": 3}
    data["dpo"] = {"bta": 0.2}
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert "sft.max_step: unknown key (did you mean `sft.max_steps`?)" in e.value.problems
    assert "dpo.bta: unknown key (did you mean `dpo.beta`?)" in e.value.problems


def test_checks_across_keys_are_listed_with_the_others(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["sft"] = {"method": "full", "lr": "fast"}  # full fine-tuning of a 4-bit base, and a field error
    data["quantize"] = {"bits": 4}
    data["dpo"] = {"loss": "orpo", "precompute_ref_log_probs": True}  # ORPO has no reference to precompute
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    text = "\n".join(e.value.problems)
    assert "sft.lr" in text and "quantize.bits must be null (got 4)" in text, text
    assert "dpo: precompute_ref_log_probs is for losses with a reference model; 'orpo' has none" in text, text
    assert len(e.value.problems) == 3
    data["sft"] = {"method": "full"}  # alone, the clash is still caught (by the model's own check)
    data.pop("dpo")
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert e.value.problems == ["sft.method: 'full' trains every weight in model.dtype, so quantize.bits must be "
                                "null (got 4); QLoRA is sft.method 'lora' with quantize.bits 4"]


def test_missing_data_files_and_base_model_are_reported_together(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["data"]["preference"] = "nope/*.jsonl"
    data["data"]["eval"] = ["d.jsonl", "missing.jsonl"]
    data["model"]["base"] = "./no/such/folder"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    text = "\n".join(e.value.problems)
    assert "data.preference[0]" in text and "data.eval[1]" in text and "model.base: folder not found" in text


def test_uncached_hub_model_is_rejected_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _base(tmp_path)
    data["model"]["base"] = "no-such-org/no-such-model"
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert "not in the local Hugging Face cache" in e.value.problems[0]


def test_missing_required_section(tmp_path: Path) -> None:
    data = _base(tmp_path)
    del data["register"]
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert e.value.problems == ["register: required key is missing"]


def test_overrides_use_dotted_paths_and_yaml_values(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, _base(tmp_path)),
                         ["sft.lora.r=32", "dpo.beta=0.25", "quantize.bits=4", "sft.lora.target_modules=[q_proj]"])
    assert recipe.sft.lora.r == 32 and recipe.dpo.beta == 0.25 and recipe.quantize.bits == 4
    assert recipe.sft.lora.target_modules == ["q_proj"]
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, _base(tmp_path)), ["sft.lora.r"])
    assert "expected dotted.key=value" in e.value.problems[0]


def test_cli_rejects_a_bad_recipe_without_traceback(tmp_path: Path) -> None:
    data = _base(tmp_path)
    data["sft"] = {"max_steps": "many"}
    data["data"]["sft"] = "absent.jsonl"
    proc = subprocess.run([sys.executable, "-m", "alignflow.cli", "run", str(_write(tmp_path, data)),
                           "--work-dir", str(tmp_path / "w")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "sft.max_steps" in proc.stderr and "data.sft[0]" in proc.stderr  # schema and file problems together
    assert not (tmp_path / "w").exists()  # rejected before any work started


def test_cli_names_a_missing_recipe_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "alignflow.cli", "validate", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_max_steps_is_positive_or_absent(tmp_path: Path) -> None:
    """-5 (or 0) steps used to validate and then train a full epoch: the Trainer reads any value <= 0 as no limit."""
    data = _base(tmp_path)
    data["sft"], data["reward"], data["dpo"] = {"max_steps": -5}, {"max_steps": 0}, {"max_steps": 4}
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    text = "\n".join(e.value.problems)
    assert "sft.max_steps: -5" in text and "reward.max_steps: 0" in text and "must be a positive number" in text
    assert "dpo.max_steps" not in text
    data["sft"], data["reward"] = {"max_steps": 3}, {}  # positive, or absent (-1: by epochs)
    recipe = load_recipe(_write(tmp_path, data))
    assert (recipe.sft.max_steps, recipe.reward.max_steps, recipe.dpo.max_steps) == (3, -1, 4)


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n  \n"), ("e.jsonl", "\ufeff\n"),
                                          ("e.json", "[ ]\n"), ("e.csv", "prompt,response\n")])
def test_an_empty_data_file_is_a_validation_error(tmp_path: Path, name: str, content: str) -> None:
    data = _base(tmp_path)
    (tmp_path / name).write_text(content, encoding="utf-8")
    data["data"]["preference"] = ["d.jsonl", name]
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"data.preference[1]: {tmp_path / name} ")
    assert any(word in e.value.problems[0] for word in ("empty", "no rows")), e.value.problems


def test_validate_refuses_what_the_issue_showed(tmp_path: Path, in_root: Path) -> None:
    """The command itself: `alignflow validate` exits 2 and names both problems (it said ok to both)."""
    from typer.testing import CliRunner

    from alignflow.cli import app

    data = _base(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    data["data"]["sft"] = str(tmp_path / "empty.jsonl")
    data["sft"] = {"max_steps": -5}
    result = CliRunner().invoke(app, ["validate", str(_write(tmp_path, data))])
    assert result.exit_code == 2, result.output
    said = "".join(result.output.split())  # Rich wraps for a narrow terminal, inside a long path too
    assert "sft.max_steps:-5" in said and "empty.jsonlisempty" in said, result.output


def test_validate_lists_every_cross_key_problem_at_once(tmp_path: Path) -> None:
    """The cross-key checks all run: a clash of sft with quantize does not hide a gate rule with nothing to measure."""
    data = _base(tmp_path)
    data["sft"] = {"method": "full"}
    data["quantize"] = {"bits": 4}
    data["register"]["gate"] = {"max_shipped_regression": {"exact_match": 0.1}}  # and register.ship is empty
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, data))
    assert len(e.value.problems) == 2, e.value.problems
    assert "quantize.bits must be null (got 4)" in e.value.problems[0]
    assert e.value.problems[1] == ("register.gate.max_shipped_regression: nothing would be measured; list the "
                                   "artifacts in register.ship (e.g. [merged, {gguf: q8_0}])")


def test_register_ship_and_its_gate_are_checked_together(tmp_path: Path) -> None:
    """Each check of register.ship / max_shipped_regression, by its message; the dict form names the GGUF type."""
    import json

    from pydantic import ValidationError

    from alignflow.recipe import Recipe

    def problems(register: dict, metrics: list[str] | None = None, base: str = "tiny:llama") -> str:
        data = {**_base(tmp_path), "model": {"base": base}, "register": {"model_name": "m", **register}}
        if metrics is not None:
            data["evaluate"] = {"metrics": metrics}
        try:
            Recipe.model_validate(data)
        except ValidationError as e:
            return str(e)
        return ""

    ok = Recipe.model_validate({**_base(tmp_path), "register": {"model_name": "m", "ship": [
        "merged", {"gguf": "q8_0"}, "gguf_f16"], "gate": {"max_shipped_regression": {"exact_match": 0.1}}}})
    assert ok.register.ship == ["merged", "gguf_q8_0", "gguf_f16"]
    assert "is not among what evaluate.metrics measures (exact_match)" in problems(
        {"ship": ["merged"], "gate": {"max_shipped_regression": {"bleu": 0.1}}}, metrics=["exact_match"])
    assert problems({"ship": ["merged"], "gate": {"max_shipped_regression": {"rougeL": 0.1}}},
                    metrics=["rouge"]) == ""  # `rouge` measures rouge1/2/L
    assert "listed more than once: ['gguf_q8_0']" in problems({"ship": ["gguf_q8_0", {"gguf": "q8_0"}]})
    assert "gguf_q4" in problems({"ship": [{"gguf": "q4"}]})  # no such type: refused by its name
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    said = problems({"ship": [{"gguf": "q8_0"}]}, base=str(folder))
    assert "register.ship: a GGUF is written for llama, mistral, qwen2 (Llama-family) models; model.base is 'gpt2'" \
        in said
    assert problems({"ship": ["merged"]}, base=str(folder)) == ""  # a merged folder is written for any model
