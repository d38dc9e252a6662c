"""Reading the MLflow model registry, failing closed: a missing alias is "none", any other error is raised."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def registry_alias(client: MlflowClient, model_name: str, alias: str) -> Any:
    """The model version an alias points at; None when the model or the alias does not exist. Any other error
    (a server down, no permission) is raised: a gate must not read it as "no champion" and skip its checks."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model / no such alias
            return None
        raise
