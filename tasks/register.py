"""register: put the tuned adapter into the MLflow model registry and let the gate pick its alias.

The adapter (with tokenizer and chat template) is logged as an MLflow pyfunc model in the register child run
and registered under `register.model_name`. The gate reads the evaluate stage's metrics: if every condition
holds, the new version gets the alias `champion` (the version it displaces keeps `previous-champion`);
otherwise it gets `challenger` and the reasons are recorded. A failed gate is an outcome, not an error.
Registration is idempotent: a version whose adapter has the same content hash is reused, never duplicated.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import read_manifest, sha256_tree, write_manifest


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_win_rate: float = Field(0.5, ge=0, le=1, description="reward-model win-rate vs the base must reach this")
    min_rougeL_gain: float | None = Field(0.0, description="rougeL - rougeL_base must reach this (None: not checked)")


class RegisterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str = Field(..., min_length=1, description="registered model name in MLflow")
    gate: GateConfig = GateConfig()


class RegisterInputs(BaseModel):
    base_path: Path
    base_spec: str
    dtype: str
    candidate: Path  # the dpo stage folder
    evaluation: Path  # the evaluate stage folder
    run_id: str  # the register child run the model is logged in
    tags: dict[str, str] = {}  # lineage tags copied onto the version (parent run, recipe and data hashes)
    out_dir: Path


def gate(cfg: GateConfig, metrics: dict[str, float]) -> list[str]:
    """Reasons the candidate fails the gate; empty when it passes."""
    reasons = []
    win = metrics.get("win_rate_vs_base")
    if win is None or win < cfg.min_win_rate:
        reasons.append(f"win_rate_vs_base={win} < min_win_rate={cfg.min_win_rate}")
    if cfg.min_rougeL_gain is not None:
        gain = metrics.get("rougeL_gain")
        if gain is None or gain < cfg.min_rougeL_gain:
            reasons.append(f"rougeL_gain={gain} < min_rougeL_gain={cfg.min_rougeL_gain}")
    return reasons


def run(cfg: RegisterConfig, inputs: RegisterInputs) -> dict[str, Any]:
    import importlib.metadata

    import mlflow
    from mlflow import MlflowClient

    from tasks.served_model import AdapterModel

    out = inputs.out_dir
    out.mkdir(parents=True, exist_ok=True)
    adapter = inputs.candidate / "adapter"
    adapter_hash = sha256_tree(adapter)
    metrics = read_manifest(inputs.evaluation)["metrics"]
    reasons = gate(cfg.gate, metrics)
    client = MlflowClient()

    existing = [v for v in client.search_model_versions(f"name='{cfg.model_name}'")
                if v.tags.get("alignflow.adapter_sha256") == adapter_hash]
    if existing:
        version = str(existing[0].version)
    else:
        active = mlflow.active_run()
        ctx = nullcontext() if active and active.info.run_id == inputs.run_id else mlflow.start_run(inputs.run_id)
        pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "transformers", "peft", "mlflow")]
        with ctx:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=AdapterModel(),
                artifacts={"adapter": str(adapter)},
                model_config={"base_path": str(inputs.base_path), "base_spec": inputs.base_spec,
                              "dtype": inputs.dtype},
                pip_requirements=pins,
                registered_model_name=cfg.model_name,
            )
        version = str(info.registered_model_version)
        for key, value in {**inputs.tags, "alignflow.adapter_sha256": adapter_hash,
                           "alignflow.base_model": inputs.base_spec}.items():
            client.set_model_version_tag(cfg.model_name, version, key, value)

    alias = "challenger" if reasons else "champion"
    if alias == "champion":
        try:
            previous = str(client.get_model_version_by_alias(cfg.model_name, "champion").version)
        except Exception:  # no champion yet
            previous = None
        if previous is not None and previous != version:
            client.set_registered_model_alias(cfg.model_name, "previous-champion", previous)
    client.set_registered_model_alias(cfg.model_name, alias, version)
    client.set_model_version_tag(cfg.model_name, version, "alignflow.gate", "passed" if not reasons else "failed")
    client.set_model_version_tag(cfg.model_name, version, "alignflow.gate_reasons", "; ".join(reasons) or "-")

    return write_manifest(out, {
        "stage": "register",
        "model_name": cfg.model_name,
        "version": version,
        "alias": alias,
        "gate_reasons": reasons,
        "adapter_sha256": adapter_hash,
        "model_uri": f"models:/{cfg.model_name}/{version}",
        "outputs": [],
        "metrics": {"gate_passed": float(not reasons), "registered_version": float(version)},
    })
