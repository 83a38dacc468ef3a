"""`tinychat agent eval`: the agent on tinyworld's multi-step tasks, with tools versus without.

Why these tasks: each agent row (tinychat.world.evalsets) asks arithmetic over facts of "kb" entities,
which appear only in WORLD/kb/docs ("How old was Munren Works' founder when it was founded?"). Without
tools the model cannot know the facts; with the knowledge-base `search` tool and the `calculator` it can
look them up and compute, exactly the pattern tinyworld's SFT agent conversations teach (on other,
"ragtrain" entities). The same Agent loop as `tinychat agent` runs every task, so what is measured is the
shipped loop, not a copy.

Reported: success rate with and without tools (graded by tinychat.world.answers.check, as every suite),
average model calls per task, tool-call validity (the share of calls the registry accepted and ran
without error), and how the runs stopped.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.config import field
from tinychat.world.evalsets import SEARCH_K


@dataclass
class AgentEvalConfig:
    world: str = field("", help="tinyworld directory (default: the world of the newest runs/*/)")
    model: str = field("", help="chat model (default: the newest runs/*/checkpoints/*/)")
    kb: str = field("", help="knowledge-base directory (default: WORLD/kb/index, built from WORLD/kb/docs)")
    limit: int = field(0, help="tasks (0 = all)")
    max_steps: int = field(6)
    search_k: int = field(SEARCH_K, help="passages per search (the trained rows show SEARCH_K)")
    max_tokens: int = field(64)
    out: str = field("", help="write the results as JSON here")
    runs_dir: str = field("runs")


def evaluate(rows: list[dict[str, Any]], backend: Any, kb: Any, cfg: AgentEvalConfig) -> dict[str, Any]:
    """Every task with the tools and without; a local model runs all tasks at once, its calls batched
    (Lockstep: the same replies as one task at a time, several times faster on a CPU)."""
    from tinychat.agent.builtin import calculator, make_search_tool
    from tinychat.agent.loop import Agent, AgentResult, LoopConfig
    from tinychat.agent.tools import Registry
    from tinychat.infer.chat_backend import LocalChat, Lockstep
    from tinychat.rag.retrieve import RetrieveConfig
    from tinychat.world.answers import check

    searching = threading.Lock()  # the knowledge base is not assumed to be thread-safe

    def run_search(query: str, k: int):  # noqa: ANN202
        with searching:
            return kb.retriever.search(query, RetrieveConfig(k=k))

    chat = Lockstep(backend) if isinstance(backend, LocalChat) else backend
    reg = Registry([make_search_tool(run_search, source_name=kb.display_name, default_k=cfg.search_k), calculator])
    agent = Agent(chat, reg, LoopConfig(max_steps=cfg.max_steps, max_seconds=600, max_tokens=cfg.max_tokens))

    def task(r: dict[str, Any]) -> tuple[AgentResult, str]:
        res = agent.run(r["question"])
        return res, chat.chat([{"role": "user", "content": r["question"]}], max_tokens=cfg.max_tokens)["content"]

    t0 = time.perf_counter()
    done = chat.map(task, rows) if isinstance(chat, Lockstep) else [task(r) for r in rows]
    ok_tools, ok_bare, calls, valid, model_calls = [], [], 0, 0, 0
    stops: Counter[str] = Counter()
    samples = []
    for r, (res, bare) in zip(rows, done):
        ok_tools.append(check(res.answer, r))
        calls += res.tool_calls
        valid += res.valid_tool_calls
        model_calls += res.model_calls
        stops[res.stopped] += 1
        ok_bare.append(check(bare, r))
        if len(samples) < 5:
            tools_used = [f"{s.name}({s.arguments}) = {s.result[:80]}" for s in res.steps if s.kind == "tool"]
            samples.append(
                {
                    "task": r["question"],
                    "expected": r["answer"],
                    "with_tools": res.answer,
                    "tools": tools_used,
                    "without_tools": bare,
                }
            )
    n = len(rows)
    return {
        "n": n,
        "success_with_tools": round(sum(ok_tools) / n, 4) if n else None,
        "success_without_tools": round(sum(ok_bare) / n, 4) if n else None,
        "avg_model_calls": round(model_calls / n, 2) if n else None,
        "tool_calls": calls,
        "tool_call_validity": round(valid / calls, 4) if calls else None,
        "stopped": dict(stops),
        "seconds": round(time.perf_counter() - t0, 1),
        "samples": samples,
    }


def run(cfg: AgentEvalConfig) -> int:
    from tinychat.infer.chat_backend import LocalChat
    from tinychat.infer.locate import resolve_model
    from tinychat.rag.evaluate import build_kb, default_world, world_rows

    world = Path(cfg.world) if cfg.world else default_world(cfg.runs_dir)
    rows = world_rows(world, "agent", cfg.limit)
    kb = build_kb(world, Path(cfg.kb) if cfg.kb else world / "kb" / "index")
    model_dir = resolve_model(cfg.model, cfg.runs_dir)
    result = {"world": str(world), "model": str(model_dir), **evaluate(rows, LocalChat(model_dir), kb, cfg)}
    kb.close()
    print(
        f"agent tasks ({result['n']}, {Path(model_dir).name}): success with tools {result['success_with_tools']}, "
        f"without {result['success_without_tools']}; {result['avg_model_calls']} model calls per task; "
        f"tool-call validity {result['tool_call_validity']} of {result['tool_calls']} calls; "
        f"stopped {result['stopped']}"
    )
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return 0
