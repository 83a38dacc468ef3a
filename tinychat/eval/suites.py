"""tinyworld task suites with exact expected answers, for base models (few-shot) and chat models (template).

A suite is a tinyworld eval set (WORLD/eval/SET.jsonl, rows described in tinychat.world.evalsets) asked
one way. Base models see k solved examples of the same set and language, then the open question (in-
context learning); chat models see the row's messages through the chat template. Replies are greedy and
length-bounded, every question of a suite goes through the model in one batched call, and grading is
tinychat.world.answers.check, the same function the GRPO reward uses, so "correct" means one thing.

Each suite returns accuracy, n, correct, a per-language breakdown (en/zh), a per-mode breakdown where
rows carry a mode (multistep: chain of thought vs direct answer), tool-call statistics for the tool
suite, and a few graded samples to read.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.errors import UserError
from tinychat.eval.backend import Completer, Mode
from tinychat.eval.toolloop import run_tool_loop
from tinychat.world.answers import check, is_refusal


@dataclass(frozen=True)
class Suite:
    name: str
    source: str  # the eval set it reads: WORLD/eval/SOURCE.jsonl
    about: str
    tools: bool = False  # offer the row's tools and run the calculator loop (chat models)
    strip_tools: bool = False  # ask the row without its tools (the no-tool baseline of a tool set)


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("facts_trained", "facts_trained", "fact QA on entities whose question-answer pairs were trained"),
        Suite("facts_heldout", "facts_heldout", "fact QA on entities whose facts were only read, never quizzed"),
        Suite("arithmetic", "arithmetic", "easy arithmetic answered directly"),
        Suite("arithmetic_tool", "arithmetic_tool", "hard arithmetic through the calculator tool loop", tools=True),
        Suite("arithmetic_notool", "arithmetic_tool", "the same hard problems with no tool offered", strip_tools=True),
        Suite("refusal", "refusal", "questions about entities that do not exist: the answer is a refusal"),
        Suite("instruction", "instruction", "format instructions: JSON, upper case, one word, full sentence, language"),
        Suite("multistep", "multistep", "two-hop questions, chain of thought vs direct answer"),
        Suite("multiturn", "multiturn", "follow-up questions in a conversation"),
    )
}
DEFAULT_SUITES: tuple[str, ...] = (
    "facts_trained",
    "facts_heldout",
    "arithmetic",
    "arithmetic_tool",
    "arithmetic_notool",
    "refusal",
    "instruction",
    "multistep",
)


@dataclass
class SuiteOptions:
    limit: int = 0  # questions per suite (0 = all); the first `limit` rows, so every stage sees the same ones
    shots: int = 3  # solved examples in a base model's prompt
    max_new_tokens: int = 48
    cot_max_new_tokens: int = 224  # chain-of-thought rows need room to reason (worked columns: up to ~185)
    max_tool_rounds: int = 2
    # a calculator call is ~45 tokens of JSON under the speedrun's 8k tokenizer: at 48 the cpu-tiny SFT
    # model's calls were cut before their closing brace (43% valid), at 96 all of them parsed
    tool_max_new_tokens: int = 96
    samples: int = 3  # graded examples kept in the result


def load_rows(world_dir: str | Path, source: str) -> list[dict[str, Any]]:
    from tinychat.world.load import load_jsonl

    path = Path(world_dir) / "eval" / f"{source}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; generate the world with `tinychat world generate --out {world_dir}`.")
    return load_jsonl(path)


def limited(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows, keeping both modes of a multistep problem together (a fair CoT/direct pair)."""
    if not limit or limit >= len(rows):
        return rows
    if not any("problem_id" in r for r in rows):
        return rows[:limit]
    keep: list[str] = []
    for r in rows:
        if r["problem_id"] not in keep:
            keep.append(r["problem_id"])
    chosen = set(keep[: max(1, limit // 2)])
    return [r for r in rows if r["problem_id"] in chosen]


def base_prompt(pool: list[dict[str, Any]], row: dict[str, Any], k: int) -> str:
    """k solved examples (same language and mode, other problems) and the open question, blank-line separated.

    Like tinychat.world.load.few_shot, plus: a chain-of-thought row's examples show their reasoning (the
    row's `reference`), and the other mode of the same multistep problem is never an example (it would
    give the answer away).
    """
    shots = [
        r
        for r in pool
        if r["id"] != row["id"]
        and r["lang"] == row["lang"]
        and r.get("mode") == row.get("mode")
        and (r.get("problem_id") is None or r.get("problem_id") != row.get("problem_id"))
    ][:k]
    sep = " " if row["lang"] == "en" else ""
    solved = [f"{r['prompt_plain']}{sep}{r['reference'] if r.get('mode') == 'cot' else r['answer']}" for r in shots]
    return "\n\n".join([*solved, row["prompt_plain"]])


def _breakdown(rows: list[dict[str, Any]], correct: list[bool], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rows, correct):
        if r.get(key) is not None:
            groups[str(r[key])].append(ok)
    return {g: {"accuracy": sum(v) / len(v), "n": len(v)} for g, v in sorted(groups.items())}


def summarize(rows: list[dict[str, Any]], replies: list[str], correct: list[bool], samples: int) -> dict[str, Any]:
    n = len(rows)
    out: dict[str, Any] = {
        "accuracy": sum(correct) / n if n else None,
        "n": n,
        "correct": sum(correct),
        "by_lang": _breakdown(rows, correct, "lang"),
    }
    if any("mode" in r for r in rows):
        out["by_mode"] = _breakdown(rows, correct, "mode")
    out["samples"] = [
        {"id": r["id"], "question": r["question"], "reply": rep, "answer": r["answer"], "correct": ok}
        for r, rep, ok in list(zip(rows, replies, correct))[:samples]
    ]
    return out


def outcomes(pool: list[dict[str, Any]], rows: list[dict[str, Any]], correct: list[bool]) -> str:
    """One character per row of the suite's file: 1 right, 0 wrong, . not asked. Stages evaluated on different
    numbers of rows are compared on the rows they share (the report's "what each stage added")."""
    at = {id(r): i for i, r in enumerate(pool)}
    chars = ["."] * len(pool)
    for r, ok in zip(rows, correct):
        chars[at[id(r)]] = "1" if ok else "0"
    return "".join(chars)


def run_suite(
    completer: Completer,
    world_dir: str | Path,
    name: str,
    mode: Mode,
    opts: SuiteOptions | None = None,
) -> dict[str, Any]:
    """Ask one suite's questions (batched, greedy) and grade them; see the module docstring for the result."""
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; suites are {', '.join(SUITES)}.")
    opts = opts or SuiteOptions()
    suite = SUITES[name]
    t0 = time.perf_counter()
    pool = load_rows(world_dir, suite.source)
    rows = limited(pool, opts.limit)
    tok = completer.tokenizer
    # a multistep row in either mode has room for the steps: a direct answer may follow them in a <think> block
    thinks = ("cot", "direct") if mode == "chat" else ("cot",)
    budget = [opts.cot_max_new_tokens if r.get("mode") in thinks else opts.max_new_tokens for r in rows]
    replies = [""] * len(rows)
    result: dict[str, Any] = {"suite": name, "mode": mode, "source": suite.source}

    if mode == "chat" and suite.tools:
        convs = [r["messages"] for r in rows]
        tools = [r.get("tools") for r in rows]
        replies, _, stats = run_tool_loop(
            completer, convs, tools, max([*budget, opts.tool_max_new_tokens]), opts.max_tool_rounds
        )
        result["tool"] = stats.as_dict(len(rows))
    else:
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = defaultdict(list)
        prompts: list[list[int]] = []
        for i, r in enumerate(rows):
            if mode == "base":
                prompts.append(tok.encode(base_prompt(pool, r, opts.shots)))
                stop = ("\n\n",) if r.get("mode") == "cot" else ("\n",)
            else:
                tools = None if suite.strip_tools else r.get("tools")
                prompts.append(tok.render_chat(r["messages"], tools, add_generation_prompt=True).ids)
                stop = ()
            groups[(budget[i], stop)].append(i)
        for (max_new, stop), idx in groups.items():
            texts = completer.complete([prompts[i] for i in idx], max_new, stop)
            for i, t in zip(idx, texts):
                replies[i] = t.strip()
    result["tool_available"] = mode == "chat" and suite.tools
    correct = [check(rep, r) for rep, r in zip(replies, rows)]
    result.update(summarize(rows, replies, correct, opts.samples))
    result["outcomes"] = outcomes(pool, rows, correct)
    if suite.source.startswith("facts_") and rows:
        # every entity here exists and its facts were in pretraining: a refusal is a false refusal
        result["refused"] = sum(is_refusal(rep) for rep in replies) / len(rows)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def run_suites(
    completer: Completer,
    world_dir: str | Path,
    names: list[str] | tuple[str, ...],
    mode: Mode,
    opts: SuiteOptions | None = None,
) -> dict[str, dict[str, Any]]:
    """Every named suite, in order: {suite name: result}."""
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise UserError(f"unknown suite {unknown[0]!r}; suites are {', '.join(SUITES)}.")
    return {n: run_suite(completer, world_dir, n, mode, opts) for n in names}
