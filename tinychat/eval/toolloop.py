"""The calculator tool loop, run for real and batched: generate, execute <tool_call>s, feed results back.

Why for real: "arithmetic with the tool" only means something if the model's own call is parsed, the
expression evaluated (safely, tinychat.agent.calculator) and the result appended as a role "tool"
message in the chat template, exactly as a serving stack would, before the model writes its answer.
Every conversation still waiting for the model is continued in one batched call per round.

Counted along the way: how many <tool_call> blocks the model opened (`calls`), how many of those were a
well-formed calculator call with an expression the calculator accepts (`valid`), and how many
conversations called a tool at all (`rows_calling`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinychat.agent.calculator import run_calculator_call
from tinychat.eval.backend import Completer
from tinychat.infer.tool_calls import split_reply


@dataclass
class ToolStats:
    calls: int = 0  # <tool_call> blocks the model opened
    valid: int = 0  # ... that were a calculator call the calculator could evaluate
    rows_calling: int = 0  # conversations with at least one call
    rounds: int = 0  # generation rounds run (1 = nobody called a tool)
    per_row_calls: list[int] = field(default_factory=list)

    def as_dict(self, n_rows: int) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "valid_calls": self.valid,
            "validity_rate": self.valid / self.calls if self.calls else None,
            "use_rate": self.rows_calling / n_rows if n_rows else None,
            "rounds": self.rounds,
        }


def run_tool_loop(
    completer: Completer,
    conversations: list[list[dict[str, Any]]],
    tools: list[list[dict[str, Any]] | None],
    max_new_tokens: int,
    max_rounds: int = 2,
) -> tuple[list[str], list[list[dict[str, Any]]], ToolStats]:
    """Final replies, full transcripts and tool statistics for a batch of chat conversations.

    A conversation ends when the model answers without a parseable call, or after `max_rounds` tool
    rounds (its last reply is then graded as it is). Calls that cannot be executed (wrong tool, bad
    arguments, not arithmetic) still get a tool message ("error: ..."), as a real agent loop would.
    """
    tok = completer.tokenizer
    convs = [list(c) for c in conversations]
    replies = [""] * len(convs)
    stats = ToolStats(per_row_calls=[0] * len(convs))
    active = list(range(len(convs)))
    for rnd in range(max_rounds + 1):
        if not active:
            break
        stats.rounds = rnd + 1
        prompts = [tok.render_chat(convs[i], tools[i], add_generation_prompt=True).ids for i in active]
        texts = completer.complete(prompts, max_new_tokens)
        still = []
        for i, text in zip(active, texts):
            content, calls, opened = split_reply(text)
            replies[i] = content
            if opened:
                stats.calls += opened
                stats.per_row_calls[i] += opened
            results = [run_calculator_call(c.name, c.arguments) for c in calls]
            stats.valid += sum(ok for ok, _ in results)
            if not calls or rnd == max_rounds:
                convs[i].append({"role": "assistant", "content": content})
                continue
            convs[i].append({"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]})
            for c, (_, result) in zip(calls, results):
                convs[i].append({"role": "tool", "tool_call_id": c.id, "name": c.name, "content": result})
            still.append(i)
        active = still
    stats.rows_calling = sum(1 for n in stats.per_row_calls if n)
    return replies, convs, stats
