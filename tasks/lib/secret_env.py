"""Which environment variables a recipe may name as a secret (`synthesize.teacher.api_key_env`).

A recipe is data a teammate (or anything that can reach the Prefect API) submits; the worker that runs it holds
credentials. If a recipe could name any variable, `api_key_env: MLFLOW_TRACKING_PASSWORD` plus a teacher `url`
on the submitter's host would send the worker's tracking password there as a Bearer token. So only the names
the operator allows may be used:

- `ALIGNFLOW_SECRET_ENV_ALLOW`: comma-separated names or shell-style patterns, read from the environment of the
  process that validates the recipe (the worker, for a deployment run). Default: `OPENAI_API_KEY,*_API_KEY`.
- Never, even if allowed: MLflow, Prefect, database and AWS credentials, and alignflow's own (`MLFLOW_*`,
  `PREFECT_*`, `AWS_*`, `ALIGNFLOW_*`, `DATABASE_*`, `PG*`, `POSTGRES*`, `MYSQL*`, names containing `DB_`,
  `REDIS*`, `MONGO*`).
"""

from __future__ import annotations

import fnmatch
import os

DEFAULT_ALLOW = "OPENAI_API_KEY,*_API_KEY"
# fnmatchcase patterns over the upper-cased name: credentials of the servers the worker talks to
NEVER = ("MLFLOW_*", "PREFECT_*", "AWS_*", "ALIGNFLOW_*", "DATABASE*", "*_DATABASE*", "PG*", "POSTGRES*", "MYSQL*",
         "*DB_*", "DB_*", "SQLALCHEMY*", "REDIS*", "MONGO*")


def allow_patterns() -> list[str]:
    raw = os.environ.get("ALIGNFLOW_SECRET_ENV_ALLOW", DEFAULT_ALLOW)
    return [p.strip() for p in raw.split(",") if p.strip()]


def secret_env_problem(name: str) -> str | None:
    """Why `name` may not be read as a secret, or None when it may."""
    upper = name.upper()
    denied = next((p for p in NEVER if fnmatch.fnmatchcase(upper, p)), None)
    if denied is not None:
        return (f"'{name}' may not be used as a secret: it matches '{denied}' (MLflow, Prefect, database, AWS and "
                "alignflow credentials are never handed to a recipe)")
    allowed = allow_patterns()
    if not any(fnmatch.fnmatchcase(name, p) for p in allowed):
        return (f"'{name}' is not an allowed secret variable (allowed: {', '.join(allowed) or 'none'}; the "
                "operator sets ALIGNFLOW_SECRET_ENV_ALLOW)")
    return None
