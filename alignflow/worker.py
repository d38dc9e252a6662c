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

Run as `python -m alignflow.worker --pool NAME` (what `up` does); the environment is the one `up` gives it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import warnings
from typing import TYPE_CHECKING, Any

from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

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
    """The process job configuration, built from PROCESS_TEMPLATE after the run passed `refusal`."""

    @classmethod
    async def resolve_for_flow_run(cls, flow_run: FlowRun, *, client: PrefectClient, work_pool: WorkPool,
                                   worker_name: str, worker_id: UUID | None = None,
                                   deployment: DeploymentResponse | None = None) -> TeamJobConfiguration:
        if deployment is None and flow_run.deployment_id:
            deployment = await client.read_deployment(flow_run.deployment_id)
        why = refusal(flow_run.job_variables or {}, deployment, os.environ.get("ALIGNFLOW_HOME", ""))
        if why:
            raise RefusedRun(f"alignflow's team worker refused this run: {why}")
        # the worker's own template, whatever the pool on the server holds now (a Prefect user may have edited it)
        pinned = work_pool.model_copy(update={"base_job_template": PROCESS_TEMPLATE})
        return await super().resolve_for_flow_run(flow_run, client=client, work_pool=pinned,
                                                  worker_name=worker_name, worker_id=worker_id,
                                                  deployment=deployment)


with warnings.catch_warnings():  # it takes the `process` type's place in Prefect's registry, in this process only
    warnings.simplefilter("ignore", UserWarning)

    class TeamWorker(ProcessWorker):
        job_configuration = TeamJobConfiguration


async def _serve(pool: str) -> None:
    worker = TeamWorker(work_pool_name=pool, base_job_template=PROCESS_TEMPLATE)
    await worker.start(printer=print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="the process work pool to serve")
    asyncio.run(_serve(parser.parse_args().pool))


if __name__ == "__main__":
    main()
