"""The team worker: Prefect's process worker, started by `alignflow server up`, that runs alignflow's flows only.

Anyone with the Prefect password can submit a flow run, set its job variables, edit the work pool's base job
template or create a deployment. Prefect's process worker would then run whatever they named: a `command` job
variable replaces `python -m prefect.engine`, an `env` one is merged into the run's environment (whatever the
pool's variables schema says: `BaseJobConfiguration.from_template_and_values` merges a deployment's or flow run's
`env` into a dict-valued `job_configuration.env`), and a deployment's pull steps or entrypoint choose the code.

So this worker builds each run's job configuration from its own template (`PROCESS_TEMPLATE`: no `command`,
`env` or `working_dir`), never from the pool's copy on the server, and refuses (the run ends CRASHED, with the
reason in its state message and the worker's log) a run that:
- sets any job variable outside `ALLOWED_JOB_VARIABLES` (on the flow run or its deployment);
- has no deployment, or a deployment whose entrypoint is not one of alignflow's flows (`ENTRYPOINTS`), or whose
  pull steps are anything but `set_working_directory` to the worker's project dir (`ALIGNFLOW_HOME`).

Nothing after that check reads the deployment again. Left to itself, Prefect 3.8 starts each run through
`prefect.runner._workspace_supervisor`, which reads the deployment from the API once more and runs that copy's pull
steps and entrypoint: a Prefect user who edits the deployment between the check and the start runs any code as
the worker's user. So the job sets its own `command` (the engine), `working_dir` (ALIGNFLOW_HOME: what the one
allowed pull step did) and `PREFECT__FLOW_ENTRYPOINT` (the checked entrypoint: the engine then loads the flow from
it and never from the deployment), and `TeamWorker.run` resolves the flow for on_crashed/on_cancellation hooks from
that same entrypoint (Prefect's default for a set command, `load_flow_from_flow_run`, reads the deployment and runs
its pull steps inside the worker itself).

Run as `python -m alignflow.worker --pool NAME` (what `up` does); the environment is the one `up` gives it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from prefect.flows import load_flow_from_entrypoint
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._starter_engine import EngineCommandStarter
from prefect.utilities.processutils import command_to_string, get_sys_executable
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.flows import Flow
    from prefect.runner._process_manager import ProcessHandle

# Prefect 3.8's process template without `command`, `env` and `working_dir`: the run's command is the engine's,
# its environment the worker's, its directory a fresh temporary one (the pull step then moves to the project).
# `additionalProperties: false` makes the server answer 422 to any other job variable when a run is created.
PROCESS_TEMPLATE: dict[str, Any] = {
    "job_configuration": {"labels": "{{ labels }}", "name": "{{ name }}", "stream_output": "{{ stream_output }}"},
    "variables": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "name": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Name",
                     "description": "Name given to infrastructure created by a worker."},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "title": "Labels",
                       "description": "Labels applied to infrastructure created by a worker."},
            "stream_output": {"type": "boolean", "default": True, "title": "Stream Output",
                              "description": "Stream the flow run's output into the worker's log."},
        },
    },
}
ALLOWED_JOB_VARIABLES = frozenset(PROCESS_TEMPLATE["variables"]["properties"])
ENTRYPOINTS = frozenset({"flows/pipeline.py:pipeline", "flows/retrain.py:retrain"})
SET_WORKING_DIRECTORY = "prefect.deployments.steps.set_working_directory"


class RefusedRun(RuntimeError):
    """A flow run this worker will not execute."""


def refusal(flow_run_vars: dict[str, Any], deployment: DeploymentResponse | None, project_dir: str) -> str | None:
    """Why the worker refuses this run, or None when it may run."""
    if deployment is None:
        return "only deployment runs of alignflow's flows run on this worker (this flow run has no deployment)"
    for where, variables in (("flow run", flow_run_vars), ("deployment", deployment.job_variables or {})):
        extra = sorted(set(variables) - ALLOWED_JOB_VARIABLES)
        if extra:
            return (f"the {where} sets job variables {', '.join(extra)}: this worker takes only "
                    f"{', '.join(sorted(ALLOWED_JOB_VARIABLES))} (the command, environment and directory are its own)")
    if deployment.entrypoint not in ENTRYPOINTS:
        return (f"entrypoint {deployment.entrypoint!r} is not one of alignflow's flows "
                f"({', '.join(sorted(ENTRYPOINTS))})")
    steps = deployment.pull_steps or []
    allowed_dirs = {"{{ $ALIGNFLOW_HOME }}", project_dir}
    if (len(steps) != 1 or set(steps[0]) != {SET_WORKING_DIRECTORY}
            or set(steps[0][SET_WORKING_DIRECTORY] or {}) != {"directory"}
            or steps[0][SET_WORKING_DIRECTORY]["directory"] not in allowed_dirs):
        return (f"the deployment's pull steps must be exactly one {SET_WORKING_DIRECTORY} to the worker's project "
                f"dir ({project_dir}), as in deployments/prefect.yaml; got {steps!r}")
    return None


class TeamJobConfiguration(ProcessJobConfiguration):
    """The process job configuration, built from PROCESS_TEMPLATE after the run passed `refusal`, with the command,
    directory and flow entrypoint fixed here (nothing started from it reads the deployment again)."""

    @classmethod
    async def resolve_for_flow_run(cls, flow_run: FlowRun, *, client: PrefectClient, work_pool: WorkPool,
                                   worker_name: str, worker_id: UUID | None = None,
                                   deployment: DeploymentResponse | None = None) -> TeamJobConfiguration:
        if deployment is None and flow_run.deployment_id:
            deployment = await client.read_deployment(flow_run.deployment_id)
        home = os.environ.get("ALIGNFLOW_HOME", "")
        why = refusal(flow_run.job_variables or {}, deployment, home)
        if why is None and not home:
            why = "the worker has no ALIGNFLOW_HOME (the project dir its flows run from)"
        if why:
            raise RefusedRun(f"alignflow's team worker refused this run: {why}")
        assert deployment is not None  # refusal() refuses a run without one
        # the checked entrypoint, as this worker spells it (not a later copy of the deployment's)
        (entrypoint,) = ENTRYPOINTS & {deployment.entrypoint}
        # the worker's own template, whatever the pool on the server holds now (a Prefect user may have edited it)
        pinned = work_pool.model_copy(update={"base_job_template": PROCESS_TEMPLATE})
        config = await super().resolve_for_flow_run(flow_run, client=client, work_pool=pinned,
                                                    worker_name=worker_name, worker_id=worker_id,
                                                    deployment=deployment)
        # A set command makes ProcessWorker start the engine directly (EngineCommandStarter) instead of the
        # workspace supervisor, which would read the deployment again and run its pull steps.
        config.command = command_to_string([get_sys_executable(), "-m", "prefect.engine"])
        config._command_configured = True
        config.working_dir = Path(home)  # where the one allowed pull step (set_working_directory) moved to
        # flow_engine.load_flow imports this entrypoint (relative to working_dir) and skips load_flow_from_flow_run
        config.env = {**config.env, "PREFECT__FLOW_ENTRYPOINT": entrypoint}
        return config


def fixed_flow_resolver(configuration: ProcessJobConfiguration) -> Callable[[FlowRun], Awaitable[Flow[Any, Any]]]:
    """The flow for a run's on_crashed/on_cancellation hooks, loaded in the worker from the entrypoint its job
    configuration fixed (under its working_dir), never from the deployment on the server."""
    entrypoint = str(configuration.env["PREFECT__FLOW_ENTRYPOINT"])
    path, name = entrypoint.rsplit(":", 1)
    absolute = f"{Path(str(configuration.working_dir)) / path}:{name}"

    async def resolve(flow_run: FlowRun) -> Flow[Any, Any]:
        # importing the flow module runs its top level: in a thread, off the worker's event loop
        return await anyio.to_thread.run_sync(lambda: load_flow_from_entrypoint(absolute, use_placeholder_flow=False))

    return resolve


with warnings.catch_warnings():  # it takes the `process` type's place in Prefect's registry, in this process only
    warnings.simplefilter("ignore", UserWarning)

    class TeamWorker(ProcessWorker):
        job_configuration = TeamJobConfiguration

        async def run(self, flow_run: FlowRun, configuration: ProcessJobConfiguration,
                      task_status: anyio.abc.TaskStatus[int] | None = None) -> ProcessWorkerResult:
            """ProcessWorker.run's set-command branch (Prefect 3.8.8), with the hooks' flow from the fixed entrypoint:
            never the workspace supervisor, never load_flow_from_flow_run."""
            if task_status is None:
                task_status = anyio.TASK_STATUS_IGNORED
            if not (configuration._command_configured and configuration.working_dir
                    and configuration.env.get("PREFECT__FLOW_ENTRYPOINT") in ENTRYPOINTS):
                raise RefusedRun("alignflow's team worker runs only job configurations TeamJobConfiguration built")
            execution: FlowRunExecutionResult | None = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                async with FlowRunExecutorContext() as ctx:
                    starter = EngineCommandStarter(command=configuration.command,
                                                   cwd=Path(configuration.working_dir).resolve(),
                                                   env=configuration.env, stream_output=configuration.stream_output,
                                                   control_channel=ctx.control_channel)
                    executor = ctx.create_executor(flow_run, starter, resolve_flow=fixed_flow_resolver(configuration),
                                                   propose_submitting=False)

                    async def execute(*, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                                      ) -> None:
                        nonlocal execution
                        execution = await executor.submit(task_status=task_status)

                    async with anyio.create_task_group() as group:
                        handle = await group.start(execute)
                        if handle.pid is None:
                            raise RuntimeError("Flow run process has no PID")
                        task_status.started(handle.pid)
            if execution is None or execution.status_code is None:
                raise RuntimeError("Failed to start flow run process.")
            return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))


async def _serve(pool: str) -> None:
    worker = TeamWorker(work_pool_name=pool, base_job_template=PROCESS_TEMPLATE)
    await worker.start(printer=print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="the process work pool to serve")
    asyncio.run(_serve(parser.parse_args().pool))


if __name__ == "__main__":
    main()
