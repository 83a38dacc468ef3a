"""The agent loop: the model calls tools in the OpenAI function-calling format until it answers.

One step = one model call. A reply with tool calls gets every call executed (several per turn are fine)
through the tool registry, whose validation errors come back as the tool's result, so the model can fix
its own call; a reply without tool calls is the answer. The loop stops at the answer, at `max_steps`, or
when `max_seconds` of wall-clock time are spent. Every step (tool, arguments, result, time) goes to the
`on_event` callback (the CLI prints it live) and to a JSONL trace.

Two optional modes wrap the loop, both plain prompting over the same chat call:
- plan-then-execute: the model first writes a numbered plan; each step is then worked through as its own
  instruction, and after each one the model may rewrite the steps that remain (it replies OK to keep
  them). Small models plan badly; the point is that the mechanism is real and inspectable in the trace.
- reflection: after an answer, the model is shown the task and its answer and asked whether the answer
  is correct and complete; anything but OK is fed back as a critique and the loop continues (once per
  `reflections`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinychat.agent.memory import SUMMARY_PREFIX, LongTermMemory, ShortTermMemory
from tinychat.agent.tools import Registry

PLAN_PROMPT = (
    "Before doing anything, write a short numbered plan (at most {n} steps) for this task. "
    "Write only the plan, one step per line, like '1. ...'.\n\nTask: {task}"
)
STEP_PROMPT = "Carry out step {i} of the plan: {step}"
REVISE_PROMPT = (
    "The remaining steps of the plan are:\n{rest}\nIf they still make sense reply OK; otherwise reply with the "
    "new numbered list of remaining steps."
)
FINAL_PROMPT = "Now give the final answer to the task: {task}"
REFLECT_PROMPT = (
    "Task: {task}\nProposed answer: {answer}\n\nCheck the answer against the task. If it is correct and complete "
    "reply with exactly OK. Otherwise say briefly what is wrong."
)
CRITIQUE = "A check of your answer found a problem: {critique}\nPlease fix it and answer again."


@dataclass
class LoopConfig:
    max_steps: int = 8
    max_seconds: float = 120.0
    max_tokens: int = 256
    plan: bool = False
    max_plan_steps: int = 5
    reflections: int = 0  # reflection rounds after an answer (0 = off)
    system: str = ""


@dataclass
class Step:
    step: int
    kind: str  # model | tool | plan | revise | reflect | summary | final
    seconds: float
    content: str = ""
    name: str = ""  # the tool
    arguments: str = ""
    result: str = ""
    ok: bool = True


@dataclass
class AgentResult:
    task: str
    answer: str
    stopped: str  # answer | max_steps | timeout
    steps: list[Step] = field(default_factory=list)
    model_calls: int = 0
    tool_calls: int = 0
    valid_tool_calls: int = 0
    plan: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trace:
    """Appends one JSON object per step to a .jsonl file (flushed each line, so a killed run keeps its trace)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def parse_plan(text: str, limit: int) -> list[str]:
    """Numbered lines ('1. x', '2) y', '步骤1：z') of a reply, in order; the whole reply when none are numbered."""
    steps = [m.group(1).strip() for m in re.finditer(r"(?m)^\s*(?:step\s*|步骤)?\d+[.)、:：]\s*(.+)$", text, re.I)]
    if not steps and text.strip():
        steps = [text.strip()]
    return steps[:limit]


class Agent:
    """Runs tasks with one chat backend (tinychat.infer.chat_backend) and one tool registry."""

    def __init__(
        self,
        backend: Any,
        registry: Registry,
        cfg: LoopConfig | None = None,
        memory: ShortTermMemory | None = None,
        long_term: LongTermMemory | None = None,
        trace: Trace | None = None,
        on_event: Callable[[Step], None] | None = None,
    ) -> None:
        self.backend, self.registry, self.cfg = backend, registry, cfg or LoopConfig()
        self.memory, self.long_term, self.trace, self.on_event = memory, long_term, trace, on_event

    # ------------------------------------------------------------------ plumbing
    def _emit(self, res: AgentResult, step: Step) -> None:
        res.steps.append(step)
        if self.trace is not None:
            self.trace.write({"task": res.task, **asdict(step), "time": time.time()})
        if self.on_event is not None:
            self.on_event(step)

    def _chat(self, res: AgentResult, messages: list[dict[str, Any]], tools: bool) -> dict[str, Any]:
        if self.memory is not None:
            before = self.memory.summaries
            self.memory.fit(messages)
            if self.memory.summaries > before:
                summary = next(m["content"] for m in messages if str(m.get("content", "")).startswith(SUMMARY_PREFIX))
                self._emit(res, Step(len(res.steps) + 1, "summary", 0.0, content=summary))
        res.model_calls += 1
        return self.backend.chat(
            messages, self.registry.specs() if tools and len(self.registry) else None, max_tokens=self.cfg.max_tokens
        )

    def _ask(self, res: AgentResult, prompt: str, kind: str, context: list[dict[str, Any]] | None = None) -> str:
        """A tool-less side question (plan, revision, reflection) that does not enter the conversation."""
        t0 = time.perf_counter()
        text = self._chat(res, [*(context or []), {"role": "user", "content": prompt}], tools=False)["content"]
        self._emit(res, Step(len(res.steps) + 1, kind, time.perf_counter() - t0, content=text))
        return text

    def _out_of_budget(self, res: AgentResult, t0: float) -> str:
        if res.model_calls >= self.cfg.max_steps:
            return "max_steps"
        if time.perf_counter() - t0 >= self.cfg.max_seconds:
            return "timeout"
        return ""

    def _until_answer(self, res: AgentResult, messages: list[dict[str, Any]], t0: float) -> str | None:
        """Model and tool turns until a reply without tool calls (returned), or None when the budget ends."""
        while not (stop := self._out_of_budget(res, t0)):
            ts = time.perf_counter()
            msg = self._chat(res, messages, tools=True)
            calls = msg.get("tool_calls") or []
            messages.append(msg)
            self._emit(res, Step(len(res.steps) + 1, "model", time.perf_counter() - ts, content=msg["content"] or ""))
            if not calls:
                return msg["content"] or ""
            for c in calls:
                fn = c.get("function", {})
                name, args = fn.get("name", ""), fn.get("arguments", "")
                r = self.registry.call(name, args)
                res.tool_calls += 1
                res.valid_tool_calls += int(r.ok)
                messages.append({"role": "tool", "tool_call_id": c.get("id", ""), "name": name, "content": r.content})
                self._emit(
                    res,
                    Step(len(res.steps) + 1, "tool", r.seconds, name=name, arguments=args, result=r.content, ok=r.ok),
                )
        res.stopped = stop
        return None

    # ------------------------------------------------------------------ the loop
    def run(self, task: str) -> AgentResult:
        t0 = time.perf_counter()
        res = AgentResult(task, "", "answer")
        messages: list[dict[str, Any]] = []
        if self.cfg.system:
            messages.append({"role": "system", "content": self.cfg.system})
        if self.long_term is not None:
            found = self.long_term.recall(task)
            if found:
                messages.append(
                    {"role": "system", "content": "Things you remember:\n" + "\n".join(f"- {f}" for f in found)}
                )
        messages.append({"role": "user", "content": task})
        answer: str | None
        if self.cfg.plan:
            answer = self._planned(res, messages, task, t0)
        else:
            answer = self._until_answer(res, messages, t0)
        for _ in range(self.cfg.reflections):
            if answer is None or self._out_of_budget(res, t0):
                break
            verdict = self._ask(res, REFLECT_PROMPT.format(task=task, answer=answer), "reflect")
            if verdict.strip().upper().startswith("OK"):
                break
            messages.append({"role": "user", "content": CRITIQUE.format(critique=verdict.strip())})
            answer = self._until_answer(res, messages, t0)
        if answer is None:  # out of budget: the last thing the model said is all there is
            answer = next((m["content"] for m in reversed(messages) if m["role"] == "assistant" and m["content"]), "")
        else:
            res.stopped = "answer"
        res.answer = answer
        res.seconds = time.perf_counter() - t0
        self._emit(res, Step(len(res.steps) + 1, "final", 0.0, content=answer))
        return res

    def _planned(self, res: AgentResult, messages: list[dict[str, Any]], task: str, t0: float) -> str | None:
        plan = parse_plan(
            self._ask(res, PLAN_PROMPT.format(n=self.cfg.max_plan_steps, task=task), "plan"), self.cfg.max_plan_steps
        )
        res.plan = list(plan)
        i = 0
        while i < len(plan):
            messages.append({"role": "user", "content": STEP_PROMPT.format(i=i + 1, step=plan[i])})
            if self._until_answer(res, messages, t0) is None:
                return None
            i += 1
            if i < len(plan) and not self._out_of_budget(res, t0):
                rest = "\n".join(f"{j + 1}. {s}" for j, s in enumerate(plan[i:]))
                reply = self._ask(res, REVISE_PROMPT.format(rest=rest), "revise", context=messages)
                if not reply.strip().upper().startswith("OK"):
                    revised = parse_plan(reply, self.cfg.max_plan_steps - i)
                    if revised:
                        plan = plan[:i] + revised
                        res.plan = list(plan)
        messages.append({"role": "user", "content": FINAL_PROMPT.format(task=task)})
        return self._until_answer(res, messages, t0)
