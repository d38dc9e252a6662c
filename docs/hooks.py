"""MkDocs hook (mkdocs.yml `hooks:`): the pages are written for GitHub as much as for this site.

In a GitHub table a `|` inside a code span must be written `\\|`, or it splits the cell; Python-Markdown already
keeps code spans whole and would show the backslash. So, on table rows only, `\\|` inside a code span becomes `|`.
"""

from __future__ import annotations

import re
from typing import Any

CODE_SPAN = re.compile(r"`[^`\n]*`")


def on_page_markdown(markdown: str, **_: Any) -> str:
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("|") and "\\|" in line:
            lines[i] = CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)
    return "\n".join(lines)
