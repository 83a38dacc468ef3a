"""Self-instruct against a scripted OpenAI-compatible endpoint (an in-test HTTP server), and a tiny local model."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ScriptedEndpoint, serve_http

from tinychat.cli import main
from tinychat.data.rouge import rouge_tokens
from tinychat.data.self_instruct import (
    STAGES,
    LocalSampler,
    RemoteSampler,
    SelfInstructConfig,
    build_prompt,
    instruction_problem,
    parse_instructions,
    read_seed_tasks,
    self_instruct,
)
from tinychat.errors import UserError

SEEDS = Path(__file__).parent / "instruct" / "seed_tasks.jsonl"
HEADER = "Come up with a series of tasks:"

# The generation replies, handed out in order (two per round), and each kept instruction's scripted answer.
GENERATIONS: list[tuple[str, str]] = [
    (  # round 1
        "Describe the life cycle of a butterfly in simple words.\n"
        "Task 10: Give three tips for staying healthy.\n"  # a seed, verbatim: near duplicate
        "Task 11: Hi there\n"  # too short
        "Task 12: Draw a picture of a cat for me please.\n"  # blocked keyword
        "Task 13: Write a program that prints the first ten primes.\n"
        'Task 14: "Quoted" tasks start with punctuation here.\n'
        "Task 15: 用三句话介绍一下长城的历史。",
        "stop",
    ),
    (
        "Explain why the sky looks blue during the day.\n"
        "Task 10: Explain why the sky looks blue during daytime.\n"  # near duplicate of the line above
        "Task 11: List five animals that live in the",  # cut off by max_tokens: dropped
        "length",
    ),
    # round 2
    ("Name the largest ocean on Earth and one fact about it.\n11. Suggest a name for a friendly robot.", "stop"),
    ("Sorry, I cannot help with that.", "stop"),  # parsed as one instruction, kept
    ("Compose a short poem about autumn leaves falling.", "stop"),  # round 3
    ("", "stop"),  # no tasks
]
ANSWERS = {
    "Describe the life cycle of a butterfly in simple words.": ("Egg, caterpillar, pupa, then a butterfly.", "stop"),
    "用三句话介绍一下长城的历史。": ("", "stop"),  # empty answer
    "Explain why the sky looks blue during the day.": ("Explain why the sky looks blue during the day!", "stop"),
    "Name the largest ocean on Earth and one fact about it.": ("The Pacific, which", "length"),  # cut off
    "Suggest a name for a friendly robot.": ("Egg, caterpillar, pupa, then a butterfly.", "stop"),  # duplicate
    "Sorry, I cannot help with that.": ("I can help.", "stop"),
    "Compose a short poem about autumn leaves falling.": ("Gold leaves drift and fall.", "stop"),
}


class _Endpoint(ScriptedEndpoint):
    received: list[dict] = []
    generations = GENERATIONS
    answers = ANSWERS
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        with self.lock:
            if content.startswith(HEADER):
                n = sum(b["messages"][-1]["content"].startswith(HEADER) for b in self.received)
                text, finish = self.generations[n] if n < len(self.generations) else ("", "stop")
            else:
                text, finish = self.answers[content]
            self.received.append(body)
        if text == "HTTP400":
            return self._send({"error": {"message": "the prompt is longer than the context"}}, 400)
        msg = {"role": "assistant", "content": text}
        self._send({"object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": finish}]})


@pytest.fixture()
def endpoint() -> Iterator[str]:
    _Endpoint.received, _Endpoint.generations, _Endpoint.answers = [], GENERATIONS, ANSWERS
    with serve_http(_Endpoint) as url:
        yield url


def cfg(**kw: object) -> SelfInstructConfig:
    return SelfInstructConfig(**{"n": 3, "prompts_per_round": 2, "max_rounds": 3, **kw})  # type: ignore[arg-type]


def test_the_loop_and_every_filter(endpoint: str) -> None:
    seeds = read_seed_tasks(SEEDS)
    dropped: list[dict] = []
    rows, counts = self_instruct(cfg(), RemoteSampler(endpoint, concurrency=2), seeds, dropped=dropped)
    assert {k: counts[k] for k, _ in STAGES} == {
        "prompts": 6,
        "request failed": 0,
        "no tasks": 1,
        "parsed": 14,
        "cut off": 1,
        "too short": 1,
        "too long": 0,
        "blocked keyword": 1,
        "write a program": 1,
        "starts with punctuation": 1,
        "near duplicate": 2,
        "instructions kept": 7,
        "answer request failed": 0,
        "empty answer": 1,
        "answer cut off": 1,
        "answer echoes": 1,
        "duplicate answer": 1,
        "over n": 0,
        "rows": 3,
    }
    not_drops = ("prompts", "no tasks", "parsed", "instructions kept", "rows")
    drops = {k: counts[k] for k, _ in STAGES if k not in not_drops and counts[k]}
    assert Counter(d["reason"] for d in dropped) == drops and sum(drops.values()) == 11
    near = [d for d in dropped if d["reason"] == "near duplicate"]
    assert {(d["instruction"], d["most_similar"]) for d in near} == {
        ("Give three tips for staying healthy.", "Give three tips for staying healthy."),
        ("Explain why the sky looks blue during daytime.", "Explain why the sky looks blue during the day."),
    }
    assert [r["messages"][0]["content"] for r in rows] == [
        "Describe the life cycle of a butterfly in simple words.",
        "Sorry, I cannot help with that.",
        "Compose a short poem about autumn leaves falling.",
    ]
    assert rows[2]["messages"][1] == {"role": "assistant", "content": "Gold leaves drift and fall."}
    meta = rows[2]["meta"]
    assert meta["generator"] == "scripted-model" and meta["round"] == 3 and meta["method"] == "self-instruct"
    assert len(meta["seed_ids"]) == 6 and set(meta["seed_ids"]) <= {t.id for t in seeds}
    assert len(meta["generated_ids"]) == 2 and all(i.startswith("si-") for i in meta["generated_ids"])
    assert rows[0]["meta"]["generated_ids"] == [] and 0 < rows[0]["meta"]["rouge_l_max"] < 0.7
    gen = [b for b in _Endpoint.received if b["messages"][0]["content"].startswith(HEADER)]
    assert all(b["temperature"] == 0.7 and b["top_p"] == 0.5 for b in gen)
    assert all(b["temperature"] == 0.0 for b in _Endpoint.received if b not in gen)
    last = gen[-1]["messages"][0]["content"].splitlines()
    assert last[0] == HEADER and last[-1] == "Task 9:" and sum(x.startswith("Task ") for x in last) == 9


def test_stops_at_n(endpoint: str) -> None:
    rows, counts = self_instruct(cfg(n=1), RemoteSampler(endpoint, concurrency=1), read_seed_tasks(SEEDS))
    assert len(rows) == 1 and counts["rounds"] == 1 and counts["prompts"] == 2


def test_a_failed_request_is_counted_and_a_failed_round_stops(endpoint: str) -> None:
    _Endpoint.generations = [
        ("HTTP400", "stop"),
        ("Compose a short poem about autumn leaves falling.\nTask 10: Explain why the sky looks blue.", "stop"),
    ]
    _Endpoint.answers = {**ANSWERS, "Compose a short poem about autumn leaves falling.": ("HTTP400", "stop")}
    _Endpoint.answers["Explain why the sky looks blue."] = ("Because air scatters blue light most.", "stop")
    dropped: list[dict] = []
    rows, counts = self_instruct(cfg(max_rounds=1), RemoteSampler(endpoint), read_seed_tasks(SEEDS), dropped=dropped)
    assert counts["request failed"] == 1 and counts["answer request failed"] == 1 and len(rows) == 1
    assert "longer than the context" in dropped[0]["error"]
    _Endpoint.received, _Endpoint.generations = [], [("HTTP400", "stop")] * 2
    with pytest.raises(UserError, match="every instruction-generation request of the round failed"):
        self_instruct(cfg(max_rounds=1), RemoteSampler(endpoint), read_seed_tasks(SEEDS))


def test_parse_instructions() -> None:
    reply = "Plan a picnic.\nTask 10: Explain  gravity\n  to a child.\n11. 写一首诗。\n任务12：列出三种水果。\n\n"
    want = ["Plan a picnic.", "Explain gravity to a child.", "写一首诗。", "列出三种水果。"]
    assert parse_instructions(reply) == want
    assert parse_instructions("Task 9: only a marker\n") == ["only a marker"]
    assert parse_instructions("   \n") == []


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Tell me a joke", None),
        ("Hi there", "too short"),
        ("word " * 151, "too long"),
        ("Plot the sales figures by month.", "blocked keyword"),
        ("Summarise the attached files for me.", "blocked keyword"),
        ("Explain how a mapping works in Python.", None),  # "map" only as a whole word
        ("把这张图片描述一下给我听。", "blocked keyword"),
        ("write a program to sort a list", "write a program"),
        ("- Make a list of three fruits.", "starts with punctuation"),
        ("「春天」是什么意思？请解释。", "starts with punctuation"),
        ("用三句话介绍一下长城的历史。", None),  # the paper's non-English filter is not applied
    ],
)
def test_instruction_filters(text: str, why: str | None) -> None:
    assert instruction_problem(text, rouge_tokens(text), SelfInstructConfig()) == why


def test_prompt_format() -> None:
    seeds = read_seed_tasks(SEEDS)
    assert build_prompt(HEADER, seeds[:2]).splitlines() == [
        HEADER,
        "",
        f"Task 1: {seeds[0].instruction}",
        "Task 2: What is the relation between the given pairs?",
        "Task 3:",
    ]
    assert seeds[-1].instruction == "Suggest a good title for a blog post about saving money."
    assert seeds[-1].id == "seed_8"  # chat rows without an id are named by their line


def test_cli_with_an_endpoint(endpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, stats = tmp_path / "si.jsonl", tmp_path / "stats.json"
    argv = ["data", "self-instruct", "--seed-tasks", str(SEEDS), "--base-url", endpoint, "--n", "3"]
    assert main(argv + ["--prompts-per-round", "2", "--out", str(out), "--stats", str(stats)]) == 0
    assert len(out.read_text().splitlines()) == 3
    assert json.loads(stats.read_text())["near duplicate"] == 2
    assert "| dropped: ROUGE-L >= threshold against the pool | 2 |" in capsys.readouterr().out
    assert main(argv + ["--model", "x", "--out", str(tmp_path / "b.jsonl")]) == 2
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "ok task here"}\n{"name": "no instruction"}\n')
    argv = ["data", "self-instruct", "--seed-tasks", str(bad), "--base-url", endpoint]
    assert main(argv + ["--out", str(out), "--force"]) == 2
    assert "line 2" in capsys.readouterr().err


def test_local_model_counts_add_up(tiny_model_dir: Path) -> None:
    """A random tiny model writes nonsense; what matters is that the local path runs and every parsed
    instruction is accounted for by exactly one stage."""
    sampler = LocalSampler(str(tiny_model_dir))
    c = cfg(n=2, max_rounds=1, max_tokens=24, answer_max_tokens=8, temperature=1.0, top_p=1.0)
    rows, counts = self_instruct(c, sampler, read_seed_tasks(SEEDS))
    drops = ["cut off", "too short", "too long", "blocked keyword", "write a program", "starts with punctuation"]
    assert counts["prompts"] == 2
    assert counts["parsed"] == sum(counts[k] for k in drops + ["near duplicate", "instructions kept"])
    answer_drops = ["empty answer", "answer cut off", "answer echoes", "duplicate answer", "over n"]
    assert (
        counts["instructions kept"]
        == sum(counts[k] for k in answer_drops) + len(rows)
        == counts["rows"] + sum(counts[k] for k in answer_drops)
    )
    assert all(r["meta"]["generator"] == sampler.name for r in rows)
