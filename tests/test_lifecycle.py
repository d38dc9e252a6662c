"""A lifecycle as a history checker (issue 26): one work dir, one SQLite MLflow store, every step a
`python -m alignflow.cli ...` process, and the same invariants checked after every step:
- the registry's champion is what the last command printed;
- every version's lineage (its parent run's `lineage/sft.jsonl`, and the version's `alignflow.lineage.*` tags)
  holds exactly the SFT records it and its ancestors trained on (the curated and the synthesized ones), and its
  `lineage/preference.jsonl` exactly the pairs their judges and policies trained on: never a held-out pair, and a
  retrain holds out none that an ancestor trained on;
- every version has tags, and one version per weights hash (`alignflow.adapter_sha256`);
- `champion` is never on a version the gate refused or a rollback demoted, unless promoted by hand
  (`challenger` and `previous-champion` are where such versions are meant to go);
- every MLflow run is FINISHED, FAILED or KILLED: none left RUNNING.
The smoke recipe on a tiny model; a few minutes on two cores (run A's stages come from the session's smoke seed,
most later ones from the cache)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from conftest import warm_copy  # tests/ is on sys.path under pytest
from mlflow import MlflowClient

from alignflow.tasks.lib.hashing import sha256_tree
from alignflow.tasks.lib.manifest import read_manifest
from alignflow.tasks.lib.pairs import pair_hash

ROOT = Path(__file__).resolve().parents[1]
NAME = "smoke-assistant"
# run B: other weights (dpo.beta) and no champion comparison (a tiny random model is not measurably better than
# another one: the history is about the registry, so the gate must let B through on its own)
OPENED = ["dpo.beta=0.3", "register.gate.min_win_rate_vs_champion=null"]
NEW_1 = [("Name the planet closest to the sun, in one word.", "Mercury"),
         ("Which gas do plants take in for photosynthesis?", "carbon dioxide"),
         ("Give the chemical symbol for gold.", "Au"),
         ("How many legs does a spider have? Answer with a digit.", "8"),
         ("What is the capital of Portugal? One word.", "Lisbon"),
         ("Spell the number twelve in letters.", "twelve")]
NEW_2 = [("Which ocean lies between Africa and Australia?", "the Indian Ocean"),
         ("Give the chemical symbol for iron.", "Fe"),
         ("How many sides does a hexagon have? Answer with a digit.", "6"),
         ("Name the largest planet of the solar system, in one word.", "Jupiter"),
         ("What is the freezing point of water in degrees Celsius? A number.", "0"),
         ("Spell the number seven in letters.", "seven")]
REGISTERED = re.compile(r"registered (\S+) version (\d+) as (no alias|\S+) \(")  # then why, in parentheses


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the work dir's store


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignflow.cli", *args]


def _cli(*args: str) -> str:
    proc = subprocess.run(_argv(*args), capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=900)
    assert proc.returncode == 0, (args, proc.stdout[-3000:], proc.stderr[-3000:])
    return " ".join(proc.stdout.split())  # rich wraps long lines


def _sets(options: list[str]) -> list[str]:
    return [x for o in options for x in ("--set", o)]


def _printed_champion(said: str) -> str | None:
    """The champion the command's output names: a run's registered line, or promote's / rollback's stamp."""
    found = list(REGISTERED.finditer(said))
    if found:
        _, version, alias = found[-1].groups()
        if alias == "champion":
            return version
        tail = said[found[-1].end():]  # the reasons may hold parentheses; the champion follows them
        champion = re.search(r"\); champion: version (\d+)", tail)
        assert champion or "); there is no champion" in tail, said
        return champion.group(1) if champion else None
    moved = re.findall(r"champion v\d+ -> v(\d+)", said)
    assert moved, said
    return moved[-1]


def _key(record: dict) -> str:
    """An SFT record by its prompt (curation keeps prompts as they are on this data)."""
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class History:
    """The steps' expectations, and the checker run after each step."""

    def __init__(self, work: Path, tmp: Path) -> None:
        self.work, self.tmp = work, tmp
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.lineage: dict[str, set[str]] = {}  # version -> prompts it and its ancestors trained on
        self.pairs: dict[str, set[str]] = {}  # version -> pairs (pair_hash) its and its ancestors' judges and
        # policies learned
        self.by_hand: set[str] = set()  # versions promoted by hand
        self.steps: list[str] = []

    def check(self, step: str, said: str | None) -> dict[str, str]:
        """Every invariant; `said` is the step's printed output (None: the step printed nothing to compare)."""
        self.steps.append(step)
        c = self.client
        where = f"after step {len(self.steps)} ({step})"
        names = {m.name for m in c.search_registered_models()}
        aliases = ({a: str(v) for a, v in c.get_registered_model(NAME).aliases.items()} if NAME in names else {})
        if said is not None:
            assert aliases.get("champion") == _printed_champion(said), (where, aliases, said[-1500:])
        versions = c.search_model_versions(f"name='{NAME}'") if NAME in names else []
        hashes = [v.tags.get("alignflow.adapter_sha256") for v in versions]
        for v in versions:
            assert v.tags and "alignflow.adapter_sha256" in v.tags, (where, v.version, v.tags)
        assert len(set(hashes)) == len(hashes), (where, "two versions hold the same weights", hashes)
        champion = aliases.get("champion")
        if champion is not None and champion not in self.by_hand:
            tags = c.get_model_version(NAME, champion).tags
            assert tags.get("alignflow.gate") != "failed", (where, champion, tags.get("alignflow.gate_reasons"))
            assert "alignflow.rolled_back" not in tags, (where, champion, tags["alignflow.rolled_back"])
        for v in versions:
            self._lineage_holds(where, str(v.version), v.tags)
        running = [(r.info.run_name, r.info.run_id) for e in c.search_experiments()
                   for r in c.search_runs([e.experiment_id], filter_string="attributes.status = 'RUNNING'")]
        assert running == [], (where, "runs left RUNNING", running)
        finished = {r.info.status for e in c.search_experiments() for r in c.search_runs([e.experiment_id])}
        assert finished <= {"FINISHED", "FAILED", "KILLED"}, (where, finished)
        print(f"{where}: holds; aliases {aliases}", flush=True)  # pytest -s shows the history as it goes
        return aliases

    def _lineage_holds(self, where: str, version: str, tags: dict[str, str]) -> None:
        assert version in self.lineage, (where, f"version {version} appeared without a step that registers it")
        dest = self.tmp / "lineage" / f"{len(self.steps)}-v{version}"
        local = Path(mlflow.artifacts.download_artifacts(run_id=tags["alignflow.parent_run_id"],
                                                         artifact_path="lineage/sft.jsonl", dst_path=str(dest),
                                                         tracking_uri=self.uri))
        records = _records(local)
        prompts = [_key(r) for r in records]
        assert len({json.dumps(r, sort_keys=True) for r in records}) == len(records), (where, version, "a record twice")
        assert set(prompts) == self.lineage[version], (where, version, set(prompts) ^ self.lineage[version])
        assert tags["alignflow.lineage.sft_records"] == str(len(records)), (where, version)
        assert tags["alignflow.lineage.sft_sha256"] == sha256_tree(local), (where, version)
        local = Path(mlflow.artifacts.download_artifacts(run_id=tags["alignflow.parent_run_id"],
                                                         artifact_path="lineage/preference.jsonl", dst_path=str(dest),
                                                         tracking_uri=self.uri))
        pairs = [pair_hash(r) for r in _records(local)]  # (the smoke data has no rated completions)
        assert len(pairs) == len(set(pairs)), (where, version, "a pair twice in the lineage")
        assert set(pairs) == self.pairs[version], (where, version, len(set(pairs) ^ self.pairs[version]))

    def registered(self, said: str, trained: set[str], continued: str | None = None) -> str:
        """The version the run printed; it must hold `trained` and the pairs its run's (and, for a retrain that
        `continued` a version, that version's lineage's) judge and policy trained on: a version found again holds
        what it held. The run held out none of those pairs."""
        version = REGISTERED.findall(said)[-1][1]
        stages = _stages(self.client, _parent_run(said))
        learned = {h for s in ("reward", "dpo") for h in read_manifest(stages[s])["trained_pair_hashes"]}
        pairs = learned | (self.pairs[continued] if continued else set())
        held = set(read_manifest(stages["tokenize"])["heldout_pair_hashes"])
        assert not held & pairs, (version, "held out a pair its judge, policy or their ancestors' trained on")
        self.lineage.setdefault(version, trained)
        assert self.lineage[version] == trained, (version, self.lineage[version] ^ trained)
        self.pairs.setdefault(version, pairs)
        assert self.pairs[version] == pairs, (version, len(self.pairs[version] ^ pairs))
        return version


def _curated_prompts(client: MlflowClient, parent_run_id: str, tmp: Path) -> set[str]:
    """What the run's own curate stage kept of the SFT data (its child run's data/ artifact)."""
    curate = client.search_runs([client.get_run(parent_run_id).info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`alignflow.stage` = 'curate'"))[0]
    local = Path(client.download_artifacts(curate.info.run_id, "data", str(tmp / f"curated-{parent_run_id}")))
    return {_key(r) for f in sorted(local.rglob("sft*.jsonl")) for r in _records(f)}


def _stages(client: MlflowClient, parent_run_id: str) -> dict[str, Path]:
    """The stage folders of a pipeline run (its child runs' `alignflow.stage_dir`, cached stages too)."""
    parent = client.get_run(parent_run_id)
    return {r.data.tags["alignflow.stage"]: Path(r.data.tags["alignflow.stage_dir"]) for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")}


def _synthesized_prompts(client: MlflowClient, parent_run_id: str) -> set[str]:
    """The teacher-written SFT records of the run's synthesize stage; sft trained on every one (tokenize dropped
    no SFT record: checked), so the version's lineage holds them beside the curated ones."""
    stages = _stages(client, parent_run_id)
    metrics = read_manifest(stages["tokenize"])["metrics"]
    assert metrics["sft.dropped.too_long"] == metrics["sft.dropped.template_mismatch"] == 0, metrics
    return {_key(r) for r in _records(stages["synthesize"] / "sft.jsonl")}


def _parent_run(said: str) -> str:
    return re.findall(r"MLflow parent run ([0-9a-f]{32})", said)[-1]


def _wait_for_register(client: MlflowClient, known: set[str], proc: subprocess.Popen, timeout_s: float) -> str:
    """Poll until a register child run of a new pipeline run is RUNNING; returns its run id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before register started"
        try:
            for e in client.search_experiments():
                for r in client.search_runs([e.experiment_id], filter_string=(
                        "tags.`alignflow.stage` = 'register' and attributes.status = 'RUNNING'")):
                    if r.info.run_id not in known:
                        return r.info.run_id
        except Exception:  # the store is being written by the run: read again
            pass
        time.sleep(0.2)
    raise AssertionError(f"register did not start within {timeout_s:.0f} s")


def test_a_history_of_registry_actions_keeps_every_invariant(smoke_seed: dict[str, Any], tmp_path: Path) -> None:
    # run A's stages come from the session's smoke seed (tests/conftest.py): its trained stages are cached, its
    # register and every later step act on this work dir's own, empty MLflow store
    work = warm_copy(smoke_seed, tmp_path / "work")
    wd = ["--work-dir", str(work)]
    h = History(work, tmp_path)
    c = h.client
    new = tmp_path / "landed" / "new.jsonl"  # the data job's file: each landing rewrites it
    new.parent.mkdir()
    grown = [f"data.sft=[data/sft.jsonl, {new}]", "register.gate.min_win_rate_vs_champion=null"]

    # 1. run A: version 1, champion; its lineage is what its own curate kept
    said = _cli("run", "configs/smoke.yaml", *wd)
    cached = {r.data.tags["alignflow.stage"]: r.data.tags["alignflow.cached"] for r in c.search_runs(
        [c.get_run(_parent_run(said)).info.experiment_id], f"tags.mlflow.parentRunId = '{_parent_run(said)}'")}
    assert {s for s, v in cached.items() if v == "false"} == {"register"}, cached
    curated = _curated_prompts(c, _parent_run(said), tmp_path)
    assert len(curated) > 100
    base = curated | _synthesized_prompts(c, _parent_run(said))  # what run A's weights learned
    assert h.registered(said, base) == "1"
    assert h.check("run A", said)["champion"] == "1"

    # 2. run B with the gate opened: version 2, champion (same data: the same lineage)
    said = _cli("run", "configs/smoke.yaml", *_sets(OPENED), *wd)
    assert h.registered(said, base) == "2"
    assert h.check("run B", said)["champion"] == "2"

    # 3. rollback: champion back on 1, version 2 tagged as demoted
    said = _cli("rollback", NAME, *wd)
    assert h.check("rollback", said)["champion"] == "1"
    assert "alignflow.rolled_back" in c.get_model_version(NAME, "2").tags

    # 4. re-run B: the champion stays where rollback put it, and B's output says so
    said = _cli("run", "configs/smoke.yaml", *_sets(OPENED), *wd)
    assert h.registered(said, base) == "2"
    assert "registered smoke-assistant version 2 as challenger (version 2 was demoted by rollback" in said
    assert "; champion: version 1" in said
    aliases = h.check("re-run B", said)
    assert aliases["champion"] == "1" and aliases["challenger"] == "2"

    # 5. promote 2 by hand: champion, its rolled_back tag cleared
    said = _cli("promote", NAME, "2", *wd)
    h.by_hand.add("2")
    assert h.check("promote 2", said)["champion"] == "2"
    assert "alignflow.rolled_back" not in c.get_model_version(NAME, "2").tags

    # 6. delete the registered model; re-run A: a new version 1, champion (no champion left to compare with)
    c.delete_registered_model(NAME)
    h.lineage.clear()
    h.pairs.clear()
    h.by_hand.clear()
    assert h.check("delete the registered model", None) == {}
    said = _cli("run", "configs/smoke.yaml", *wd)
    assert h.registered(said, base) == "1"
    assert "registered smoke-assistant version 1 as champion" in said
    assert h.check("re-run A", said)["champion"] == "1"

    # 7. kill -9 during B's register (its process group: the command and its temporary Prefect server)
    known = {r.info.run_id for e in c.search_experiments() for r in c.search_runs([e.experiment_id])}
    proc = subprocess.Popen(_argv("run", "configs/smoke.yaml", *_sets(OPENED), *wd), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_register(c, known, proc, timeout_s=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # (the killed run's MLflow runs are left RUNNING here; the next run reaps them, so nothing is checked now)

    # 8. re-run B: the killed run reaped (KILLED), one version for B's weights, tagged
    said = _cli("run", "configs/smoke.yaml", *_sets(OPENED), *wd)
    b = h.registered(said, base)
    assert b == "2", said[-1500:]  # a version the killed register created is adopted, not registered again
    h.check("kill -9 during register, re-run B", said)
    assert len(c.search_model_versions(f"name='{NAME}'")) == 2

    # 9. new data lands; retrain on it (gate opened): a new version that continued the champion
    champion = str(c.get_registered_model(NAME).aliases["champion"])  # (an int in MLflow 3.17)
    new.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                    {"role": "assistant", "content": a}]}) + "\n"
                           for p, a in NEW_1))
    said = _cli("retrain", "configs/smoke.yaml", *_sets(grown), *wd)
    first = h.registered(said, h.lineage[champion] | {p for p, _ in NEW_1} | _synthesized_prompts(c, _parent_run(said)),
                         continued=champion)
    assert h.check("retrain on 6 new records", said)["champion"] == first
    assert c.get_run(_parent_run(said)).data.tags["alignflow.retrain.sft.new"] == "6"

    # 10. six more land; a second retrain trains on those six only
    new.write_text(new.read_text() + "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                                      {"role": "assistant", "content": a}]}) + "\n"
                                             for p, a in NEW_2))
    said = _cli("retrain", "configs/smoke.yaml", *_sets(grown), *wd)
    second = h.registered(said, h.lineage[first] | {p for p, _ in NEW_2} | _synthesized_prompts(c, _parent_run(said)),
                          continued=first)
    assert second != first
    assert h.check("second retrain on 6 more", said)["champion"] == second
    parent = c.get_run(_parent_run(said))
    assert parent.data.tags["alignflow.retrain.sft.new"] == "6"
    assert parent.data.tags["alignflow.retrain_of"] == first
    stages = _stages(c, parent.info.run_id)
    judge = set(read_manifest(stages["reward"])["trained_pair_hashes"])
    policy = set(read_manifest(stages["dpo"])["trained_pair_hashes"])
    assert judge and policy and not judge & policy  # the judge never learned the policy's pairs
    # nor any pair the policies of the weights it continued (first's and its ancestors') learned, nor its policy
    # one their judges learned: evaluate compares with the lineage's sides
    evaluation = read_manifest(stages["evaluate"])
    assert evaluation["judge_independent"] is True, evaluation["judge_dependence"]

    # 11. two runs at once on the work dir (A and B): both finish, and the invariants hold
    procs = [subprocess.Popen(_argv("run", "configs/smoke.yaml", *extra, *wd), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra in ([], _sets(OPENED))]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (out[-3000:], err[-3000:])
    said_a, said_b = (" ".join(out.split()) for out, _ in outs)
    assert h.registered(said_a, base) == "1" and h.registered(said_b, base) == "2"
    # the printed champion is the registry's after the later of the two; each line is checked against the
    # registry as the checker reads it now, which both must agree with unless the other run moved it after
    aliases = h.check("two runs at once", None)
    assert aliases["champion"] in {_printed_champion(said_a), _printed_champion(said_b)}, (aliases, said_a, said_b)
    assert len(h.steps) >= 10
