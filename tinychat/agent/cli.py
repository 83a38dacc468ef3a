"""`tinychat agent "task"`: run the tool-using agent from the command line, each step shown as it happens.

The model is a local directory (--model, default the speedrun's newest) or any OpenAI-compatible server
(--base-url). Tools: calculator and current_time always; workspace files and the sandboxed python tool on
--workspace; knowledge-base search with --kb; remember/recall with --memory; and every tool of each MCP
server given with --mcp "command args" (stdio). The trace of every step is appended to --trace
(default WORKSPACE/traces/agent-TIMESTAMP.jsonl).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.world.evalsets import SEARCH_K


@dataclass
class AgentConfig:
    task: str = field("", positional=True, help="what the agent should do")
    model: str = field("", help="model directory (default: the newest runs/*/checkpoints/*/)")
    base_url: str = field("", help="an OpenAI-compatible server instead of a local model")
    served_model: str = field("", help="model name at --base-url (default: its first)")
    api_key: str = field("")
    workspace: str = field("agent-workspace", help="the folder the file and python tools may use ('' = no such tools)")
    kb: str = field("", help="knowledge base for the search tool (see tinychat rag ingest)")
    search_k: int = field(
        SEARCH_K,
        help="passages a search returns by default (small models have short contexts; tinyworld's rows use this)",
    )
    memory: str = field("", help="long-term memory directory: adds remember/recall, and recalls at the start")
    mcp: list[str] = field([], help='MCP servers to connect over stdio, each a quoted command ("python srv.py")')
    python: bool = field(True, help="offer the sandboxed python tool (needs --workspace)")
    allow_unisolated: bool = field(
        False,
        help="let the python tool run where the sandbox cannot isolate (no bubblewrap or user namespaces, "
        "no seccomp): the code then reads what you can read; also TINYCHAT_SANDBOX_ALLOW_UNISOLATED=1",
    )
    max_steps: int = field(8, help="model calls at most")
    max_seconds: float = field(120.0, help="wall-clock budget")
    max_tokens: int = field(256, help="tokens per model reply")
    context_tokens: int = field(0, help="short-term memory budget (0: the local model's context, else 4096)")
    plan: bool = field(False, help="plan-then-execute: numbered plan first, steps revised as they are done")
    reflect: int = field(0, help="reflection rounds: check the answer against the task, retry on a problem")
    system: str = field("", help="system prompt")
    trace: str = field("", help="JSONL trace file (default: WORKSPACE/traces/agent-TIME.jsonl)")
    json: bool = field(False, help="print the result as JSON at the end")
    runs_dir: str = field("runs")


def _show(step) -> None:  # noqa: ANN001 - tinychat.agent.loop.Step
    def short(s: str, n: int = 200) -> str:
        s = " ".join(str(s).split())
        return s if len(s) <= n else s[: n - 1] + "…"

    if step.kind == "tool":
        mark = "→" if step.ok else "✗"
        call = f"{step.name}({short(step.arguments, 120)})"
        print(f"  [{step.step}] {mark} {call} = {short(step.result)}  ({step.seconds:.2f}s)")
    elif step.kind == "model" and step.content:
        print(f"  [{step.step}] model: {short(step.content)}  ({step.seconds:.2f}s)")
    elif step.kind in ("plan", "revise", "reflect", "summary"):
        print(f"  [{step.step}] {step.kind}: {short(step.content, 400)}")
    sys.stdout.flush()


def build_registry(cfg: AgentConfig, stack: contextlib.ExitStack):  # noqa: ANN201 - (Registry, LongTermMemory | None)
    from tinychat.agent.builtin import default_registry, make_search_tool

    search = None
    if cfg.kb:
        from tinychat.rag.kb import open_kb
        from tinychat.rag.retrieve import RetrieveConfig

        kb = open_kb(cfg.kb)
        stack.callback(kb.close)
        default_k = cfg.search_k

        def run_search(query: str, k: int):  # noqa: ANN202
            return kb.retriever.search(query, RetrieveConfig(k=k or default_k))

        search = make_search_tool(run_search, source_name=kb.display_name, default_k=default_k)
    workspace = None
    sandbox_factory = None
    if cfg.workspace:
        workspace = Path(cfg.workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        if cfg.python:
            from tinychat.agent.sandbox import Sandbox, require_isolation

            allow = cfg.allow_unisolated or None  # None: the environment variable decides
            require_isolation(allow)  # refuse at the start, not at the model's first python call
            sandbox_factory = lambda: Sandbox(workspace / "sandbox", allow_unisolated=allow)  # noqa: E731
    reg = default_registry(workspace, search, sandbox_factory)
    stack.callback(reg.close)
    memory = None
    if cfg.memory:
        from tinychat.agent.memory import LongTermMemory

        memory = LongTermMemory(cfg.memory)
        stack.callback(memory.close)
        for t in memory.tools():
            reg.add(t)
    for command in cfg.mcp:
        from tinychat.agent.mcp import McpConnection

        argv = shlex.split(command)
        if not argv:
            raise UserError("--mcp needs a command, e.g. --mcp 'python my_server.py'.")
        conn = stack.enter_context(McpConnection(argv))
        for t in conn.tools():
            reg.add(t)
    return reg, memory


def run(cfg: AgentConfig) -> int:
    from tinychat.agent.loop import Agent, LoopConfig, Trace
    from tinychat.agent.memory import ShortTermMemory
    from tinychat.infer.chat_backend import make_backend

    if not cfg.task.strip():
        raise UserError('give the agent a task: tinychat agent "what is 17 * 23?".')
    if cfg.max_steps < 1 or cfg.max_seconds <= 0:
        raise UserError("--max-steps must be at least 1 and --max-seconds positive.")
    backend = make_backend(cfg.model, cfg.base_url, cfg.served_model, cfg.api_key, cfg.runs_dir)
    with contextlib.ExitStack() as stack:
        reg, long_term = build_registry(cfg, stack)
        budget = cfg.context_tokens or getattr(backend, "max_seq_len", 0) or 4096
        count = getattr(backend, "count_tokens", None)
        short = ShortTermMemory(
            max(64, budget - cfg.max_tokens),
            lambda prompt: backend.chat([{"role": "user", "content": prompt}], max_tokens=cfg.max_tokens)["content"],
            **({"count": count} if count else {}),
        )
        trace_path = cfg.trace or (
            str(Path(cfg.workspace or ".") / "traces" / f"agent-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        )
        trace = Trace(trace_path)
        stack.callback(trace.close)
        loop_cfg = LoopConfig(
            cfg.max_steps, cfg.max_seconds, cfg.max_tokens, cfg.plan, reflections=cfg.reflect, system=cfg.system
        )
        agent = Agent(backend, reg, loop_cfg, short, long_term, trace, None if cfg.json else _show)
        print(f"agent: {backend.name}; tools: {', '.join(reg.names)}", file=sys.stderr)
        res = agent.run(cfg.task)
    if cfg.json:
        print(json.dumps(res.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(f"\n{res.answer}")
        print(
            f"\n({res.stopped}; {res.model_calls} model calls, {res.tool_calls} tool calls "
            f"({res.valid_tool_calls} valid), {res.seconds:.1f}s; trace {trace_path})",
            file=sys.stderr,
        )
    return 0 if res.stopped == "answer" else 1
