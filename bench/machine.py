"""What a benchmark's figures were measured on: printed first and last by every bench, so a results file says
which commit (and whether the tree was edited), how many cores, and how loaded the machine was around the run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def describe(when: str) -> str:
    """One line: commit (+ "edited" when the tree differs from it), cores, load averages (1, 5, 15 min)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        edited = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        commit += " (edited)" if edited else ""
    except (OSError, subprocess.CalledProcessError):  # a copy without git: `git archive` wrote bench/COMMIT
        stamped = (ROOT / "bench" / "COMMIT").read_text().strip()
        commit = f"{stamped} (a `git archive` copy)" if not stamped.startswith("$") else "unknown (no git checkout)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine {when}: commit {commit}, {os.cpu_count()} cores, load average {load}"
