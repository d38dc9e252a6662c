"""The teacher: chat completions from the local base model or an OpenAI-compatible endpoint, journaled so that a
re-run resumes, and the pairwise judge built on it (used by synthesize for preference pairs and by evaluate).

Local (`"base"`): batched generate() on the base model. Remote (`TeacherEndpoint`: vLLM, TGI, llama.cpp server,
...): `concurrency` requests in flight, a timeout per request, and bounded retries with exponential backoff on
timeouts, 429 and 5xx. The API key is read from the environment variable *named* by `api_key_env`, so it never
appears in params, manifests or artifacts.

Journal: every completion is appended to a JSONL file as it arrives, keyed by a hash of the prompt and the
sampling settings. A killed run, re-run, reads it back and generates only what is missing (`resumed` counts the
completions it reused).

Judge (`teacher_scores`): the teacher compares every two answers in both orders (A/B, then B/A); an answer wins a
comparison only if it is preferred in both, which controls position bias. Its score is its share of wins.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.hashing import sha256_json
from alignflow.tasks.lib.secret_env import secret_env_problem

Messages = list[dict[str, str]]


class TeacherEndpoint(BaseModel):
    """An OpenAI-compatible chat-completions server."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(..., pattern=r"^https?://", description="base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., min_length=1, description="model name the server expects")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight")
    timeout_s: float = Field(60.0, gt=0, description="seconds per request")
    max_retries: int = Field(3, ge=0, description="retries per request on timeouts, 429 and 5xx")

    @field_validator("url")
    @classmethod
    def _plain_url(cls, v: str) -> str:
        # `/chat/completions` is appended to the path: a `?` or `#` would swallow it and let a recipe reach any
        # path of the host; credentials in the URL would land in params and manifests
        parts = urlsplit(v)
        if parts.query or parts.fragment or "?" in v or "#" in v:
            raise ValueError(f"'{v}' has a query or fragment; give the base URL only, e.g. http://host:8000/v1")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError("the URL may not carry credentials (user:password@); use api_key_env")
        if not parts.hostname:
            raise ValueError(f"'{v}' names no host")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _allowed_secret(cls, v: str | None) -> str | None:
        # checked wherever a recipe is validated (CLI, and the worker for a deployment run) and again when the
        # Teacher is built: a recipe must not make the worker send its MLflow/Prefect/cloud credentials away
        problem = None if v is None else secret_env_problem(v)
        if problem:
            raise ValueError(problem)
        return v


# Ports of the team's own services (`alignflow server up` defaults: Prefect 4200, MLflow 5000, PostgreSQL 5433); the
# ports of PREFECT_API_URL and MLFLOW_TRACKING_URI in the checking process's environment are added. A non-default
# PostgreSQL port (`up --pg-port`) is in neither: the worker's environment does not carry it, and state.json, which
# does, also holds the database password and is not the worker's to read. `up` binds PostgreSQL (like Prefect and
# MLflow) to 127.0.0.1 only, so it is reached only through a loopback address, which needs a literal host:port
# listing whatever the port: that rule, not this list, keeps a teacher off a PostgreSQL on any port.
TEAM_PORTS = (4200, 5000, 5433)


def url_allow_patterns() -> list[str]:
    """ALIGNFLOW_TEACHER_URL_ALLOW: comma-separated `host` or `host:port` shell-style patterns (lower case)."""
    raw = os.environ.get("ALIGNFLOW_TEACHER_URL_ALLOW", "")
    return [p.strip().lower() for p in raw.split(",") if p.strip()]


def _team_ports() -> set[int]:
    ports = set(TEAM_PORTS)
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        try:
            port = urlsplit(os.environ.get(var, "")).port
        except ValueError:
            port = None
        if port:
            ports.add(port)
    return ports


def _special(address: str) -> str | None:
    """Why an address needs an explicit listing (loopback, link-local such as cloud metadata, unspecified)."""
    if _special_name(address):  # a name listed as such (never resolved)
        return "loopback"
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (where cloud metadata services answer)"
    if ip.is_unspecified:
        return "unspecified (it reaches this machine)"
    return None


def _special_name(host: str) -> bool:
    """`localhost` and names under `.localhost`: loopback without asking a resolver (RFC 6761)."""
    name = host.rstrip(".")  # `localhost.` is the same name, fully qualified
    return name == "localhost" or name.endswith(".localhost")


def teacher_url_problem(url: str, *, resolve: bool = True, strict_resolve: bool = False) -> str | None:
    """Why a deployment run may not send requests (and its API key) to `url`, or None when it may.

    The host (or host:port) must match a pattern in ALIGNFLOW_TEACHER_URL_ALLOW (empty: no remote teacher). A
    loopback, link-local or unspecified address, and a port of the team's own services, pass only when the
    operator names that host:port literally, without wildcards: a bare host (`127.0.0.1`, `localhost`) opens only
    the ports of ordinary hosts, never every service on this machine. A host name is resolved (`resolve`) and
    each address it resolves to is checked the same way; `strict_resolve`: a name that does not resolve is
    refused (at request time), else left to the request to fail (at validation)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"'{url}' has no valid port"
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    patterns = url_allow_patterns()
    # equal, or matching as a pattern (an IPv6 `[::1]:8000` is only ever equal: fnmatch reads brackets as a set)
    if not any(p in (host, where) or fnmatch.fnmatchcase(host, p) or fnmatch.fnmatchcase(where, p)
               for p in patterns):
        return (f"teacher host '{where}' is not allowed for a deployment run (allowed: {', '.join(patterns) or 'none'}"
                "; the operator lists hosts or host:port patterns in ALIGNFLOW_TEACHER_URL_ALLOW)")
    if where in patterns:  # this host:port named literally, without wildcards: the operator meant it
        return None
    if port in _team_ports():
        return (f"teacher '{where}' uses port {port} of the team's own services (Prefect, MLflow, PostgreSQL); "
                f"the operator must list '{where}' itself in ALIGNFLOW_TEACHER_URL_ALLOW")
    addresses: list[str] = [host] if _special_name(host) else []
    try:
        addresses = [str(ipaddress.ip_address(host))]  # an address literal (urlsplit drops IPv6's brackets)
    except ValueError:
        if resolve and not addresses:
            try:
                addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port)})
            except OSError:
                if strict_resolve:
                    return f"teacher host '{host}' does not resolve"
    for address in addresses:
        why = _special(address)
        if why:
            return (f"teacher host '{host}' is {why} ({address}); the operator must list '{where}' itself (host "
                    "and port) in ALIGNFLOW_TEACHER_URL_ALLOW")
    return None


_SPEC: TypeAdapter[Literal["base"] | TeacherEndpoint] = TypeAdapter(Literal["base"] | TeacherEndpoint)


class Teacher:
    """Completions for chat prompts: from the journal if already made, else from the local model or endpoint."""

    def __init__(self, teacher: Literal["base"] | TeacherEndpoint, *, max_new_tokens: int, temperature: float,
                 top_p: float, batch_size: int, base: Path, dtype: str, journal: Path) -> None:
        """`teacher`: "base" (the local model at `base`, loaded in `dtype`) or an endpoint. `max_new_tokens`,
        `temperature` and `top_p` apply to sampled completions (greedy ones use neither of the last two);
        `batch_size`: prompts per generate() call (local). `journal`: the completions file a re-run resumes from."""
        self.teacher = _SPEC.validate_python(teacher)  # evaluate passes the recipe's value through an untyped field
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        self.base, self.dtype, self.journal = base, dtype, journal
        self.done: dict[str, list[str]] = {}
        if journal.exists():  # a previous, interrupted attempt of this stage
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.done[row["key"]] = row["outputs"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut off by the kill
        self.resumed, self.generated, self.chars = 0, 0, 0
        self._file = open(journal, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._local: tuple[Any, Any] | None = None

    def complete(self, prompts: list[Messages], *, n: int, sample: bool, desc: str) -> list[list[str]]:
        settings = {"n": n, "sample": sample, "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature if sample else 0.0, "top_p": self.top_p if sample else 1.0}
        keys = [sha256_json({"messages": p, **settings}) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.done}
        self.resumed += sum(1 for k in set(keys) if k not in todo)
        if todo:
            if self.teacher == "base":
                self._complete_local(todo, n, sample, desc)
            else:
                self._complete_remote(todo, n, sample, desc)
        return [self.done[k] for k in keys]

    def _record(self, key: str, outputs: list[str]) -> None:
        with self._lock:
            self.done[key] = outputs
            self.generated += 1
            self.chars += sum(len(o) for o in outputs)
            self._file.write(json.dumps({"key": key, "outputs": outputs}, ensure_ascii=False) + "\n")
            self._file.flush()  # on disk before the next request: a kill loses at most the one in flight

    def _complete_local(self, todo: dict[str, Messages], n: int, sample: bool, desc: str) -> None:
        from alignflow.tasks.lib.inference import generate
        from alignflow.tasks.lib.models import load_causal_lm, load_tokenizer

        if self._local is None:
            self._local = (load_causal_lm(self.base, self.dtype), load_tokenizer(self.base))
        model, tok = self._local
        items = list(todo.items())
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            outputs = generate(model, tok, [p for _, p in chunk], max_new_tokens=self.max_new_tokens,
                               batch_size=self.batch_size, do_sample=sample, temperature=self.temperature,
                               top_p=self.top_p, num_return_sequences=n, desc=f"{desc} {i}/{len(items)}")
            for (key, _), out in zip(chunk, outputs, strict=True):
                self._record(key, out)

    def _complete_remote(self, todo: dict[str, Messages], n: int, sample: bool, desc: str) -> None:
        import httpx
        from tqdm.auto import tqdm

        endpoint = self.teacher
        assert isinstance(endpoint, TeacherEndpoint)
        headers = {"Content-Type": "application/json"}
        problem = secret_env_problem(endpoint.api_key_env) if endpoint.api_key_env else None
        if problem:  # again here, in the worker's environment: a model built without validation is refused too
            raise StageError(f"synthesize.teacher.api_key_env: {problem}")
        if "?" in endpoint.url or "#" in endpoint.url:  # again here: a model built without validation too
            raise StageError(f"synthesize.teacher.url: '{endpoint.url}' has a query or fragment")
        if url_allow_patterns():  # the operator's list is set here (a worker): checked where the request is made,
            # with the host resolved now (a name that pointed elsewhere at validation time is caught here)
            problem = teacher_url_problem(endpoint.url, strict_resolve=True)
            if problem:
                raise StageError(f"synthesize.teacher.url: {problem}")
        if endpoint.api_key_env and os.environ.get(endpoint.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[endpoint.api_key_env]}"
        url = endpoint.url.rstrip("/") + "/chat/completions"

        def one(item: tuple[str, Messages]) -> None:
            key, messages = item
            body = {"model": endpoint.model, "messages": messages, "max_tokens": self.max_new_tokens, "n": n,
                    "temperature": self.temperature if sample else 0.0, "top_p": self.top_p if sample else 1.0}
            last_error = ""
            for attempt in range(endpoint.max_retries + 1):
                try:
                    r = client.post(url, json=body, headers=headers, timeout=endpoint.timeout_s)
                    if r.status_code == 429 or r.status_code >= 500:
                        last_error = f"HTTP {r.status_code}"
                    elif r.status_code >= 400:
                        raise StageError(f"synthesize: teacher {url} refused the request: HTTP {r.status_code} "
                                         f"{r.text[:200]}")
                    else:
                        choices = r.json()["choices"]
                        self._record(key, [(c.get("message") or {}).get("content", "").strip() for c in choices])
                        return
                except (httpx.TimeoutException, httpx.TransportError) as e:
                    last_error = type(e).__name__
                time.sleep(min(2**attempt * 0.5, 8.0))  # exponential backoff, capped at 8 s
            raise StageError(f"synthesize: teacher {url} failed after {endpoint.max_retries + 1} attempts "
                             f"({last_error}); completions so far are kept and a re-run resumes")

        # redirects are not followed (httpx default, said here): a teacher may not bounce the request elsewhere
        with httpx.Client(follow_redirects=False) as client, \
                ThreadPoolExecutor(max_workers=endpoint.concurrency) as pool:
            futures = [pool.submit(one, item) for item in todo.items()]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="request"):
                    future.result()
            except BaseException:
                for future in futures:  # stop queued requests; those in flight finish and are journaled
                    future.cancel()
                raise

    def close(self) -> None:
        self._file.close()


JUDGE_PROMPT = ("Question:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
                "Which answer is better: more correct, more helpful, better formatted? Reply with one letter, A or B.")


def teacher_scores(teacher: Teacher, prompt: Messages, answers: list[str]) -> list[float]:
    """Each answer's share of pairwise wins; a win needs the teacher's preference in both presentation orders."""
    question = "\n".join(m["content"] for m in prompt if m["role"] == "user")
    pairs = [(i, j) for i in range(len(answers)) for j in range(i + 1, len(answers))]
    asks = []
    for i, j in pairs:
        asks.append([{"role": "user", "content": JUDGE_PROMPT.format(question=question, a=answers[i], b=answers[j])}])
        asks.append([{"role": "user", "content": JUDGE_PROMPT.format(question=question, a=answers[j], b=answers[i])}])
    verdicts = [_letter(c[0]) for c in teacher.complete(asks, n=1, sample=False, desc="synthesize: judge")]
    wins = [0] * len(answers)
    for k, (i, j) in enumerate(pairs):
        first, swapped = verdicts[2 * k], verdicts[2 * k + 1]
        if first == "A" and swapped == "B":
            wins[i] += 1
        elif first == "B" and swapped == "A":
            wins[j] += 1  # otherwise the two orders disagree (position bias) or no verdict: nobody wins
    return [w / max(len(answers) - 1, 1) for w in wins]


def _letter(text: str) -> str | None:
    found = re.search(r"\b([AB])\b", text.strip()[:20])
    return found.group(1) if found else None
