"""Teacher generation throughput: the local teacher batched vs unbatched, measured side by side.

Generates `--prompts` answers of `--tokens` new tokens each (sampled) with batch_size=8 and with batch_size=1
through `alignflow.tasks.lib.inference.generate` (the function the synthesize stage uses), and prints new tokens/s
and the ratio batched / unbatched over `--pairs` alternating pairs (median and range). Uses the embedded SmolLM2
when installed, else the tiny test model.

  python bench/bench_synthesize.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from pairs import at_least_one  # noqa: E402  (bench/pairs.py)

from alignflow.tasks.lib.base_model import embedded_available, resolve_base  # noqa: E402
from alignflow.tasks.lib.inference import generate  # noqa: E402
from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--pairs", type=at_least_one, default=3, help="alternating batched / unbatched pairs")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "alignflow-bench-base"))
    args = parser.parse_args()
    spec = "embedded:smollm2-135m-instruct" if embedded_available("embedded:smollm2-135m-instruct") else "tiny:llama"
    base = resolve_base(spec, Path(args.work), [ROOT / "data" / "sft.jsonl"])
    model, tok = load_causal_lm(base.path, "float32"), load_tokenizer(base.path)
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(args.prompts)]
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up
    rates: dict[int, list[float]] = {8: [], 1: []}
    for i in range(args.pairs):  # alternating: batched, unbatched, batched, unbatched, ...
        for batch in (8, 1):
            torch.manual_seed(i)  # the same samples (and lengths) for both sizes within a pair
            t0 = time.perf_counter()
            outs = generate(model, tok, prompts, max_new_tokens=args.tokens, batch_size=batch, do_sample=True,
                            desc=f"batch {batch}")
            seconds = time.perf_counter() - t0
            tokens = sum(len(tok(o[0], add_special_tokens=False)["input_ids"]) for o in outs)
            rates[batch].append(tokens / seconds)
            print(f"pair {i + 1}, {spec} batch_size={batch}: {tokens} new tokens in {seconds:.1f}s = "
                  f"{rates[batch][-1]:.1f} tokens/s", flush=True)
    ratios = [a / b for a, b in zip(rates[8], rates[1], strict=True)]
    print(f"tokens/s batched            {statistics.median(rates[8]):.1f} ({min(rates[8]):.1f} to {max(rates[8]):.1f})")
    print(f"tokens/s unbatched          {statistics.median(rates[1]):.1f} ({min(rates[1]):.1f} to {max(rates[1]):.1f})")
    print(f"ratio batched / unbatched   {statistics.median(ratios):.2f} (median of {args.pairs} pairs; "
          f"{min(ratios):.2f} to {max(ratios):.2f})")

if __name__ == "__main__":
    from machine import describe  # bench/machine.py

    print(describe("at start"), flush=True)
    main()
    print(describe("at end"))
