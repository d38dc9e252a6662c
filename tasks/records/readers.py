"""Reading data files and normalising record shapes: what counts as a record, and what its internal form is.

Files: JSONL, a JSON array, CSV, Parquet, or a `datasets` folder saved with `save_to_disk`. A line that is
not UTF-8 or not JSON is not an error here: it is yielded with its reason (`invalid_utf8`, `bad_json`) so
that the caller counts it; a whole file that cannot be read is a StageError.

Accepted record shapes (detected per record), all normalised to one internal schema:
  chat        {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}
  sharegpt    {"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}
  alpaca      {"instruction": "...", "input": "...", "output": "..."}   (input folded into the prompt)
  pair        {"prompt": "...", "response"|"completion"|"reference": "..."}
  preference  {"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": ... }
  hh-rlhf     {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}  (split into prompt + answers)
  unpaired    {"prompt": "..." | [messages], "completion": "..." | [messages], "label": true | false}, or
              "thumbs_up" instead of "label", or {"messages": [..., assistant turn], "label": ...}: one rated
              completion (thumbs up / down feedback), in data.preference; KTO learns from these
Internal schema:  sft -> {"messages": [...]};  preference -> {"prompt": [...], "chosen": str, "rejected": str}
                  or, unpaired, {"prompt": [...], "completion": str, "label": bool};
                  eval -> {"prompt": [...], "reference": str}
A record that fits none of them is rejected under a named reason (`wrong_schema`, `bad_role`, ...).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

from alignflow.tasks.lib.errors import StageError

Dataset = Literal["sft", "preference", "eval"]
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def read_all(files: list[Path]) -> Any:
    """(where, record, error_reason) for every record of every file, in order."""
    for path in files:
        yield from read_records(path)


def read_records(path: Path) -> Any:
    """Yield (where, record, error_reason) for each record of a file or a saved `datasets` folder."""
    if path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise StageError(f"curate: {path} is a folder but not a saved datasets Dataset: {e}") from None
        if hasattr(ds, "keys"):  # a DatasetDict: every split
            for split in ds:
                for i, row in enumerate(ds[split]):
                    yield f"{path}[{split}][{i}]", row, None
        else:
            for i, row in enumerate(ds):
                yield f"{path}[{i}]", row, None
        return
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise StageError(f"curate: {path} is not a readable Parquet file: {e}") from None
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row, None
        return
    data = path.read_bytes()
    if not data.strip():
        raise StageError(f"curate: {path} is empty")
    if b"\0" in data[:8192]:
        raise StageError(f"curate: {path} is not a text data file (binary content)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first column's name
        text = data.decode("utf-8-sig", errors="replace")
        reader = csv.DictReader(io.StringIO(text))
        _check_csv_header(path, reader.fieldnames or [])
        for i, row in enumerate(reader, start=2):
            yield f"{path}:{i}", dict(row), None
        return
    stripped = data.removeprefix(BOM).lstrip()
    if suffix == ".json" or stripped.startswith(b"["):
        try:
            rows = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StageError(f"curate: {path} is not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise StageError(f"curate: {path} holds a JSON {type(rows).__name__}, expected a list of records")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", row, None
        return
    for i, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            yield _parse_line(path, i, line)


def _parse_line(path: Path, i: int, line: bytes) -> tuple[str, Any, str | None]:
    """(where, record, error) of line `i` (1-based) of a JSON Lines file; a byte-order mark before the first line
    is not part of it."""
    try:
        text = line.decode("utf-8-sig" if i == 1 else "utf-8")
    except UnicodeDecodeError:
        return f"{path}:{i}", line[:200], "invalid_utf8"
    try:
        return f"{path}:{i}", json.loads(text), None
    except json.JSONDecodeError:
        return f"{path}:{i}", text, "bad_json"


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors and spreadsheets put first in a file
# Column sets a CSV header may hold (each a record shape of `normalise`; more columns are allowed): without one of
# them every row would be dropped as `wrong_schema`, so the file is refused with its header instead.
CSV_SHAPES = (("instruction", "output"), ("prompt", "response"), ("prompt", "completion"), ("prompt", "reference"),
              ("prompt", "chosen", "rejected"), ("chosen", "rejected"), ("prompt", "completion", "label"),
              ("prompt", "completion", "thumbs_up"))


def _check_csv_header(path: Path, found: list[str]) -> None:
    if not any(set(shape) <= set(found) for shape in CSV_SHAPES):
        expected = " | ".join(", ".join(shape) for shape in CSV_SHAPES)
        raise StageError(f"curate: {path}: the CSV header has the columns {found}, which match no record shape; "
                         f"expected the columns of one of: {expected}")


BLOCK = 8 << 20  # bytes read at a time from a shard's byte range (then to the end of the line)


def read_shard(files: list[Path], shard: int, shards: int) -> Any:
    """(position, where, record, error) for the records of shard `shard` of `shards`, in input order.

    A JSON Lines file is cut into `shards` byte ranges of equal size, each moved to the next line start: a
    shard reads and parses only the lines that start in its range, streaming (`BLOCK` bytes at a time), and
    counts the line breaks before it (a C-speed count, as `splitlines` counts them) to number its lines as a
    single pass does. Other files (JSON arrays, CSV, Parquet, `datasets` folders) are read whole by every shard,
    which keeps the records at index % shards == shard. Positions are (file index, line or record number):
    sorted, they give the input order, so merging the shards' streams restores it."""
    for f_index, path in enumerate(files):
        if not _json_lines(path):
            for i, (where, raw, error) in enumerate(read_records(path)):
                if i % shards == shard:
                    yield (f_index, i), where, raw, error
            continue
        size = path.stat().st_size
        with open(path, "rb") as f:
            begin, end = _line_start(f, size * shard // shards), _line_start(f, size * (shard + 1) // shards)
            number = _line_breaks(f, begin)  # lines before the range
            f.seek(begin)
            while f.tell() < end:
                block = f.read(min(BLOCK, end - f.tell()))
                if not block:  # the file shrank while being read
                    raise StageError(f"curate: {path} changed while it was read")
                if f.tell() < end and not block.endswith(b"\n"):
                    block += f.readline()  # to the end of the line: the next block starts a line
                for line in block.splitlines():
                    number += 1
                    if line.strip():
                        yield (f_index, number), *_parse_line(path, number, line)


def count_lines(path: Path) -> int:
    """Line breaks in a JSON Lines file (0 for other files): a cheap estimate of its records, for progress."""
    if not path.is_file() or path.suffix.lower() in (".parquet", ".csv", ".json"):
        return 0
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(BLOCK), b""))


def _json_lines(path: Path) -> bool:
    """Whether `read_records` reads `path` as JSON Lines; an empty or binary file fails as it does there."""
    if path.is_dir() or path.suffix.lower() in (".parquet", ".csv", ".json"):
        return False
    with open(path, "rb") as f:
        head = f.read(8192)
        first = re.search(rb"\S", head.removeprefix(BOM))
        while first is None and (chunk := f.read(BLOCK)):  # only white space so far
            first = re.search(rb"\S", chunk)
    if first is None:
        raise StageError(f"curate: {path} is empty")
    if b"\0" in head:
        raise StageError(f"curate: {path} is not a text data file (binary content)")
    return first.group() != b"["


def _line_start(f: Any, offset: int) -> int:
    """The first line start at or after byte `offset` (a line starts after a "\n"), or the file's end."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return int(f.tell())


def _line_breaks(f: Any, end: int) -> int:
    """How many lines `splitlines` finds before byte `end` (a line start): "\n", "\r\n" and a lone "\r" each
    end one. Read in blocks cut after a "\n", so that no "\r\n" is split between two blocks."""
    f.seek(0)
    count = 0
    while f.tell() < end:
        block = f.read(min(BLOCK, end - f.tell()))
        if not block:
            raise StageError(f"curate: {f.name} changed while it was read")
        if f.tell() < end and not block.endswith(b"\n"):
            block += f.readline()
        count += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
    return count


def normalise(name: Dataset, raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """One raw record -> (internal record, None) or (None, reason it was rejected)."""
    if not isinstance(raw, dict):
        return None, "wrong_schema"
    if name == "preference":
        return _preference(raw)
    messages, reason = _messages(raw)
    if reason:
        return None, reason
    assert messages is not None
    if not any(m["role"] == "user" for m in messages):
        return None, "no_user_turn"
    if messages[-1]["role"] != "assistant":
        return None, "no_assistant_turn"
    if name == "eval":
        return {"prompt": messages[:-1], "reference": messages[-1]["content"]}, None
    return {"messages": messages}, None


def _messages(raw: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    if "messages" in raw:
        turns = raw["messages"]
        if not isinstance(turns, list) or not turns:
            return None, "wrong_schema"
        out = []
        for t in turns:
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                return None, "wrong_schema"
            out.append({"role": t["role"], "content": t["content"]})
    elif "conversations" in raw:
        turns = raw["conversations"]
        if not isinstance(turns, list) or not turns:
            return None, "wrong_schema"
        out = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                return None, "wrong_schema"
            role = SHAREGPT_ROLES.get(str(t["from"]).lower())
            if role is None:
                return None, "bad_role"
            out.append({"role": role, "content": t["value"]})
    elif "instruction" in raw and "output" in raw:
        extra = raw.get("input") or ""
        if not isinstance(raw["instruction"], str) or not isinstance(extra, str):
            return None, "non_string_content"
        prompt = raw["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        out = [{"role": "user", "content": prompt}, {"role": "assistant", "content": raw["output"]}]
    elif "prompt" in raw and any(k in raw for k in ("response", "completion", "reference")):
        answer = next(raw[k] for k in ("response", "completion", "reference") if k in raw)
        out = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": answer}]
    else:
        return None, "wrong_schema"
    for m in out:
        if m["role"] not in ROLES:
            return None, "bad_role"
        if not isinstance(m["content"], str):
            return None, "non_string_content"
        if not m["content"].strip():
            return None, "empty_content"
    return out, None


def _split_hh(transcript: str) -> tuple[list[dict[str, str]], str] | None:
    """'\n\nHuman: a\n\nAssistant: b ...' -> (turns before the last assistant turn, last assistant answer)."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + transcript.lstrip("\n") if transcript else "")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
             for who, text in zip(parts[1::2], parts[2::2], strict=True)]
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        return None
    return turns[:-1], turns[-1]["content"]


LABELS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "up": True, "down": False}


def is_unpaired(record: dict[str, Any]) -> bool:
    """An internal preference record holding one rated completion (not a pair)."""
    return "label" in record and "completion" in record


def _label(value: Any) -> bool | None:
    """true/false, 1/0, or their spellings in a CSV cell ("true", "yes", "up", ...); None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return LABELS.get(value.strip().lower())
    return None


def _unpaired(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """{"prompt", "completion", "label" | "thumbs_up"} or {"messages", "label" | "thumbs_up"} -> internal form."""
    label = _label(raw["label"] if "label" in raw else raw["thumbs_up"])
    if label is None:
        return None, "bad_label"
    if "messages" in raw and "completion" not in raw:
        messages, reason = _messages({"messages": raw["messages"]})
        if reason:
            return None, reason
        assert messages is not None
        if messages[-1]["role"] != "assistant":
            return None, "no_assistant_turn"
        prompt, completion = messages[:-1], messages[-1]["content"]
    elif "prompt" in raw and "completion" in raw:
        prompt, completion = raw["prompt"], raw["completion"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, list):  # message list: the answer is its last assistant turn
            completion = next((m.get("content") for m in reversed(completion) if isinstance(m, dict)
                               and m.get("role") == "assistant"), None)
            if completion is None:
                return None, "missing_side"
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                   for m in prompt):
            return None, "wrong_schema"
    else:
        return None, "wrong_schema"
    if any(m["role"] not in ROLES for m in prompt):
        return None, "bad_role"
    if not isinstance(completion, str) or not all(isinstance(m["content"], str) for m in prompt):
        return None, "non_string_content"
    if not completion.strip() or not any(m["content"].strip() for m in prompt):
        return None, "empty_content"
    if not any(m["role"] == "user" for m in prompt):
        return None, "no_user_turn"
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], "completion": completion,
            "label": label}, None


def _preference(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    if ("label" in raw or "thumbs_up" in raw) and "chosen" not in raw and "rejected" not in raw:
        return _unpaired(raw)
    if "prompt" not in raw and isinstance(raw.get("chosen"), str) and isinstance(raw.get("rejected"), str) \
            and "\n\nAssistant:" in raw["chosen"]:
        chosen, rejected = _split_hh(raw["chosen"]), _split_hh(raw["rejected"])
        if chosen is None or rejected is None:
            return None, "wrong_schema"
        if chosen[0] != rejected[0]:
            return None, "prompt_mismatch"  # the two transcripts must share everything but the last answer
        raw = {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}
    if not all(k in raw for k in ("prompt", "chosen", "rejected")):
        return None, "missing_side" if "prompt" in raw and ("chosen" in raw or "rejected" in raw) else "wrong_schema"
    prompt = raw["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return None, "wrong_schema"
    sides = []
    for side in (raw["chosen"], raw["rejected"]):
        if isinstance(side, list):  # message list: the answer is its last assistant turn
            side = next((m.get("content") for m in reversed(side) if isinstance(m, dict)
                         and m.get("role") == "assistant"), None)
        if side is None:
            return None, "missing_side"
        if not isinstance(side, str):
            return None, "non_string_content"
        sides.append(side)
    chosen, rejected = sides
    if any(m["role"] not in ROLES for m in prompt):
        return None, "bad_role"
    if not all(isinstance(m["content"], str) for m in prompt):
        return None, "non_string_content"
    if not chosen.strip() or not rejected.strip() or not any(m["content"].strip() for m in prompt):
        return None, "empty_content"
    if not any(m["role"] == "user" for m in prompt):
        return None, "no_user_turn"
    if chosen.strip() == rejected.strip():
        return None, "chosen_equals_rejected"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None
