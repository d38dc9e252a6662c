"""`alignflow policy set / show`: a registered model's promotion policy, kept in its tags (MLflow wiring only; the
merging with a recipe's gate is tasks/lib/policy.py, applied by the register stage, which never writes policy).

Who may change it: MLflow 3.17's basic-auth app lets a tag be written with EDIT on the model (SetRegisteredModelTag
needs `can_update`), not MANAGE. `policy set` therefore asks the server first for the caller's own effective
permission on the model (`GET /api/3.0/mlflow/users/permissions/get`, which any user may ask about themselves)
and refuses unless it is MANAGE or the caller is an admin. A user with EDIT can still write the tags with a raw
MLflow client: see README, Team mode, for what that leaves open. Without the auth app (a local store) there are
no users and anyone who can write the store may set the policy.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.policy import PREFIX, policy_from_tags
from alignflow.tasks.register import GateConfig

SET_BY = "alignflow.policy.set_by"  # who last changed the policy, when, and what
PER_METRIC = ("max_regression", "max_shipped_regression", "min_gain_vs_champion")  # metric -> value rules


def parse(items: list[str]) -> dict[str, Any]:
    """`register.gate.KEY=VALUE` items -> {KEY: value}, values read as YAML (numbers, true/false, null, {a: 1});
    `register.gate.RULE.METRIC=V` sets one metric of a per-metric rule (max_regression, max_shipped_regression,
    min_gain_vs_champion): the form gate bounds and reasons cite. Every problem listed at once."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.startswith(PREFIX):
            problems.append(f"{item}: expected {PREFIX}KEY=VALUE (keys: "
                            f"{', '.join(PREFIX + k for k in GateConfig.model_fields)})")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        name = key.removeprefix(PREFIX)
        rule, dot, metric = name.partition(".")
        if dot and rule in PER_METRIC:
            per_metric = values.setdefault(rule, {})
            if not isinstance(per_metric, dict):
                problems.append(f"{item}: {rule} is already set as a whole")
                continue
            per_metric[metric] = value
            continue
        values[name] = value
    for name, value in values.items():
        if value is None:
            continue  # null removes the key from the policy
        if name in PER_METRIC and isinstance(value, dict):  # RULE.METRIC=null removes that metric (set_policy)
            value = {metric: v for metric, v in value.items() if v is not None}
        try:
            GateConfig.model_validate({name: value})
        except ValidationError as e:
            for error in e.errors():
                where = ".".join(str(p) for p in error["loc"])
                problems.append(f"{PREFIX}{where}: {str(error['msg']).removeprefix('Value error, ')} "
                                f"(got {error.get('input')!r})")
    if problems:
        raise StageError("policy set: " + "; ".join(problems))
    return values


def _caller_may_manage(client: MlflowClient, name: str) -> tuple[bool, str]:
    """(may the caller change the policy of `name`, who the caller is). On a server without the auth app: yes."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = client.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return True, getpass.getuser()  # a local store: no users, no permissions
    creds = get_default_host_creds(uri)
    me = http_request(creds, "/api/2.0/mlflow/users/current", "GET")
    if me.status_code == 404:  # no auth app on this server
        return True, os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    if me.status_code != 200:
        raise StageError(f"policy set: the tracking server did not say who you are (HTTP {me.status_code})")
    user = me.json()["user"]
    if user.get("is_admin"):
        return True, user["username"]
    answer = http_request(creds, "/api/3.0/mlflow/users/permissions/get", "GET",
                          params={"username": user["username"], "resource_type": "registered_model",
                                  "resource_id": name})
    if answer.status_code != 200:
        raise StageError(f"policy set: the tracking server did not say your permission on {name} "
                         f"(HTTP {answer.status_code})")
    return answer.json().get("permission") == "MANAGE", user["username"]


def _model_tags(client: MlflowClient, name: str, action: str) -> dict[str, str]:
    try:
        return dict(client.get_registered_model(name).tags or {})
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise StageError(f"policy {action}: there is no registered model {name!r}") from None
        raise


def set_policy(client: MlflowClient, name: str, items: list[str]) -> str:
    """Write `register.gate.*` tags on the registered model (null removes one); only its owner (MANAGE) or an
    admin may. Returns what the policy is now."""
    values = parse(items)
    tags = _model_tags(client, name, "set")
    allowed, user = _caller_may_manage(client, name)
    if not allowed:
        raise StageError(f"policy set: user {user!r} lacks MANAGE on registered model {name!r}; only its owner "
                         "(MANAGE) or an admin may change its promotion policy")
    current, _problems = policy_from_tags(tags)
    for rule in PER_METRIC:
        if isinstance(values.get(rule), dict) and any(i.partition("=")[0].strip().startswith(
                f"{PREFIX}{rule}.") for i in items):  # one metric at a time: keep the others (null removes one)
            values[rule] = {k: v for k, v in {**current.get(rule, {}), **values[rule]}.items() if v is not None}
    for key, value in values.items():
        if value is None or value == {}:
            if f"{PREFIX}{key}" in tags:
                client.delete_registered_model_tag(name, f"{PREFIX}{key}")
        else:
            client.set_registered_model_tag(name, f"{PREFIX}{key}", json.dumps(value))
    stamp = f"{user} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {' '.join(items)}"
    client.set_registered_model_tag(name, SET_BY, stamp[:5000])
    return show_policy(client, name)


def show_policy(client: MlflowClient, name: str) -> str:
    """The policy as `register.gate.KEY=VALUE` lines, with who set it last."""
    tags = _model_tags(client, name, "show")
    policy, problems = policy_from_tags(tags)
    if not policy and not problems:
        return f"{name}: no promotion policy (each run's register.gate decides)"
    lines = [f"{name}: promotion policy (a recipe's register.gate may be stricter, never looser)"]
    lines += [f"  {PREFIX}{k}={json.dumps(v, sort_keys=True)}" for k, v in sorted(policy.items())]
    lines += [f"  INVALID: {p} (register fails the gate while it is there)" for p in problems]
    if SET_BY in tags:
        lines.append(f"  last set by {tags[SET_BY]}")
    return "\n".join(lines)
