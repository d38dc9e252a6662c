"""The deployment files parse and agree with the code: prefect.yaml, the work-pool job templates, docker compose.

The templates are also created as real work pools on a real Prefect server in tests/test_team.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from alignflow.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deployments"


def test_deployment_file_parses_and_points_at_real_flows(in_root: Path, tmp_path: Path) -> None:
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        # as a worker loads it: the file path in the checkout (the installed package is alignflow.flows)
        flow = load_flow_from_entrypoint(f"{ROOT}/{dep['entrypoint']}")
        assert hasattr(flow, "deploy"), f"{dep['entrypoint']} is not a Prefect flow"
        if "recipe" in dep.get("parameters", {}):
            # the deployment's default recipe must validate like a recipe file does (data/ relative to the root)
            path = tmp_path / "deployed.yaml"
            path.write_text(yaml.safe_dump(dep["parameters"]["recipe"]))
            load_recipe(path)


def test_work_pool_templates_only_use_declared_variables() -> None:
    # what Prefect's server checks when a pool is created: every {{ placeholder }} is a declared variable
    for kind in ("docker", "kubernetes"):
        template = json.loads((DEPLOY / "work-pools" / f"{kind}.json").read_text())
        declared = set(template["variables"]["properties"])
        used = set(re.findall(r"{{\s*([\w]+)\s*}}", json.dumps(template["job_configuration"])))
        assert used and used <= declared, f"{kind}: undeclared {used - declared}"
        assert template["variables"]["properties"]["image"]["default"] == "alignflow:latest"
    k8s = json.loads((DEPLOY / "work-pools" / "kubernetes.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/app/runs", "/dev/shm"}


def test_compose_file_defines_the_team_services_on_loopback() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker"}
    assert services["prefect-server"]["ports"] == ["127.0.0.1:4200:4200"]
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "postgresql+psycopg2://" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "--pool" in services["worker"]["command"] and "alignflow" in services["worker"]["command"]
    assert (DEPLOY / "postgres-init.sql").read_text().count("CREATE DATABASE mlflow") == 1
    # no literal password: it comes from the environment
    assert "${ALIGNFLOW_DB_PASSWORD" in services["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_the_deployment_forms_defaults_are_the_demo_recipe_as_it_is() -> None:
    # the Prefect UI's run form starts from these values: they must be configs/demo.yaml, not a superseded copy
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    spec = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    recipes = {dep["name"]: dep["parameters"]["recipe"] for dep in spec["deployments"]}
    assert set(recipes) == {"pipeline", "retrain"}
    assert recipes["pipeline"] == demo, "deployments/prefect.yaml's pipeline form differs from configs/demo.yaml"
    retrain = dict(recipes["retrain"])
    assert retrain.pop("retrain") == {"start_from": "champion"}
    assert retrain == demo, "deployments/prefect.yaml's retrain form differs from configs/demo.yaml"


def test_the_deployment_form_takes_register_ship_as_the_recipe_writes_it() -> None:
    """The flow's parameter schema (the Prefect UI form, `deployment run --params`) takes `register.ship` in both
    spellings the recipe documents, `gguf_q8_0` and `{gguf: q8_0}`, and refuses a type there is none of."""
    import jsonschema
    import pytest
    from prefect.utilities.callables import parameter_schema

    from alignflow.flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump_for_openapi()
    recipe_schema = {**schema["properties"]["recipe"], "definitions": schema.get("definitions", {}),
                     "$defs": schema.get("definitions", {})}
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    for ship in (["merged", "gguf_q8_0"], ["merged", {"gguf": "q8_0"}], [{"gguf": "f16"}]):
        jsonschema.validate({**raw, "register": {**raw["register"], "ship": ship}}, recipe_schema)
    for wrong in ([{"gguf": "q4"}], ["gguf"], [{"gguf": "q8_0", "name": "x"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**raw, "register": {**raw["register"], "ship": wrong}}, recipe_schema)
