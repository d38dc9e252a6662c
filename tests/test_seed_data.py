"""The demo's claim: its held-out eval set uses names, cities and fruits that never occur in training."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_held_out_entities_never_occur_in_training_data() -> None:
    spec = importlib.util.spec_from_file_location("make_seed_data", ROOT / "data" / "make_seed_data.py")
    assert spec and spec.loader
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    training = ((ROOT / "data" / "sft.jsonl").read_text() + (ROOT / "data" / "pairs.jsonl").read_text()).lower()
    evaluation = (ROOT / "data" / "eval.jsonl").read_text().lower()
    for word in [*seed.EVAL_FRUITS, *seed.EVAL_FIRST, *seed.EVAL_LAST, *seed.EVAL_CITY]:
        assert not re.search(rf"\b{re.escape(word.lower())}", training), f"held-out '{word}' occurs in training"
    # and the eval set's fruits are only held-out ones (it used to mix in apple and pear)
    listed = re.findall(r"fruits: ([a-z]+), ([a-z]+)", evaluation)
    assert listed and {f for pair in listed for f in pair} <= {f.lower() for f in seed.EVAL_FRUITS}
