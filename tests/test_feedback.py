"""Feedback as users have it: what the command line prints (Rich markup), a full disk, and the library warnings
a clean run used to print."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
from rich.errors import StyleSyntaxError
from rich.style import Style

from alignflow.recipe import load_recipe
from alignflow.tasks.lib.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
CLI = ROOT / "alignflow" / "cli.py"
RENDERABLES = {"table", "metrics"}  # Tables built in cli.py: their cells are checked where they are added
MARKUP_HELPERS = {"_registered_line"}  # functions of cli.py that return markup: every f-string in them is checked


def _tag_problems(text: str) -> list[str]:
    """`[...]` in literal markup that Rich would take for a style it does not know (and drop): `[sweep]`."""
    problems = []
    for match in re.finditer(r"(?<!\\)\[([^\[\]]*)\]", text):
        tag = match.group(1)
        if tag.startswith("/"):
            continue
        try:
            Style.parse(tag)
        except StyleSyntaxError:
            problems.append(f"[{tag}] in {text!r}")
    return problems


def _value_problems(node: ast.expr) -> list[str]:
    """What in one argument of a markup print is not safe: a value shown raw, or a literal bracket Rich eats."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return _tag_problems(node.value)
    if isinstance(node, ast.JoinedStr):
        problems = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                problems += _tag_problems(str(part.value))
            elif isinstance(part, ast.FormattedValue) and part.format_spec is None:
                problems += _value_problems(part.value) if not _is_escape(part.value) else []
        return problems
    if isinstance(node, ast.IfExp):
        return _value_problems(node.body) + _value_problems(node.orelse)
    if isinstance(node, ast.Starred):
        return _value_problems(node.value)
    if isinstance(node, ast.ListComp):
        return _value_problems(node.elt)
    if _is_escape(node) or (isinstance(node, ast.Name) and node.id in RENDERABLES):
        return []
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") in MARKUP_HELPERS:  # audited where defined
        return []
    if isinstance(node, ast.Attribute) and node.attr == "__name__":  # an exception's class name: no brackets
        return []
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("len", "sum"):  # counts
        return []
    if isinstance(node, ast.Name) and node.id in ("delta", "waited", "stage", "col"):  # numbers / fixed names
        return []
    return [f"line {node.lineno}: {ast.unparse(node)} is shown without escape()"]


def _is_escape(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "escape"


def test_every_message_the_cli_prints_escapes_what_rich_would_take_for_markup() -> None:
    """An audit of alignflow/cli.py: every print, table title and table cell under Rich markup shows values through
    escape() (or prints with markup=False), and its literal text holds no `[word]` that is not a style. The install
    hint `pip install 'alignflow[sweep]'` failed this (Rich printed `alignflow`)."""
    problems: list[str] = []
    calls = 0
    for node in ast.walk(ast.parse(CLI.read_text())):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("print", "add_row", "Table"):
            continue
        calls += 1
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(keywords.get("markup"), ast.Constant) and keywords["markup"].value is False:
            continue
        args = list(node.args) + ([keywords["title"]] if "title" in keywords else [])
        for arg in args:
            problems += [f"line {node.lineno}: {p}" for p in _value_problems(arg)]
    for node in ast.walk(ast.parse(CLI.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name in MARKUP_HELPERS:
            for inner in ast.walk(node):
                if isinstance(inner, ast.JoinedStr):
                    problems += [f"{node.name}: {p}" for p in _value_problems(inner)]
    assert calls > 40  # the audit saw the file's prints
    assert not problems, "\n".join(problems)


def test_the_audit_catches_what_it_is_for() -> None:
    """The audit itself: the old sweep hint and a raw value fail it; their fixed forms pass."""
    old = ast.parse("""err.print("[red]needs Optuna:[/] pip install 'alignflow[sweep]'")""").body[0].value.args[0]
    raw = ast.parse('err.print(f"[bold red]stopped:[/] {e}")').body[0].value.args[0]
    assert _value_problems(old) and _value_problems(raw)
    fixed = ast.parse("""err.print("[red]needs Optuna:[/] pip install 'alignflow\\\\[sweep]'")""").body[0].value.args[0]
    escaped = ast.parse('err.print(f"[bold red]stopped:[/] {escape(str(e))}")').body[0].value.args[0]
    assert not _value_problems(fixed) and not _value_problems(escaped)


def test_sweep_without_optuna_names_the_extra(in_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from alignflow.cli import app

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError, as where it is absent
    result = CliRunner().invoke(app, ["sweep", str(SMOKE), "--param", "dpo.beta=0.1,0.2"])
    assert result.exit_code == 2
    assert "pip install 'alignflow[sweep]'" in result.output, result.output


def test_a_stopped_run_shows_its_message_whole(in_root: Path, tmp_path: Path) -> None:
    """A StageError's text reaches the terminal as written, brackets included, through the command itself: here a
    data file named `export[v2].csv` (Rich took `[v2]` for a style and printed `export.csv`)."""
    from typer.testing import CliRunner

    from alignflow.cli import app

    (tmp_path / "exports").mkdir()
    data = tmp_path / "exports" / "export[v2].csv"  # named through its folder (a glob would read [v2] as a class)
    data.write_text("question,answer\nq,a\n")
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--until", "curate", "--work-dir", str(tmp_path / "w"),
                                      "--set", f"data.sft={data.parent}"])
    said = "".join(result.output.split())  # Rich wraps long lines (a path may break anywhere)
    assert result.exit_code == 1, result.output
    assert "".join(f"stopped: curate: {data}: the CSV header has the columns".split()) in said, result.output


def test_a_full_disk_names_the_stage_and_the_path_and_rerunning_resumes(prefect_server: None, in_root: Path,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real "No space left on device" from a real write: curate's plot goes to Linux's /dev/full, which refuses
    every write with ENOSPC. The message names the stage, the path it was writing and that re-running resumes; and
    re-running, once the space is back, does finish."""
    from alignflow.flows.pipeline import pipeline
    from alignflow.tasks import curate

    def plot_to_a_full_disk(path: Path, lengths: dict) -> None:
        (path.parent / "lengths.png").symlink_to("/dev/full")
        with open(path.parent / "lengths.png", "wb") as f:
            f.write(b"\0" * 1_000_000)

    monkeypatch.setattr(curate, "_plot_lengths", plot_to_a_full_disk)
    work = tmp_path / "w"
    recipe = load_recipe(SMOKE)
    with pytest.raises(StageError) as e:
        pipeline(recipe=recipe, work_dir=str(work), until="curate")
    message = str(e.value)
    assert message.startswith("curate: no space left on the device while writing "), message
    written = Path(re.search(r"while writing (\S+) ", message).group(1))
    assert written.name.endswith(".partial") and written.parent == work / "stages" / "curate", message
    assert "run the same command again: it resumes" in message
    monkeypatch.undo()
    (written / "lengths.png").unlink()  # what the full disk left
    result = pipeline(recipe=recipe, work_dir=str(work), until="curate")
    assert (Path(result["stages"]["curate"]["folder"]) / "sft.jsonl").is_file()


def test_curated_data_is_logged_with_an_explicit_dataset_source() -> None:
    """MLflow 3.17 registers its local dataset source twice, so guessing the source of a local artifact path warned
    "can be interpreted in multiple ways" on every run. The source is named by the URI's scheme: the same types the
    guess chose, and no warning."""
    import warnings

    from alignflow.flows.tracking import dataset_source

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sources = {uri: dataset_source(uri) for uri in ("/w/mlartifacts/1/r/artifacts/data/sft.jsonl",
                                                         "file:///w/mlruns/1/r/artifacts/data/sft.jsonl",
                                                         "s3://bucket/1/r/artifacts/data/sft.jsonl",
                                                         "mlflow-artifacts:/1/r/artifacts/data/sft.jsonl")}
    assert not [str(w.message) for w in seen]
    kinds = {uri: s._get_source_type() for uri, s in sources.items()}
    assert list(kinds.values()) == ["local", "local", "s3", "http"]
    assert all(uri in str(s.to_dict()) for uri, s in sources.items())  # the URI is what gets recorded


def test_a_full_disk_outside_a_stage_is_said_by_the_command(in_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any stage: the base model's conversion writes into the work dir, here onto Linux's /dev/full. The
    command says no space, where, and that re-running resumes, not `failed: OSError: [Errno 28] ...`."""
    from typer.testing import CliRunner

    import alignflow.flows.pipeline as flow
    from alignflow.cli import app

    def convert_onto_a_full_disk(spec: str, dest: Path, corpus: list, **options: object) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model.safetensors").symlink_to("/dev/full")
        (dest / "model.safetensors").write_bytes(b"\0" * 1_000_000)

    monkeypatch.setattr(flow, "resolve_base", convert_onto_a_full_disk)
    result = CliRunner().invoke(app, ["run", str(SMOKE), "--until", "synthesize", "--work-dir", str(tmp_path / "w")])
    said = "".join(result.output.split())  # Rich wraps long lines, a long path anywhere
    assert result.exit_code == 1, result.output
    assert "".join(f"stopped: no space left on the device while writing {tmp_path / 'w'}".split()) in said, said
    assert "runthesamecommandagain:itresumes" in said and "Errno" not in said
