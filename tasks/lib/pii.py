"""PII and secret scrubbing: typed placeholders in place of emails, phone numbers, IP addresses, credit-card
numbers (Luhn-verified, so order numbers and ISO dates survive) and API keys / tokens.

Regular expressions rather than Presidio / spaCy NER: those need model downloads that this project's machines
cannot make, and the classes asked for here are pattern-shaped. Order matters: secrets and card numbers are
replaced before phone numbers, whose pattern would otherwise eat their digits.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

_SECRETS = [
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),  # OpenAI / Anthropic style
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),  # Hugging Face
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),  # Google API key
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),  # Slack
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWT
]
# `api_key = ...`, `password: ...`: keep the name, drop the value.
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)\s*[:=]\s*)"
    r"([\"']?)[^\s\"']{6,}\2")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
# Full 8-group form, or a compressed form with "::" (so a time like 12:30 is left alone).
_IPV6 = re.compile(r"\b(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}\b"
                   r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:)*[0-9a-fA-F]{0,4}::(?:[0-9a-fA-F]{1,4}:)*[0-9a-fA-F]{1,4}\b")
# +CC numbers, (area) numbers, or North-American 3-3-4; never a run inside a longer digit sequence.
_PHONE = re.compile(
    r"(?<![\w+-])(?:\+\d{1,3}[ .-]?(?:\(?\d{1,4}\)?[ .-]?)?\d{2,4}[ .-]?\d{3,4}(?:[ .-]?\d{2,4})?"
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"
    r"|\d{3}[ .-]\d{3}[ .-]\d{4})(?![\w-]|[ .-]\d)")


def _luhn(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if double:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        double = not double
    return total % 10 == 0


def scrub(text: str, counts: Counter[str] | None = None) -> str:
    """`text` with PII and secrets replaced by <EMAIL>, <PHONE>, <IP_ADDRESS>, <CREDIT_CARD>, <SECRET>."""
    counts = counts if counts is not None else Counter()

    def sub(pattern: re.Pattern[str], label: str, s: str) -> str:
        def repl(m: re.Match[str]) -> str:
            counts[label.strip("<>").lower()] += 1
            return label

        return pattern.sub(repl, s)

    for pattern in _SECRETS:
        text = sub(pattern, "<SECRET>", text)

    def assigned(m: re.Match[str]) -> str:
        counts["secret"] += 1
        return m.group(1) + "<SECRET>"

    text = _ASSIGNED_SECRET.sub(assigned, text)
    text = sub(_EMAIL, "<EMAIL>", text)

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and _luhn(digits):
            counts["credit_card"] += 1
            return "<CREDIT_CARD>"
        return m.group(0)

    text = _CARD.sub(card, text)
    text = sub(_IPV4, "<IP_ADDRESS>", text)
    text = sub(_IPV6, "<IP_ADDRESS>", text)
    return sub(_PHONE, "<PHONE>", text)


# Every pattern `scrub` applies, each with a needle: a cheap pattern that every match of it contains, so that
# a text the needle does not match cannot match the pattern either. `may_hold_pii` scans a whole batch of texts
# joined by "\n\0\n": nothing can match across it (only `\s*` in _ASSIGNED_SECRET takes a "\n", and then needs
# [:=], not "\0"; no needle takes either), and every look-around and `\b` sees "\n" as the start or end of a text.
_DIGITS = re.compile(r"\d[\d .()+-]{5,}")  # in every card number, IPv4 address and phone number (>= 6 digits)
_NEEDLES: list[tuple[re.Pattern[str], re.Pattern[str]]] = [
    *zip(_SECRETS, map(re.compile, ("sk-", "gh[pousr]_", "github_pat_", "hf_", "AKIA", "AIza", "xox[abprs]-",
                                    "eyJ")), strict=True),
    (_ASSIGNED_SECRET, re.compile("[:=]")),
    (_EMAIL, re.compile("@")),
    (_CARD, _DIGITS),
    (_IPV4, _DIGITS),  # d.d.d.d: a digit and 6 more characters
    (_IPV6, re.compile("::|:[0-9a-fA-F]{1,4}:")),  # the compressed form has "::", the full one ":h:"
    (_PHONE, _DIGITS),  # +d dd ddd, (dd)ddd ddd, ddd ddd dddd
]
_JOIN = "\n\0\n"


def _joined(texts: list[str]) -> tuple[str, list[int]]:
    """`texts` joined by _JOIN, and the offset of each text in the result."""
    return _JOIN.join(texts), [0, *accumulate(len(t) + len(_JOIN) for t in texts)][:-1]


def _texts_matched(pattern: re.Pattern[str], joined: str, starts: list[int]) -> set[int]:
    """Indices of the texts (joined by `_joined`) that some match of `pattern` overlaps, in one scan."""
    found: set[int] = set()
    for m in pattern.finditer(joined):
        first = bisect_right(starts, m.start()) - 1
        last = bisect_right(starts, max(m.end() - 1, m.start())) - 1
        found.update(range(first, last + 1))  # a match cannot span texts; marking more is only slower
    return found


def may_hold_pii(texts: list[str]) -> list[bool]:
    """For each text, whether `scrub` might change it: False only when no pattern matches the text, and then
    `scrub` returns it unchanged and counts nothing (each step leaves an unmatched text as it is). One scan of
    the batch per needle, then one scan per pattern of the texts its needle found and no earlier pattern did,
    instead of every pattern over every text, one call each: those calls and the `\b`-led scans were the cost
    (docs/profiles/curate.md)."""
    joined, starts = _joined(texts)
    hit = [False] * len(texts)
    found_by: dict[re.Pattern[str], set[int]] = {}
    for pattern, needle in _NEEDLES:
        if needle not in found_by:  # a needle several patterns share scans once
            found_by[needle] = _texts_matched(needle, joined, starts)
        candidates = sorted(i for i in found_by[needle] if not hit[i])
        if candidates:
            for k in _texts_matched(pattern, *_joined([texts[i] for i in candidates])):
                hit[candidates[k]] = True
    return hit


def record_strings(record: dict[str, Any]) -> Iterator[str]:
    """The strings `scrub_record` scrubs, in its order: string fields, and message contents of list fields."""
    for value in record.values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (m["content"] for m in value)


def scrub_record(record: dict[str, Any], counts: Counter[str], flags: Iterator[bool] | None = None) -> dict[str, Any]:
    """`record` with every string field, and the content of every message in a list field, scrubbed.
    `flags`: `may_hold_pii` of `record_strings(record)`, in order; a string flagged False is kept as it is."""

    def clean(text: str) -> str:
        return scrub(text, counts) if flags is None or next(flags) else text

    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, str):
            out[key] = clean(value)
        elif isinstance(value, list):
            out[key] = [{**m, "content": clean(m["content"])} for m in value]
        else:
            out[key] = value
    return out
