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


def _url(url: str) -> str:
    return f"synthesize.teacher={{url: '{url}', model: m, api_key_env: VLLM_API_KEY}}"


def test_a_deployment_teacher_url_must_be_allowed_by_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27 item 5: a recipe's teacher.url receives the operator's API key as a Bearer token."""
    recipe = ROOT / "configs" / "smoke.yaml"
    metadata = _cli("validate", str(recipe), "--deployment", "--set", _url("http://169.254.169.254/latest/v1"),
                    env={"ALIGNFLOW_TEACHER_URL_ALLOW": "*"})
    said = " ".join(metadata.stderr.split())
    assert metadata.returncode == 2, said
    assert "synthesize.teacher.url:" in said and "169.254.169.254" in said and "link-local" in said
    # the same recipe at a shell is not confined (the person's own key, the person's own network)
    assert _cli("validate", str(recipe), "--set", _url("http://169.254.169.254/latest/v1")).returncode == 0

    def problems(url: str, allow: str | None) -> str:
        if allow is None:
            monkeypatch.delenv("ALIGNFLOW_TEACHER_URL_ALLOW", raising=False)
        else:
            monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", allow)
        try:
            load_recipe(recipe, [_url(url)], confine=[ROOT])
        except RecipeError as e:
            return "\n".join(e.problems)
        return ""

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5111")
    # nothing listed: no remote teacher at all
    assert "is not allowed for a deployment run (allowed: none" in problems("http://10.1.2.3:8000/v1", None)
    # a wildcard admits ordinary hosts, never loopback, link-local, unspecified or the team's own service ports
    assert problems("http://10.1.2.3:8000/v1", "*") == ""
    assert "loopback" in problems("http://127.0.0.1:8000/v1", "*")
    assert "loopback" in problems("http://localhost:8000/v1", "*")  # a name resolving to loopback
    assert "loopback" in problems("http://2130706433:8000/v1", "*")  # 127.0.0.1 written as one number
    assert "loopback" in problems("http://[::ffff:127.0.0.1]:8000/v1", "*")
    assert "link-local" in problems("http://[fe80::1]:8000/v1", "*")
    assert "unspecified" in problems("http://0.0.0.0:8000/v1", "*")
    assert "port 5000 of the team's own services" in problems("http://10.1.2.3:5000/v1", "*")
    assert "port 5111 of the team's" in problems("http://10.1.2.3:5111/v1", "*")  # MLFLOW_TRACKING_URI's port
    # host or host:port patterns; a literal listing admits even loopback
    assert problems("http://teacher.lan:8000/v1", "*.lan:8000") == ""
    assert "not allowed" in problems("http://teacher.lan:8001/v1", "*.lan:8000")
    assert problems("http://127.0.0.1:8000/v1", "127.0.0.1:8000") == ""
    assert "not allowed" in problems("http://127.0.0.1:8001/v1", "127.0.0.1:8000")
    # a query or fragment would swallow the `/chat/completions` suffix: refused everywhere, even at a shell
    for url in ("http://10.1.2.3:8000/admin?x=", "http://10.1.2.3:8000/admin#", "http://u:p@10.1.2.3:8000/v1"):
        with pytest.raises(RecipeError, match=r"synthesize\.teacher\.TeacherEndpoint\.url: .*(query|credentials)"):
            load_recipe(recipe, [_url(url)])


def test_a_bare_loopback_host_in_the_allow_list_opens_no_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review finding 5: `127.0.0.1,localhost` listed without ports must not open this machine's services (the
    team's Prefect, MLflow, PostgreSQL on any port, a worker's local listeners): loopback, link-local and
    unspecified addresses, and the team's service ports, pass only as a literal host:port."""
    from alignflow.tasks.lib.teacher import teacher_url_problem

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", "127.0.0.1,localhost,::1,0.0.0.0,169.254.169.254,teacher.lan")
    for url in ("http://127.0.0.1:9999/v1", "http://127.0.0.1:5000/v1", "http://localhost:4200/v1",
                "http://LOCALHOST:5433/v1", "http://localhost:6543/v1",  # a PostgreSQL moved by --pg-port
                "http://[::1]:8000/v1", "http://0.0.0.0:8000/v1", "http://169.254.169.254/latest/v1"):
        for resolve in (True, False):  # `localhost` is loopback without asking a resolver
            problem = teacher_url_problem(url, resolve=resolve) or ""
            assert "itself (host and port)" in problem or "team's own services" in problem, (url, resolve, problem)
    # a bare ordinary host still opens its ordinary ports, never the team's service ports
    assert teacher_url_problem("http://teacher.lan:8000/v1", resolve=False) is None
    assert "team's own services" in (teacher_url_problem("http://teacher.lan:5000/v1", resolve=False) or "")
    # named literally with the port, each one is the operator's choice
    monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", "127.0.0.1:9999,localhost:4200,[::1]:8000,teacher.lan:5000")
    for url in ("http://127.0.0.1:9999/v1", "http://LOCALHOST:4200/v1", "http://[::1]:8000/v1",
                "http://teacher.lan:5000/v1"):
        assert teacher_url_problem(url) is None, url
    assert "not allowed" in (teacher_url_problem("http://127.0.0.1:9998/v1") or "")
    # through the recipe, as a deployment run validates it
    problems = ""
    monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", "127.0.0.1,localhost")
    try:
        load_recipe(ROOT / "configs" / "smoke.yaml", [_url("http://localhost:9999/v1")], confine=[ROOT])
    except RecipeError as e:
        problems = "\n".join(e.problems)
    assert "synthesize.teacher.url:" in problems and "loopback" in problems and "'localhost:9999'" in problems


def test_the_teacher_checks_its_url_again_where_the_request_is_made(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Teacher built without validation (model_construct) sends nothing to a refused URL: no request reaches the
    listener, so no Authorization header leaves the worker."""
    import http.server
    import threading

    from alignflow.tasks.lib.errors import StageError
    from alignflow.tasks.lib.teacher import Teacher, TeacherEndpoint

    seen: list[str] = []

    class Listener(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(f"{self.path} {self.headers.get('Authorization')}")
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    monkeypatch.setenv("SOME_SERVICE_API_KEY", "canary-key")

    def ask(url: str) -> None:
        endpoint = TeacherEndpoint.model_construct(url=url, model="m", api_key_env="SOME_SERVICE_API_KEY",
                                                   concurrency=1, timeout_s=2.0, max_retries=0)
        teacher = Teacher(endpoint, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=1, base=tmp_path,
                          dtype="float32", journal=tmp_path / "j.jsonl")
        try:
            teacher.complete([[{"role": "user", "content": "hi"}]], n=1, sample=False, desc="test")
        finally:
            teacher.close()

    try:
        with pytest.raises(StageError, match="query or fragment"):
            ask(f"http://127.0.0.1:{port}/steal?")
        monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", "*")  # the operator's list is set on the worker
        with pytest.raises(StageError, match="loopback"):
            ask(f"http://localhost:{port}/v1")
        assert seen == []  # neither request left
        monkeypatch.setenv("ALIGNFLOW_TEACHER_URL_ALLOW", f"127.0.0.1:{port}")  # listed literally: it may
        with pytest.raises(StageError, match="failed after 1 attempts"):
            ask(f"http://127.0.0.1:{port}/v1")
        assert seen == ["/v1/chat/completions Bearer canary-key"]  # the control: the listener does record
    finally:
        server.shutdown()


def test_a_deployment_path_check_says_outside_before_it_looks(tmp_path: Path) -> None:
    """Issue 27 item 6: whether a file exists outside the allowed folders must not change the message."""
    recipe = ROOT / "configs" / "smoke.yaml"
    present = tmp_path / "present.json"
    present.write_text('{"type": "object"}')
    messages = []
    for target in (present, tmp_path / "absent.json"):
        rewards = f"dpo.rewards=[{{json_schema: '{target}'}}]"
        with pytest.raises(RecipeError) as e:
            load_recipe(recipe, ["dpo.loss=grpo", rewards], confine=[ROOT])
        messages.append("\n".join(e.value.problems).replace(target.name, "X"))
    assert messages[0] == messages[1] and "dpo.rewards[0].json_schema" in messages[0] and "outside" in messages[0]
    assert "no file" not in messages[1]
    # a relative path that climbs out: the same answer for a folder that exists and one that does not
    up = os.path.relpath(tmp_path, ROOT)
    (tmp_path / "model").mkdir()
    for base in (f"{up}/model", f"{up}/no-such-model"):
        with pytest.raises(RecipeError, match=r"model\.base: .* is outside the allowed folders"):
            load_recipe(recipe, [f"model.base={base}"], confine=[ROOT])


def test_a_deployment_reward_module_is_not_imported_before_the_recipe_is_decided(tmp_path: Path) -> None:
    """Issue 27 item 6: `validate --deployment` imported a `python:` reward (running its top-level code) even when
    the recipe was refused for another reason."""
    planted = tmp_path / "PWNED"
    (tmp_path / "inside.py").write_text(f"open({str(planted)!r}, 'w').write('ran')\n"
                                        "def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere.jsonl"
    elsewhere.write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "link.jsonl").symlink_to(elsewhere)  # inside an allowed folder, leading outside it
    recipe = ROOT / "configs" / "smoke.yaml"
    reward = f"dpo.rewards=[{{python: '{tmp_path / 'inside.py'}:f'}}]"
    roots = [ROOT, tmp_path]
    try:
        for other in (f"data.sft={tmp_path / 'link.jsonl'}", "sft.lora.r=-1", _url("http://169.254.169.254/v1")):
            with pytest.raises(RecipeError):
                load_recipe(recipe, ["dpo.loss=grpo", reward, other], confine=roots)
            assert not planted.exists(), other
        # the control: with nothing else wrong the module is checked, which imports it
        load_recipe(recipe, ["dpo.loss=grpo", reward], confine=roots)
        assert planted.exists()
    finally:
        elsewhere.unlink()


# Every parameter of the deployment-facing flows (alignflow/worker.py's ENTRYPOINTS), by how it is kept safe. A
# parameter that names a path, or changes what is read, is CONFINED (inside ALIGNFLOW_HOME / ALIGNFLOW_DATA_ROOTS
# for a deployment run) and has a test below; SAFE ones name no path. A new parameter fails the test until it is
# put in one of them (review finding 3: `base_corpus` was added to the pipeline's signature unchecked).
CONFINED = {"flows/pipeline.py:pipeline": {"recipe", "work_dir", "init_adapter"},
            "flows/retrain.py:retrain": {"recipe", "work_dir"}}
SAFE = {"flows/pipeline.py:pipeline": {"until",  # a Stage name (a Literal)
                                       "tags"},  # strings on the parent run; alignflow.* / mlflow.* refused
        "flows/retrain.py:retrain": set()}


def _deployment_flow(entrypoint: str) -> object:
    import importlib

    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module("alignflow." + path.removesuffix(".py").replace("/", ".")), name)


def test_every_parameter_of_a_deployment_facing_flow_is_confined_or_safe() -> None:
    import inspect

    from prefect.utilities.callables import parameter_schema

    from alignflow.worker import ENTRYPOINTS

    assert set(CONFINED) == set(ENTRYPOINTS) == set(SAFE)
    for entrypoint in ENTRYPOINTS:
        flow = _deployment_flow(entrypoint)
        names = set(inspect.signature(flow.fn).parameters)  # type: ignore[attr-defined]
        # what `prefect deploy` puts on the deployment's form (and the server validates runs against)
        assert set(parameter_schema(flow.fn).properties) == names, entrypoint  # type: ignore[attr-defined]
        assert names == CONFINED[entrypoint] | SAFE[entrypoint], (entrypoint, sorted(names))
        assert not CONFINED[entrypoint] & SAFE[entrypoint]
    # the internal parameters retrain and sweep set are not on the public flow: a submitter cannot pass them
    from alignflow.flows.pipeline import pipeline

    for internal in ("base_corpus", "ancestors", "sft_unchanged", "selection_trials"):
        with pytest.raises(Exception, match=internal):
            pipeline.validate_parameters({"recipe": load_recipe(ROOT / "configs" / "smoke.yaml").model_dump(),
                                          internal: ["/etc/passwd"] if internal == "base_corpus" else 1})


def _as_deployment_run(monkeypatch: pytest.MonkeyPatch) -> object:
    """The flows' view of a run started from a deployment, confined to ROOT; returns the context token."""
    import uuid

    from prefect.context import _deployment_id

    monkeypatch.setenv("ALIGNFLOW_HOME", str(ROOT))
    monkeypatch.delenv("ALIGNFLOW_DATA_ROOTS", raising=False)
    return _deployment_id.set(uuid.uuid4())  # as the flow engine sets it for a run started from a deployment


@pytest.mark.parametrize("entrypoint", ["flows/pipeline.py:pipeline", "flows/retrain.py:retrain"])
@pytest.mark.parametrize("parameter", ["recipe", "work_dir"])
def test_a_deployment_flows_path_parameters_are_confined(entrypoint: str, parameter: str, tmp_path: Path,
                                                         in_root: Path, prefect_server: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """CONFINED above, one by one (init_adapter: the test after this one): outside the allowed folders, refused
    before anything is read or written; the same call inside them is not refused for it."""
    from prefect.context import _deployment_id

    from alignflow.tasks.lib.errors import StageError

    outside = tmp_path / "elsewhere"
    recipe = load_recipe(ROOT / "configs" / "smoke.yaml")
    work_dir = str(outside / "runs") if parameter == "work_dir" else str(ROOT / "runs")
    if parameter == "recipe":  # a recipe's path: its data file (each recipe path has tests of its own above)
        outside.mkdir()
        (outside / "sft.jsonl").write_text((ROOT / "data" / "sft.jsonl").read_text())
        data = recipe.data.model_copy(update={"sft": [str(outside / "sft.jsonl")]})
        recipe = recipe.model_copy(update={"data": data})
    flow = _deployment_flow(entrypoint)
    token = _as_deployment_run(monkeypatch)
    try:
        with pytest.raises(StageError, match="is outside the allowed folders") as refused:
            flow(recipe=recipe, work_dir=work_dir)  # type: ignore[operator]
    finally:
        _deployment_id.reset(token)
    assert ("work_dir: " if parameter == "work_dir" else "data.sft") in str(refused.value)
    assert not (outside / "runs").exists()


def test_the_internal_flows_registry_paths_are_confined_in_a_deployment_run(tmp_path: Path, in_root: Path,
                                                                            prefect_server: None,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Retrain (a deployment) hands the internal pipeline `base_corpus` from a run tag and `ancestors` from the
    registry: a tiny base would train its tokenizer on any file named there, and register logs that base with
    the version (review finding 3). Outside the allowed folders, refused before a base is built."""
    from prefect.context import _deployment_id

    from alignflow.flows.pipeline import pipeline_internal
    from alignflow.tasks.lib.errors import StageError

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRETtokenXy " * 50)
    token = _as_deployment_run(monkeypatch)
    try:
        with pytest.raises(StageError, match=r"base_corpus\[0\]: '.*secret.txt' is outside the allowed folders"):
            pipeline_internal(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(ROOT / "runs"),
                              base_corpus=[str(secret)])
    finally:
        _deployment_id.reset(token)


def test_the_pipelines_tags_cannot_set_the_pipelines_own(tmp_path: Path, in_root: Path, prefect_server: None) -> None:
    """`tags` is safe only because alignflow.* (a retrain reads `alignflow.base_corpus` from the champion's run as
    files to read) and mlflow.* (`mlflow.user`, `mlflow.parentRunId`) are refused on the public flow."""
    from alignflow.flows.pipeline import pipeline
    from alignflow.tasks.lib.errors import StageError

    for tag in ("alignflow.base_corpus", "mlflow.user", "MLflow.parentRunId"):
        with pytest.raises(StageError, match="are the pipeline's own"):
            pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(tmp_path / "w"),
                     tags={tag: '["/etc/passwd"]'})
    assert not (tmp_path / "w").exists()


def test_the_flows_init_adapter_is_confined_for_a_deployment_run(tmp_path: Path, in_root: Path,
                                                                 prefect_server: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 27 item 6: the pipeline flow's `init_adapter` parameter (the adapter sft continues) came from the
    deployment's parameters unchecked."""
    import uuid

    from prefect.context import _deployment_id

    from alignflow.flows.pipeline import pipeline
    from alignflow.tasks.lib.errors import StageError

    monkeypatch.setenv("ALIGNFLOW_HOME", str(ROOT))
    monkeypatch.delenv("ALIGNFLOW_DATA_ROOTS", raising=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    token = _deployment_id.set(uuid.uuid4())  # as the flow engine sets it for a run started from a deployment
    try:
        with pytest.raises(StageError, match=r"init_adapter: '.*adapter' is outside the allowed folders"):
            pipeline(recipe=load_recipe(ROOT / "configs" / "smoke.yaml"), work_dir=str(ROOT / "runs"),
                     init_adapter=str(adapter))
    finally:
        _deployment_id.reset(token)
