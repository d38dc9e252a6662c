"""What a shared team service must refuse: recipes naming the worker's secrets, paths outside the allowed folders
when a recipe comes through a deployment, `server down` signalling a process it did not start; and the pickle
check the smoke-run tests use (`pickles_under`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from alignflow.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alignflow.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "250", **(env or {})}, timeout=120)


def _teacher(var: str) -> str:
    return f"synthesize.teacher={{url: 'http://127.0.0.1:9/v1', model: m, api_key_env: {var}}}"


def test_a_recipe_cannot_name_the_workers_credentials() -> None:
    bad = _cli("validate", "configs/smoke.yaml", "--set", _teacher("MLFLOW_TRACKING_PASSWORD"))
    said = " ".join((bad.stdout + bad.stderr).split())
    assert bad.returncode == 2, said
    assert "synthesize.teacher" in said and "api_key_env" in said and "'MLFLOW_TRACKING_PASSWORD'" in said
    assert "never handed to a recipe" in said
    # allowed by default: OPENAI_API_KEY and names ending in _API_KEY; anything else is not
    assert _cli("validate", "configs/smoke.yaml", "--set", _teacher("VLLM_API_KEY")).returncode == 0
    home = _cli("validate", "configs/smoke.yaml", "--set", _teacher("HOME"))
    assert home.returncode == 2 and "not an allowed secret variable" in " ".join(home.stderr.split())
    # the operator can widen the list, never to MLflow, Prefect, database or AWS credentials
    wide = {"ALIGNFLOW_SECRET_ENV_ALLOW": "*"}
    assert _cli("validate", "configs/smoke.yaml", "--set", _teacher("HOME"), env=wide).returncode == 0
    os.environ["ALIGNFLOW_SECRET_ENV_ALLOW"] = "*"
    try:
        for var in ("AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING", "PGPASSWORD", "DATABASE_URL", "MLFLOW_X"):
            with pytest.raises(RecipeError, match=f"'{var}' may not be used as a secret"):
                load_recipe(ROOT / "configs" / "smoke.yaml", [_teacher(var)])
    finally:
        os.environ.pop("ALIGNFLOW_SECRET_ENV_ALLOW")


def test_a_teacher_built_without_validation_still_refuses(tmp_path: Path) -> None:
    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.teacher import Teacher, TeacherEndpoint

    endpoint = TeacherEndpoint.model_construct(url="http://127.0.0.1:9/v1", model="m", api_key_env="AWS_SECRET_KEY",
                                               concurrency=1, timeout_s=1.0, max_retries=0)
    teacher = Teacher(endpoint, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=1, base=tmp_path,
                      dtype="float32", journal=tmp_path / "j.jsonl")
    with pytest.raises(StageError, match="AWS_SECRET_KEY"):
        teacher.complete([[{"role": "user", "content": "hi"}]], n=1, sample=False, desc="test")


def test_deployment_paths_are_confined(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "link.jsonl").symlink_to(outside)
    recipe = ROOT / "configs" / "smoke.yaml"
    # a person at a shell reads what they may read: not confined
    assert _cli("validate", str(recipe), "--set", f"data.sft={outside}").returncode == 0
    # the same recipe as a deployment would get it: refused, naming the key
    bad = _cli("validate", str(recipe), "--deployment", "--set", f"data.sft={outside}",
               "--set", f"model.base={tmp_path}")
    said = " ".join(bad.stderr.split())
    assert bad.returncode == 2, said
    assert f"data.sft[0]: '{outside}' is outside the allowed folders ({ROOT}" in said
    assert "model.base:" in said and "2 problem(s)" in said
    # `..` is resolved before the check
    sneaky = _cli("validate", str(recipe), "--deployment", "--set", f"data.eval=data/../../{outside.name}")
    assert sneaky.returncode == 2 and "data.eval[0]" in sneaky.stderr
    # the operator's ALIGNFLOW_DATA_ROOTS admits a folder
    roots = {"ALIGNFLOW_DATA_ROOTS": str(tmp_path)}
    assert _cli("validate", str(recipe), "--deployment", "--set", f"data.sft={outside}", env=roots).returncode == 0
    # the flow's check: a symlink inside an allowed folder that leads outside is refused too
    from alignflow.recipe import resolve_recipe

    inside = ROOT / "data" / ".test-link-outside.jsonl"
    inside.symlink_to(outside)
    try:
        smoke = load_recipe(recipe)
        linked = smoke.model_copy(update={"data": smoke.data.model_copy(update={"sft": [str(inside)]})})
        with pytest.raises(RecipeError, match=r"data\.sft\[0\]: .*test-link-outside\.jsonl. is outside the allowed"):
            resolve_recipe(linked, confine=[ROOT], work_dir=str(ROOT / "runs"))
        with pytest.raises(RecipeError, match=r"work_dir: '/tmp/elsewhere' is outside"):
            resolve_recipe(smoke, confine=[ROOT], work_dir="/tmp/elsewhere")
        assert resolve_recipe(smoke, confine=[ROOT], work_dir=str(ROOT / "runs")).data.sft == smoke.data.sft
    finally:
        inside.unlink()


def test_server_down_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    from alignflow.server import State, _save_state, _spawn, down
    from alignflow.tasks.lib.processes import pid_alive

    state = State(home=str(tmp_path), project_dir=str(ROOT))
    ours = _spawn("prefect-worker", ["sleep", "60"], dict(os.environ), state, tmp_path)
    # a stranger: alive under a pid the state file claims (as after a reboot / pid reuse), another command line
    stranger = subprocess.Popen(["sleep", "61"], start_new_session=True)
    try:
        state.pids["prefect-server"] = stranger.pid
        state.procs["prefect-server"] = {"pid": stranger.pid, "started": state.procs["prefect-worker"]["started"],
                                         "cmdline": ["sleep", "60"]}
        _save_state(state)
        said: list[str] = []
        assert down(tmp_path, say=said.append)
        time.sleep(0.2)
        assert stranger.poll() is None, said  # left alone
        assert any(f"pid {stranger.pid} is now another process" in line for line in said), said
        assert any(f"prefect-worker  stopped (pid {ours})" in line for line in said), said
        assert not pid_alive(ours)  # our child: a zombie until reaped, which pid_alive counts as gone
        saved = json.loads((tmp_path / "state.json").read_text())
        assert saved["pids"] == {} and saved["procs"] == {}
    finally:
        stranger.kill()
        stranger.wait()


def pickles_under(root: Path) -> list[str]:
    """Files that are pickles: named *.pkl / *.pickle, starting with the pickle protocol opcode (0x80 and a
    protocol number 2-5), or zip archives holding a pickle (torch.save's format: <name>/data.pkl)."""
    found = []
    for f in root.rglob("*"):
        if not f.is_file() or f.is_symlink():
            continue
        if f.suffix in (".pkl", ".pickle"):
            found.append(str(f))
            continue
        with open(f, "rb") as handle:
            head = handle.read(2)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            found.append(str(f))
        elif head == b"PK" and zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                if any(n.endswith((".pkl", ".pickle")) for n in z.namelist()):
                    found.append(str(f))
    return found


def test_the_pickle_check_finds_pickles(tmp_path: Path) -> None:
    import pickle

    import torch

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(pickle.dumps({"k": 1}, protocol=4))
    torch.save({"w": torch.zeros(2)}, tmp_path / "t.pt")
    (tmp_path / "named.pkl").write_text("not even a pickle")
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump({"a": 1}))
    assert sorted(Path(p).name for p in pickles_under(tmp_path)) == ["named.pkl", "t.pt", "x.bin"]


def test_deployment_reward_code_and_schemas_outside_the_roots_are_never_run_or_read(tmp_path: Path) -> None:
    """dpo.rewards names Python the worker would import and JSON it would read: through a deployment, only files
    inside the allowed folders, checked before anything is imported or read."""
    from alignflow.recipe import resolve_recipe

    planted = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(f"open({str(planted)!r}, 'w').write('ran')\n"
                                      "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "cred.json").write_text('{"type": "secret-value-here"}')
    smoke = load_recipe(ROOT / "configs" / "smoke.yaml")
    rewards = [{"python": f"{tmp_path / 'evil.py'}:f"}, {"json_schema": str(tmp_path / "cred.json")},
               {"python": "json:dumps"}]  # an installed module: importing it is running code too
    raw = smoke.model_dump(mode="json")
    raw["dpo"].update(loss="grpo", rewards=rewards)
    from alignflow.recipe import Recipe

    recipe = Recipe.model_validate(raw)
    with pytest.raises(RecipeError) as err:
        resolve_recipe(recipe, confine=[ROOT], work_dir=str(ROOT / "runs"))
    said = str(err.value)
    assert not planted.exists()  # the module was never imported
    assert "secret-value-here" not in said
    for i in range(3):
        assert f"dpo.rewards[{i}]" in said and "allowed folders" in said.split(f"dpo.rewards[{i}]")[1].split("\n")[0]
