"""Teacher generation throughput: the local teacher batched vs unbatched, measured side by side.

Generates `--prompts` answers of `--tokens` new tokens each (sampled) with batch_size=8 and with batch_size=1
through `alignflow.tasks.lib.inference.generate` (the function the synthesize stage uses), and prints new tokens/s
and the ratio batched / unbatched. Uses the embedded SmolLM2 when installed, else the tiny test model.

  python bench/bench_synthesize.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignflow.tasks.lib.base_model import embedded_available, resolve_base  # noqa: E402
from alignflow.tasks.lib.inference import generate  # noqa: E402
from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-base"))
    args = parser.parse_args()
    spec = "embedded:smollm2-135m-instruct" if embedded_available("embedded:smollm2-135m-instruct") else "tiny:llama"
    base = resolve_base(spec, Path(args.work), [ROOT / "data" / "sft.jsonl"])
    model, tok = load_causal_lm(base.path, "float32"), load_tokenizer(base.path)
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(args.prompts)]
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    rates = {}
    for batch in (8, 1):
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts, max_new_tokens=args.tokens, batch_size=batch, do_sample=True,
                        desc=f"batch {batch}")
        seconds = time.perf_counter() - t0
        tokens = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) for o in outs)
        rates[batch] = tokens / seconds
        print(f"{spec} batch_size={batch}: {tokens} new tokens in {seconds:.1f}s = {rates[batch]:.1f} tokens/s")
    print(f"ratio batched / unbatched   {rates[8] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
