"""Tell Prefect that new training data landed, which triggers the `retrain` deployment (see prefect.yaml).

A data job calls this after writing a file:  python deployments/emit_data_landed.py data/sft.jsonl
(PREFECT_API_URL must point at the team's Prefect server.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect.events import emit_event

from alignflow.tasks.lib.hashing import sha256_file


def main() -> None:
    for arg in sys.argv[1:] or ["data"]:
        path = Path(arg).resolve()
        event = emit_event(
            event="alignflow.data.landed",
            resource={"prefect.resource.id": f"alignflow.data.{path.stem}", "alignflow.path": str(path)},
            payload={"sha256": sha256_file(path) if path.is_file() else None},
        )
        print(f"emitted alignflow.data.landed for {path} ({event.id if event else 'not sent: no Prefect API'})")


if __name__ == "__main__":
    main()
