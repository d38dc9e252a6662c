"""quantize's report on the tiny model: every decoder Linear is compared with its original weights, which are
streamed from the base's safetensors files one layer at a time."""

from __future__ import annotations

import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_report_covers_every_quantized_layer(tmp_path: Path) -> None:
    from alignflow.tasks import quantize
    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.jsonl import read_jsonl, write_jsonl

    base = resolve_base("tiny:llama", tmp_path / "base", [ROOT / "data" / "sft.jsonl"])
    (tmp_path / "curated").mkdir()
    write_jsonl(tmp_path / "curated" / "eval.jsonl", (
        {"prompt": [{"role": "user", "content": r["prompt"]}], "reference": r["reference"]}
        for r in list(read_jsonl(ROOT / "data" / "eval.jsonl"))[:4]))
    manifest = quantize.run(quantize.QuantizeConfig(bits=4), quantize.QuantizeInputs(
        base=base.path, dtype="auto", curated=tmp_path / "curated", out_dir=tmp_path / "q"))
    layers = list(csv.DictReader((tmp_path / "q" / "layers.csv").read_text().splitlines()))
    # 2 decoder layers x (q, k, v, o, gate, up, down); the LM head and embeddings stay unquantized
    assert len(layers) == 14 and not any("lm_head" in r["layer"] or "embed" in r["layer"] for r in layers)
    errors = [float(r["relative_error"]) for r in layers]
    assert all(0.01 < e < 0.5 for e in errors)  # NF4 really rounds, and the originals are the right tensors
    first = json.loads((tmp_path / "q" / "first_principles.json").read_text())
    assert {v["layers"] for v in first.values()} == {14}
    metrics = manifest["metrics"]
    assert metrics["memory_ratio"] < 0.7 and metrics["perplexity_after"] > 0
    assert json.loads((tmp_path / "q" / "quantization.json").read_text())["bnb_4bit_compute_dtype"] == "float32"
