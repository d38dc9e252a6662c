"""P1 orchestration overhead and P2 cached re-run, each over several samples (median and range).

  P1 = (pipeline wall time - plain script wall time) / plain script wall time, over `--pairs` alternating pairs
       (pipeline, plain, pipeline, plain, ...), each run in a fresh work dir sharing one base model resolved
       beforehand (warm for both: neither converts it), `--until evaluate` (register has no plain equivalent),
       after an untimed `--until curate` pipeline run (the flow's imports and Prefect's server, once a process).
       Also the pipeline's time outside its stages (wall time minus the stages' own `stage_seconds`).
       The pipeline: Prefect flow + tasks + cache records + MLflow parent/child runs + artifacts; the plain
       script: the very same `tasks.<stage>.run` functions called in sequence, nothing else.
  P2 in-process = the pipeline called again on an unchanged recipe (every stage served from cache, in this
       process, Prefect's server already up) / the median cold pipeline run of P1.
  P2 whole command = `alignflow run RECIPE` as users type it (a new process: imports, Prefect's temporary
       server, MLflow store, hashing, register), `--cached` times on an unchanged recipe / the same command's
       cold run in a fresh work dir (base model conversion included, as a user's first run).
  Also: `alignflow --help` wall time (median of 5).

Machines here are shared and noisy: compare only figures printed by one invocation.

  python bench/bench_pipeline.py --recipe configs/smoke.yaml                  # ~3 min
  python bench/bench_pipeline.py --recipe configs/demo.yaml --pairs 3        # ~55 min on 2 idle cores
  python bench/bench_pipeline.py --recipe configs/demo.yaml --only-command   # P2 whole command only (~8 min)
  python bench/bench_pipeline.py --only-command --heartbeat-pairs 5           # what heartbeats cost (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
sys.path.insert(0, str(ROOT / "bench"))

import pairs  # noqa: E402  (bench/pairs.py)
from pairs import at_least_one  # noqa: E402

os.environ.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})  # as the CLI: slow first start
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


def stage_seconds(work: Path) -> float:
    """Seconds the flow spent inside its stages (each stage's `stage_seconds` in its MLflow child run): the
    pipeline's wall time minus this is what orchestration costs outside them, free of the run-to-run noise."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return sum(r.data.metrics.get("stage_seconds", 0.0) for r in runs)


def timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


CPU: list[float] = []  # CPU seconds (user + system) of each `command`, children it waited for included


def command(recipe: str, work: Path, extra_env: dict[str, str] | None = None) -> float:
    """`alignflow run RECIPE --work-dir WORK` in a new process, timed from launch to exit. Its CPU time goes
    to CPU: on a loaded machine it says what the command costs when wall time mostly says what others cost."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}  # a user's INFO lines, as typed
    env |= extra_env or {}
    proc = subprocess.run([sys.executable, "-m", "alignflow.cli", "run", recipe, "--work-dir", str(work)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"alignflow run {recipe} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return seconds


def help_seconds() -> float:
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "alignflow.cli", "--help"], capture_output=True, check=True)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def spread(values: list[float]) -> dict[str, float]:
    return pairs.spread(values, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/smoke.yaml")
    parser.add_argument("--pairs", type=at_least_one, default=3, help="P1: alternating pipeline / plain pairs")
    parser.add_argument("--cached", type=at_least_one, default=3,
                        help="P2: cached re-runs (in-process and whole command)")
    parser.add_argument("--only-command", action="store_true", help="P2 whole command only (no P1 pairs)")
    parser.add_argument("--heartbeat-pairs", type=int, default=0,
                        help="also: cached commands with Prefect's flow heartbeats / without, alternating")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    os.chdir(ROOT)
    recipe = load_recipe(Path(args.recipe))
    tmp = Path(tempfile.mkdtemp(prefix="alignflow-bench-"))
    figures: dict[str, object] = {"recipe": args.recipe}
    try:
        if not args.only_command:
            resolve_base(recipe.model.base, tmp / "base", [Path(p) for p in recipe.data.sft])  # warm, untimed
            # warm, untimed: the flow's imports and Prefect's temporary server, paid once per process (the
            # `alignflow` command overlaps them with its imports; P2 whole command measures that)
            (tmp / "warm").mkdir()
            (tmp / "warm" / "base").symlink_to(tmp / "base", target_is_directory=True)
            from alignflow.flows.pipeline import pipeline

            pipeline(recipe=recipe, work_dir=str(tmp / "warm"), until="curate")
            pipe, plain, overhead, within = [], [], [], []
            for i in range(args.pairs):
                for kind in ("flow", "plain"):
                    (tmp / f"{kind}-{i}").mkdir()
                    (tmp / f"{kind}-{i}" / "base").symlink_to(tmp / "base", target_is_directory=True)
                pipe.append(timed(orchestrated, recipe, tmp / f"flow-{i}"))
                plain.append(timed(plain_script, recipe, tmp / f"plain-{i}"))
                overhead.append((pipe[-1] - plain[-1]) / plain[-1])
                within.append(pipe[-1] - stage_seconds(tmp / f"flow-{i}"))
                print(f"pair {i + 1}: pipeline {pipe[-1]:.2f} s, plain {plain[-1]:.2f} s, "
                      f"overhead {100 * overhead[-1]:+.1f} %; pipeline outside its stages {within[-1]:.2f} s",
                      flush=True)
            warm = [timed(orchestrated, recipe, tmp / "flow-0") for _ in range(args.cached)]
            figures |= {"pipeline_s": spread(pipe), "plain_script_s": spread(plain),
                        "P1_orchestration_overhead": spread(overhead), "pipeline_cached_s": spread(warm),
                        "P1_ratio_of_medians": round(statistics.median(pipe) / statistics.median(plain) - 1, 4),
                        "pipeline_outside_stages_s": spread(within),
                        "P2_in_process_cached_over_cold": round(statistics.median(warm) / statistics.median(pipe), 4)}
        from alignflow.cli import _prefect_api_may_be_configured

        # whether the command starts Prefect's temporary server itself (fast) or leaves it to Prefect: a Prefect
        # setting naming an API (profile, prefect.toml, ...) changes what P2 measures
        figures["command_starts_own_server"] = not _prefect_api_may_be_configured()
        cold = command(args.recipe, tmp / "command")
        cached = [command(args.recipe, tmp / "command") for _ in range(args.cached)]
        figures |= {"command_cold_s": round(cold, 2), "command_cached_s": spread(cached),
                    "P2_command_cached_over_cold": round(statistics.median(cached) / cold, 4),
                    "command_cold_cpu_s": round(CPU[0], 2), "command_cached_cpu_s": spread(CPU[1:])}
        # flows on the command's own server send no heartbeats; a frequency the user sets keeps them on (Prefect's
        # default, 180 s): alternating pairs of the cached command with them and without
        on, off = [], []
        for i in range(args.heartbeat_pairs):
            on.append(command(args.recipe, tmp / "command", {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "180"}))
            off.append(command(args.recipe, tmp / "command"))
            print(f"heartbeat pair {i + 1}: with {on[-1]:.2f} s, without {off[-1]:.2f} s", flush=True)
        if on:
            figures |= {"command_cached_heartbeats_s": spread(on), "command_cached_no_heartbeats_s": spread(off),
                        "heartbeats_cost_s": spread([a - b for a, b in zip(on, off, strict=True)])}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures["help_s"] = round(help_seconds(), 3)
    for k, v in figures.items():
        print(f"{k:32s} {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    from machine import describe  # bench/machine.py

    print(describe("at start"), flush=True)
    main()
    print(describe("at end"))
