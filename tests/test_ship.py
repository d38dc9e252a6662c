"""What ships is measured (`register.ship`): evaluate builds each artifact from the tuned weights as `alignflow export`
does, answers the eval prompts with it read back as users load it, and logs `shipped.<format>.*` with a paired
interval of its difference from the adapter model; the gate's `max_shipped_regression` refuses a version whose
artifact may lose more than allowed.

Cheap on purpose: a tiny Llama with a random LoRA, and `evaluate.run` called on stage folders built here (no
pipeline run). The eval references are the adapter model's own greedy answers, so the adapter scores exact match
1.0 and any damage the artifact does shows.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from alignflow.tasks.lib.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[1]
GEN = {"max_new_tokens": 12, "batch_size": 8}
N_PROMPTS = 24


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage folders evaluate reads: tokenize's tokenizer, curate's eval.jsonl (references = the adapter's own
    answers), dpo's adapter (a random LoRA over the tiny base), reward's manifest."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.inference import generate
    from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

    root = tmp_path_factory.mktemp("ship")
    base = resolve_base("tiny:llama", root / "base", [ROOT / "data" / "sft.jsonl"])
    tok = load_tokenizer(base.path)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(base.path, "float32"),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    dpo = root / "dpo"
    model.save_pretrained(dpo / "adapter")
    tok.save_pretrained(dpo / "adapter")
    write_manifest(dpo, {"stage": "dpo", "outputs": ["adapter"], "trained_pair_hashes": []})
    tokenized = root / "tokenize"
    tok.save_pretrained(tokenized / "tokenizer")
    write_manifest(tokenized, {"stage": "tokenize", "outputs": ["tokenizer"]})
    (root / "reward").mkdir()
    write_manifest(root / "reward", {"stage": "reward", "outputs": [], "trained_pair_hashes": []})

    lines = [json.loads(line) for line in (ROOT / "data" / "eval.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in lines][:N_PROMPTS]
    answers = generate(model.eval(), tok, prompts, **GEN)
    curated = root / "curate"
    curated.mkdir()
    (curated / "eval.jsonl").write_text("".join(json.dumps({"prompt": p, "reference": a[0]}) + "\n"
                                                for p, a in zip(prompts, answers, strict=True)))
    return {"root": root, "base": base, "dpo": dpo, "tokenize": tokenized, "curate": curated,
            "reward": root / "reward"}


def _evaluate(stages: dict[str, Any], out: Path, ship: list[str], cache: Path | None = None,
              dtype: str = "float32") -> dict[str, Any]:
    from alignflow.tasks import evaluate

    cfg = evaluate.EvaluateConfig(metrics=["exact_match", "rouge", "bleu", "perplexity"], **GEN)
    return evaluate.run(cfg, evaluate.EvaluateInputs(
        base=stages["base"].path, dtype=dtype, tokenized=stages["tokenize"], curated=stages["curate"],
        candidate=stages["dpo"], reward=stages["reward"], base_key=stages["base"].key,
        answers_cache=stages["root"] / "answers", out_dir=out, seed=0, ship=ship, base_spec="tiny:llama",
        shipped_cache=cache))


def _corrupt_q8_scales(path: Path, tensor: str, factor: float) -> None:
    """Multiply every Q8_0 block scale of one tensor of a written GGUF file by `factor` (ggml's Q8_0 block: one
    float16 scale, then 32 int8 values), in place: a writer bug that a reader loads without complaint."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    found = next(t for t in GGUFReader(path).tensors if t.name == tensor)
    assert found.tensor_type == GGMLQuantizationType.Q8_0
    with open(path, "r+b") as f:
        f.seek(found.data_offset)
        blocks = np.frombuffer(f.read(int(found.n_bytes)), dtype=np.uint8).copy().reshape(-1, 34)
        scales = blocks[:, :2].copy().view(np.float16)
        blocks[:, :2] = (scales.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
        f.seek(found.data_offset)
        f.write(blocks.tobytes())


@pytest.fixture(scope="module")
def evaluated(stages: dict[str, Any]) -> dict[str, Any]:
    """evaluate with register.ship = [merged, {gguf: q8_0}], its artifacts cached under <root>/shipped."""
    return _evaluate(stages, stages["root"] / "evaluate", ["merged", "gguf_q8_0"], cache=stages["root"] / "shipped")


def test_evaluate_measures_each_shipped_artifact_against_the_adapter(stages: dict[str, Any],
                                                                     evaluated: dict[str, Any]) -> None:
    result = evaluated
    m = result["metrics"]
    print({k: v for k, v in m.items() if k.startswith("shipped.") or k in ("exact_match", "perplexity")})
    assert m["exact_match"] == 1.0  # the references are the adapter's own answers
    rows = [json.loads(line) for line in (stages["root"] / "evaluate" / "samples.jsonl").read_text().splitlines()]
    for fmt in ("merged", "gguf_q8_0"):
        for metric in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "perplexity"):
            # the interval is of shipped - adapter: it holds the difference of the two point values
            low, high = m[f"shipped.{fmt}.{metric}_delta_ci_low"], m[f"shipped.{fmt}.{metric}_delta_ci_high"]
            point = m[f"shipped.{fmt}.{metric}"] - m[metric]
            assert low - 1e-3 <= point <= high + 1e-3, (fmt, metric, low, point, high)
        # nothing scores above the adapter's own answers: the exact-match loss is never negative
        assert m[f"shipped.{fmt}.exact_match_delta_ci_high"] <= 0.0
        # `changed`: the share of the prompts whose answer differs from the adapter model's, as the table shows
        differ = sum(row[f"shipped.{fmt}"] != row["tuned"] for row in rows)
        assert m[f"shipped.{fmt}.changed"] == round(differ / N_PROMPTS, 4)
        assert m[f"shipped.{fmt}.exact_match"] == round(1 - differ / N_PROMPTS, 4)
        record = result["shipped"][fmt]
        assert Path(record["path"]).exists() and len(record["sha256"]) == 64 and not record["reused"]
        path = Path(record["path"])
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert m[f"shipped.{fmt}.bytes"] == size
    # merged in float32 and saved: the adapter model's answers, to float rounding
    assert m["shipped.merged.exact_match"] == 1.0 and m["shipped.merged.changed"] == 0.0
    assert m["shipped.merged.exact_match_delta_ci_low"] == m["shipped.merged.exact_match_delta_ci_high"] == 0.0
    assert abs(m["shipped.merged.perplexity"] - m["perplexity"]) < 1e-3
    # the GGUF was read back through transformers' GGUF loader: a file, hashed as written
    from alignflow.tasks.lib.hashing import sha256_file

    gguf = Path(result["shipped"]["gguf_q8_0"]["path"])
    assert gguf.suffix == ".gguf" and sha256_file(gguf) == result["shipped"]["gguf_q8_0"]["sha256"]
    assert m["shipped.gguf_q8_0.bytes"] == gguf.stat().st_size
    # the side-by-side table carries each artifact's answers
    row = json.loads((stages["root"] / "evaluate" / "samples.jsonl").read_text().splitlines()[0])
    assert row["shipped.merged"] == row["tuned"]


def test_a_corrupted_gguf_scores_lower_and_the_gate_refuses_it(stages: dict[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from alignflow.tasks.lib import gguf_file
    from alignflow.tasks.register import GateConfig, gate

    honest = _evaluate(stages, tmp_path / "honest", ["gguf_q8_0"])["metrics"]
    real = gguf_file.write_gguf

    def broken(model: Any, tok: Any, out: Path, gguf_type: str = "f16", name: str = "") -> dict[str, Any]:
        written = real(model, tok, out, gguf_type, name)  # type: ignore[arg-type]
        _corrupt_q8_scales(out, "blk.0.ffn_down.weight", 30.0)
        return written

    monkeypatch.setattr(gguf_file, "write_gguf", broken)
    damaged = _evaluate(stages, tmp_path / "broken", ["gguf_q8_0"])["metrics"]
    print("honest", honest["shipped.gguf_q8_0.exact_match"], "broken", damaged["shipped.gguf_q8_0.exact_match"],
          damaged["shipped.gguf_q8_0.exact_match_delta_ci_low"])
    assert damaged["shipped.gguf_q8_0.exact_match"] < honest["shipped.gguf_q8_0.exact_match"]
    assert damaged["shipped.gguf_q8_0.changed"] > honest["shipped.gguf_q8_0.changed"]

    # loose on purpose: a random tiny model's logits are near ties, so honest 8-bit rounding already flips some
    # greedy answers (measured: 6 of 24, loss upper bound 0.42); the broken file loses far more
    loose = GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                       min_judge_accuracy=None, max_shipped_regression={"exact_match": 0.5})
    assert gate(loose, honest, True)[0] == []
    reasons, decided = gate(loose, damaged, True)
    assert len(reasons) == 1 and reasons[0].startswith("shipped gguf_q8_0: exact_match may lose up to ")
    assert "vs the adapter (95% upper bound; allowed 0.5)" in reasons[0]
    assert any(d.startswith("shipped gguf_q8_0 exact_match loss upper bound=") for d in decided)


def test_gate_fails_closed_when_nothing_shipped_was_measured() -> None:
    from alignflow.tasks.register import GateConfig, gate

    cfg = GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None, min_judge_accuracy=None,
                     max_shipped_regression={"perplexity": 1.0, "exact_match": 0.1})
    reasons, _ = gate(cfg, {"exact_match": 1.0}, True)
    assert reasons == ["max_shipped_regression is set but no shipped artifact was measured (register.ship is "
                       "empty, or evaluate ran without it)"]
    # perplexity: lower is better, so the loss is the upper end of (shipped - adapter)
    measured = {"shipped.merged.perplexity_delta_ci_low": -0.5, "shipped.merged.perplexity_delta_ci_high": 1.5,
                "shipped.merged.exact_match": 1.0}
    reasons, _ = gate(cfg, measured, True)
    assert reasons == ["shipped merged: exact_match was not measured (evaluate.metrics), so its loss vs the adapter "
                       "cannot be checked",
                       "shipped merged: perplexity may lose up to 1.5000 vs the adapter (95% upper bound; allowed 1.0)"]
    with pytest.raises(ValueError, match="reward_mean"):
        GateConfig(max_shipped_regression={"reward_mean": 0.1})


def test_shipped_artifacts_are_cached_by_what_they_are_made_of(stages: dict[str, Any], tmp_path: Path) -> None:
    """Same weights and format: reused, from any path; a tampered or half-written entry is rebuilt, never measured;
    a rebuild writes the same bytes (the writer is deterministic, so export can reproduce the measured file)."""
    from alignflow.tasks.lib.manifest import read_manifest
    from alignflow.tasks.lib.shipped_artifacts import ARTIFACT_JSON, artifact, build_identity

    cache = tmp_path / "cache"
    sha = read_manifest(stages["dpo"])["outputs"]["adapter"]

    def get(fmt: str, weights: Path) -> Any:
        identity = build_identity(fmt, sha, stages["base"].key, "float32", "tiny:llama", "cpu")
        return artifact(fmt, weights, stages["base"].path, "float32", "tiny:llama", cache, identity, tmp_path / "x")

    first = get("gguf_q8_0", stages["dpo"] / "adapter")
    assert not first.reused and first.path.parent.parent == cache
    moved = tmp_path / "elsewhere" / "adapter"  # the same weights at another path: the same entry
    shutil.copytree(stages["dpo"] / "adapter", moved)
    again = get("gguf_q8_0", moved)
    assert again.reused and again.path == first.path and again.sha256 == first.sha256
    other = get("gguf_f16", moved)  # another format: another entry
    assert not other.reused and other.path.parent != first.path.parent and other.sha256 != first.sha256

    with open(first.path, "r+b") as f:  # one byte of the cached file changed
        f.seek(first.bytes - 10)
        byte = f.read(1)
        f.seek(first.bytes - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    rebuilt = get("gguf_q8_0", moved)
    assert not rebuilt.reused and rebuilt.sha256 == first.sha256  # built twice: the same bytes
    (rebuilt.path.parent / ARTIFACT_JSON).unlink()  # a build killed before its record was written
    assert not get("gguf_q8_0", moved).reused
    assert not list(cache.glob("*.tmp"))  # nothing half-built left beside the entries


def test_a_second_evaluate_reuses_the_artifacts_by_evaluates_own_key_and_names_the_dtype_built_in(
        stages: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another evaluate of the same weights, in another folder, with `model.dtype: auto` (float32 on a CPU): the
    cached artifacts and answers are reused (keyed by content and the resolved dtype, never by path or by `auto`),
    and what the artifact records it was built in names the dtype, not `auto`. How an artifact is read back is in
    its answers' key: another reader answers again, from the same cached artifact."""
    from alignflow.tasks import evaluate
    from alignflow.tasks.lib.models import device_kind

    if device_kind() != "cpu":
        pytest.skip("`auto` is float32 on a CPU only")
    ship, cache = ["gguf_q8_0", "merged"], stages["root"] / "shipped"
    again = _evaluate(stages, tmp_path / "again", ship, cache=cache, dtype="auto")
    for fmt in ship:
        record, first = again["shipped"][fmt], evaluated["shipped"][fmt]
        assert record["reused"] and (record["path"], record["sha256"]) == (first["path"], first["sha256"])
        assert record["built_with"].split("; ")[1:3] == ["float32", "cpu"]
        assert record["built_with"] == first["built_with"]
    assert {"base", "tuned", "shipped.merged", "shipped.gguf_q8_0"} <= set(again["cached_answers"])
    assert {k: v for k, v in again["metrics"].items() if k.startswith("shipped.")} == \
        {k: v for k, v in evaluated["metrics"].items() if k.startswith("shipped.")}
    # the reader's libraries are in it: `tokenizers` rebuilds a GGUF's tokenizer from the file's metadata
    from alignflow.tasks.lib import shipped_artifacts

    real_version = shipped_artifacts.version
    before = shipped_artifacts.read_back_identity()
    for name in ("tokenizers", "gguf", "safetensors"):
        monkeypatch.setattr(shipped_artifacts, "version",
                            lambda n, name=name: "0.0.1" if n == name else real_version(n))
        assert shipped_artifacts.read_back_identity() != before, name
    monkeypatch.setattr(shipped_artifacts, "version", real_version)
    monkeypatch.setattr(evaluate, "read_back_identity", lambda: {"code": "another reader"})
    third = _evaluate(stages, tmp_path / "third", ["merged"], cache=cache)
    assert third["shipped"]["merged"]["reused"] and "tuned" in third["cached_answers"]
    assert "shipped.merged" not in third["cached_answers"]


def test_the_build_never_puts_the_model_on_a_gpu(stages: dict[str, Any]) -> None:
    """The artifact is loaded, merged and written on the CPU (export on a machine without a GPU must write the same
    bytes): not one byte of it passes through the GPU evaluate measures on (a float32 copy of a 7B model is 28 GB)."""
    import torch

    from alignflow.tasks.lib.shipped_artifacts import build_model

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _ = build_model({"base": {"kind": "artifact", "spec": "tiny:llama"}, "base_spec": "tiny:llama"},
                           {"adapter": str(stages["dpo"] / "adapter"), "base": str(stages["base"].path)}, "auto")
    assert torch.cuda.max_memory_allocated() == before
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_second_builder_keeps_the_sound_entry_another_run_reads(stages: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Run B looked the entry up before run A put it in place, then built it too (here: other bytes, as another
    writer would): A's sound entry stays where A reads it, and B measures that one, not its own. The lookup and the
    replacement happen under the entry's lock; leftovers of killed builds are swept there."""
    from alignflow.tasks.lib import gguf_file
    from alignflow.tasks.lib import shipped_artifacts as sa
    from alignflow.tasks.lib.manifest import read_manifest

    cache = tmp_path / "cache"
    identity = sa.build_identity("gguf_q8_0", read_manifest(stages["dpo"])["outputs"]["adapter"], stages["base"].key,
                                 "float32", "tiny:llama", "cpu")

    def build() -> sa.Shipped:
        return sa.artifact("gguf_q8_0", stages["dpo"] / "adapter", stages["base"].path, "float32", "tiny:llama",
                           cache, identity, tmp_path / "x")

    a = build()
    inode = a.path.stat().st_ino
    real_valid, real_write = sa._valid, gguf_file.write_gguf
    looked: list[Path] = []

    def held(entry: Path) -> bool:
        """Is the entry's lock held (by the build under test)? flock from another open file would block."""
        import fcntl

        with open(entry.with_name(entry.name + ".lock"), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def late(entry: Path, fmt: str, name: str) -> str | None:  # B's lookup ran before A's entry was in place
        assert held(entry), "an entry is judged (and an unsound one replaced) only under its lock"
        looked.append(entry)
        return None if len(looked) == 1 else real_valid(entry, fmt, name)

    def other_bytes(model: Any, tok: Any, out: Path, gguf_type: str = "f16", name: str = "") -> dict[str, Any]:
        written = real_write(model, tok, out, gguf_type, name)  # type: ignore[arg-type]
        _corrupt_q8_scales(out, "blk.0.ffn_down.weight", 2.0)
        return written

    # leftovers of killed builds: this entry's (stale: its lock is free), another's from two days ago, and another's
    # being written now (kept: its builder may be alive)
    key = a.path.parent.name
    mine, old, fresh = cache / f"{key}.99999.tmp", cache / f"{'0' * 32}.1.unsound", cache / f"{'1' * 32}.2.tmp"
    for leftover in (mine, old, fresh):
        (leftover / "merged").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    monkeypatch.setattr(sa, "_valid", late)
    monkeypatch.setattr(gguf_file, "write_gguf", other_bytes)
    b = build()
    assert a.path.stat().st_ino == inode  # A's file: never deleted and replaced under its reader
    assert b.path == a.path and b.sha256 == a.sha256 and b.reused
    # B's build and the stale leftovers gone; the lock file stays (it is what is locked)
    assert sorted(p.name for p in cache.iterdir()) == sorted([key, f"{key}.lock", fresh.name])


def test_the_version_carries_the_measured_hash_and_export_writes_that_file(
        stages: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """register tags the measured artifacts' sha256 (and logs the files with log_shipped); `alignflow export --gguf`
    of the version writes a file with that hash, refuses (writing nothing) where it would write other bytes, and
    says so when the type asked for is not the one measured."""
    import mlflow
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from alignflow.cli import app
    from alignflow.tasks import register
    from alignflow.tasks.lib.hashing import sha256_file, sha256_weights

    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    curated = tmp_path / "curate"
    curated.mkdir()
    write_manifest(curated, {"stage": "curate", "outputs": [], "metrics": {"decontaminated": 1}})
    mlflow.set_experiment("ship")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    gate = register.GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                               min_judge_accuracy=None, max_shipped_regression={"exact_match": 0.5})
    done = register.run(register.RegisterConfig(model_name="ship-test", gate=gate, ship=["merged", "gguf_q8_0"],
                                                log_shipped=True),
                        register.RegisterInputs(base_path=stages["base"].path, base_spec="tiny:llama",
                                                base_key=stages["base"].key, dtype="float32",
                                                candidate=stages["dpo"], evaluation=stages["root"] / "evaluate",
                                                curated=curated, run_id=run_id, out_dir=tmp_path / "register"))
    assert done["alias"] == "champion" and done["gate_reasons"] == []
    client = MlflowClient(uri)
    version = done["version"]
    tags = client.get_model_version("ship-test", version).tags
    measured = evaluated["shipped"]["gguf_q8_0"]["sha256"]
    assert tags["alignflow.shipped.gguf_q8_0.sha256"] == measured
    assert tags["alignflow.shipped.merged.sha256"] == evaluated["shipped"]["merged"]["sha256"]
    assert "transformers==" in tags["alignflow.shipped.gguf_q8_0.built_with"]
    assert tags["alignflow.metric.shipped.gguf_q8_0.exact_match"] == str(evaluated["metrics"][
        "shipped.gguf_q8_0.exact_match"])
    assert tags["alignflow.shipped.gguf_q8_0.artifact_uri"] == f"runs:/{run_id}/shipped/gguf_q8_0/model.gguf"
    card = (tmp_path / "register" / "MODEL_CARD.md").read_text()
    assert f"| `shipped.gguf_q8_0.exact_match` | {evaluated['metrics']['shipped.gguf_q8_0.exact_match']} |" in card

    def export(out: Path, kind: str = "q8_0") -> Any:
        return CliRunner().invoke(app, ["export", f"models:/ship-test/{version}", "--gguf", str(out), "--gguf-type",
                                        kind, "--work-dir", str(work)])

    logged = export(tmp_path / "logged.gguf")  # the file register logged, checked against the tag
    assert logged.exit_code == 0, logged.output
    assert sha256_file(tmp_path / "logged.gguf") == measured and "the file logged with it" in logged.output
    client.delete_model_version_tag("ship-test", version, "alignflow.shipped.gguf_q8_0.artifact_uri")
    rebuilt = export(tmp_path / "rebuilt.gguf")  # no file logged: rebuilt from the registry, the same bytes
    assert rebuilt.exit_code == 0, rebuilt.output
    assert sha256_file(tmp_path / "rebuilt.gguf") == measured and "rebuilt, same bytes" in rebuilt.output
    other = export(tmp_path / "f16.gguf", "f16")  # a type that was not measured: written, and said so
    assert other.exit_code == 0 and "not the measured artifact" in " ".join(other.output.split())
    merged = CliRunner().invoke(app, ["export", f"models:/ship-test/{version}", "--merged", str(tmp_path / "merged"),
                                      "--work-dir", str(work)])  # the merged folder, checked the same way
    assert merged.exit_code == 0, merged.output
    assert "the artifact evaluate measured" in merged.output and (tmp_path / "merged" / "README.md").exists()
    assert sha256_weights(tmp_path / "merged") == evaluated["shipped"]["merged"]["sha256"]
    # a version measured at other bytes (another machine or library versions): refused, nothing written
    client.set_model_version_tag("ship-test", version, "alignflow.shipped.gguf_q8_0.sha256", "0" * 64)
    client.set_model_version_tag("ship-test", version, "alignflow.shipped.merged.sha256", "0" * 64)
    refused = export(tmp_path / "out" / "refused.gguf")
    said = " ".join(refused.output.split())
    assert refused.exit_code != 0 and "is not the one evaluate measured" in said and "built with" in said
    refused = CliRunner().invoke(app, ["export", f"models:/ship-test/{version}", "--merged",
                                       str(tmp_path / "out" / "merged"), "--work-dir", str(work)])
    assert refused.exit_code != 0 and "is not the one evaluate measured" in " ".join(refused.output.split())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# --- register keeps the shipped tags with the verdict; export says what is true (review items 1, 2, 6, 9, 12) -----

def _damaged_evaluation(evaluated: dict[str, Any], stages: dict[str, Any], out: Path, passes: bool) -> str:
    """An evaluate folder like the fixture's, whose GGUF is another file (one byte flipped: other bytes, as another
    writer or machine would make); `passes`: its scores are the honest ones, else it lost every answer. Returns its
    sha256. (No evaluate run: register reads only the manifest and the file.)"""
    from alignflow.tasks.lib.hashing import sha256_file
    from alignflow.tasks.lib.manifest import read_manifest

    manifest = read_manifest(stages["root"] / "evaluate")
    out.mkdir(parents=True)
    gguf = out / "model.gguf"
    shutil.copyfile(evaluated["shipped"]["gguf_q8_0"]["path"], gguf)
    with open(gguf, "r+b") as f:  # a byte of the last tensor's data
        f.seek(gguf.stat().st_size - 10)
        byte = f.read(1)
        f.seek(gguf.stat().st_size - 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    sha = sha256_file(gguf)
    manifest["shipped"]["gguf_q8_0"] = {**manifest["shipped"]["gguf_q8_0"], "path": str(gguf), "sha256": sha}
    if not passes:
        manifest["metrics"].update({"shipped.gguf_q8_0.exact_match": 0.0, "shipped.gguf_q8_0.changed": 1.0,
                                    "shipped.gguf_q8_0.exact_match_delta_ci_low": -1.0,
                                    "shipped.gguf_q8_0.exact_match_delta_ci_high": -1.0})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return sha


def _evaluation_without(src: Path, out: Path, formats: set[str], metrics: set[str]) -> Path:
    """A copy of the evaluate folder `src`'s manifest that measured none of `formats` and no shipped `metrics`
    (as evaluate writes it with those left out of register.ship / evaluate.metrics). Its artifacts' paths stay
    absolute (the fixture's are in the cache)."""
    from alignflow.tasks.lib.manifest import read_manifest

    manifest = read_manifest(src)
    manifest["shipped"] = {f: r for f, r in manifest["shipped"].items() if f not in formats}
    manifest["metrics"] = {k: v for k, v in manifest["metrics"].items() if not k.startswith("shipped.")
                           or (k.split(".")[1] not in formats and k.split(".")[2].removesuffix("_delta_ci_low")
                               .removesuffix("_delta_ci_high") not in metrics)}
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_kept_champion_keeps_the_artifact_that_passed_and_export_names_the_true_cause(
        stages: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The champion re-submitted with an artifact that fails the gate keeps its verdict, and with it the shipped tags
    of the artifact that passed (this run's go on the run); an unchanged artifact is not logged again; a passing
    re-measure with other bytes drops the stale logged file. Export of `latest` resolves one version; its refusals
    name the cause that holds (a logged file that disagrees with its tag; same build settings); --merged refuses a
    non-empty OUT."""
    import mlflow
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from alignflow.cli import app
    from alignflow.tasks import register
    from alignflow.tasks.lib.hashing import sha256_file

    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    from alignflow.flows import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", uri)  # what MLFLOW_TRACKING_URI sets at import (the CLI's)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ship-keep")
    client = MlflowClient(uri)
    curated = tmp_path / "curate"
    curated.mkdir()
    write_manifest(curated, {"stage": "curate", "outputs": [], "metrics": {"decontaminated": 1}})
    gate = register.GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                               min_judge_accuracy=None, max_shipped_regression={"exact_match": 0.5})

    def submit(evaluation: Path, log_shipped: bool, ship: tuple[str, ...] = ("merged", "gguf_q8_0"),
               rules: register.GateConfig = gate) -> tuple[str, dict[str, Any]]:
        with mlflow.start_run() as run:
            run_id = run.info.run_id
        done = register.run(register.RegisterConfig(model_name="ship-keep", gate=rules, ship=list(ship),
                                                    log_shipped=log_shipped),
                            register.RegisterInputs(base_path=stages["base"].path, base_spec="tiny:llama",
                                                    base_key=stages["base"].key, dtype="float32",
                                                    candidate=stages["dpo"], evaluation=evaluation, curated=curated,
                                                    run_id=run_id, out_dir=tmp_path / f"register-{run_id}"))
        return run_id, done

    honest = evaluated["shipped"]["gguf_q8_0"]["sha256"]
    first, done = submit(stages["root"] / "evaluate", True)
    assert done["alias"] == "champion" and done["gate_reasons"] == []
    version = done["version"]
    logged_uri = f"runs:/{first}/shipped/gguf_q8_0/model.gguf"
    # the same artifact again: not logged again (the version already names a file with this sha256)
    second, done = submit(stages["root"] / "evaluate", True)
    assert done["version"] == version and done["gate_reasons"] == []
    assert client.list_artifacts(second, "shipped") == []
    assert client.get_model_version("ship-keep", version).tags[
        "alignflow.shipped.gguf_q8_0.artifact_uri"] == logged_uri

    # #1: the champion re-submitted with an artifact that fails the gate keeps champion, its verdict and its tags
    damaged = _damaged_evaluation(evaluated, stages, tmp_path / "damaged", passes=False)
    third, done = submit(tmp_path / "damaged", True)
    assert done["alias"] == "champion" and done["gate_reasons"][0].startswith(f"version {version} already holds")
    assert done["shipped_tags"] == {}
    tags = client.get_model_version("ship-keep", version).tags
    assert tags["alignflow.gate"] == "passed"
    assert tags["alignflow.shipped.gguf_q8_0.sha256"] == honest
    assert tags["alignflow.shipped.gguf_q8_0.artifact_uri"] == logged_uri
    assert tags["alignflow.metric.shipped.gguf_q8_0.exact_match"] == str(evaluated["metrics"][
        "shipped.gguf_q8_0.exact_match"])
    assert client.get_run(third).data.tags["alignflow.shipped.gguf_q8_0.sha256"] == damaged  # on the run only
    assert client.list_artifacts(third, "shipped") == []

    def export(ref: str, *args: str) -> tuple[int, str]:
        done = CliRunner().invoke(app, ["export", ref, *args, "--work-dir", str(work)])
        return done.exit_code, " ".join(done.output.split())

    # #9: `latest` is resolved to one version, whose tags and logged file export uses: the honest file
    code, said = export("models:/ship-keep/latest", "--gguf", str(tmp_path / "latest.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and f"(models:/ship-keep/{version})" in said and "the file logged with it" in said, said
    assert sha256_file(tmp_path / "latest.gguf") == honest
    # #6: NAME@ALIAS and the register run's `runs:/RUN/model` are that version, checked the same way
    for i, ref in enumerate(("ship-keep@champion", "models:/ship-keep")):  # (the latter: its champion, as bare)
        code, said = export(ref, "--gguf", str(tmp_path / f"alias{i}.gguf"), "--gguf-type", "q8_0")
        assert code == 0 and f"(models:/ship-keep/{version})" in said and "the file logged with it" in said, said
    code, said = export(f"runs:/{first}/model", "--gguf", str(tmp_path / "run.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and f"(models:/ship-keep/{version})" in said and "the file logged with it" in said, said
    # the version's source (the logged model's id) is the version too; a runs:/ path that is no registered model's
    # is exported unchecked, and said to be
    source = client.get_model_version("ship-keep", version).source
    code, said = export(source, "--gguf", str(tmp_path / "src.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and f"(models:/ship-keep/{version})" in said and "the file logged with it" in said, said
    twin = client.create_model_version("ship-keep", source, run_id=first)  # the run made two versions: which?
    code, said = export(f"runs:/{first}/model", "--gguf", str(tmp_path / "run2.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and "not checked against a measured artifact" in said, said
    client.delete_model_version("ship-keep", twin.version)
    # ... one error line, before any build, for a --gguf OUT that is a folder and a --merged OUT that is where the
    # shell stands (replaced whole, it would leave the shell in a deleted folder)
    (tmp_path / "adir").mkdir()
    code, said = export(f"models:/ship-keep/{version}", "--gguf", str(tmp_path / "adir"), "--gguf-type", "q8_0")
    assert code == 1 and "is a folder; --gguf writes one file" in said and not list((tmp_path / "adir").iterdir())
    monkeypatch.chdir(tmp_path / "adir")
    code, said = export(f"models:/ship-keep/{version}", "--merged", ".")
    assert code == 1 and "is the current directory" in said and not list((tmp_path / "adir").iterdir()), said
    monkeypatch.chdir(tmp_path)
    # ... and an alias that moves while export runs does not mix versions: the tags (and logged file) are those of
    # the version whose weights were downloaded (read by alias again, they would be another version's: none)
    from alignflow.flows import registry

    other_version = client.create_model_version("ship-keep", client.get_model_version("ship-keep", version).source)
    real_download = registry.download_model

    def download_then_move(model_uri: str, dest: Path) -> Any:
        found = real_download(model_uri, dest)
        client.set_registered_model_alias("ship-keep", "champion", other_version.version)
        return found

    monkeypatch.setattr(registry, "download_model", download_then_move)
    code, said = export("models:/ship-keep@champion", "--gguf", str(tmp_path / "race.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and "the file logged with it" in said, said
    monkeypatch.setattr(registry, "download_model", real_download)
    client.set_registered_model_alias("ship-keep", "champion", version)
    client.delete_model_version("ship-keep", other_version.version)

    # #2: a logged file that is not the one its tag names is said to be that, not a rebuild on another machine
    client.set_model_version_tag("ship-keep", version, "alignflow.shipped.gguf_q8_0.sha256", "0" * 64)
    code, said = export(f"models:/ship-keep/{version}", "--gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q8_0")
    assert code != 0 and f"the gguf_q8_0 file logged with this version ({logged_uri}) hashes to" in said, said
    assert "built here" not in said and "machine kind" not in said and not (tmp_path / "x.gguf").exists()
    client.set_model_version_tag("ship-keep", version, "alignflow.shipped.gguf_q8_0.sha256", honest)

    # a passing re-measure with other bytes (log_shipped off): the version's sha256 is the new one, and the logged
    # file of the old bytes is no longer named (export rebuilds, and refuses: the rebuild is the honest bytes)
    other = _damaged_evaluation(evaluated, stages, tmp_path / "other", passes=True)
    _fourth, done = submit(tmp_path / "other", False)
    assert done["gate_reasons"] == []
    tags = client.get_model_version("ship-keep", version).tags
    assert tags["alignflow.shipped.gguf_q8_0.sha256"] == other
    assert "alignflow.shipped.gguf_q8_0.artifact_uri" not in tags
    code, said = export(f"models:/ship-keep/{version}", "--gguf", str(tmp_path / "y.gguf"), "--gguf-type", "q8_0")
    # (here the bytes differ because the measurement was made up: the same settings name possible causes, not one)
    assert code != 0 and "rebuilt here" in said and not (tmp_path / "y.gguf").exists(), said
    assert "same libraries, dtype, machine kind and alignflow build code" in said and "possibly:" in said, said
    assert "'tiny:llama'" in said and "alignflow code outside the build code" in said, said
    # alignflow's own build code changed since (an upgrade of its GGUF writer): named as what differs, not the base
    from alignflow.tasks.lib import shipped_artifacts

    real_code = shipped_artifacts.build_code
    monkeypatch.setattr(shipped_artifacts, "build_code", lambda: "f" * 64)
    code, said = export(f"models:/ship-keep/{version}", "--gguf", str(tmp_path / "y.gguf"), "--gguf-type", "q8_0")
    assert code != 0 and "What differs: alignflow's build code;" in said and "possibly" not in said, said
    assert f"alignflow code {real_code()[:12]}" in tags["alignflow.shipped.gguf_q8_0.built_with"]
    monkeypatch.setattr(shipped_artifacts, "build_code", real_code)

    # #2 for merged: the measured folder, logged, is named where to fetch it; nothing written
    client.set_model_version_tag("ship-keep", version, "alignflow.shipped.merged.sha256", "0" * 64)
    code, said = export(f"models:/ship-keep/{version}", "--merged", str(tmp_path / "m"))
    assert code != 0 and f"mlflow artifacts download -u runs:/{first}/shipped/merged" in said, said
    assert "log_shipped" not in said and not (tmp_path / "m").exists()
    client.set_model_version_tag("ship-keep", version, "alignflow.shipped.merged.sha256",
                                 evaluated["shipped"]["merged"]["sha256"])
    # #12: never mixed into a folder holding other files; an empty one is filled whole
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("kept")
    code, said = export(f"models:/ship-keep/{version}", "--merged", str(full))
    assert code != 0 and "exists and is not empty" in said and [p.name for p in full.iterdir()] == ["old.txt"]
    (tmp_path / "empty").mkdir()
    code, said = export(f"models:/ship-keep/{version}", "--merged", str(tmp_path / "empty"))
    assert code == 0 and "rebuilt, same bytes" in said, said
    assert (tmp_path / "empty" / "model.safetensors").exists() and not list(tmp_path.glob(".empty.*"))

    # a verdict written on the version names only what this run measured: the GGUF dropped from register.ship (and
    # perplexity from evaluate.metrics) leaves no tag of it, so export does not call a file of it "measured"
    fewer = _evaluation_without(stages["root"] / "evaluate", tmp_path / "fewer", {"gguf_q8_0"}, {"perplexity"})
    _fifth, done = submit(fewer, False, ship=("merged",))
    assert done["gate_reasons"] == [] and done["alias"] == "champion"
    tags = client.get_model_version("ship-keep", version).tags
    shipped_keys = {k for k in tags if k.startswith(("alignflow.shipped.", "alignflow.metric.shipped."))}
    assert shipped_keys and not {k for k in shipped_keys if "gguf_q8_0" in k or "perplexity" in k}, shipped_keys
    assert tags["alignflow.shipped.merged.sha256"] == evaluated["shipped"]["merged"]["sha256"]
    assert tags["alignflow.shipped.merged.artifact_uri"] == f"runs:/{first}/shipped/merged"  # same bytes: kept
    code, said = export(f"models:/ship-keep/{version}", "--gguf", str(tmp_path / "z.gguf"), "--gguf-type", "q8_0")
    assert code == 0 and "not the measured artifact" in said and "evaluate measured" not in said, said
    # nothing shipped measured (and no rule asking for it): no shipped tag at all
    plain = register.GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                                min_judge_accuracy=None)
    none = _evaluation_without(stages["root"] / "evaluate", tmp_path / "none", {"gguf_q8_0", "merged"}, set())
    _sixth, done = submit(none, False, ship=(), rules=plain)
    assert done["gate_reasons"] == []
    tags = client.get_model_version("ship-keep", version).tags
    assert not [k for k in tags if k.startswith(("alignflow.shipped.", "alignflow.metric.shipped."))]


def test_policy_sets_merges_and_cites_max_shipped_regression(tmp_path: Path) -> None:
    """`policy set register.gate.max_shipped_regression.METRIC=V` (the form bounds cite) sets one metric, keeping the
    others; merged with the recipe's, the smaller wins; the fail-closed reason (nothing shipped measured) names the
    policy that asked for the check."""
    from mlflow import MlflowClient

    from alignflow.flows.policy import set_policy
    from alignflow.tasks.lib.policy import cite, gate_with_policy
    from alignflow.tasks.register import GateConfig, gate

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    set_policy(client, "m", ["register.gate.max_shipped_regression.exact_match=0.02"])
    set_policy(client, "m", ["register.gate.max_shipped_regression.perplexity=1.0"])
    assert json.loads(client.get_registered_model("m").tags["register.gate.max_shipped_regression"]) == {
        "exact_match": 0.02, "perplexity": 1.0}
    recipe = GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                        min_judge_accuracy=None, max_shipped_regression={"exact_match": 0.1, "rougeL": 0.3})
    merged, decided, problems = gate_with_policy(client, "m", recipe)
    assert problems == [] and merged.max_shipped_regression == {"exact_match": 0.02, "perplexity": 1.0,
                                                                "rougeL": 0.3}
    assert set(decided) == {"max_shipped_regression.exact_match", "max_shipped_regression.perplexity"}
    # a recipe without register.ship: the policy's rule fails closed, and the reason says whose rule it is
    plain = GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                       min_judge_accuracy=None)
    merged, decided, _ = gate_with_policy(client, "m", plain)
    reasons = cite(gate(merged, {"exact_match": 1.0}, True)[0], decided, "m")
    assert len(reasons) == 1 and reasons[0].startswith("max_shipped_regression is set but no shipped artifact")
    assert reasons[0].endswith("register.gate.max_shipped_regression.exact_match=0.02, "
                               "register.gate.max_shipped_regression.perplexity=1.0]"), reasons
    set_policy(client, "m", ["register.gate.max_shipped_regression.perplexity=null"])  # null removes one metric
    assert json.loads(client.get_registered_model("m").tags["register.gate.max_shipped_regression"]) == {
        "exact_match": 0.02}


def test_the_registered_config_serves_in_the_recipes_dtype_and_merges_in_the_one_evaluate_built_in(
        stages: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.dtype: auto` is registered as `auto` for serving (resolved where the version is loaded: a CPU host serves
    a version trained on a bf16 GPU in float32) and, as `merge_dtype`, as what it resolved to where evaluate built and
    measured the artifacts (float32 on this CPU): a machine that resolves `auto` otherwise (here: one that says it
    has a bf16 GPU) merges in float32, so `export --merged` there writes the bytes evaluate measured."""
    import mlflow
    from mlflow.models import Model
    from typer.testing import CliRunner

    from alignflow.cli import app
    from alignflow.flows import tracking
    from alignflow.tasks import register
    from alignflow.tasks.lib import models
    from alignflow.tasks.lib.hashing import sha256_weights

    if models.device_kind() != "cpu":
        pytest.skip("`auto` is float32 on a CPU only")
    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking, "USER_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    curated = tmp_path / "curate"
    curated.mkdir()
    write_manifest(curated, {"stage": "curate", "outputs": [], "metrics": {"decontaminated": 1}})
    mlflow.set_experiment("ship-dtype")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    gate = register.GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                               min_judge_accuracy=None)
    done = register.run(register.RegisterConfig(model_name="ship-dtype", gate=gate, ship=["merged", "gguf_q8_0"]),
                        register.RegisterInputs(base_path=stages["base"].path, base_spec="tiny:llama",
                                                base_key=stages["base"].key, dtype="auto",
                                                candidate=stages["dpo"], evaluation=stages["root"] / "evaluate",
                                                curated=curated, run_id=run_id, out_dir=tmp_path / "register"))
    config = Model.load(f"models:/ship-dtype/{done['version']}").flavors["python_function"]["config"]
    assert config["dtype"] == "auto" and config["merge_dtype"] == "float32"
    assert evaluated["shipped"]["merged"]["built_with"].split("; ")[1:3] == ["float32", "cpu"]
    monkeypatch.setattr(models, "device_kind", lambda: "cuda-bf16")  # `auto` would be bfloat16 here
    out = tmp_path / "merged"
    exported = CliRunner().invoke(app, ["export", "ship-dtype", "--merged", str(out), "--work-dir", str(work)])
    assert exported.exit_code == 0, exported.output
    assert sha256_weights(out) == evaluated["shipped"]["merged"]["sha256"]



def test_a_version_registered_before_merge_dtype_merges_in_the_dtype_its_verdict_measured() -> None:
    """A version created by an older alignflow has `dtype: auto` and no `merge_dtype` in its config (the config is
    written once, when the version is created); measured later (register.ship added after the upgrade, on a bf16
    GPU) its verdict tags the merged artifact's `built_with` with the dtype it was built in. Export merges in that
    dtype, not in what `auto` means on the exporting machine, so it can write the bytes that were measured."""
    from alignflow.tasks.export import MeasuredArtifact, merge_dtype

    old_config = {"dtype": "auto", "base_spec": "tiny:llama"}
    libs = "torch==2.13.0+cpu, transformers==5.23.0"
    on_gpu = MeasuredArtifact(sha256="0" * 64, built_with=f"{libs}; bfloat16; cuda-bf16; alignflow code 0123456789ab")
    assert merge_dtype(old_config, on_gpu) == "bfloat16"
    older_record = MeasuredArtifact(sha256="0" * 64, built_with=f"{libs}; float16; cuda")  # before the code part
    assert merge_dtype(old_config, older_record) == "float16"
    # nothing measured, or a record without a dtype: the config decides, as before
    assert merge_dtype({**old_config, "merge_dtype": "float32"}) == "float32"
    assert merge_dtype(old_config, MeasuredArtifact(sha256="0" * 64)) == "auto"
    assert merge_dtype({"dtype": "bfloat16", "merge_dtype": "float32"},
                       MeasuredArtifact(sha256="0" * 64, built_with="x")) == "float32"

def test_a_sweep_winner_re_gated_at_a_lower_level_keeps_the_shipped_tags_of_its_verdict(
        stages: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's winner (k=3), refused for its GGUF and so a challenger, re-submitted by a plain run (k=1, its
    intervals at 95%) with another artifact: the gate does not re-gate it at the lower level, so the version keeps
    the verdict and the shipped tags of the sweep (this run's go on the run). Not the champion: only the sweep-winner
    rule keeps them."""
    import mlflow
    from mlflow import MlflowClient

    from alignflow.tasks import register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ship-relevel")
    client = MlflowClient(uri)
    curated = tmp_path / "curate"
    curated.mkdir()
    write_manifest(curated, {"stage": "curate", "outputs": [], "metrics": {"decontaminated": 1}})
    gate = register.GateConfig(min_win_rate=None, min_win_rate_vs_champion=None, min_rougeL_gain=None,
                               min_judge_accuracy=None, max_shipped_regression={"exact_match": 0.5})

    def submit(evaluation: Path) -> tuple[str, dict[str, Any]]:
        with mlflow.start_run() as run:
            run_id = run.info.run_id
        done = register.run(register.RegisterConfig(model_name="ship-relevel", gate=gate,
                                                    ship=["merged", "gguf_q8_0"]),
                            register.RegisterInputs(base_path=stages["base"].path, base_spec="tiny:llama",
                                                    base_key=stages["base"].key, dtype="float32",
                                                    candidate=stages["dpo"], evaluation=evaluation, curated=curated,
                                                    run_id=run_id, out_dir=tmp_path / f"register-{run_id}"))
        return run_id, done

    refused = _damaged_evaluation(evaluated, stages, tmp_path / "sweep", passes=False)
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    manifest["metrics"].update({"selection_trials": 3.0, "interval_level": 0.9833})
    (tmp_path / "sweep" / "manifest.json").write_text(json.dumps(manifest))
    _sweep, done = submit(tmp_path / "sweep")
    assert done["alias"] == "challenger" and done["gate_selection"]
    version = done["version"]
    assert client.get_model_version("ship-relevel", version).tags["alignflow.shipped.gguf_q8_0.sha256"] == refused

    plain, done = submit(stages["root"] / "evaluate")  # k=1: the honest artifact, which would pass at 95%
    assert done["version"] == version and done["shipped_tags"] == {}
    assert any("does not re-gate it at a lower level" in r for r in done["gate_reasons"])
    tags = client.get_model_version("ship-relevel", version).tags
    assert tags["alignflow.gate"] == "failed" and tags["alignflow.shipped.gguf_q8_0.sha256"] == refused
    assert tags["alignflow.metric.shipped.gguf_q8_0.exact_match"] == "0.0"
    assert client.get_run(plain).data.tags["alignflow.shipped.gguf_q8_0.sha256"] == \
        evaluated["shipped"]["gguf_q8_0"]["sha256"]
