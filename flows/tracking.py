"""MLflow wiring: one experiment per recipe name, one parent run per pipeline run, one child run per stage.

`MLFLOW_TRACKING_URI` is honoured; without it the store is SQLite under the work dir (no server needed),
with artifacts beside it. Runs are created with the client API and passed by id (MLflow's active run is
per thread); a stage's Prefect task activates its own child run so that the stage's step metrics
(tasks/lib/step_metrics.py) stream into it live.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from alignflow.recipe import Recipe
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json, sha256_tree, sha256_weights
from alignflow.tasks.lib.processes import folder_lock, pid_alive
from alignflow.tasks.lib.registry import registry_alias
from alignflow.tasks.lib.step_metrics import UNRECORDED, read_unrecorded, server_answers

log = logging.getLogger("alignflow")
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
# Read once, before alignflow sets anything: mlflow.set_tracking_uri() also writes MLFLOW_TRACKING_URI into
# os.environ, so reading it later would send a second run (other work dir) into the first run's store.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


# The curate stage's datasets logged as MLflow inputs, with the context the UI shows beside each.
CURATED = {"sft.jsonl": "training", "preference.jsonl": "training", "eval.jsonl": "evaluation"}


def tracking_uri(work: Path) -> str:
    return USER_TRACKING_URI or f"sqlite:///{work / 'mlflow.db'}"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _process_tags() -> dict[str, str]:
    return {"alignflow.host": platform.node(), "alignflow.pid": str(os.getpid())}


def reap_orphans(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose process on this host is gone (a kill -9, an OOM kill, a power cut).

    A process killed that way cannot close its own runs; the next `alignflow run` on the same host does.
    """
    host, reaped = platform.node(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500):
        tags = run.data.tags
        pid = tags.get("alignflow.pid", "")
        if tags.get("alignflow.host") == host and pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            client.set_tag(run.info.run_id, "alignflow.reaped", "process gone; marked KILLED by a later run")
            reaped.append(run.info.run_id)
    return reaped


def check_same_base(model_name: str, version: Any, base_spec: str | None, base_key: str | None,
                    base_revision: str | None = None) -> None:
    """Refuse a registered version trained over another base than the recipe's.

    Compared by the resolved base's identity (`alignflow.base_key`: an embedded package version, a folder's
    listing, a hub model's file hashes, whichever commit holds them), so two spellings of one folder agree and a
    rewritten folder does not, and two machines with other snapshots of the same hub weights agree; versions
    registered before that tag existed are compared by `model.base` as written. The `tiny:` test model is built
    from each run's own data, so only its spec is compared. A hub version registered while hub bases were keyed by
    their commit (`[spec, commit]`) is the same base when this run loaded that very commit (`base_revision`)."""
    spec, key = version.tags.get("alignflow.base_model"), version.tags.get("alignflow.base_key")
    same = (spec == base_spec) if (key is None or base_key is None or (base_spec or "").startswith("tiny:")) \
        else (key == base_key or (base_revision is not None and key == sha256_json([base_spec, base_revision])))
    if base_spec is not None and spec is not None and not same:
        raise StageError(f"the champion of '{model_name}' (version {version.version}) was trained on base "
                         f"'{spec}', which is not this recipe's model.base '{base_spec}'"
                         f"{' (same name, other weights)' if spec == base_spec else ''}: register under another "
                         "register.model_name, or move the champion alias first (alignflow rollback/promote)")


def flatten(prefix: str, obj: Any) -> dict[str, str]:
    """Nested config -> {"sft.lora.r": "16", ...} (MLflow params are flat strings)."""
    if isinstance(obj, dict):
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: json.dumps(obj) if isinstance(obj, list) else str(obj)}


# MLflow's UI opens an experiment without this tag in its GenAI mode ("Evaluations", traces, an assistant panel);
# alignflow's runs are training runs, so the UI should open in its "Model training" mode.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _tag_experiment_kind(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> None:
    """Tag an experiment made before alignflow set the kind (or by someone else). A user who may not edit it
    (team mode: another user's experiment) leaves it as it is: the tag only changes how the UI opens."""
    if all(tags.get(k) == v for k, v in EXPERIMENT_TAGS.items()):
        return
    try:
        for k, v in EXPERIMENT_TAGS.items():
            client.set_experiment_tag(experiment_id, k, v)
    except MlflowException as e:
        if e.error_code != "PERMISSION_DENIED":
            raise


def dataset_source(uri: str) -> Any:
    """The MLflow dataset source of an artifact URI, named explicitly by its scheme: the artifact store's own source
    type (`local` for a path or file:, `s3`, `gs`, ...), else an HTTP source, which only records the URI (what the UI
    shows; `mlflow-artifacts:`, a server's proxied store, has no source type in MLflow 3.17). Not guessed with
    `resolve_dataset_source`: MLflow 3.17 registers its local source twice (for "" and "file"), and the guess warns
    that a local path "can be interpreted in multiple ways" on every run."""
    from urllib.parse import urlparse

    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    scheme = urlparse(uri).scheme
    kind = "local" if scheme in ("", "file") else scheme
    for source in get_registered_sources():
        if issubclass(source, FileSystemDatasetSource) and source._get_source_type() == kind:
            return source(uri)
    return HTTPDatasetSource(uri)


@dataclass
class Tracker:
    client: MlflowClient
    experiment_id: str
    parent_run_id: str

    @classmethod
    def start(cls, recipe: Recipe, work: Path, data_hashes: dict[str, str], flow_run_id: str,
              extra_tags: dict[str, str] | None = None) -> Tracker:
        uri = tracking_uri(work)
        mlflow.set_tracking_uri(uri)
        # A local SQLite store is created and migrated when the first client touches it: two runs starting
        # together on one work dir would migrate it twice and create the experiment twice. They take turns.
        with folder_lock(work / "mlflow.db") if uri.startswith("sqlite:") else nullcontext():
            client = MlflowClient(uri)
            try:  # the first call: an unreachable server fails here, before any stage runs
                exp = client.get_experiment_by_name(recipe.name)
            except Exception as e:  # MlflowException, requests' ConnectionError, ... depending on where it broke
                if not uri.startswith(("http://", "https://")):
                    raise
                retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLflow's default")
                raise StageError(f"tracking server {uri} is unreachable ({type(e).__name__}) after {retries} "
                                 "retries; start it, or unset MLFLOW_TRACKING_URI to use the local store under the "
                                 "work dir. Finished stages and checkpoints are kept; re-running resumes.") from None
            if exp is None:
                # A local store keeps artifacts beside the db; a tracking server decides for itself.
                location = (work / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
                try:
                    experiment_id = client.create_experiment(recipe.name, artifact_location=location,
                                                             tags=EXPERIMENT_TAGS)
                except MlflowException as e:  # another run on the same tracking server created it just now
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment_id = client.get_experiment_by_name(recipe.name).experiment_id
            else:
                experiment_id = exp.experiment_id
                _tag_experiment_kind(client, experiment_id, exp.tags)
        reap_orphans(client, experiment_id)
        resolved = recipe.model_dump(mode="json")
        tags = {
            **_process_tags(),
            "alignflow.recipe_hash": sha256_json(resolved),
            "alignflow.git_sha": git_sha(),
            "alignflow.prefect_flow_run_id": flow_run_id,
            "alignflow.work_dir": str(work),
            "alignflow.base_model": recipe.model.base,
            **{f"alignflow.data_hash.{k}": v for k, v in data_hashes.items()},
            **(extra_tags or {}),
        }
        # a sweep names its trials' runs (trial-0, ...); a plain run is named by recipe and time
        name = tags.pop("mlflow.runName", None) or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        client.log_text(run.info.run_id, yaml.safe_dump(resolved, sort_keys=False), "recipe.yaml")
        client.log_batch(run.info.run_id, params=[Param(k, v[:MAX_PARAM_CHARS])
                                                  for k, v in flatten("", {"name": recipe.name, "seed": recipe.seed,
                                                                           "model": resolved["model"]}).items()])
        return cls(client, experiment_id, run.info.run_id)

    def child(self, stage: str, cache_key: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": self.parent_run_id, "alignflow.stage": stage, "alignflow.cache_key": cache_key,
            **_process_tags()})
        return run.info.run_id

    def record_stage(self, run_id: str, stage: str, cfg: dict[str, Any], manifest: dict[str, Any], folder: Path,
                     cached: bool, seconds: float, waited: float = 0.0) -> None:
        """Params, metrics, tags and artifacts of a finished (or cached) stage; then mark the child run done.
        `seconds` is the stage's own time; `waited` the time it first waited for another run building the same
        folder (logged as `lock_wait_seconds` when there was such a wait)."""
        c = self.client
        params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flatten(stage, cfg).items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in manifest.get("metrics", {}).items()
                   if isinstance(v, int | float)]
        metrics.append(Metric("stage_seconds", seconds, now, 0))
        if waited > 0:
            metrics.append(Metric("lock_wait_seconds", waited, now, 0))
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(run_id, params=params[i : i + 100])
        for i in range(0, len(metrics), 1000):
            c.log_batch(run_id, metrics=metrics[i : i + 1000])
        produced_by = manifest.get("produced_by", {})
        c.set_tag(run_id, "alignflow.cached", str(cached).lower())
        c.set_tag(run_id, "alignflow.stage_dir", str(folder))
        if cached:
            c.set_tag(run_id, "alignflow.cached_from", produced_by.get("mlflow_run_id", "unknown"))
        if "ref_logprobs_cached" in manifest:
            c.set_tag(run_id, "alignflow.ref_logprobs_cached", str(manifest["ref_logprobs_cached"]).lower())
        if "judge_independent" in manifest:  # evaluate: may the gate count the reward model's win-rates?
            c.set_tag(run_id, "alignflow.judge_independent", str(bool(manifest["judge_independent"])).lower())
        if "eval_config_hash" in manifest:  # what makes two evaluations' numbers comparable (alignflow compare)
            c.set_tag(run_id, "alignflow.eval_config_hash", str(manifest["eval_config_hash"]))
        if manifest.get("resumed_from") is not None:
            c.set_tag(run_id, "alignflow.resumed_from", str(manifest["resumed_from"]))
        self.log_unrecorded(run_id, folder, manifest)
        c.log_artifact(run_id, str(folder / "manifest.json"))
        for name in manifest.get("artifacts", []):
            if (folder / name).exists():
                c.log_artifact(run_id, str(folder / name))
        if stage == "curate":
            self.log_curated(run_id, folder, manifest)
        for table in sorted((folder / "samples").glob("step_*.json")) if (folder / "samples").is_dir() else []:
            # online RL's sampled completions (tasks/dpo/online.py writes them while it trains; logged here, after
            # training, so that a tracking server that is away never holds a training step up)
            rows = json.loads(table.read_text())
            if rows:
                c.log_table(run_id, {k: [r.get(k) for r in rows] for k in rows[0]}, f"samples/{table.name}")
        if stage == "evaluate" and (folder / "samples.jsonl").exists():
            rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line]
            if rows:
                c.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]}, "side_by_side.json")
        c.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def log_unrecorded(self, run_id: str, folder: Path, manifest: dict[str, Any]) -> None:
        """Step metrics the stage could not send while the tracking server was away (tasks/lib/step_metrics.py):
        logged now, with their own steps and times, into the run that made them (where the curves have the
        holes), or into this run when that one is gone (deleted, or on another server); then the file is renamed,
        so they go in once."""
        kept = read_unrecorded(folder)
        if not kept:
            return
        by_run: dict[str, list[Metric]] = {}
        for producer, (k, v, t, s) in kept:
            by_run.setdefault(producer or run_id, []).append(Metric(k, v, t, s))
        for producer, metrics in by_run.items():
            target = producer
            try:
                if self.client.get_run(producer).info.lifecycle_stage != "active":
                    target = run_id
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                target = run_id
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(target, metrics=metrics[i : i + 1000])
            log.warning("logged %d step metric values kept while the tracking server was away into run %s",
                        len(metrics), target)
        with suppress(FileNotFoundError):  # another run sharing the work dir recorded them at the same time
            os.replace(folder / UNRECORDED, folder / (UNRECORDED + ".sent"))

    def log_curated(self, run_id: str, folder: Path, manifest: dict[str, Any]) -> None:
        """The curated datasets as artifacts of the curate run (`data/`: what `retrain` reads back, on any worker)
        and as MLflow dataset inputs with their digests, on the curate run and on the pipeline run (the UI's
        "Datasets used" column)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        outputs = manifest.get("outputs")
        inputs = []
        for name, context in CURATED.items():
            path = folder / name
            if not path.exists():
                continue
            self.client.log_artifact(run_id, str(path), "data")
            digest = outputs.get(name) if isinstance(outputs, dict) else None
            digest = digest or sha256_tree(path)
            uri = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/data/{name}"
            dataset = MetaDataset(dataset_source(uri), name=f"{Path(name).stem}", digest=digest[:32])
            inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                       [InputTag("mlflow.data.context", context)]))
        # MLflow's stores look a dataset up, then insert it: two runs logging the same curated data at once race on
        # its UNIQUE (experiment, name, digest) row (seen with two runs sharing a work dir's SQLite store). A local
        # store is taken in turns; a server's store gets a second try, which finds the row the other run made.
        uri = str(self.client.tracking_uri)
        db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        with folder_lock(db) if db is not None else nullcontext():
            for target in (run_id, self.parent_run_id):
                try:
                    self.client.log_inputs(target, datasets=inputs)
                except MlflowException:
                    time.sleep(1.0)
                    self.client.log_inputs(target, datasets=inputs)

    def champion_adapter(self, model_name: str, candidate_sha: str, dest_root: Path,
                         base_spec: str | None = None, base_key: str | None = None,
                         base_revision: str | None = None) -> tuple[Path | None, dict]:
        """The weights (adapter or full model) to compare the candidate with, downloaded once, and their identity.

        That is the registry's `champion`; or, when the champion is this very adapter (same content hash: the run
        that promoted it, re-run unchanged), the `previous-champion` it displaced, which is the comparison the
        promoting run made, so the re-run keeps its cache key. None when there is nothing to compare with.
        A champion trained over another base is refused: its adapter would be applied over the wrong weights.
        """
        version = None
        for alias in ("champion", "previous-champion"):
            version = registry_alias(self.client, model_name, alias)
            if version is None:
                return None, {}
            if alias == "champion":
                # before the weights are compared: the adapter hash leaves paths out, so the same training over a
                # copy of the base (another model.base) gives the champion's very hash, and it must still be refused
                check_same_base(model_name, version, base_spec, base_key, base_revision)
            if version.tags.get("alignflow.adapter_sha256", "") != candidate_sha:
                break
        else:
            return None, {}
        check_same_base(model_name, version, base_spec, base_key, base_revision)
        sha = version.tags.get("alignflow.adapter_sha256", "")
        # named by content too: another tracking server (or a re-created model) may reuse the version number
        dest = dest_root / f"{model_name}-v{version.version}-{sha[:12]}"
        kinds = ("adapter", "model")  # a LoRA adapter, or a full fine-tune's complete weights
        if not any((dest / kind).exists() for kind in kinds):
            tmp = dest.with_name(dest.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version.version}",
                                                        dst_path=str(tmp))
            kind = next(k for k in kinds if (Path(local) / "artifacts" / k).exists())
            # sha256_weights: what the weights compute; versions registered before it was the tag hash their
            # folder's bytes (sha256_tree), and are still checked that way
            if sha and sha not in (sha256_weights(Path(local) / "artifacts" / kind),
                                   sha256_tree(Path(local) / "artifacts" / kind)):
                raise StageError(f"the champion of '{model_name}' (version {version.version}) downloaded with other "
                                 f"weights than its tag alignflow.adapter_sha256={sha[:12]}… says")
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(Path(local) / "artifacts" / kind, dest / kind)
            shutil.rmtree(tmp, ignore_errors=True)
        weights = next(dest / kind for kind in kinds if (dest / kind).exists())
        return weights, {"version": str(version.version), "adapter_sha256": sha}

    def fail(self, run_id: str, killed: bool) -> None:
        """Mark a run failed (or killed) on the way out of an error: never raises, so that a tracking server that
        is away does not hide the error being reported (a later run on this host reaps the run instead)."""
        status = RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)
        try:
            if not server_answers(self.client.tracking_uri):
                raise ConnectionError("the tracking server does not answer")  # not after minutes of retries
            self.client.set_terminated(run_id, status)
        except Exception as e:  # requests' ConnectionError, MlflowException after MLflow's retries
            log.warning("could not mark MLflow run %s %s (%s)", run_id, status, type(e).__name__)

    def finish(self, status: str, summary: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        if summary:
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in summary.items()])
        self.client.set_terminated(self.parent_run_id, status)
