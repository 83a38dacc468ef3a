"""The agent's memory: a context window that summarises its oldest turns, and facts kept in a vector store.

Short-term: a conversation grows by a model reply and a tool result per step, and a small model's
context is short (512 tokens for the speedrun model). When the rendered conversation passes `trigger`
of the budget, the oldest turns after the task (never the system prompt, the task itself or the last
`keep_last` messages, and never splitting an assistant tool call from its tool results) are replaced by
one system message holding a summary that the model itself writes. Counting uses the backend's tokenizer
when it has one, else about four characters a token.

Long-term: facts the agent chose to save (its `remember` tool) go into a LanceDB table with their
embeddings, and are found again by relevance (the `recall` tool, and the top few relevant memories
shown at the start of every task). It is the same vector store and embedder as the knowledge base, so a
memory directory is a small knowledge base of the agent's own notes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Message = dict[str, Any]
SUMMARY_PREFIX = "Summary of the earlier conversation: "
SUMMARIZE = (
    "Summarise the conversation below in a few sentences for your own later use: keep every fact, number, "
    "file name and tool result that may still matter, and what is left to do.\n\n{text}"
)


def approx_tokens(messages: list[Message]) -> int:
    return sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) + 8 for m in messages) // 4


def _render(messages: list[Message]) -> str:
    lines = []
    for m in messages:
        content = str(m.get("content") or "")
        if m.get("tool_calls"):
            calls = ", ".join(f"{c['function']['name']}({c['function']['arguments']})" for c in m["tool_calls"])
            content = (content + f" [calls {calls}]").strip()
        who = m["role"] if m["role"] != "tool" else f"tool {m.get('name', '')}"
        lines.append(f"{who}: {content}")
    return "\n".join(lines)


class ShortTermMemory:
    """Keeps a conversation under a token budget by summarising old turns (see the module docstring)."""

    def __init__(
        self,
        budget: int,
        summarize: Callable[[str], str],
        count: Callable[[list[Message]], int] = approx_tokens,
        trigger: float = 0.8,
        keep_last: int = 4,
    ) -> None:
        self.budget, self.summarize, self.count = budget, summarize, count
        self.trigger, self.keep_last = trigger, keep_last
        self.summaries = 0

    def _head(self, messages: list[Message]) -> int:
        """Messages that always stay: leading system messages and the first user message (the task)."""
        i = 0
        while i < len(messages) and messages[i]["role"] == "system":
            i += 1
        return min(i + 1, len(messages))

    def fit(self, messages: list[Message]) -> list[Message]:
        """The conversation, compacted in place when it passes trigger * budget; returns it for chaining."""
        if self.count(messages) <= self.trigger * self.budget:
            return messages
        head = self._head(messages)
        cut = len(messages) - self.keep_last
        while cut > head and messages[cut]["role"] == "tool":  # a tool result stays with the call before it
            cut -= 1
        if cut <= head:
            return messages
        old = messages[head:cut]
        earlier = [m for m in old if m["role"] == "system" and str(m.get("content", "")).startswith(SUMMARY_PREFIX)]
        text = _render(earlier + [m for m in old if m not in earlier])
        summary = self.summarize(SUMMARIZE.format(text=text)).strip() or text[-400:]
        messages[head:cut] = [{"role": "system", "content": SUMMARY_PREFIX + summary}]
        self.summaries += 1
        return messages


class LongTermMemory:
    """Facts in a LanceDB table, recalled by embedding similarity."""

    def __init__(self, path: str | Path, embedder: Any = None) -> None:
        from tinychat.rag.embed import make_embedder
        from tinychat.rag.store import open_store

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder or make_embedder("minilm")
        self.store = open_store("lance", str(self.path / "lance"), self.embedder.dim)

    def save(self, fact: str) -> str:
        from tinychat.rag.types import ChunkRecord

        fact = " ".join(fact.split())
        if not fact:
            raise ValueError("nothing to remember: the fact is empty")
        h = hashlib.sha256(fact.encode()).hexdigest()
        source = f"memory:{h[:16]}"
        if source in self.store.sources():
            return "already remembered"
        rec = ChunkRecord(f"{h[:16]}:0", source, time.strftime("%Y-%m-%d %H:%M:%S"), "", 0, 0, len(fact), fact, h)
        self.store.add([rec], self.embedder.embed([fact]))
        return "remembered"

    def recall(self, query: str, k: int = 3, min_similarity: float = 0.25) -> list[str]:
        if not query.strip() or self.store.count() == 0:
            return []
        q = np.asarray(self.embedder.embed([query])[0], dtype=np.float32)
        return [h.record.text for h in self.store.search(q, k) if h.score >= min_similarity]

    def tools(self) -> list[Any]:
        """`remember` and `recall` as agent tools."""
        from tinychat.agent.tools import tool

        @tool
        def remember(fact: str) -> str:
            """Save a fact to long-term memory so it can be recalled in later tasks.

            Args:
                fact: one self-contained sentence worth remembering
            """
            return self.save(fact)

        @tool
        def recall(query: str) -> str:
            """Search long-term memory for facts saved in earlier tasks.

            Args:
                query: what to look for
            """
            found = self.recall(query, k=5)
            return "\n".join(f"- {f}" for f in found) if found else "nothing relevant remembered"

        return [remember, recall]

    def close(self) -> None:
        self.store.close()
