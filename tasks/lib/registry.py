"""Reading the MLflow model registry, failing closed (a missing alias is "none", any other error is raised), finding
the version that holds given weights, and moving the champion alias by compare-and-set."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

HASH_TAG = "alignflow.adapter_sha256"  # what the weights compute (tasks/lib/hashing.sha256_weights)
# On a version `alignflow rollback` demoted: who, when, from which champion to which. The gate never promotes it
# again on its own; `alignflow promote` (a person's decision) does, and clears it.
ROLLED_BACK_TAG = "alignflow.rolled_back"
# On the registered model, one per demoted weights hash: `alignflow.demoted.<sha256>` = who demoted them, when, by
# which action. Set whenever the champion leaves weights by a person's action (`alignflow rollback`, `alignflow
# promote` of another version), never by the gate. A model tag, not a version tag: deleting the version (and the
# same weights registering again as a new version) does not undo a person's decision. Only `alignflow promote` of
# those weights (or a rollback back to them) clears it.
DEMOTED_PREFIX = "alignflow.demoted."
UNREADABLE = "unreadable"  # HASH_TAG of a register-made version whose weights could not be read: never adopted


def demoted_key(weights_hash: str) -> str:
    return DEMOTED_PREFIX + weights_hash


def demotion(client: MlflowClient, model_name: str, weights_hash: str) -> str | None:
    """Why these weights were demoted by a person (the stamp), or None; None also when the model does not exist."""
    try:
        return client.get_registered_model(model_name).tags.get(demoted_key(weights_hash))
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def registry_alias(client: MlflowClient, model_name: str, alias: str) -> Any:
    """The model version an alias points at; None when the model or the alias does not exist. Any other error
    (a server down, no permission) is raised: a gate must not read it as "no champion" and skip its checks."""
    for attempt in range(2):
        try:
            return client.get_model_version_by_alias(model_name, alias)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model / no such alias
                return None
            if e.error_code != "PERMISSION_DENIED" or attempt == 1:
                raise
            # MLflow's basic-auth app answers 403, not 404, to a non-admin asking for an alias of a model that
            # does not exist (so that the answer tells nothing about which names exist): the first run of a
            # team's worker meets this before it registers anything. GetRegisteredModel does answer 404 there.
            if not _model_exists(client, model_name):
                return None
            # The model exists now: another run created it between the two calls (two pipelines registering at
            # once, as tests/test_team.py runs them). Ask once more; a second 403 is a real one.
    raise AssertionError("unreachable")


def _model_exists(client: MlflowClient, model_name: str) -> bool:
    """False only when the registry says the model does not exist; any other error is raised."""
    try:
        client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


LOCK_SUFFIX = ".alias-lock"
LOCK_TTL_S = 120.0  # a lock older than this was left by a process that died holding it
LOCK_POLL_S = (0.2, 0.5)  # seconds between two tries, drawn in this range (two waiters do not retry in step)


class LockPermissionError(PermissionError):
    """The tracking server refused an operation on the alias lock (another MLflow user's lock, or no right to
    create registered models): waiting would never end, so this is said at once."""


def _lock_owner() -> str:
    """Who holds a lock: the MLflow user (basic auth), the OS user, host and process."""
    import getpass
    import os
    import platform

    mlflow_user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    return f"{mlflow_user + ' / ' if mlflow_user else ''}{getpass.getuser()}@{platform.node()} pid {os.getpid()}"


@contextmanager
def alias_lock(client: MlflowClient, model_name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Serialize alias moves and version creation of `model_name` across processes and machines through the
    tracking server itself: creating a registered model is atomic there (a unique name in its database), so the
    one process that creates `<name>.alias-lock` holds the lock until it deletes it. A lock older than LOCK_TTL_S
    is taken over.

    Every path that does not get the lock sleeps and checks the deadline (TimeoutError after `timeout_s`); a
    PERMISSION_DENIED from the server (a lock another MLflow user created, which this one may not delete) is one
    LockPermissionError naming the lock and its owner, not a wait that never ends."""
    lock = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout_s
    holder = "unknown"
    while True:
        try:
            client.create_registered_model(lock, tags={"alignflow.lock_taken_at": str(time.time()),
                                                       "alignflow.lock_owner": _lock_owner()},
                                           description=f"alignflow: held while an alias of {model_name} moves")
            break
        except MlflowException as e:
            if e.error_code == "PERMISSION_DENIED":
                raise LockPermissionError(
                    f"the tracking server refused to create the alias lock '{lock}' ({e.message}): this MLflow user "
                    f"may not create registered models, so {model_name}'s aliases cannot move") from None
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            tags = client.get_registered_model(lock).tags
            holder = tags.get("alignflow.lock_owner", "an unknown owner (no alignflow.lock_owner tag)")
            try:
                taken = float(tags.get("alignflow.lock_taken_at", "0"))
            except ValueError:
                taken = 0.0  # unreadable: as old as can be
            if time.time() - taken > LOCK_TTL_S:
                client.delete_registered_model(lock)  # stale: its holder died
                if time.monotonic() <= deadline:
                    continue  # try to take it at once
        except MlflowException as e:
            if e.error_code == "PERMISSION_DENIED":
                raise LockPermissionError(
                    f"the alias lock '{lock}' of {model_name} is held by {holder} and this MLflow user may not "
                    f"remove it ({e.message}); if its holder is gone, its owner or an admin deletes the registered "
                    f"model '{lock}'") from None
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # released between our two calls: try again, after the sleep below like every other try
        if time.monotonic() > deadline:
            raise TimeoutError(f"the alias lock {lock} was held for over {timeout_s:.0f} s (by {holder})")
        time.sleep(LOCK_POLL_S[0] + random.random() * (LOCK_POLL_S[1] - LOCK_POLL_S[0]))
    try:
        yield
    finally:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


def move_champion(client: MlflowClient, model_name: str, expected: str | None, new: str,
                  by_person: str | None = None) -> bool:
    """Compare-and-set: make `new` the champion (the displaced one becomes previous-champion) only if the champion
    is still `expected` (None: there is none). False, and nothing moved, when another run moved it first. The
    version that becomes champion loses `challenger` (it is not one any more).

    `by_person` (the stamp of `alignflow promote` / `rollback`): a person's decision. Inside the lock and before
    any alias moves, the displaced champion's weights are marked demoted (DEMOTED_PREFIX on the model,
    ROLLED_BACK_TAG on the version) and `new`'s weights are cleared of that mark; a kill part-way leaves marks that
    re-running the same command completes, never an alias moved without its mark."""
    with alias_lock(client, model_name):
        current = registry_alias(client, model_name, "champion")
        current_version = None if current is None else str(current.version)
        if current_version != expected:
            return False
        if by_person is not None:
            if current is not None and current_version != new:
                _mark_demoted(client, model_name, current, by_person)
            clear_demoted(client, model_name, client.get_model_version(model_name, new))
        if current_version is not None and current_version != new:
            client.set_registered_model_alias(model_name, "previous-champion", current_version)
        client.set_registered_model_alias(model_name, "champion", new)
        challenger = registry_alias(client, model_name, "challenger")
        if challenger is not None and str(challenger.version) == new:
            client.delete_registered_model_alias(model_name, "challenger")
        return True


def _mark_demoted(client: MlflowClient, model_name: str, version: Any, stamp: str) -> None:
    weights_hash = version.tags.get(HASH_TAG)
    if weights_hash and weights_hash != UNREADABLE:
        client.set_registered_model_tag(model_name, demoted_key(weights_hash), stamp)
    client.set_model_version_tag(model_name, str(version.version), ROLLED_BACK_TAG, stamp)


def clear_demoted(client: MlflowClient, model_name: str, version: Any) -> None:
    weights_hash = version.tags.get(HASH_TAG)
    if weights_hash and demoted_key(weights_hash) in client.get_registered_model(model_name).tags:
        client.delete_registered_model_tag(model_name, demoted_key(weights_hash))
    if ROLLED_BACK_TAG in version.tags:
        client.delete_model_version_tag(model_name, str(version.version), ROLLED_BACK_TAG)


def find_version(client: MlflowClient, model_name: str, weights_hash: str, tags: dict[str, str], scratch: Path,
                 legacy_hash: Callable[[], list[str]] | None = None, base_key: str = "") -> str | None:
    """The version of `model_name` that holds weights with this hash (its tag HASH_TAG); None when there is none.
    Several (made before registration was idempotent): the champion if it is one of them, else the oldest.

    Two kinds of versions are recognised by their weights although their tag does not say so, and are tagged on
    the way (once: a later run finds them by the tag):
    - an orphan: a version without HASH_TAG made by an alignflow register run (what a kill -9 between creating
      the version and tagging it left, before the tags went into the creating call). Its weights are downloaded
      into `scratch` and hashed; if they match it is adopted (given `tags`), else it gets its own hash;
    - a version tagged with a hash an older alignflow used (the folder's bytes before sha256_weights; the weights
      hash without lora_dropout): `legacy_hash()` lists them, computed only when nothing else matched; its tag is
      rewritten to the new hash.
    A version whose weights cannot be read (a download error, no adapter/ or model/ folder) is tagged
    HASH_TAG=unreadable and never downloaded again: one bad version does not block every later run.
    A version tagged with another `alignflow.base_key` than `base_key` (both set) is not a match: an adapter's
    tensors say nothing about the base they were trained over."""
    from alignflow.tasks.lib.hashing import sha256_weights

    versions = client.search_model_versions(f"name='{model_name}'")  # [] when there is no such model
    for v in versions:
        if v.tags.get(HASH_TAG) is not None or not v.run_id or not _made_by_register(client, v.run_id):
            continue
        folder = scratch / str(v.version)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{v.version}",
                                                             dst_path=str(folder)))
            weights = next((local / "artifacts" / k for k in ("adapter", "model")
                            if (local / "artifacts" / k).is_dir()), None)
            found = UNREADABLE if weights is None else sha256_weights(weights)
        except Exception:  # any failure to read it (artifact gone, store error, bad files)
            found = UNREADABLE
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        adopt = tags if found == weights_hash else {HASH_TAG: found}
        for key, value in adopt.items():
            client.set_model_version_tag(model_name, str(v.version), key, value)
        v.tags.update(adopt)

    def same_base(v: Any) -> bool:
        theirs = v.tags.get("alignflow.base_key", "")
        return not base_key or not theirs or theirs == base_key

    versions = [v for v in versions if same_base(v)]
    matches = [v for v in versions if v.tags.get(HASH_TAG) == weights_hash]
    if not matches and legacy_hash is not None and versions:
        olds = legacy_hash()
        matches = [v for v in versions if v.tags.get(HASH_TAG) in olds]
        for v in matches:
            client.set_model_version_tag(model_name, str(v.version), HASH_TAG + "_legacy", v.tags[HASH_TAG])
            client.set_model_version_tag(model_name, str(v.version), HASH_TAG, weights_hash)
    if not matches:
        return None
    champion = registry_alias(client, model_name, "champion")
    champion_version = None if champion is None else str(champion.version)
    chosen = next((v for v in matches if str(v.version) == champion_version),
                  min(matches, key=lambda v: int(v.version)))
    return str(chosen.version)


def _made_by_register(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).data.tags.get("alignflow.stage") == "register"
    except MlflowException:
        return False  # a run deleted since, or of another store: not ours to adopt
