"""The calculator tool loop: a forced call is parsed, executed safely, fed back as a tool message, and counted."""

from __future__ import annotations

import json
import re
from pathlib import Path

from eval_helpers import ScriptedCompleter, last_user_turn

from tinychat.eval.backend import LocalCompleter, load
from tinychat.eval.suites import SuiteOptions, load_rows, run_suite
from tinychat.eval.toolloop import run_tool_loop, split_reply
from tinychat.world.arith import CALCULATOR_TOOL


def call(expr: str) -> str:
    return '<tool_call>\n{"name": "calculator", "arguments": {"expression": ' + json.dumps(expr) + "}}\n</tool_call>"


def tool_result(prompt: str) -> str | None:
    """The content of the last <tool_response> in a rendered prompt, if any."""
    found = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", prompt, re.DOTALL)
    return found[-1] if found else None


def test_forced_call_runs_for_real(tiny_tokenizer) -> None:
    def reply(prompt: str) -> str:
        res = tool_result(prompt)
        return call("383 * 42") if res is None else f"The answer is {res}."

    fake = ScriptedCompleter(tiny_tokenizer, reply)
    convs = [[{"role": "user", "content": "What is 383 × 42?"}]]
    replies, transcripts, stats = run_tool_loop(fake, convs, [[CALCULATOR_TOOL]], max_new_tokens=64)
    assert replies == ["The answer is 16086."]
    roles = [m["role"] for m in transcripts[0]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert transcripts[0][1]["tool_calls"][0]["function"]["name"] == "calculator"
    assert transcripts[0][2]["content"] == "16086"  # computed by the calculator, not by the script
    assert "<tool_response>\n16086\n</tool_response>" in fake.prompts[-1]  # rendered through the chat template
    assert stats.as_dict(1) == {"calls": 1, "valid_calls": 1, "validity_rate": 1.0, "use_rate": 1.0, "rounds": 2}


def test_invalid_calls_get_errors_and_count_against_validity(tiny_tokenizer) -> None:
    script = {
        "a": [call("__import__('os').getcwd()"), "I could not compute it."],
        "b": ['<tool_call>\n{"name": "calculator", "arguments": \n</tool_call>', "unused"],  # broken JSON: final text
        "c": ['<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call>', "no idea"],
    }

    def reply(prompt: str) -> str:
        key = (
            last_user_turn(prompt).strip() if tool_result(prompt) is None else prompt.split("<|im_start|>user\n")[1][0]
        )
        return script[key][0 if tool_result(prompt) is None else 1]

    fake = ScriptedCompleter(tiny_tokenizer, reply)
    convs = [[{"role": "user", "content": k}] for k in script]
    replies, transcripts, stats = run_tool_loop(fake, convs, [[CALCULATOR_TOOL]] * 3, max_new_tokens=64)
    assert transcripts[0][2]["content"].startswith("error:")
    assert replies[0] == "I could not compute it."
    assert len(transcripts[1]) == 2 and "<tool_call>" in replies[1]  # unparseable: kept as the reply, no tool turn
    assert transcripts[2][2]["content"].startswith("error: unknown tool")
    assert stats.calls == 3 and stats.valid == 0 and stats.rows_calling == 3


def test_rounds_are_bounded(tiny_tokenizer) -> None:
    fake = ScriptedCompleter(tiny_tokenizer, lambda p: call("1 + 1"))  # never stops calling
    replies, transcripts, stats = run_tool_loop(
        fake, [[{"role": "user", "content": "loop"}]], [[CALCULATOR_TOOL]], 32, max_rounds=2
    )
    assert stats.rounds == 3 and stats.calls == 3 and stats.valid == 3
    assert [m["role"] for m in transcripts[0]] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert fake.calls == 3  # one batched call per round


def test_split_reply() -> None:
    content, calls, opened = split_reply("Let me compute.\n" + call("2 * 3"))
    assert content == "Let me compute." and opened == 1 and calls[0].name == "calculator"
    assert split_reply("42") == ("42", [], 0)


def test_arithmetic_tool_suite_with_a_scripted_model(tiny_tokenizer, world_dir: Path) -> None:
    """The whole suite: every row's question mapped to its expression; the calculator supplies the value."""
    rows = load_rows(world_dir, "arithmetic_tool")
    expr = {r["question"]: r["expression"] for r in rows}

    def reply(prompt: str) -> str:
        res = tool_result(prompt)
        if res is None:
            return call(expr[last_user_turn(prompt.split("<|im_start|>user\n<tool_response>")[0])])
        return res

    fake = ScriptedCompleter(tiny_tokenizer, reply)
    r = run_suite(fake, world_dir, "arithmetic_tool", "chat", SuiteOptions(limit=0))
    assert r["accuracy"] == 1.0 and r["n"] == len(rows)
    assert r["tool"]["validity_rate"] == 1.0 and r["tool"]["use_rate"] == 1.0 and r["tool_available"]
    assert fake.calls == 2  # all questions batched: one round of calls, one round of answers


def test_tool_loop_with_the_real_tiny_model(tiny_model_dir: Path, world_dir: Path) -> None:
    model, tok = load(tiny_model_dir)
    completer = LocalCompleter(model, tok, batch_size=8)
    r = run_suite(completer, world_dir, "arithmetic_tool", "chat", SuiteOptions(limit=4, max_new_tokens=16))
    assert r["n"] == 4 and 0.0 <= r["accuracy"] <= 1.0
    assert set(r["tool"]) == {"calls", "valid_calls", "validity_rate", "use_rate", "rounds"}
    assert r["tool"]["rounds"] >= 1 and 0.0 <= r["tool"]["use_rate"] <= 1.0


def test_tool_suite_replies_get_room_for_a_whole_call(tiny_tokenizer, world_dir: Path) -> None:
    """A calculator call is ~45 tokens of JSON: the tool suite gets tool_max_new_tokens, other suites keep theirs."""
    budgets: list[int] = []

    class Recording(ScriptedCompleter):
        def complete(self, prompts, max_new_tokens, stop=()):  # noqa: ANN001, ANN202 - the Completer signature
            budgets.append(max_new_tokens)
            return super().complete(prompts, max_new_tokens, stop)

    fake = Recording(tiny_tokenizer, lambda _prompt: "42")
    opts = SuiteOptions(limit=2, max_new_tokens=16, tool_max_new_tokens=96)
    run_suite(fake, world_dir, "arithmetic_tool", "chat", opts)
    assert budgets == [96]
    run_suite(fake, world_dir, "arithmetic", "chat", opts)
    assert budgets == [96, 16]
