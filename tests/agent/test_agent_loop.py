"""The agent loop on deterministic paths: a scripted model (in process, and behind a real HTTP endpoint that
speaks the OpenAI chat format), tool calls with validation errors fed back, budgets, plan/reflection,
short-term summarisation and long-term memory."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ScriptedEndpoint, serve_http

from tinychat.agent.builtin import calculator
from tinychat.agent.loop import Agent, LoopConfig, Trace, parse_plan
from tinychat.agent.memory import SUMMARY_PREFIX, LongTermMemory, ShortTermMemory
from tinychat.agent.tools import Registry, tool
from tinychat.infer.chat_backend import RemoteChat


def call(name: str, args: dict[str, Any] | str, i: int = 0) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


class Scripted:
    """A chat backend that replays scripted assistant messages and records what it was sent."""

    name = "scripted"

    def __init__(self, replies: list[dict[str, Any] | str]) -> None:
        self.replies = list(replies)
        self.seen: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, max_tokens: int = 256):  # noqa: ANN201
        self.seen.append(([dict(m) for m in messages], tools))
        r = self.replies.pop(0) if self.replies else "done"
        return {"role": "assistant", "content": r} if isinstance(r, str) else {"role": "assistant", "content": "", **r}


@tool
def lookup(name: str) -> str:
    """Look up a person's birth year.

    Args:
        name: the person
    """
    return {"Ada": "1961", "Bo": "1984"}.get(name, "unknown")


def registry() -> Registry:
    return Registry([calculator, lookup])


def test_several_calls_per_turn_and_the_answer(tmp_path: Path) -> None:
    model = Scripted(
        [
            {"tool_calls": [call("lookup", {"name": "Ada"}, 0), call("lookup", {"name": "Bo"}, 1)]},
            {"tool_calls": [call("calculator", {"expression": "1984 - 1961"}, 2)]},
            "Bo is 23 years younger than Ada.",
        ]
    )
    trace = Trace(tmp_path / "trace.jsonl")
    events = []
    res = Agent(model, registry(), trace=trace, on_event=events.append).run("How much younger is Bo than Ada?")
    trace.close()
    assert res.answer == "Bo is 23 years younger than Ada." and res.stopped == "answer"
    assert (res.model_calls, res.tool_calls, res.valid_tool_calls) == (3, 3, 3)
    tool_msgs = [m for m in model.seen[-1][0] if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs] == ["1961", "1984", "23"]
    assert [m["tool_call_id"] for m in tool_msgs] == ["call_0", "call_1", "call_2"]
    assert {t["function"]["name"] for t in model.seen[0][1]} == {"calculator", "lookup"}
    lines = [json.loads(x) for x in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["model", "tool", "tool", "model", "tool", "model", "final"]
    assert lines[1]["name"] == "lookup" and lines[1]["result"] == "1961" and "seconds" in lines[1]
    assert len(events) == len(lines)


def test_bad_calls_become_error_results_and_the_model_recovers() -> None:
    model = Scripted(
        [
            {"tool_calls": [call("calculator", {"expr": "2+2"})]},  # wrong argument name
            {"tool_calls": [call("calculator", "{not json")]},
            {"tool_calls": [call("weather", {"city": "Paris"})]},  # no such tool
            {"tool_calls": [call("calculator", {"expression": "2+2"})]},
            "4",
        ]
    )
    res = Agent(model, registry()).run("2+2?")
    results = [s.result for s in res.steps if s.kind == "tool"]
    assert all(r.startswith("error: ") for r in results[:3]) and results[3] == "4"
    assert "expression" in results[0] and "weather" in results[2]
    assert res.answer == "4" and (res.tool_calls, res.valid_tool_calls) == (4, 1)


def test_step_and_time_budgets() -> None:
    forever = [{"tool_calls": [call("lookup", {"name": "Ada"})]}] * 50
    res = Agent(Scripted(forever), registry(), LoopConfig(max_steps=3)).run("loop")
    assert res.stopped == "max_steps" and res.model_calls == 3

    class Slow(Scripted):
        def chat(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            time.sleep(0.15)
            return super().chat(*a, **k)

    res = Agent(Slow(forever), registry(), LoopConfig(max_steps=100, max_seconds=0.4)).run("loop")
    assert res.stopped == "timeout" and res.model_calls < 6


def test_plan_then_execute_with_a_revision() -> None:
    model = Scripted(
        [
            "1. Look up Ada's birth year\n2. Look up Bo's birth year\n3. Subtract",  # the plan
            {"tool_calls": [call("lookup", {"name": "Ada"})]},
            "Ada was born in 1961.",
            "1. Look up Bo's birth year and subtract",  # revision of the remaining steps
            {"tool_calls": [call("lookup", {"name": "Bo"})]},
            "23",
            "23",  # final answer
        ]
    )
    res = Agent(model, registry(), LoopConfig(plan=True)).run("How much younger is Bo than Ada?")
    assert res.plan == ["Look up Ada's birth year", "Look up Bo's birth year and subtract"]
    assert [s.kind for s in res.steps if s.kind in ("plan", "revise")] == ["plan", "revise"]
    assert res.answer == "23" and res.stopped == "answer"
    assert any(
        "Carry out step 2 of the plan: Look up Bo's birth year and subtract" in str(m["content"])
        for m in model.seen[-1][0]
    )


def test_parse_plan_variants() -> None:
    assert parse_plan("1. a\n2) b\n步骤3：c\nnot a step", 5) == ["a", "b", "c"]
    assert parse_plan("just do it", 3) == ["just do it"]


def test_reflection_feeds_a_critique_back() -> None:
    model = Scripted(["1950", "The answer ignores the lookup; Ada was born in 1961.", "1961", "OK"])
    res = Agent(model, registry(), LoopConfig(reflections=2)).run("When was Ada born?")
    assert res.answer == "1961" and [s.kind for s in res.steps].count("reflect") == 2
    assert "A check of your answer found a problem" in model.seen[2][0][-1]["content"]


def test_short_term_memory_summarises_old_turns_when_near_the_budget() -> None:
    asked: list[str] = []

    def summarize(prompt: str) -> str:
        asked.append(prompt)
        return "Ada was born in 1961; Bo in 1984."

    mem = ShortTermMemory(budget=200, summarize=summarize, keep_last=2)
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "task"}]
    assert mem.fit(list(msgs)) == msgs and not asked  # under the budget: untouched
    for i in range(6):
        msgs.append({"role": "assistant", "content": "", "tool_calls": [call("lookup", {"name": f"P{i}"}, i)]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "name": "lookup", "content": "x" * 120})
    before = len(msgs)
    mem.fit(msgs)
    assert mem.summaries == 1 and len(asked) == 1 and "lookup" in asked[0]
    assert msgs[:2] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "task"}]
    assert msgs[2]["content"] == SUMMARY_PREFIX + "Ada was born in 1961; Bo in 1984."
    assert len(msgs) < before and msgs[3]["role"] == "assistant"  # a tool result never loses its call
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            assert msgs[i - 1]["role"] in ("assistant", "tool")


def test_long_term_memory_round_trip(tmp_path: Path) -> None:
    mem = LongTermMemory(tmp_path / "memory")
    assert mem.save("The user's favourite city is Porthaven.") == "remembered"
    assert mem.save("The user's favourite city is Porthaven.") == "already remembered"
    mem.save("The quarterly report is due on Friday.")
    assert mem.recall("Which city does the user like best?", k=1) == ["The user's favourite city is Porthaven."]
    model = Scripted(["Porthaven"])
    Agent(model, registry(), long_term=mem).run("Suggest a city for my holiday.")
    first = model.seen[0][0]
    assert first[0]["role"] == "system" and "Porthaven" in first[0]["content"]  # recalled at the start
    remember, recall = mem.tools()
    assert remember(fact="Bo likes tea.") == "remembered" and "Bo likes tea." in recall(query="what does Bo drink?")
    mem.close()
    assert LongTermMemory(tmp_path / "memory").recall("report deadline", k=1) == [
        "The quarterly report is due on Friday."
    ]


# ---------------------------------------------------------------------------------------------- over HTTP
class _Endpoint(ScriptedEndpoint):
    script: list[dict[str, Any] | str] = []
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append(body)
        if body["model"] != "scripted-model":
            return self._send({"error": {"message": "The model does not exist."}}, 404)
        r = self.script.pop(0)
        msg = {"role": "assistant", "content": r} if isinstance(r, str) else {"role": "assistant", "content": None, **r}
        self._send({"object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})


@pytest.fixture()
def endpoint() -> Iterator[str]:
    with serve_http(_Endpoint) as url:
        yield url


def test_the_loop_over_an_openai_compatible_endpoint(endpoint: str) -> None:
    _Endpoint.received.clear()
    _Endpoint.script[:] = [{"tool_calls": [call("calculator", {"expression": "17 * 23"})]}, "391"]
    backend = RemoteChat(endpoint)
    assert backend.name == "scripted-model"  # the first model the server lists
    res = Agent(backend, registry()).run("What is 17 * 23?")
    assert res.answer == "391" and res.valid_tool_calls == 1
    second = _Endpoint.received[1]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "391"}
    assert second["tools"][0]["type"] == "function"
    from tinychat.errors import UserError

    with pytest.raises(UserError, match="404"):
        RemoteChat(endpoint, model="nope").chat([{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match="cannot reach"):
        RemoteChat("http://127.0.0.1:9", model="x").chat([{"role": "user", "content": "hi"}])
