"""A registered model's promotion policy (issue 27 item 4): `alignflow policy set / show`, owner-only on a server
with MLflow's basic-auth app, merged with a recipe's gate in register (stricter wins, key by key), on a local
registry too; and a non-admin's refused `promote` as one line (item 6)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from alignflow.tasks.lib.policy import cite, merge, policy_from_tags
from alignflow.tasks.register import GateConfig, gate

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", "alignflow.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, "COLUMNS": "250", **(env or {})}, timeout=300)


# --- merging: stricter wins, key by key ----------------------------------------------------------------------

def test_the_stricter_of_recipe_and_policy_wins_key_by_key() -> None:
    recipe = GateConfig(min_win_rate=0.6, min_win_rate_vs_champion=0.0, min_rougeL_gain=None,
                        min_judge_accuracy=None, max_regression={"rougeL": 0.05, "perplexity": 0.1},
                        min_gain_vs_champion={"exact_match": 0.05, "rougeL": 0.0}, require_decontaminated=False)
    policy = {"min_win_rate": 0.5, "min_win_rate_vs_champion": 0.5, "min_rougeL_gain": 0.01,
              "max_regression": {"rougeL": 0.02, "bleu": 0.03, "perplexity": 0.5}, "require_decontaminated": True,
              "min_gain_vs_champion": {"exact_match": 0.0, "rougeL": 0.01, "bleu": 0.0}}
    merged, decided = merge(recipe, policy)
    assert merged.min_win_rate == 0.6  # the recipe is stricter: kept
    assert merged.min_win_rate_vs_champion == 0.5  # the recipe asked for less: the policy's floor
    assert merged.min_rougeL_gain == 0.01  # the recipe's None (unchecked) never disables a policy check
    assert merged.min_judge_accuracy is None  # neither checks it
    assert merged.max_regression == {"rougeL": 0.02, "perplexity": 0.1, "bleu": 0.03}  # union, smaller per metric
    assert merged.min_gain_vs_champion == {"exact_match": 0.05, "rougeL": 0.01, "bleu": 0.0}  # larger per metric
    assert merged.require_decontaminated is True
    assert set(decided) == {"min_win_rate_vs_champion", "min_rougeL_gain", "max_regression.rougeL",
                            "max_regression.bleu", "require_decontaminated", "min_gain_vs_champion.rougeL",
                            "min_gain_vs_champion.bleu"}
    # no policy: the recipe's gate, unchanged (today's behaviour)
    assert merge(recipe, {}) == (recipe, {})


def test_gate_reasons_name_the_policy_where_it_decided() -> None:
    metrics = {"win_rate_vs_base_ci_low": 0.9, "win_rate_vs_champion": 0.55, "win_rate_vs_champion_ci_low": 0.3,
               "rougeL_delta_ci_low": -0.04, "rougeL_delta_ci_high": 0.01}
    recipe = GateConfig(min_win_rate=0.0, min_win_rate_vs_champion=0.0, min_rougeL_gain=None,
                        min_judge_accuracy=None)
    assert gate(recipe, metrics, True)[0] == []  # the recipe alone promotes it
    merged, decided = merge(recipe, {"min_win_rate_vs_champion": 0.5, "max_regression": {"rougeL": 0.02},
                                     "min_gain_vs_champion": {"rougeL": -1.0}})
    reasons = cite(gate(merged, metrics, True)[0], decided, "m")
    assert len(reasons) == 2, reasons  # the rougeL gain rule passes (-0.04 > -1.0): cited nowhere
    assert reasons[0].startswith("win_rate_vs_champion_ci_low=0.3 does not exceed min_win_rate_vs_champion=0.5")
    assert reasons[0].endswith("[policy of m: register.gate.min_win_rate_vs_champion=0.5]")
    assert reasons[1].startswith("rougeL may have regressed") and "register.gate.max_regression.rougeL=0.02" in \
        reasons[1]


def test_policy_tags_that_do_not_validate_are_problems_not_ignored() -> None:
    policy, problems = policy_from_tags({"register.gate.min_win_rate_vs_champion": "0.5",
                                         "register.gate.min_win_rate": "2", "register.gate.bogus": "1",
                                         "register.gate.max_regression": "{\"nope\": 0.1}",
                                         "register.gate.min_rougeL_gain": "null", "other": "x"})
    assert policy == {"min_win_rate_vs_champion": 0.5}
    assert len(problems) == 3 and all("is not valid" in p for p in problems)


# --- NaN / inf thresholds: refused at validation, and the gate fails closed on one (review finding 2) ----------

# every numeric key of register.gate (dotted, as a recipe's --set names it), with a value the policy would check
GATE_KEYS = ["min_win_rate", "min_win_rate_vs_champion", "min_rougeL_gain", "min_judge_accuracy",
             "max_regression.rougeL", "min_gain_vs_champion.exact_match"]
NON_FINITE = [(float("nan"), ".nan", "NaN"), ("nan", "nan", '"nan"'), (float("inf"), ".inf", "Infinity"),
              ("inf", "inf", '"inf"'), (float("-inf"), "-.inf", "-Infinity")]  # (python, YAML, JSON tag text)


def _nested(dotted: str, value: object) -> dict[str, object]:
    key, _, metric = dotted.partition(".")
    return {key: {metric: value} if metric else value}


@pytest.mark.parametrize("key", GATE_KEYS)
@pytest.mark.parametrize(("value", "yaml_text", "tag_text"), NON_FINITE)
def test_a_non_finite_gate_threshold_is_refused_per_key(key: str, value: object, yaml_text: str,
                                                        tag_text: str) -> None:
    from alignflow.recipe import RecipeError, load_recipe

    with pytest.raises(ValueError, match="finite number"):
        GateConfig.model_validate(_nested(key, value))
    # a recipe: one problem, at the key's dotted path (YAML `.nan` and the plain string a deployment form sends)
    with pytest.raises(RecipeError) as refused:
        load_recipe(ROOT / "configs" / "smoke.yaml", [f"register.gate.{key}={yaml_text}"])
    assert len(refused.value.problems) == 1, refused.value.problems
    assert refused.value.problems[0].startswith(f"register.gate.{key}: Input should be a finite number")
    # a policy tag: a problem (it fails the gate), never a value that merge() would compare
    tag, _, metric = f"register.gate.{key}".rpartition(".") if "." in key else (f"register.gate.{key}", "", "")
    text = f'{{"{metric}": {tag_text}}}' if metric else tag_text
    policy, problems = policy_from_tags({tag: text})
    assert policy == {} and len(problems) == 1 and "finite number" in problems[0], (policy, problems)


def test_the_reviewers_nan_recipe_is_refused_at_the_cli_and_on_the_deployment_form() -> None:
    """The review's repro: `--set register.gate.min_rougeL_gain=.nan --set 'register.gate.max_regression={rougeL:
    .nan}'` made the gate pass over the policy. Refused by `alignflow validate` (two problems, each at its key), and
    by the pipeline flow's own parameter validation (what a deployment form's "nan" strings meet)."""
    from alignflow.flows.pipeline import pipeline
    from alignflow.recipe import load_recipe

    done = _cli("validate", "configs/smoke.yaml", "--set", "register.gate.min_rougeL_gain=.nan",
                "--set", "register.gate.max_regression={rougeL: .nan}")
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert "register.gate.min_rougeL_gain: Input should be a finite number" in said
    assert "register.gate.max_regression.rougeL: Input should be a finite number" in said
    form = load_recipe(ROOT / "configs" / "smoke.yaml").model_dump(mode="json")
    form["register"]["gate"].update(min_rougeL_gain="nan", min_gain_vs_champion={"exact_match": "NaN"})
    with pytest.raises(Exception, match="finite number"):
        pipeline.validate_parameters({"recipe": form})
    form["register"]["gate"].update(min_rougeL_gain=0.0, min_gain_vs_champion={"exact_match": 0.0})
    assert pipeline.validate_parameters({"recipe": form})  # the control: finite values pass


# the candidate the reviewer's NaN recipe promoted over the policy: every check below fails on the policy alone
FAILING = {"judge_heldout_accuracy_ci_low": 0.05, "win_rate_vs_base_ci_low": 0.1, "win_rate_vs_champion": 0.3,
           "win_rate_vs_champion_ci_low": 0.1, "rougeL_gain_ci_low": -0.3, "rougeL_delta_ci_low": -0.4,
           "rougeL_delta_ci_high": -0.1, "exact_match_delta_ci_low": -0.5, "exact_match_delta_ci_high": -0.2}


@pytest.mark.parametrize("key", GATE_KEYS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_gate_fails_closed_on_a_non_finite_threshold(key: str, value: float) -> None:
    """A config built around validation (model_construct) still cannot pass the gate with a NaN or inf threshold,
    and merge() keeps the policy's value over it."""
    fields = {"min_win_rate": None, "min_win_rate_vs_champion": None, "min_rougeL_gain": None,
              "min_judge_accuracy": None, "max_regression": {}, "min_gain_vs_champion": {},
              "require_decontaminated": False}
    cfg = GateConfig.model_construct(**{**fields, **_nested(key, value)})
    reasons, _ = gate(cfg, FAILING, True)
    assert any(r.startswith(f"register.gate.{key}={value} is not a finite number") for r in reasons), reasons
    floor = {"max_regression.rougeL": 0.02, "min_gain_vs_champion.exact_match": 0.0}.get(key, 0.5)
    policy = _nested(key, floor)
    merged, decided = merge(cfg, policy)
    assert merged.model_dump() == GateConfig.model_validate({**fields, **policy}).model_dump()
    assert decided == {key: f"register.gate.{key}={floor}"}
    assert gate(merged, FAILING, True)[0], "the policy's check must fail this candidate"


# --- a real tracking server with MLflow's basic-auth app -----------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`mlflow server --app-name basic-auth` on a free port, SQLite behind it; admin credentials in the dict."""
    from alignflow.tasks.lib.launch import free_port

    home = tmp_path_factory.mktemp("auth-server")
    ini = home / "auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{home / 'auth.db'}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    admin = {"username": "admin", "password": secrets.token_urlsafe(12)}
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret",
           "MLFLOW_AUTH_ADMIN_USERNAME": admin["username"], "MLFLOW_AUTH_ADMIN_PASSWORD": admin["password"]}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--serve-artifacts",
                               "--artifacts-destination", str(home / "artifacts"), "--workers", "1",
                               "--app-name", "basic-auth"], env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((home / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield {"uri": uri, **admin}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _as(server: dict[str, str], user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password}


def _client(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> MlflowClient:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_only_the_models_owner_or_an_admin_sets_its_policy(auth_server: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.auth.client import AuthServiceClient

    admin = _as(auth_server, auth_server["username"], auth_server["password"])
    users = {name: secrets.token_urlsafe(12) for name in ("owner", "editor", "reader")}
    _client(monkeypatch, admin)
    auth = AuthServiceClient(auth_server["uri"])
    for name, password in users.items():
        auth.create_user(name, password)
    model = "team-model"
    _client(monkeypatch, _as(auth_server, "owner", users["owner"])).create_registered_model(model)  # MANAGE
    _client(monkeypatch, admin)
    auth.grant_user_permission("editor", "registered_model", model, "EDIT")
    setting = ["policy", "set", model, "register.gate.min_win_rate_vs_champion=0.5"]

    # MLflow itself lets EDIT write a model tag: why `policy set` asks for MANAGE before it writes
    editor = _client(monkeypatch, _as(auth_server, "editor", users["editor"]))
    editor.set_registered_model_tag(model, "probe", "1")
    for user in ("reader", "editor"):
        refused = _cli(*setting, env=_as(auth_server, user, users[user]))
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 1, refused.stderr
        assert lines == [f"error: policy set: user '{user}' lacks MANAGE on registered model '{model}'; only its "
                         "owner (MANAGE) or an admin may change its promotion policy"], refused.stderr
    tags = _client(monkeypatch, admin).get_registered_model(model).tags
    assert not any(k.startswith("register.gate.") for k in tags)

    done = _cli(*setting, "register.gate.max_regression.rougeL=0.02", env=_as(auth_server, "owner", users["owner"]))
    assert done.returncode == 0, done.stderr
    tags = _client(monkeypatch, admin).get_registered_model(model).tags
    assert tags["register.gate.min_win_rate_vs_champion"] == "0.5"
    assert tags["register.gate.max_regression"] == '{"rougeL": 0.02}'
    assert tags["alignflow.policy.set_by"].startswith("owner at ")
    # an admin may too; null removes a key; one metric of max_regression changes without dropping the others
    done = _cli("policy", "set", model, "register.gate.min_win_rate_vs_champion=null",
                "register.gate.max_regression.bleu=0.1", env=admin)
    assert done.returncode == 0, done.stderr
    shown = _cli("policy", "show", model, env=_as(auth_server, "reader", users["reader"]))  # READ may look
    assert shown.returncode == 0, shown.stderr
    assert 'register.gate.max_regression={"bleu": 0.1, "rougeL": 0.02}' in shown.stdout
    assert "  register.gate.min_win_rate_vs_champion=" not in shown.stdout and "last set by admin at" in shown.stdout
    # a value the gate would refuse is refused here, with its key
    bad = _cli("policy", "set", model, "register.gate.min_win_rate=2", "register.gate.bogus=1", env=admin)
    assert bad.returncode == 1
    assert "register.gate.min_win_rate:" in bad.stderr and "register.gate.bogus" in bad.stderr


def test_a_non_admins_refused_promote_is_one_line(auth_server: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlflow.server.auth.client import AuthServiceClient

    admin = _as(auth_server, auth_server["username"], auth_server["password"])
    client = _client(monkeypatch, admin)
    password = secrets.token_urlsafe(12)
    AuthServiceClient(auth_server["uri"]).create_user("viewer", password)
    model = "promote-model"
    client.create_registered_model(model)
    experiment = client.create_experiment("promote-exp")
    run = client.create_run(experiment)
    (tmp_path / "w.txt").write_text("w")
    client.log_artifact(run.info.run_id, str(tmp_path / "w.txt"), "model")
    for _ in range(2):
        client.create_model_version(model, f"runs:/{run.info.run_id}/model", run.info.run_id)
    refused = _cli("promote", model, "2", env=_as(auth_server, "viewer", password))
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1, refused.stderr
    assert lines == [f"error: promote: permission denied: MLflow user 'viewer' needs EDIT (moving its champion "
                     f"alias) on registered model '{model}' (its owner or an admin grants it)"], refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    assert client.get_registered_model(model).aliases == {}  # nothing moved
    # the control: the admin may
    assert _cli("promote", model, "2", env=admin).returncode == 0
    assert client.get_registered_model(model).aliases == {"champion": "2"}


# --- the register stage on a local registry (no auth) --------------------------------------------------------

def test_a_recipe_cannot_loosen_the_models_policy(smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: a v1 champion; its owner sets min_win_rate_vs_champion=1.0; a run with another dpo.beta
    and `--set register.gate.min_win_rate_vs_champion=0.0` is not promoted, and its reasons name the policy.
    At 1.0 the policy fails any candidate (a lower bound never exceeds 1): at 0.5 the outcome would hang on the
    win rate of a tiny random model against the champion."""
    from conftest import warm_copy  # tests/ is on sys.path under pytest

    from alignflow.flows.pipeline import pipeline
    from alignflow.recipe import load_recipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the session's smoke seed (tests/conftest.py) trained the stages: v1 is registered in this work dir's store
    work = warm_copy(smoke_seed, tmp_path / "work")
    smoke = ROOT / "configs" / "smoke.yaml"
    first = pipeline(recipe=load_recipe(smoke), work_dir=str(work))
    assert {s for s, info in first["stages"].items() if not info["cached"]} == {"register"}
    assert first["registered"]["alias"] == "champion"
    name = first["registered"]["model_name"]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert not any(k.startswith("register.gate.") for k in client.get_registered_model(name).tags)  # none yet

    done = _cli("policy", "set", name, "register.gate.min_win_rate_vs_champion=1.0", "--work-dir", str(work))
    assert done.returncode == 0, done.stderr
    assert "register.gate.min_win_rate_vs_champion=1.0" in _cli("policy", "show", name, "--work-dir",
                                                                 str(work)).stdout
    loose = load_recipe(smoke, ["register.gate.min_win_rate_vs_champion=0.0", "dpo.beta=0.3"])
    second = pipeline(recipe=loose, work_dir=str(work))
    registered = second["registered"]
    assert registered["alias"] == "challenger" and registered["version"] == "2", registered
    cited = [r for r in registered["gate_reasons"] if "min_win_rate_vs_champion=1.0" in r]
    assert cited and cited[0].endswith(f"[policy of {name}: register.gate.min_win_rate_vs_champion=1.0]"), \
        registered["gate_reasons"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    version = client.get_model_version(name, "2")
    assert version.tags["alignflow.gate"] == "failed" and "policy of" in version.tags["alignflow.gate_reasons"]
    # the pipeline read the policy and never wrote it
    tags = client.get_registered_model(name).tags
    assert {k: v for k, v in tags.items() if k.startswith("register.gate.")} == \
        {"register.gate.min_win_rate_vs_champion": "1.0"}
