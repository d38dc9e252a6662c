"""Which text of an internal record (see readers.py) the checks look at: its answers, or all of its turns."""

from __future__ import annotations

from typing import Any


def answer_texts(record: dict[str, Any]) -> list[str]:
    """The assistant turns of an sft record, both sides of a preference pair, an unpaired record's completion, or
    an eval item's reference."""
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if "completion" in record:
        return [record["completion"]]
    return [record["chosen"], record["rejected"]] if "chosen" in record else [record.get("reference", "")]


def record_text(record: dict[str, Any]) -> str:
    """Every turn of an sft record, a preference pair's prompt and both answers, or an unpaired record's prompt and
    completion, joined by spaces."""
    if "messages" in record:
        return " ".join(m["content"] for m in record["messages"])
    if "completion" in record:
        return " ".join([*(m["content"] for m in record["prompt"]), record["completion"]])
    return " ".join([*(m["content"] for m in record["prompt"]), record["chosen"], record["rejected"]])
