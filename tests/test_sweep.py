"""`alignflow sweep`: Optuna trials as pipeline runs under one MLflow sweep run, sharing stages through the cache;
Ctrl-C in the second trial, then the same command, resumes the study; the best trial is registered."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from alignflow.flows.sweep import grid_size, parse_param
from alignflow.tasks.lib.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_params_parse_as_lists_or_ranges() -> None:
    beta = parse_param("dpo.beta=0.05,0.2")
    assert beta.key == "dpo.beta" and beta.choices == [0.05, 0.2]
    lr = parse_param("sft.lr=1e-5:1e-3:log")
    assert (lr.low, lr.high, lr.log, lr.integer, lr.choices) == (1e-5, 1e-3, True, False, None)
    assert parse_param("sft.lora.r=4:32").integer
    assert parse_param("dpo.loss=sigmoid,ipo").choices == ["sigmoid", "ipo"]
    assert grid_size([beta, parse_param("dpo.loss=sigmoid,ipo,hinge")]) == 6
    assert grid_size([beta, lr]) is None
    for bad in ("dpo.beta", "sft.lr=1e-3:1e-5", "sft.lr=0:1:log", "dpo.beta=0.1,"):
        with pytest.raises(ValueError):
            parse_param(bad)


def test_suggested_values_stay_in_range_and_make_valid_recipes() -> None:
    import optuna

    from alignflow.flows.sweep import _suggest, with_overrides
    from alignflow.recipe import load_recipe
    from alignflow.tasks.lib.errors import StageError

    specs = [parse_param("sft.lora.r=4:32"), parse_param("sft.lr=1e-5:1e-3:log"), parse_param("dpo.loss=sigmoid,ipo")]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    smoke = load_recipe(ROOT / "configs" / "smoke.yaml")
    for _ in range(5):
        trial = study.ask()
        values = {p.key: _suggest(trial, p) for p in specs}
        assert isinstance(values["sft.lora.r"], int) and 4 <= values["sft.lora.r"] <= 32
        assert 1e-5 <= values["sft.lr"] <= 1e-3 and values["dpo.loss"] in ("sigmoid", "ipo")
        recipe = with_overrides(smoke, values)
        assert (recipe.sft.lora.r, recipe.sft.lr, recipe.dpo.loss) == tuple(values.values())
        study.tell(trial, 0.0)
    with pytest.raises(StageError, match=r"sft\.lora\.r"):
        with_overrides(smoke, {"sft.lora.r": -1})
    with pytest.raises(StageError, match="not a recipe section"):
        with_overrides(smoke, {"name.x": 1})


def _sweep(work: Path, env: dict[str, str]) -> subprocess.Popen:
    # dpo trains 30 steps (smoke: 4), so that the Ctrl-C sent once the second trial has its first checkpoint (step
    # 2) lands while it trains, not in the second after it (where the trial may have finished and been told)
    return subprocess.Popen([sys.executable, "-m", "alignflow.cli", "sweep", "configs/smoke.yaml", "--param",
                             "dpo.beta=0.05,0.2", "--set", "dpo.max_steps=30", "--work-dir", str(work)], cwd=ROOT,
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sweep_shares_stages_resumes_after_ctrl_c_and_registers_the_best(prefect_server: None, tmp_path: Path) -> None:
    import optuna
    from prefect.settings import PREFECT_API_URL

    work = tmp_path / "w"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())  # the session's server: no temporary one per command
    proc = _sweep(work, env)
    # Ctrl-C while the second trial trains: its dpo folder (another beta: another key) has a checkpoint, the first
    # trial's dpo folder is finished
    deadline = time.time() + 600
    dpo = work / "stages" / "dpo"
    while time.time() < deadline and proc.poll() is None:
        finished = [p for p in dpo.glob("*") if p.is_dir() and not p.name.endswith(".partial")] if dpo.exists() else []
        if finished and any(dpo.glob("*.partial/checkpoints/checkpoint-*")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    storage = f"sqlite:///{work / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    interrupted = optuna.load_study(study_name=name, storage=storage)
    assert [t.state.name for t in interrupted.trials] == ["COMPLETE", "RUNNING"]

    proc = _sweep(work, env)  # the same command: the study continues
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["dpo.beta"] for t in complete) == [0.05, 0.2]
    assert study.trials[-1].user_attrs["retry_of"] == 1 and study.trials[-1].params == study.trials[1].params

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`alignflow.sweep_role` = 'parent'")
    sweep = parent.data.tags["alignflow.sweep"]
    assert name == f"alignflow-sweep-{sweep}" and parent.info.status == "FINISHED"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and "alignflow.sweep_trial" in r.data.tags]
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(finished) == 2 and {r.data.params["dpo.beta"] for r in finished} == {"0.05", "0.2"}
    # trial runs are named by trial, not by timestamp
    assert all(r.info.run_name == f"trial-{r.data.tags['alignflow.sweep_trial']}" for r in trials)
    # sft trained once across both trials, the interrupted attempt and the best trial's registering run
    sft = [r for r in runs if r.data.tags.get("alignflow.stage") == "sft"]
    assert len(sft) >= 4 and sum(r.data.tags["alignflow.cached"] == "false" for r in sft) == 1
    assert parent.data.metrics["cache_saved_stage_runs"] >= 6  # trial 2: curate ... reward came from the cache
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.json",
                                                                           "parallel_coordinates.png"}
    # the best trial went through register and the gate
    best = study.best_trial
    (registering,) = [r for r in runs if r.data.tags.get("alignflow.sweep_best") == str(best.number)]
    assert registering.info.run_name == f"best-trial-{best.number}"
    version = client.get_model_version_by_alias("smoke-assistant", "champion")
    assert version.tags["alignflow.parent_run_id"] == registering.info.run_id
    # picked among 2 trials on the gate's own prompts: its intervals at the familywise level, said with k
    (register,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == registering.info.run_id
                   and r.data.tags.get("alignflow.stage") == "register"]
    assert "k=2" in register.data.tags["alignflow.gate_selection"] and "1 - 0.05/2" in \
        register.data.tags["alignflow.gate_bounds"]
    assert version.tags["alignflow.gate_selection"] == register.data.tags["alignflow.gate_selection"]
    assert f"best: trial {best.number}" in out


def test_a_ctrl_c_that_prefect_drops_as_a_trial_ends_still_stops_the_sweep(
        prefect_server: None, in_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect 3.8 drops a KeyboardInterrupt raised after a subflow's function has returned (in real use while it
    joins its heartbeat thread, up to a second; here from the subflow's completion hook, which runs in that same
    stretch, so the test hits it every time). The sweep stops there all the same: the trial that finished is told
    COMPLETE (no work thrown away), the sweep's MLflow run is KILLED, and no further trial or best-trial run starts.
    Trials are stand-ins (a real Prefect subflow, a real MLflow run, an evaluate manifest) so that this takes
    seconds. A broken sweep goes on to the best-trial run, which fails the test."""
    import optuna
    from prefect import flow

    from alignflow.flows import sweep as sweep_module
    from alignflow.flows.tracking import tracking_uri
    from alignflow.recipe import load_recipe
    from alignflow.tasks.lib.manifest import write_manifest

    def ctrl_c(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    @flow(name="trial-stand-in")
    def quiet() -> None:
        return None

    interrupted = quiet.with_options(on_completion=[ctrl_c])

    @flow(name="parent-stand-in")
    def parent() -> str:
        interrupted()
        return "went on"

    def trial(recipe: object, work_dir: str, tags: dict[str, str]) -> dict[str, object]:
        number = int(tags["alignflow.sweep_trial"])
        (quiet if number == 0 else interrupted)()
        client = MlflowClient(tracking_uri(Path(work_dir)))
        run = client.create_run(client.get_experiment_by_name("smoke").experiment_id)
        evaluate = Path(work_dir) / f"evaluate-{number}"
        evaluate.mkdir()
        write_manifest(evaluate, {"metrics": {"rougeL": 0.5}})
        return {"parent_run_id": run.info.run_id,
                "stages": {"evaluate": {"folder": str(evaluate), "cached": False, "seconds": 1.0}}}

    class BestTrialRun:  # where the sweep goes once every trial is done: it must not get there
        def with_options(self, **_: object) -> None:
            raise AssertionError("the sweep went on to its best-trial run after Ctrl-C")

    monkeypatch.setattr(sweep_module, "_trial", trial)
    monkeypatch.setattr(sweep_module, "pipeline_internal", BestTrialRun())
    work = tmp_path / "w"
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if pytest was not
    try:
        try:  # Prefect still drops it (if not, Prefect has changed and flows/interrupts.py can go)
            assert parent() == "went on"
        except KeyboardInterrupt:
            pytest.fail("Prefect no longer drops a Ctrl-C at a subflow's end: flows/interrupts.py is not needed")
        with pytest.raises(KeyboardInterrupt):
            sweep_module.sweep(recipe=load_recipe(in_root / "configs" / "smoke.yaml"),
                               params=[parse_param("dpo.beta=0.05,0.2,0.4")], trials=3, work_dir=str(work))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the sweep put it back
    finally:
        signal.signal(signal.SIGINT, before)
    storage = f"sqlite:///{work / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    # trial 1 finished before the Ctrl-C was seen: kept; trial 2 (queued by the grid) never started
    assert [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials] == \
        ["COMPLETE", "COMPLETE", "WAITING"]
    client = MlflowClient(tracking_uri(work))
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                "tags.`alignflow.sweep_role` = 'parent'")
    assert run.info.status == "KILLED"


def test_cache_savings_count_stages_made_before_the_sweep(tmp_path: Path) -> None:
    """A sweep in a work dir warmed by an earlier run: the stages the cache served were made by that run, whose
    MLflow child run logged how long they took; those seconds count as saved (they used to count 0)."""
    from types import SimpleNamespace

    from mlflow.entities import Metric

    from alignflow.flows.sweep import _cache_savings
    from alignflow.tasks.lib.manifest import write_manifest

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x")
    earlier = client.create_run(experiment).info.run_id  # the plain run before the sweep made sft
    client.log_batch(earlier, metrics=[Metric("stage_seconds", 95.0, 0, 0)])
    sft, gone, dpo = tmp_path / "sft", tmp_path / "gone", tmp_path / "dpo"
    for folder, run_id in ((sft, earlier), (gone, "0" * 32)):  # `gone`: its producer run was deleted
        folder.mkdir()
        write_manifest(folder, {"produced_by": {"flow_run_id": "f", "mlflow_run_id": run_id}})
    trials = [SimpleNamespace(user_attrs={"stages": {"sft": [str(sft), True, 0.1], "reward": [str(gone), True, 0.1],
                                                     "dpo": [str(dpo), False, 40.0]}}),
              SimpleNamespace(user_attrs={"stages": {"sft": [str(sft), True, 0.1], "reward": [str(gone), True, 0.1],
                                                     "dpo": [str(dpo), True, 0.1]}})]
    saved = _cache_savings(trials, client)
    # sft twice from before the sweep (2 x 95 s), dpo once from trial 0 (40 s), `gone` counted but 0 s
    assert saved == {"stage_runs": 6, "cache_saved_stage_runs": 5, "cache_saved_seconds": 230.0}
    # --parallel: trial 1 waited 30 s for trial 0's dpo, which it then found made: it saved 10 s of it, not 40
    trials[1].user_attrs["waited"] = {"sft": 0.0, "reward": 0.0, "dpo": 30.0}
    assert _cache_savings(trials, client)["cache_saved_seconds"] == 200.0


def test_the_parallel_coordinates_plot_draws_every_trial_visibly(tmp_path: Path) -> None:
    # Optuna's "Blues" scale put the lowest of two trials in near-white on a white background (issue 28, item 16)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.collections import LineCollection

    from alignflow.flows import sweep as sweep_flow

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for beta, value in ((0.05, 0.41), (0.2, 0.58)):
        study.enqueue_trial({"dpo.beta": beta})
        trial = study.ask()
        trial.suggest_float("dpo.beta", 0.01, 0.5, log=True)
        study.tell(trial, value)
    shown: list[tuple[float, ...]] = []
    real_savefig = matplotlib.figure.Figure.savefig

    def keep_colours(fig: matplotlib.figure.Figure, *args: object, **kwargs: object) -> None:
        for ax in fig.axes:
            for c in ax.collections:
                if isinstance(c, LineCollection) and c.get_array() is not None:  # the trials' lines
                    c.update_scalarmappable()  # the colours each line is drawn in, from its value and the scale
                    shown.extend(tuple(rgba) for rgba in c.get_edgecolor())
        real_savefig(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep_colours  # type: ignore[method-assign]
    try:
        sweep_flow._parallel_coordinates(study, tmp_path / "pc.png")
    finally:
        matplotlib.figure.Figure.savefig = real_savefig  # type: ignore[method-assign]
        plt.close("all")
    assert (tmp_path / "pc.png").stat().st_size > 0 and len(shown) == 2
    for r, g, b, _a in shown:  # relative luminance: white is 1.0, Blues' low end ~0.97; light blue ~0.78
        assert 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.85, (r, g, b)


def test_parallel_trials_run_in_processes_of_their_own_and_make_what_a_run_alone_makes(
        smoke_seed: dict[str, Any], in_root: Path, tmp_path: Path) -> None:
    """`--parallel 2`: each trial runs in its own process (threads shared torch's random generator, and two trials
    loading weights at once failed), so what it puts into the shared cache is what the same recipe makes alone: a
    run of trial 0's recipe in another work dir trains the same weights, bit for bit. Its sft and reward are the
    session's smoke seed's (tests/conftest.py: a cold run of the same stages in this pytest process, alone);
    its dpo (trial 0's beta) it trains itself."""
    import optuna
    from conftest import warm_copy  # tests/ is on sys.path under pytest

    from alignflow.flows.keys import upstream_value
    from alignflow.flows.pipeline import pipeline
    from alignflow.flows.sweep import sweep
    from alignflow.recipe import load_recipe

    work = tmp_path / "w"
    smoke = ROOT / "configs" / "smoke.yaml"
    result = sweep(recipe=load_recipe(smoke), params=[parse_param("dpo.beta=0.05,0.2")], trials=2, parallel=2,
                   work_dir=str(work))
    assert result["registered"]["alias"] == "champion" and len(result["trials"]) == 2
    client = MlflowClient(result["tracking_uri"])
    pids = {client.get_run(row["run_id"]).data.tags["alignflow.pid"] for row in result["trials"]}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two trial processes, neither this one

    study = optuna.load_study(study_name=f"alignflow-sweep-{result['sweep_id']}", storage=result["storage"])
    first = next(t for t in study.trials if t.number == 0)
    folders = {stage: Path(folder) for stage, (folder, _, _) in first.user_attrs["stages"].items()}
    assert first.params["dpo.beta"] != load_recipe(smoke).dpo.beta  # the seed's dpo is not trial 0's
    assert not any(info["cached"] for info in smoke_seed["result"]["stages"].values())  # the seed ran cold
    alone = pipeline(recipe=load_recipe(smoke, [f"dpo.beta={first.params['dpo.beta']}"]),
                     work_dir=str(warm_copy(smoke_seed, tmp_path / "alone")), until="dpo")
    assert _rerun_stages(alone) == {"dpo"}
    for stage in ("sft", "reward", "dpo"):
        assert upstream_value(read_manifest(folders[stage]), "weights") == \
            upstream_value(read_manifest(Path(alone["stages"][stage]["folder"])), "weights"), stage


def _rerun_stages(result: dict) -> set[str]:
    return {s for s, info in result["stages"].items() if not info["cached"]}


def test_the_winner_of_k_trials_is_gated_at_the_familywise_level() -> None:
    """Eight trials that are all no better than the base (per-prompt gains are pure noise): picking the best by its
    mean and gating it at 95 % promotes it far more often than 5 % (the issue measured 0.153); at the familywise
    level 1 - 0.05/8 the false promotions fall to the nominal rate. Then the gate says which correction and k."""
    import random

    from alignflow.tasks.lib.stats import LEVEL, delta_ci, familywise_level
    from alignflow.tasks.register import GateConfig, gate

    k, prompts, runs = 8, 48, 200
    rng = random.Random(7)
    promoted = {LEVEL: 0, familywise_level(k): 0}
    for sim in range(runs):
        trials = [[rng.gauss(0.0, 0.3) for _ in range(prompts)] for _ in range(k)]  # candidate - base, mean 0
        best = max(trials, key=sum)
        for level in promoted:
            low, _ = delta_ci(best, [0.0] * prompts, seed=sim, level=level)
            promoted[level] += low > 0.0
    print(f"false promotions of the best of {k}: {promoted[LEVEL] / runs:.3f} at 95 %, "  # the README's figures
          f"{promoted[familywise_level(k)] / runs:.3f} at 1 - 0.05/{k}")
    assert familywise_level(k) == 1 - 0.05 / 8
    assert promoted[LEVEL] / runs > 0.08  # the selection inflates a 95 % gate
    assert promoted[familywise_level(k)] / runs <= 0.05 < promoted[LEVEL] / runs

    metrics = {"win_rate_vs_base": 0.7, "win_rate_vs_base_ci_low": 0.45, "rougeL_gain_ci_low": 0.1,
               "judge_heldout_accuracy_ci_low": 0.9, "selection_trials": 8, "interval_level": familywise_level(k)}
    reasons, decided = gate(GateConfig(), metrics, True)
    assert decided[0].startswith("selection: the best of k=8 sweep trials") and "1 - 0.05/8 = 0.99375" in decided[0]
    assert reasons[-1] == decided[0]  # a failed gate says how its bounds were taken
    assert not any(d.startswith("selection") for d in gate(GateConfig(), {**metrics, "selection_trials": 1},
                                                              True)[1])


def test_a_sweep_winner_is_never_re_gated_at_a_lower_level() -> None:
    """Re-running the winning recipe alone gets every stage cached and intervals at 95 %: register used to re-gate
    the version the sweep selected among k=8 at 95 % and rewrite its gate tags. It now takes k from the version
    (`alignflow.gate_selection_k`, or the k in `alignflow.gate_selection` on versions tagged before) and refuses a
    lower level; the same or a larger k gates as before."""
    from alignflow.tasks.lib.stats import familywise_level
    from alignflow.tasks.register import SELECTION_K_TAG, lower_level, selected_among, selection

    eight = {"selection_trials": 8, "interval_level": familywise_level(8)}
    old_style = {"alignflow.gate_selection": selection(eight)}  # the text the sweep's register wrote
    assert selected_among(old_style) == 8 and selected_among({SELECTION_K_TAG: "8", **old_style}) == 8
    assert selected_among({}) == 1 and selected_among({"alignflow.gate_selection": ""}) == 1
    assert selected_among({"alignflow.gate_selection": selection({"selection_trials": 12})}) == 12  # two digits
    alone = {"interval_level": 0.95}  # `alignflow run` with the winner's params: no selection_trials
    for tags in (old_style, {SELECTION_K_TAG: "8"}):
        why = lower_level(alone, tags, "3")
        assert why.startswith("version 3 was selected as the best of k=8 sweep trials") and "0.95 (k=1)" in why
        assert "k=4" in lower_level({"selection_trials": 4, "interval_level": familywise_level(4)}, tags, "3")
        assert lower_level(eight, tags, "3") == ""  # the sweep itself, resumed or re-run
        assert lower_level({"selection_trials": 16}, tags, "3") == ""  # a larger sweep: a stricter level
    assert lower_level(alone, {}, "3") == ""  # a version no sweep selected: gated as always
