"""The pipeline flow: curate -> synthesize -> tokenize -> quantize -> sft -> reward -> dpo -> evaluate -> register.

Wiring only. Each stage is a Prefect task over folder paths, with
- a cache key made of what the stage reads (flows/keys.py: its settings, the content hashes of the upstream
  files it reads, the base model with dtype, its code, the seed): Prefect persists the stage's manifest under
  that key in `<work>/.prefect-results`, so an unchanged stage is not recomputed, in this run or any later one
  (changing `dpo.beta` re-runs dpo, evaluate and register only; an upstream stage that re-ran but wrote the
  same files leaves the stages after it cached);
- its own folder `<work>/stages/<stage>/<key[:16]>`, written as `<...>.partial` and renamed when complete,
  so a half-written stage is never mistaken for a finished one (and a crashed training stage finds its
  checkpoints in the partial folder when re-run);
- its own MLflow child run under the pipeline's parent run (a cached stage gets one too, tagged
  `alignflow.cached=true` and pointing at the run that produced it), and a Prefect markdown artifact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

from alignflow.flows import lineage
from alignflow.flows.interrupts import stop_after_subflow
from alignflow.flows.keys import (
    STAGES,
    RunFacts,
    Stage,
    data_hashes,
    resolved_dtype,
    stage_inputs,
    stage_key,
    upstream_value,
)
from alignflow.flows.tracking import Tracker, tracking_uri
from alignflow.recipe import (
    Recipe,
    RecipeError,
    ScaleOutSection,
    allowed_roots,
    confinement_problems,
    outside_roots,
    resolve_recipe,
)
from alignflow.tasks import curate, dpo, evaluate, quantize, register, reward, sft, synthesize, tokenize
from alignflow.tasks.lib.base_model import ResolvedBase, resolve_base
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json, sha256_weights
from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.losses import ONLINE, UNPAIRED
from alignflow.tasks.lib.manifest import MANIFEST, changed_outputs, read_manifest
from alignflow.tasks.lib.models import LOADS, device_kind
from alignflow.tasks.lib.processes import folder_lock
from alignflow.tasks.lib.progress import report_progress, set_progress_reporter
from alignflow.tasks.lib.step_metrics import UNRECORDED, describe, read_unrecorded, server_answers, without_retries

WAIT_REPORTED_S = 0.5  # a shorter wait for a stage folder's lock is the lock itself, not another run's work
HEADLINE = ("rougeL", "rougeL_base", "bleu", "exact_match", "exact_match_base", "exact_match_sft",
            "exact_match_gain_vs_sft", "exact_match_gain_vs_sft_ci_low", "exact_match_gain_vs_sft_ci_high",
            "win_rate_vs_base",
            "win_rate_vs_base_ci_low", "win_rate_vs_base_ci_high", "win_rate_vs_sft", "win_rate_vs_sft_ci_low",
            "win_rate_vs_sft_ci_high", "changed_vs_sft", "judge_heldout_accuracy", "judge_win_rate_vs_base",
            "win_rate_vs_champion", "win_rate_vs_champion_ci_low", "win_rate_vs_champion_ci_high", "perplexity",
            "perplexity_base", "gate_passed", "registered_version")


def _no_traceback_for_stage_errors(record: logging.LogRecord) -> bool:
    """A StageError is the user's to fix (bad data, a gate): Prefect logs its message, not a traceback."""
    if record.exc_info and isinstance(record.exc_info[1], StageError):
        record.exc_info, record.exc_text = None, None
    return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_no_traceback_for_stage_errors)

# Noise a user would have to learn to ignore (transformers 5.23 / bitsandbytes 0.50): TRL and PEFT still call the
# renamed gradient-checkpointing API (a FutureWarning per trainer), and bitsandbytes' CPU backend says it has no
# optional `kernels` package on every 4-bit load. Neither changes a result.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())


@dataclass
class Context:
    recipe: Recipe
    work: Path
    tracker: Tracker
    flow_run_id: str
    facts: RunFacts = field(default_factory=RunFacts)  # what the keys need beyond the recipe (flows/keys.py)
    folders: dict[str, Path] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    waited: dict[str, float] = field(default_factory=dict)  # seconds spent waiting for another run's stage lock
    seconds: dict[str, float] = field(default_factory=dict)


@task(name="base-model", persist_result=False)
def prepare_base(spec: str, dest: str, corpus: list[str], revision: str | None = None) -> ResolvedBase:
    return resolve_base(spec, Path(dest), [Path(p) for p in corpus], revision=revision)


@task(persist_result=True)
def execute_stage(stage: str, fn: Callable[[Any, Any], dict[str, Any]], cfg: BaseModel, inputs: BaseModel,
                  folder: str, run_id: str, flow_run_id: str, cache_key: str,
                  key_inputs: dict[str, Any], stale: bool = False, always: bool = False) -> dict[str, Any]:
    """Run one stage into its `.partial` folder inside its MLflow child run, then publish the folder.

    An exclusive lock per stage folder keeps two runs sharing a work dir from writing the same `.partial`
    folder at once; the one that waited finds the folder finished and reuses it (unless the stage is a side
    effect, `always`: then it acts again, after the other run).
    """
    partial, final = Path(inputs.out_dir), Path(folder)  # type: ignore[attr-defined]
    with folder_lock(final):
        if (final / MANIFEST).exists():
            if not always and not (stale and changed_outputs(final)):  # another run finished (or re-made) it
                return json.loads((final / MANIFEST).read_text())
            shutil.rmtree(final)  # under the lock: no other run is writing it; its outputs no longer match
        # the Prefect UI shows how far a long stage is (training stages report steps / max_steps)
        progress = create_progress_artifact(0.0, key=f"{stage}-progress", description=f"alignflow {stage}: % done")
        logger = get_run_logger()

        def reporter(fraction: float, detail: str | None) -> None:
            # a detail (curate: records/s and ETA) goes into the artifact's description and the terminal's log
            update_progress_artifact(progress, 100.0 * fraction, description=f"alignflow {detail}" if detail else None)
            if detail:
                logger.info(detail)

        set_progress_reporter(reporter)
        loads_before = len(LOADS)
        failed = True
        try:
            mlflow.start_run(run_id=run_id)  # active: the stage's step metrics go into it as they are made
            manifest = fn(cfg, inputs)
            failed = False
        finally:
            set_progress_reporter(None)
            _leave_run(failed)
        update_progress_artifact(progress, 100.0)
        manifest.update(cache_key=cache_key, config=cfg.model_dump(mode="json"), inputs=key_inputs,
                        produced_by={"flow_run_id": flow_run_id, "mlflow_run_id": run_id},
                        model_loads=LOADS[loads_before:])  # model folders loaded in this process (not launched ones)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        if final.exists():  # a stale folder without a manifest (deleted or interrupted): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
    return manifest


def disk_full(error: BaseException) -> OSError | None:
    """The "no space left on device" (or disk quota) error behind `error`, following its causes: libraries wrap
    it (a checkpoint save raises RuntimeError from the OSError)."""
    import errno

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        current = current.__cause__ or current.__context__
    return None


def _disk_full_message(stage: str, error: OSError, partial: Path) -> str:
    """What a user needs when the disk filled: the stage, the path it was writing (the file when the OS named it,
    else the stage's unfinished folder), and that nothing is lost by re-running."""
    where = error.filename or partial
    return (f"{stage}: no space left on the device while writing {where} ({error.strerror or error}). Free space on "
            f"that disk and run the same command again: it resumes (finished stages are reused; {stage} starts "
            "again, a training stage from its last checkpoint).")


def _leave_run(failed: bool) -> None:
    """Leave the stage's active MLflow run without depending on the tracking server: a server that is away now
    must not cost the stage's work, nor minutes of MLflow's retries (the tracker marks the run again when it
    records the stage, or reaps it later)."""
    if mlflow.active_run() is None:  # start_run itself failed
        return
    status = "FAILED" if failed else "FINISHED"
    answers = server_answers(mlflow.get_tracking_uri())
    try:
        with nullcontext() if answers else without_retries():
            mlflow.end_run(status)  # pops the active run first, then tells the server
    except Exception as e:  # the server is away: the run is popped all the same
        get_run_logger().warning("could not mark the stage's MLflow run %s now (%s); it is marked when the stage "
                                 "is recorded", status, type(e).__name__)


@task(name="synthesize-shard", persist_result=False)
def synthesize_shard(cfg: synthesize.SynthesizeConfig, inputs: synthesize.SynthesizeInputs, index: int) -> str:
    return str(synthesize.run_shard(cfg, inputs, index))


@flow(name="alignflow-synthesize-shards", log_prints=False)
def synthesize_shards(cfg: synthesize.SynthesizeConfig, inputs: synthesize.SynthesizeInputs) -> list[str]:
    """The synthesize shards as mapped tasks, on this subflow's task runner (threads or Dask)."""
    futures = synthesize_shard.map(unmapped(cfg), unmapped(inputs), list(range(cfg.shards)))
    return [f.result() for f in futures]


@task(name="curate-shard", persist_result=False)
def curate_shard(cfg: curate.CurateConfig, inputs: curate.CurateInputs, dataset: str, index: int) -> str:
    return str(curate.run_shard(cfg, inputs, dataset, index))  # type: ignore[arg-type]


@flow(name="alignflow-curate-shards", log_prints=False)
def curate_shards(cfg: curate.CurateConfig, inputs: curate.CurateInputs) -> list[str]:
    """The per-record work of curate (parse, scrub, quality, MinHash, eval overlap) as mapped tasks."""
    jobs = [(name, i) for name in curate.SHARDED for i in range(cfg.shards)]
    futures = curate_shard.map(unmapped(cfg), unmapped(inputs), [j[0] for j in jobs], [j[1] for j in jobs])
    started = time.monotonic()
    for done, _ in enumerate(as_completed(futures), start=1):  # the shards' progress, then curate.run's merge
        seconds = time.monotonic() - started
        report_progress(done / len(jobs), f"curate: {done} of {len(jobs)} shards done in {seconds:.0f} s")
    return [f.result() for f in futures]


def curate_fanned_out(scale: ScaleOutSection, cfg: curate.CurateConfig, inputs: curate.CurateInputs,
                      ) -> dict[str, Any]:
    """Shards fanned out, then curate.run: it finds them finished and takes the dedup decisions in order."""
    if cfg.shards > 1:
        with stop_after_subflow(), environment_kept():
            curate_shards.with_options(task_runner=task_runner(scale, cpu_bound=True))(cfg, inputs)
    return curate.run(cfg, inputs)


@contextmanager
def environment_kept() -> Iterator[None]:
    """Put this process's environment back as it was once the shards are done. A local Dask cluster's nannies
    write their workers' settings (`distributed.nanny.pre-spawn-environ`: OMP_NUM_THREADS=1, MKL_NUM_THREADS=1,
    OPENBLAS_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_) into the process that starts them and leave them there: every
    process started afterwards (a training launch, a sweep trial) then ran torch on one thread, and its floating
    point sums in another order than a run without Dask (a sweep trial's sft weights differed from the same recipe
    run alone)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(before):
            del os.environ[name]
        for name, value in before.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def task_runner(scale: ScaleOutSection, cpu_bound: bool) -> TaskRunner[Any]:
    if scale.task_runner == "dask":
        from prefect_dask import DaskTaskRunner  # the `team` extra

        if scale.dask_address:
            return DaskTaskRunner(address=scale.dask_address)
        # one single-threaded process per worker: a local teacher model per process, no GIL sharing
        return DaskTaskRunner(cluster_kwargs={"n_workers": scale.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    # Threads help an HTTP teacher (requests wait on the network). CPU-bound shards gain nothing from threads:
    # curate's Python holds the GIL, a local model already uses every core, and two shards sampling at once
    # would interleave torch's global RNG. Those run one at a time (use Dask processes to spread them).
    return ThreadPoolTaskRunner(max_workers=1 if cpu_bound else scale.workers)


def synthesize_fanned_out(scale: ScaleOutSection, cfg: synthesize.SynthesizeConfig,
                          inputs: synthesize.SynthesizeInputs) -> dict[str, Any]:
    """Shards fanned out (a subflow, visible in the Prefect UI), then synthesize.run: it finds every shard
    finished and only merges."""
    if cfg.shards > 1:
        with stop_after_subflow(), environment_kept():
            synthesize_shards.with_options(task_runner=task_runner(scale, cpu_bound=cfg.teacher == "base"))(
                cfg, inputs)
    return synthesize.run(cfg, inputs)


def _renderable(markdown: str, uri: str, run_id: str, folder: Path) -> str:
    """A stage's markdown with its relative image links (`![x](lengths.png)`) made to render in the Prefect UI:
    served by the MLflow tracking server (`uri`) when there is one, else named by their path on disk."""

    def link(match: re.Match[str]) -> str:
        alt, name = match.group(1), match.group(2)
        if uri.startswith(("http://", "https://")):
            return f"![{alt}]({uri.rstrip('/')}/get-artifact?path={name}&run_uuid={run_id})"
        return f"*{alt}: `{folder / name}` (also an artifact of MLflow run `{run_id}`)*"

    return re.sub(r"!\[([^\]]*)\]\((?!https?:)([^)]+)\)", link, markdown)


def _short(row: dict[str, Any], limit: int = 120) -> dict[str, Any]:
    """A side-by-side row readable at 1600 px: long prompts and answers cut with an ellipsis."""
    return {k: (v if not isinstance(v, str) or len(v) <= limit else v[: limit - 1] + "…") for k, v in row.items()}


def _run_link(ctx: Context, run_id: str) -> str:
    """A clickable link to the stage's MLflow run when tracking goes to a server; the run id otherwise."""
    uri = tracking_uri(ctx.work)
    if uri.startswith(("http://", "https://")):
        return f"[`{run_id}`]({uri.rstrip('/')}/#/experiments/{ctx.tracker.experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


# Stages that act on something outside the work dir that changes under them (register: the model registry, which
# promote, rollback, deleting the model or another run change between runs): never served from cache, they act on
# it as it is now, every run, idempotently (the same weights find the same version), and report what it holds.
SIDE_EFFECTS: frozenset[Stage] = frozenset({"register"})


def run_stage(ctx: Context, stage: Stage, fn: Callable[[Any, Any], dict[str, Any]], cfg: BaseModel,
              make_inputs: Callable[[Path, str], BaseModel]) -> Path:
    """Run (or serve from cache) one stage; its key is what it reads (flows/keys.py)."""
    key_inputs = stage_inputs(stage, ctx.recipe, ctx.folders, ctx.facts)
    key = stage_key(stage, key_inputs)
    always = stage in SIDE_EFFECTS
    # a side effect's folder is this run's own: two runs sharing the work dir both act, and neither may replace
    # the folder the other is still reading (its Prefect result too: never read back, as it always acts)
    run_key = f"{key}-{ctx.flow_run_id}" if always else key
    folder = ctx.work / "stages" / stage / (f"{key[:16]}-{ctx.flow_run_id}" if always else key[:16])
    partial = folder.with_name(folder.name + ".partial")
    stale = (folder / MANIFEST).exists() and bool(changed := changed_outputs(folder))
    if stale:  # trusted hashes no longer describe the files (edited or half-deleted by hand): make the stage anew
        get_run_logger().warning("%s: %s changed since the stage wrote them; running it again", stage,
                                 ", ".join(changed))
    run_id = ctx.tracker.child(stage, key)
    started = time.perf_counter()
    if not (folder / MANIFEST).exists():
        # Another run sharing the work dir may be building this very folder (it holds the folder's lock): wait for
        # it here, so that the wait is reported as a wait and not as this stage's own seconds (a cached sft once
        # showed 163.9 s). The stage takes the lock again inside; it is free by then unless a third run took it.
        with folder_lock(folder):
            pass
    waited = time.perf_counter() - started
    runner = execute_stage.with_options(
        name=stage,
        cache_key_fn=lambda *_: run_key,
        result_storage=ctx.work / ".prefect-results",
        result_serializer="json",  # the manifest is JSON: nothing in the work dir is unpickled
        # the cache record alone is not enough: the folder must exist, its outputs as they were written
        refresh_cache=always or stale or not (folder / MANIFEST).exists(),
    )
    try:
        manifest = runner(stage, fn, cfg, make_inputs(partial, run_id), str(folder), run_id, ctx.flow_run_id, key,
                          key_inputs, stale, always)
    except BaseException as e:
        ctx.tracker.fail(run_id, killed=isinstance(e, KeyboardInterrupt))  # never raises
        full = disk_full(e)
        if full:
            raise StageError(_disk_full_message(stage, full, partial)) from None
        raise
    seconds = time.perf_counter() - started - waited
    cached = manifest["produced_by"]["flow_run_id"] != ctx.flow_run_id
    uri = tracking_uri(ctx.work)
    try:
        if not server_answers(uri):  # fail now, not after MLflow's retries
            raise requests.exceptions.ConnectionError(f"{uri}/health did not answer")
        ctx.tracker.record_stage(run_id, stage, cfg.model_dump(mode="json"), manifest, folder, cached, seconds,
                                 waited if waited >= WAIT_REPORTED_S else 0.0)
    except (MlflowException, requests.exceptions.RequestException) as e:
        if server_answers(uri):  # the server is there: this is another error, say it as it is
            raise
        kept = read_unrecorded(folder)
        raise StageError(
            f"{stage} finished and its outputs are kept in {folder}, but the tracking server {uri} did not answer "
            f"when the stage was recorded ({type(e).__name__})"
            + (f"; {describe(kept)} could not be sent and are kept in {folder / UNRECORDED}" if kept else "")
            + ". Run the same command again when the server is back: finished stages are reused, and the kept "
              "metrics are logged into the run that trained then.") from None
    ctx.folders[stage], ctx.cached[stage], ctx.seconds[stage] = folder, cached, seconds
    ctx.waited[stage] = waited if waited >= WAIT_REPORTED_S else 0.0
    wait_note = (f" (after waiting {waited:.1f}s for another run that was building it)"
                 if waited >= WAIT_REPORTED_S else "")
    get_run_logger().info("%s: %s in %.1fs%s -> %s", stage, "cached" if cached else "done", seconds, wait_note,
                          folder)
    metrics = manifest.get("metrics", {})
    card = _renderable((folder / "data_card.md").read_text(), tracking_uri(ctx.work), run_id, folder) \
        if (folder / "data_card.md").exists() else ""
    create_markdown_artifact(
        key=f"{stage}-summary",
        description=f"alignflow {stage}",
        markdown="\n".join([f"## {stage} ({'cached' if cached else 'ran'}, {seconds:.1f}s{wait_note})",
                            f"MLflow run {_run_link(ctx, run_id)} · folder `{folder}`", "", "| metric | value |",
                            "|---|---|",
                            *[f"| {k} | {v} |" for k, v in metrics.items()], "", card]),
    )
    if stage == "evaluate" and (folder / "samples.jsonl").exists():
        create_table_artifact(key="evaluate-side-by-side", table=[_short(row) for row in read_jsonl(folder /
                                                                                                "samples.jsonl")],
                              description="prompt, reference, base / SFT / champion / tuned answers, rewards "
                                          "(long texts shortened; the full table is side_by_side.json in MLflow)")
    return folder


# Tag names a caller of the deployment-facing flow may not set on the parent run: alignflow's own tags steer later
# runs (a retrain reads `alignflow.base_corpus` and `alignflow.parent_run_id`'s lineage; orphan reaping reads
# `alignflow.pid`), and MLflow's system tags say who ran it (`mlflow.user`) and where it is nested.
RESERVED_TAG_PREFIXES = ("alignflow.", "mlflow.")


@flow(name="alignflow-pipeline", log_prints=False)  # True would also capture print(file=...) inside libraries
def pipeline(recipe: Recipe, work_dir: str = "runs", until: Stage | None = None, init_adapter: str | None = None,
             tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the recipe's nine stages (or up to `until`) with caching and MLflow tracking.

    The deployment-facing flow (deployments/prefect.yaml): every parameter is one a user sets, and each that
    names a path is confined for a deployment run (the recipe's paths, `work_dir`, `init_adapter`: inside the
    worker's project dir or ALIGNFLOW_DATA_ROOTS). `init_adapter` makes sft continue that adapter; `tags` go onto
    the parent run (not `alignflow.*` or `mlflow.*`, which are the pipeline's own). What retrain and sweep also
    set is on `pipeline_internal`, which is no deployment's entrypoint."""
    reserved = sorted(k for k in tags or {} if k.lower().startswith(RESERVED_TAG_PREFIXES))
    if reserved:
        raise StageError(f"tags: {', '.join(reserved)}: tags named alignflow.* or mlflow.* are the pipeline's own")
    return pipeline_internal.fn(recipe, work_dir, until, init_adapter, tags)


@flow(name="alignflow-pipeline", log_prints=False)
def pipeline_internal(recipe: Recipe, work_dir: str = "runs", until: Stage | None = None,
                      init_adapter: str | None = None, tags: dict[str, str] | None = None,
                      ancestors: str | None = None, sft_unchanged: bool = False, selection_trials: int = 1,
                      base_corpus: list[str] | None = None) -> dict[str, Any]:
    """The pipeline with the parameters only alignflow's own flows set (retrain, sweep): not a deployment's
    entrypoint (the worker runs only `pipeline` and `retrain`), so a submitter cannot set these.

    `init_adapter` makes sft continue that adapter (retraining); `ancestors`: the lineage folder of what those
    weights already learned (flows/lineage.py), to which what this run trains on is added and logged (tokenize
    never holds out what it lists; evaluate reads its judge / policy sides);
    `sft_unchanged`: sft hands `init_adapter` on untrained (a retrain with no new SFT records);
    `selection_trials` > 1: this recipe is the best of that many sweep trials, picked on the eval prompts, so
    evaluate takes its intervals at the familywise level 1 - 0.05/k; `base_corpus`: the files a `tiny:` test base
    is built from (default data.sft; a retrain passes the champion's, so its adapter fits the same base); `tags`
    go onto the parent run. Inside a deployment run (retrain's) every path among them is confined all the same:
    `ancestors` and `base_corpus` come from the registry, which more people write than the worker's operator."""
    from prefect.runtime import deployment, flow_run

    try:  # a deployment's form skips load_recipe: expand and check files the same way
        # submitted through a deployment: every path must lie in the worker's project dir or ALIGNFLOW_DATA_ROOTS
        recipe = resolve_recipe(recipe, confine=allowed_roots() if deployment.id else None, work_dir=work_dir,
                                init_adapter=init_adapter)
    except RecipeError as e:
        raise StageError(str(e)) from None
    if ancestors and deployment.id and confinement_problems({}, None, allowed_roots(), None, ancestors):
        raise StageError(f"ancestors: '{ancestors}' is outside the folders this worker may read")
    outside = outside_roots("base_corpus", base_corpus or [], allowed_roots()) if deployment.id else []
    if outside:  # a `tiny:` base trains its tokenizer on these files, and register logs that base with the version
        raise StageError("; ".join(outside))
    if sft_unchanged and not init_adapter:
        raise StageError("sft_unchanged: there are no weights to hand on (init_adapter is not set)")
    work = Path(work_dir).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = data_hashes(recipe)  # files or `datasets` folders: content hashes
    tracker = Tracker.start(recipe, work, data, str(flow_run.id or "local"), tags or {})
    init = Path(init_adapter) if init_adapter else None
    before = Path(ancestors) if ancestors else None  # the lineage of the weights this run continues
    ctx = Context(recipe, work, tracker, str(flow_run.id), RunFacts(
        data=data, tracking_uri=tracking_uri(work), init_adapter=sha256_weights(init) if init else None,
        sft_unchanged=sft_unchanged, selection_trials=selection_trials, device=device_kind(),
        ancestors=lineage.digest(before) if before else None))
    r, dtype, seed = recipe, recipe.model.dtype, recipe.seed
    # `model.dtype: auto` as this machine computes in it (as the stage keys hold it): what evaluate records a shipped
    # artifact was built in. register gets the recipe's dtype as it is: the version is served in it (`auto`
    # resolved where it is loaded: float32 on a CPU host), and register records the resolved one as `merge_dtype`,
    # which export merges in (a version measured on a bf16 GPU is exported in bfloat16 anywhere)
    computed = resolved_dtype(dtype, ctx.facts.device)
    try:
        base: ResolvedBase | None = None
        if _reached(until, "synthesize"):  # curate needs no model: `--until curate` converts nothing
            corpus = base_corpus or r.data.sft  # (only a `tiny:` base reads it)
            base = prepare_base(r.model.base, str(work / "base"), corpus, r.model.revision)
            if base.spec.startswith("tiny:"):  # what a retrain needs to build the same test base again
                tracker.client.set_tag(tracker.parent_run_id, "alignflow.base_corpus", json.dumps(corpus))
            ctx.facts = replace(ctx.facts, base_key=base.key)
            if base.revision:  # a hub base: the commit this run loaded (model.revision, or what `main` named)
                tracker.client.set_tag(tracker.parent_run_id, "alignflow.base_revision", base.revision)

        run_stage(ctx, "curate", partial(curate_fanned_out, r.scale_out), r.curate, lambda out, _: curate.CurateInputs(
            sft=r.data.sft, preference=r.data.preference, eval=r.data.eval, out_dir=out))
        if base is None:
            raise _Stop
        run_stage(ctx, "synthesize", partial(synthesize_fanned_out, r.scale_out), r.synthesize,
                  lambda out, _: synthesize.SynthesizeInputs(
                      base=base.path, dtype=dtype, curated=ctx.folders["curate"], curate_cfg=r.curate, out_dir=out,
                      seed=seed))
        if _reached(until, "tokenize"):
            run_stage(ctx, "tokenize", tokenize.run, r.tokenize, lambda out, _: tokenize.TokenizeInputs(
                base=base.path, curated=ctx.folders["curate"], synthesized=ctx.folders["synthesize"], out_dir=out,
                heldout_fraction=r.reward.eval_fraction, pairs=r.reward.pairs,
                policy_pairs=r.dpo.loss not in (*ONLINE, *UNPAIRED), sft_heldout=r.sft.keep == "best",
                trained_before=before))
        if _reached(until, "quantize"):
            run_stage(ctx, "quantize", quantize.run, r.quantize, lambda out, _: quantize.QuantizeInputs(
                base=base.path, dtype=dtype, curated=ctx.folders["curate"], out_dir=out))
        if _reached(until, "sft"):
            run_stage(ctx, "sft", sft.hand_on if sft_unchanged else sft.run, r.sft, lambda out, _: sft.SftInputs(
                base=base.path, dtype=dtype, tokenized=ctx.folders["tokenize"], quantized=ctx.folders["quantize"],
                out_dir=out, seed=seed, init_adapter=init, report_to=["mlflow"], launch=r.launch))
        if _reached(until, "reward"):
            run_stage(ctx, "reward", reward.run, r.reward, lambda out, _: reward.RewardInputs(
                base=base.path, dtype=dtype, tokenized=ctx.folders["tokenize"], quantized=ctx.folders["quantize"],
                out_dir=out, seed=seed,
                report_to=["mlflow"], launch=r.launch))
        if _reached(until, "dpo"):
            run_stage(ctx, "dpo", dpo.run, r.dpo, lambda out, _: dpo.DpoInputs(
                base=base.path, base_key=base.key, dtype=dtype, tokenized=ctx.folders["tokenize"],
                quantized=ctx.folders["quantize"], sft=ctx.folders["sft"], out_dir=out, seed=seed,
                report_to=["mlflow"], launch=r.launch, ref_cache=work / "cache" / "ref_logps", lora=r.sft.lora,
                reward=ctx.folders["reward"], pairs=r.reward.pairs))
        if _reached(until, "tokenize"):
            # what these weights learned: the ancestors' lineage and what this run's training stages read (cached
            # ones as they read it; sft handing the weights on adds nothing), on the parent run
            ran = {s: read_manifest(ctx.folders[s]) if s in ctx.folders else None for s in ("sft", "reward", "dpo")}
            trained_on = lineage.union(before, ctx.folders["curate"], lineage.trained(
                ctx.folders["tokenize"], ran["sft"], ran["reward"], ran["dpo"], kto=r.dpo.loss in UNPAIRED),
                work / "lineage")
            lineage.log(tracker.client, tracker.parent_run_id, trained_on)
        if _reached(until, "evaluate"):
            candidate_sha = upstream_value(read_manifest(ctx.folders["dpo"]), "weights")  # hashed when written
            champion, champion_id = ctx.tracker.champion_adapter(r.register.model_name, candidate_sha,
                                                                 work / "champions", base_spec=r.model.base,
                                                                 base_key=base.key, base_revision=base.revision)
            ctx.facts = replace(ctx.facts, champion=champion_id)
            run_stage(ctx, "evaluate", evaluate.run, r.evaluate, lambda out, _: evaluate.EvaluateInputs(
                base=base.path, dtype=computed, tokenized=ctx.folders["tokenize"], curated=ctx.folders["curate"],
                candidate=ctx.folders["dpo"], sft=ctx.folders["sft"], reward=ctx.folders["reward"],
                champion=champion, champion_sha=champion_id.get("adapter_sha256"), base_key=base.key,
                answers_cache=work / "cache" / "answers", teacher=r.synthesize.teacher, out_dir=out, seed=seed,
                selection_trials=selection_trials, ancestors=before, ship=r.register.ship, base_spec=base.spec,
                shipped_cache=work / "cache" / "shipped"))
        if _reached(until, "register"):
            version_tags = {"alignflow.parent_run_id": ctx.tracker.parent_run_id,
                            **lineage.version_tags(trained_on),  # digests and record counts of what it learned
                            "alignflow.recipe_hash": sha256_json(r.model_dump(mode="json")),
                            **{f"alignflow.data_hash.{k}": v for k, v in data.items()},
                            **({"alignflow.base_revision": base.revision} if base.revision else {})}
            run_stage(ctx, "register", register.run, r.register, lambda out, run_id: register.RegisterInputs(
                base_path=base.path, base_spec=base.spec, base_key=base.key, dtype=dtype,
                compared_champion=ctx.facts.champion.get("version"), candidate=ctx.folders["dpo"],
                evaluation=ctx.folders["evaluate"], curated=ctx.folders["curate"], run_id=run_id, tags=version_tags,
                stages=dict(ctx.folders), out_dir=out))
    except _Stop:
        pass
    except BaseException as e:
        # a tracking server that is away must not hide the error (the run stays RUNNING; a later run reaps it)
        with suppress(MlflowException, requests.exceptions.RequestException):
            if server_answers(tracking_uri(ctx.work)):
                ctx.tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED", {})
        raise

    summary: dict[str, float] = {"total_seconds": round(sum(ctx.seconds.values()), 2)}
    for stage in ctx.folders:
        for k, v in read_manifest(ctx.folders[stage]).get("metrics", {}).items():
            # with `--until curate` the data is the result: records in / kept / dropped by reason
            # the harness's scores of the tuned model and the base (lm_eval.<task>.<metric>[_base]) too
            # and what ships (shipped.<format>.<metric>), their point values
            harness = k.startswith(("lm_eval.", "shipped.")) and not k.endswith(("_ci_low", "_ci_high",
                                                                                 "_higher_is_better"))
            if k in HEADLINE or harness or (until == "curate" and (".records_" in k or ".dropped." in k)):
                summary[k] = float(v)
    ctx.tracker.finish("FINISHED", summary)
    result: dict[str, Any] = {
        "parent_run_id": ctx.tracker.parent_run_id,
        "experiment_id": ctx.tracker.experiment_id,
        "tracking_uri": tracking_uri(work),
        "stages": {s: {"folder": str(f), "cached": ctx.cached[s], "seconds": round(ctx.seconds[s], 2),
                       "waited_seconds": round(ctx.waited.get(s, 0.0), 2)}
                   for s, f in ctx.folders.items()},
        "metrics": summary,
    }
    if "register" in ctx.folders:
        m = read_manifest(ctx.folders["register"])
        result["registered"] = {k: m.get(k) for k in ("model_name", "version", "alias", "gate_reasons", "model_uri",
                                                      "champion")}  # champion: the version that holds it now
    return result


class _Stop(Exception):
    """`--until curate`: the stages after it are not run."""


def _reached(until: str | None, stage: str) -> bool:
    """True when `stage` is to run: no `--until`, or `until` is this stage or a later one."""
    return until is None or STAGES.index(until) >= STAGES.index(stage)
