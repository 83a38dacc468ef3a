"""Engine events -> OpenAI response objects and stream chunks (chat.completion, text_completion, logprobs).

Kept apart from the routes so the shapes can be read in one place and checked against the official
client, which the tests use to parse every one of them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tinychat.infer.engine import TokenLogprob
from tinychat.infer.structured import Grammars
from tinychat.infer.tool_calls import ToolCall


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event; the stream ends with the literal `data: [DONE]`."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class Formatter:
    """Builds response bodies for one request (id, creation time and model name fixed once)."""

    def __init__(self, grammars: Grammars, model: str, kind: str, logprobs: bool = False) -> None:
        self.g, self.model = grammars, model
        self.kind = kind  # "chat" | "completion"
        # asked for: a choice that produced no token (its first sample was the end of text) still gets a
        # logprobs object, with empty lists, as OpenAI sends it; not asked for: null
        self.logprobs = logprobs
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ------------------------------------------------------------------ logprobs
    def _token(self, tid: int) -> tuple[str, list[int]]:
        b = self.g.token_bytes(tid)
        return b.decode("utf-8", errors="replace"), list(b)

    def chat_logprobs(self, lps: list[TokenLogprob]) -> dict[str, Any] | None:
        if not lps and not self.logprobs:
            return None
        content = []
        for lp in lps:
            tok, b = self._token(lp.token_id)
            top = []
            for tid, v in lp.top:
                t2, b2 = self._token(tid)
                top.append({"token": t2, "logprob": v, "bytes": b2})
            content.append({"token": tok, "logprob": lp.logprob, "bytes": b, "top_logprobs": top})
        return {"content": content}

    def completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not lps and not self.logprobs:
            return None
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            tok, _ = self._token(lp.token_id)
            out["tokens"].append(tok)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self._token(t)[0]: v for t, v in lp.top})
            out["text_offset"].append(offset)
            offset += len(tok)
        return out

    # ------------------------------------------------------------------ whole responses
    def chat_response(self, choices: list[dict[str, Any]], prompt: int, completion: int) -> dict[str, Any]:
        out = []
        for i, c in enumerate(choices):
            msg: dict[str, Any] = {"role": "assistant", "content": c["text"]}
            if c.get("reasoning") is not None:
                msg["reasoning_content"] = c["reasoning"]
            if c["tool_calls"]:
                msg["tool_calls"] = [tc.to_openai() for tc in c["tool_calls"]]
                msg["content"] = c["text"] or None
            out.append(
                {
                    "index": i,
                    "message": msg,
                    "logprobs": self.chat_logprobs(c["logprobs"]),
                    "finish_reason": c["finish_reason"],
                }
            )
        return {**self._head("chat.completion"), "choices": out, "usage": usage(prompt, completion)}

    def completion_response(self, choices: list[dict[str, Any]], prompt: int, completion: int) -> dict[str, Any]:
        out = [
            {
                "index": i,
                "text": c["prefix"] + c["text"],
                "logprobs": self.completion_logprobs(c["logprobs"], len(c["prefix"])),
                "finish_reason": c["finish_reason"],
            }
            for i, c in enumerate(choices)
        ]
        return {**self._head("text_completion"), "choices": out, "usage": usage(prompt, completion)}

    # ------------------------------------------------------------------ stream chunks
    def chat_chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**self._head("chat.completion.chunk"), "choices": [choice]})

    def tool_call_chunks(self, index: int, calls: list[ToolCall], first: int) -> list[str]:
        """Each call as two deltas, as OpenAI streams them: id and name first, then the arguments."""
        out = []
        for k, tc in enumerate(calls, start=first):
            head = {"index": k, "id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
            out.append(self.chat_chunk(index, {"tool_calls": [head]}))
            out.append(self.chat_chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": tc.arguments}}]}))
        return out

    def completion_chunk(
        self, index: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**self._head("text_completion"), "choices": [choice]})

    def usage_chunk(self, prompt: int, completion: int) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse({**self._head(obj), "choices": [], "usage": usage(prompt, completion)})
