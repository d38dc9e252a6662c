"""Several processes (GPUs) for the training stages, through `accelerate launch`.

With `launch.num_processes > 1` a training stage's `run(cfg, inputs)` does not train in the calling process:
it writes its config and inputs as JSON beside its outputs and starts

    accelerate launch --num_processes N [--multi_gpu | --use_fsdp ... | --use_deepspeed ...] \
        --module alignflow.tasks.lib.launch alignflow.tasks.sft <cfg.json> <inputs.json>

Every process then runs the same `run()`; the Trainer shards the batches (DDP), or the parameters (FSDP /
DeepSpeed ZeRO), and only the main process writes the adapter, the plots and the manifest, which the caller
reads back. The MLflow child run is passed on in MLFLOW_RUN_ID, so the step-metrics callback (main process
only, tasks/lib/step_metrics.py) logs into it as in a single process. `cpu: true` runs the processes on CPU
with the gloo backend (how the tests exercise this path without GPUs).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.manifest import read_manifest


class LaunchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_processes: int = Field(1, ge=1, le=1024, description="training processes (one per GPU); >1 launches "
                               "the training stages through accelerate")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp: a full copy per GPU; fsdp: parameters sharded (FULL_SHARD, transformer-block "
        "wrap); deepspeed: ZeRO stage `zero_stage`")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (strategy: deepspeed)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate's mixed precision")
    config_file: Path | None = Field(None, description="an `accelerate config` file; replaces the flags above")
    cpu: bool = Field(False, description="run the processes on CPU (gloo, DDP only): for tests and debugging")

    @model_validator(mode="after")
    def _honoured(self) -> LaunchSpec:
        # Measured with accelerate 1.15: `--use_fsdp` on CPU processes leaves the Trainer unsharded
        # (AcceleratorState enables FSDP only for GPU-like distributed types; MULTI_CPU falls through, so
        # `Trainer.is_fsdp_enabled` is False), and DeepSpeed is skipped on CPU the same way. Training would
        # silently be DDP: refuse instead of substituting.
        if self.cpu and self.strategy != "ddp" and self.config_file is None:
            raise ValueError(f"launch.strategy '{self.strategy}' cannot run with launch.cpu: true (accelerate "
                             "shards parameters only across GPUs; on CPU it would silently train DDP). Use "
                             "strategy: ddp on CPU, or drop cpu: true on a GPU machine")
        return self


def launched() -> bool:
    """True inside a process started by `accelerate launch` (or torchrun): train here, don't launch again."""
    return "LOCAL_RANK" in os.environ or os.environ.get("ALIGNFLOW_LAUNCHED") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(spec: LaunchSpec, module: str, cfg_file: Path, inputs_file: Path, port: int) -> list[str]:
    """The `accelerate launch` command line for one training stage."""
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.config_file is not None:
        argv += ["--config_file", str(spec.config_file), "--num_processes", str(spec.num_processes)]
    else:
        argv += ["--num_processes", str(spec.num_processes), "--num_machines", "1",
                 "--mixed_precision", spec.mixed_precision, "--dynamo_backend", "no"]
        if spec.strategy == "ddp":
            # --multi_gpu means torchrun-style processes; without GPUs they join over gloo (accelerate's own
            # --cpu would start one process, or need MPI)
            argv += ["--multi_gpu"]
        elif spec.strategy == "fsdp":
            argv += ["--use_fsdp", "--fsdp_version", "2", "--fsdp_sharding_strategy", "FULL_SHARD",
                     "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type",
                     "SHARDED_STATE_DICT"]
        else:
            argv += ["--use_deepspeed", "--zero_stage", str(spec.zero_stage)]
    argv += ["--main_process_port", str(port), "--module", "alignflow.tasks.lib.launch", module, str(cfg_file),
             str(inputs_file)]
    return argv


def distributed(module: str, spec: LaunchSpec, cfg: BaseModel, inputs: BaseModel, out: Path) -> dict[str, Any]:
    """Run `module.run(cfg, inputs)` in `spec.num_processes` processes; return the manifest rank 0 wrote."""
    import mlflow

    launch_dir = out / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    cfg_file, inputs_file = launch_dir / "config.json", launch_dir / "inputs.json"
    cfg_file.write_text(cfg.model_dump_json(indent=2))
    inputs_file.write_text(inputs.model_dump_json(indent=2))
    argv = command(spec, module, cfg_file, inputs_file, free_port())
    (launch_dir / "command.txt").write_text(" ".join(argv) + "\n")
    env = dict(os.environ)
    active = mlflow.active_run()
    if active is not None:  # the step-metrics callback (rank 0) logs into the stage's child run
        env["MLFLOW_RUN_ID"] = active.info.run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["ALIGNFLOW_LAUNCHED"] = "1"  # never launch again from inside a launched process
    env["ALIGNFLOW_CALLER_PID"] = str(os.getpid())  # the training processes end when this one is gone
    if spec.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # No PYTHONPATH entry: alignflow is installed, and its tasks/ folder on the path would shadow the standard
    # library's `tokenize` (and HF `evaluate`) with the stages of the same names.
    proc = subprocess.run(argv, env=env, cwd=Path.cwd())
    if proc.returncode != 0:
        raise StageError(f"{module}: `accelerate launch` with {spec.num_processes} processes failed (exit "
                         f"{proc.returncode}); the command is in {launch_dir / 'command.txt'}. Checkpoints are "
                         "kept: re-running resumes.")
    manifest = read_manifest(out)
    manifest["launch"] = {"num_processes": spec.num_processes, "strategy": spec.strategy, "cpu": spec.cpu}
    return manifest


def end_with_caller(poll_s: float = 0.5) -> None:
    """Kill this process (SIGKILL) once the process that launched the stage is gone.

    torchrun starts every training process in a session of its own, so a kill -9 of the pipeline's process group
    (or the pipeline alone) leaves them running, orphaned: they would go on writing the stage's `.partial` folder
    and, at their end, delete the checkpoints that the re-run is resuming from, beside the re-run's own processes
    (seen with accelerate 1.15 / torch 2.13: a killed two-process dpo run finished on its own; the re-run found no
    checkpoint and trained from step 0). On Linux the kernel kills this process as soon as its parent, the
    launcher, dies (a kill of the pipeline's process group takes the launcher); a daemon thread also watches the
    caller's pid (the pipeline killed alone leaves the launcher waiting on its processes).
    """
    import threading
    import time

    from alignflow.tasks.lib.processes import pid_alive

    caller = int(os.environ.get("ALIGNFLOW_CALLER_PID") or 0)
    if not caller:  # started by hand (torchrun, accelerate launch): nobody to follow
        return
    if sys.platform == "linux":
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGKILL)

    def watch() -> None:
        while pid_alive(caller):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="alignflow-end-with-caller", daemon=True).start()


def main(argv: list[str]) -> None:
    """Entry point of each launched process: alignflow.tasks.lib.launch MODULE CFG_JSON INPUTS_JSON."""
    end_with_caller()
    module_name, cfg_file, inputs_file = argv
    module = importlib.import_module(module_name)
    stage = module_name.rsplit(".", 1)[-1]
    config_cls = {"sft": "SftConfig", "reward": "RewardConfig", "dpo": "DpoConfig"}[stage]
    inputs_cls = {"sft": "SftInputs", "reward": "RewardInputs", "dpo": "DpoInputs"}[stage]
    cfg = getattr(module, config_cls).model_validate(json.loads(Path(cfg_file).read_text()))
    inputs = getattr(module, inputs_cls).model_validate(json.loads(Path(inputs_file).read_text()))
    module.run(cfg, inputs)


if __name__ == "__main__":
    main(sys.argv[1:])
