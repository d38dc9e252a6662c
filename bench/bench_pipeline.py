"""P1 orchestration overhead and P2 cached re-run, measured side by side in one process.

  P1 = (pipeline wall time - plain script wall time) / plain script wall time
       the pipeline: Prefect flow + tasks + cache records + MLflow parent/child runs + artifacts;
       the plain script: the very same `tasks.<stage>.run` functions called in sequence, nothing else.
  P2 = unchanged re-run of the pipeline / its cold run (every stage served from cache).
  Also: `alignflow --help` wall time (median of 5).

Both cold runs start from an empty work dir (each converts/builds its own base model). Machines here are
shared and noisy: compare only figures printed by one invocation.

  python bench/bench_pipeline.py --recipe configs/smoke.yaml        # ~1.5 min
  python bench/bench_pipeline.py --recipe configs/demo.yaml         # ~25 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING"})
os.environ.pop("MLFLOW_TRACKING_URI", None)

from alignflow.recipe import Recipe, load_recipe  # noqa: E402
from alignflow.tasks import curate, dpo, evaluate, quantize, reward, sft, synthesize, tokenize  # noqa: E402
from alignflow.tasks.lib.base_model import resolve_base  # noqa: E402


def plain_script(r: Recipe, work: Path) -> None:
    """The eight ML stages with no orchestration and no tracking (register needs MLflow, so both skip it)."""
    d, dtype, seed = work / "stages", r.model.dtype, r.seed
    base = resolve_base(r.model.base, work / "base", [Path(p) for p in r.data.sft])
    curate.run(r.curate, curate.CurateInputs(sft=r.data.sft, preference=r.data.preference, eval=r.data.eval,
                                             out_dir=d / "curate"))
    synthesize.run(r.synthesize, synthesize.SynthesizeInputs(base=base.path, dtype=dtype, curated=d / "curate",
                                                             curate_cfg=r.curate, out_dir=d / "synthesize", seed=seed))
    tokenize.run(r.tokenize, tokenize.TokenizeInputs(base=base.path, curated=d / "curate",
                                                     synthesized=d / "synthesize", out_dir=d / "tokenize",
                                                     heldout_fraction=r.reward.eval_fraction))
    quantize.run(r.quantize, quantize.QuantizeInputs(base=base.path, dtype=dtype, curated=d / "curate",
                                                     out_dir=d / "quantize"))
    sft.run(r.sft, sft.SftInputs(base=base.path, dtype=dtype, tokenized=d / "tokenize", quantized=d / "quantize",
                                 out_dir=d / "sft", seed=seed))
    reward.run(r.reward, reward.RewardInputs(base=base.path, dtype=dtype, tokenized=d / "tokenize",
                                             quantized=d / "quantize", out_dir=d / "reward", seed=seed))
    dpo.run(r.dpo, dpo.DpoInputs(base=base.path, base_key=base.key, dtype=dtype, tokenized=d / "tokenize",
                                 quantized=d / "quantize", sft=d / "sft", out_dir=d / "dpo", seed=seed,
                                 lora=r.sft.lora))
    evaluate.run(r.evaluate, evaluate.EvaluateInputs(base=base.path, dtype=dtype, tokenized=d / "tokenize",
                                                     curated=d / "curate", candidate=d / "dpo", sft=d / "sft",
                                                     reward=d / "reward", out_dir=d / "evaluate", seed=seed))


def orchestrated(r: Recipe, work: Path) -> dict:
    from alignflow.flows.pipeline import pipeline

    return pipeline(recipe=r, work_dir=str(work), until="evaluate")  # register needs MLflow: compared without it


def timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def help_seconds() -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alignflow.cli", "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/smoke.yaml")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    os.chdir(ROOT)
    recipe = load_recipe(Path(args.recipe))
    tmp = Path(tempfile.mkdtemp(prefix="alignflow-bench-"))
    try:
        plain = timed(plain_script, recipe, tmp / "plain")
        cold = timed(orchestrated, recipe, tmp / "flow")
        warm = timed(orchestrated, recipe, tmp / "flow")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        "recipe": args.recipe,
        "plain_script_s": round(plain, 2),
        "pipeline_cold_s": round(cold, 2),
        "pipeline_cached_s": round(warm, 2),
        "P1_orchestration_overhead": round((cold - plain) / plain, 4),
        "P2_cached_over_cold": round(warm / cold, 4),
        "help_s": round(help_seconds(), 3),
    }
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
