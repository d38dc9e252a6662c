"""synthesize against a local OpenAI-compatible HTTP server: retries, the key stays secret, and a failed run
resumes without repeating completed requests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from alignflow.tasks.curate import CurateConfig, CurateInputs
from alignflow.tasks.curate import run as curate
from alignflow.tasks.lib.errors import StageError
from alignflow.tasks.lib.jsonl import read_jsonl
from alignflow.tasks.lib.manifest import read_manifest
from alignflow.tasks.lib.teacher import TeacherEndpoint
from alignflow.tasks.synthesize import SynthesizeConfig, SynthesizeInputs, run

SECRET = "sk-test-canary-5f3a9e1d2c7b"


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions; fails the requests whose 1-based number is in `fail_on` with a 500."""

    calls: ClassVar[list[dict]] = []
    fail_on: ClassVar[set[int]] = set()
    auth: ClassVar[list[str]] = []
    judge: ClassVar[str] = "longer"  # "longer": prefers the longer answer; "first": always "A" (position bias)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.calls.append(body)
        FakeOpenAI.auth.append(self.headers.get("Authorization", ""))
        if len(FakeOpenAI.calls) in FakeOpenAI.fail_on:
            self.send_response(500)
            self.end_headers()
            return
        prompt = body["messages"][-1]["content"]
        if "Reply with one letter" in prompt:
            a = prompt.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
            b = prompt.split("Answer B:\n")[1].split("\n\nWhich answer")[0]
            texts = ["A" if FakeOpenAI.judge == "first" or len(a) >= len(b) else "B"]
        elif "Write one new task" in prompt:
            topics = ["Name three rivers that flow through Peru.", "Translate good morning into Finnish politely.",
                      "Summarize the plot of a heist film in one line."]
            texts = [topics[len(FakeOpenAI.calls) % 3]]
        else:
            texts = [f"answer {i}: " + prompt[:20] + " more" * i for i in range(body["n"])]
        choices = [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]
        payload = {"choices": choices}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[str]:
    FakeOpenAI.calls, FakeOpenAI.fail_on, FakeOpenAI.auth, FakeOpenAI.judge = [], set(), [], "longer"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def _curated(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Spell the word number {i} backwards please", "response": f"reply {i}"} for i in range(6)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "Unrelated eval question?", "reference": "x"}) + "\n")
    curate(CurateConfig(), CurateInputs(sft=[tmp_path / "s.jsonl"], preference=[tmp_path / "p.jsonl"],
                                        eval=[tmp_path / "e.jsonl"], out_dir=tmp_path / "curated"))
    return tmp_path / "curated"


def test_http_teacher_retries_keeps_the_key_secret_and_resumes(server: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_API_KEY", SECRET)
    cfg = SynthesizeConfig(teacher=TeacherEndpoint(url=server, model="m", api_key_env="TEACHER_API_KEY", concurrency=1,
                                                   timeout_s=5, max_retries=0),
                           instructions=3, preference_prompts=4, samples_per_prompt=2)
    inputs = SynthesizeInputs(base=tmp_path, dtype="float32", curated=_curated(tmp_path), out_dir=tmp_path / "out",
                              seed=0)

    FakeOpenAI.fail_on = {5}  # no retries allowed: the 5th request kills the stage
    with pytest.raises(StageError, match="failed after 1 attempts"):
        run(cfg, inputs)
    journaled = len((tmp_path / "out" / "shards" / "000-of-001" / "generations.jsonl").read_text().splitlines())
    assert 4 <= journaled <= 5  # the four before the failure (+ one already in flight, at most)

    FakeOpenAI.calls, FakeOpenAI.fail_on = [], {1}  # one transient 500, now with a retry allowed
    cfg.teacher.max_retries = 1  # type: ignore[union-attr]
    manifest = run(cfg, inputs)
    m = manifest["metrics"]
    assert m["teacher.resumed"] == journaled  # completed before the failure: not requested again
    total = 3 + 3 + 4  # instructions, their answers, preference prompts
    assert len(FakeOpenAI.calls) == total - journaled + 1  # + the retried request
    assert m["teacher.completions"] == total - journaled
    assert all(a == f"Bearer {SECRET}" for a in FakeOpenAI.auth)
    assert FakeOpenAI.calls[-1]["n"] == 2 and FakeOpenAI.calls[-1]["model"] == "m"
    for f in (tmp_path / "out").rglob("*"):
        assert not f.is_file() or SECRET not in f.read_text(errors="ignore"), f.name
    assert read_manifest(tmp_path / "out")["teacher"]["api_key_env"] == "TEACHER_API_KEY"
    assert m["sft.kept"] == 3 and m["preference.kept"] >= 1


def test_teacher_judge_controls_position_bias(server: str, tmp_path: Path) -> None:
    teacher = TeacherEndpoint(url=server, model="m", api_key_env=None, concurrency=2, timeout_s=5)
    cfg = SynthesizeConfig(teacher=teacher, instructions=0, preference_prompts=3, samples_per_prompt=3,
                           judge="teacher")
    curated = _curated(tmp_path)
    m = run(cfg, SynthesizeInputs(base=tmp_path, dtype="float32", curated=curated, out_dir=tmp_path / "a",
                                  seed=0))["metrics"]
    assert m["pairs.judged"] == 3 and m["pairs.dropped.tie"] == 0
    pairs = [json.loads(line) for line in (tmp_path / "a" / "preference.jsonl").read_text().splitlines()]
    assert all(p["chosen"].endswith("more more") and "more" not in p["rejected"] for p in pairs)
    assert all(p["judge"] == "teacher_both_orders" and p["margin"] == 1.0 for p in pairs)

    FakeOpenAI.judge = "first"  # a judge that always says "A": every verdict flips with the order -> ties
    m = run(cfg, SynthesizeInputs(base=tmp_path, dtype="float32", curated=curated, out_dir=tmp_path / "b",
                                  seed=0))["metrics"]
    assert m["pairs.judged"] == 0 and m["pairs.dropped.tie"] == 3


def test_reward_model_judge_keeps_the_higher_scored_answer(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from pydantic import ValidationError

    from alignflow.tasks.lib.base_model import resolve_base
    from alignflow.tasks.lib.inference import score_answers
    from alignflow.tasks.lib.models import load_reward_model, load_tokenizer

    curated = _curated(tmp_path)
    base = resolve_base("tiny:llama", tmp_path / "base", [tmp_path / "s.jsonl"]).path
    # a reward "stage folder" as an earlier run leaves it: a LoRA + score head on the same base
    rm = load_reward_model(base, "float32", adapter=None)
    rm.config.pad_token_id = load_tokenizer(base).pad_token_id
    get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear")).save_pretrained(
        tmp_path / "reward" / "adapter")
    load_tokenizer(base).save_pretrained(tmp_path / "reward" / "adapter")

    with pytest.raises(ValidationError, match="no reward adapter"):
        SynthesizeConfig(judge="reward_model", reward_model=tmp_path / "nowhere")
    cfg = SynthesizeConfig(judge="reward_model", reward_model=tmp_path / "reward", instructions=0,
                           preference_prompts=4, samples_per_prompt=3, max_new_tokens=8, min_margin=0.0)
    m = run(cfg, SynthesizeInputs(base=base, dtype="float32", curated=curated, out_dir=tmp_path / "out",
                                  seed=0))["metrics"]
    pairs = list(read_jsonl(tmp_path / "out" / "preference.jsonl"))
    assert pairs and m["pairs.judged"] + m["pairs.dropped.tie"] == 4
    judge = load_reward_model(base, "float32", adapter=tmp_path / "reward" / "adapter")
    tok = load_tokenizer(tmp_path / "reward" / "adapter")
    for p in pairs:
        chosen, rejected = score_answers(judge, tok, [p["prompt"]] * 2, [p["chosen"], p["rejected"]])
        assert p["judge"] == "reward_model" and chosen - rejected == pytest.approx(p["margin"], abs=1e-3)
