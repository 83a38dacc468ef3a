"""The speedrun's last measurement: what the final chat model does with documents and tools.

The stage suites (tinychat.eval.suites) grade the model alone. Two of tinyworld's eval sets need more than
the model: kb_qa asks about "kb" entities that appear only in WORLD/kb/docs, and the agent set asks
arithmetic over their facts. This runs them through the shipped pipelines — the knowledge base of
tinychat.rag (built from the world's documents) and the agent loop of tinychat.agent — and records, side
by side, the same questions without them: the model's floor, since it never saw these entities.

Written to runs/NAME/eval/apply.json and shown by the report card (section "Documents and tools").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tinychat.eval.run import write_json


def apply_eval(
    run_dir: str | Path, model_dir: str | Path, limit: int = 48, agent_limit: int = 24, k: int = 1
) -> dict[str, Any]:
    """Retrieval quality, answers with/without the knowledge base (the top-k hybrid chunks in the prompt), and
    agent tasks with/without tools."""
    from tinychat.agent.evaluate import AgentEvalConfig, evaluate
    from tinychat.infer.chat_backend import LocalChat
    from tinychat.rag.evaluate import answer_accuracy, build_kb, retrieval_metrics, world_rows

    run_dir, model_dir = Path(run_dir), Path(model_dir)
    world = run_dir / "world"
    t0 = time.perf_counter()
    kb = build_kb(world, run_dir / "kb")
    try:
        kb_rows = world_rows(world, "kb_qa", limit)
        out: dict[str, Any] = {"model": model_dir.name, "kb_chunks": kb.store.count()}
        out["retrieval"] = [retrieval_metrics(kb, kb_rows, m, 10) for m in ("dense", "bm25", "hybrid")]
        backend = LocalChat(model_dir)  # loaded once for both measurements
        out["answers"] = answer_accuracy(kb, kb_rows, backend, k=k)
        out["agent"] = evaluate(world_rows(world, "agent", agent_limit), backend, kb, AgentEvalConfig())
    finally:
        kb.close()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(run_dir / "eval" / "apply.json", out)
    return out


def section(run_dir: Path) -> list[str]:
    """The report card's "Documents and tools" section, or nothing when apply.json is absent."""
    path = run_dir / "eval" / "apply.json"
    if not path.is_file():
        return []
    d = json.loads(path.read_text())

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = [
        "## Documents and tools",
        "",
        f"The final model ({d['model']}) on questions about entities that exist only in the knowledge base "
        f"({d['kb_chunks']} chunks from world/kb/docs): without help it cannot know them.",
        "",
        "| retrieval | recall@1 | recall@5 | MRR | en recall@1 | zh recall@1 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in d["retrieval"]:
        cells = [m["mode"], *(str(m[k]) for k in ("recall@1", "recall@5", "mrr", "recall@1_en", "recall@1_zh"))]
        lines.append("| " + " | ".join(cells) + " |")
    a, g = d["answers"], d["agent"]
    lines += [
        "",
        "| task | without | with | n |",
        "| --- | --- | --- | --- |",
        f"| kb_qa: answer exact match (knowledge base, top-{a['k']} hybrid sources) | "
        f"{pct(a['accuracy_without_kb'])} | {pct(a['accuracy_with_kb'])} | {a['n']} |",
        f"| agent: multi-step tasks (search + calculator tools) | {pct(g['success_without_tools'])} | "
        f"{pct(g['success_with_tools'])} | {g['n']} |",
        "",
        f"Agent: {g['avg_model_calls']} model calls per task, tool-call validity {pct(g['tool_call_validity'])} "
        f"of {g['tool_calls']} calls, stopped {g['stopped']}. Answers with a citation "
        f"{pct(a['answers_with_citation'])}, citations pointing at a stating document {pct(a['citations_correct'])}.",
        "",
    ]
    return lines
