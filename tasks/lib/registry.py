"""Reading the MLflow model registry, failing closed (a missing alias is "none", any other error is raised), and
moving the champion alias by compare-and-set."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


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


@contextmanager
def alias_lock(client: MlflowClient, model_name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Serialize alias moves of `model_name` across processes and machines through the tracking server itself:
    creating a registered model is atomic there (a unique name in its database), so the one process that creates
    `<name>.alias-lock` holds the lock until it deletes it. A lock older than LOCK_TTL_S is taken over."""
    lock = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"alignflow.lock_taken_at": str(time.time())},
                                           description=f"alignflow: held while an alias of {model_name} moves")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            taken = float(client.get_registered_model(lock).tags.get("alignflow.lock_taken_at", "0"))
            if time.time() - taken > LOCK_TTL_S:
                client.delete_registered_model(lock)  # stale: its holder died
                continue
        except MlflowException:
            continue  # released between our two calls: try again
        if time.monotonic() > deadline:
            raise TimeoutError(f"the alias lock {lock} was held for over {timeout_s:.0f} s")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        with suppress(MlflowException):
            client.delete_registered_model(lock)


def move_champion(client: MlflowClient, model_name: str, expected: str | None, new: str) -> bool:
    """Compare-and-set: make `new` the champion (the displaced one becomes previous-champion) only if the champion
    is still `expected` (None: there is none). False, and nothing moved, when another run moved it first."""
    with alias_lock(client, model_name):
        current = registry_alias(client, model_name, "champion")
        current_version = None if current is None else str(current.version)
        if current_version != expected:
            return False
        if current_version is not None and current_version != new:
            client.set_registered_model_alias(model_name, "previous-champion", current_version)
        client.set_registered_model_alias(model_name, "champion", new)
        return True
