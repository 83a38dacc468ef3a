"""Tool calls in the model's output: <tool_call>{json}</tool_call> (Hermes / Qwen2.5) -> OpenAI `tool_calls`.

Why a streaming parser: the server streams a reply as it is generated, so the split between plain
content and tool calls must be made token by token. Text that could still be the start of
"<tool_call>" is held back (like a stop string), a call is handed out whole when its closing tag
arrives, and a block whose JSON does not parse is given back as ordinary content so nothing the model
wrote is lost. Whitespace between content and calls (the format's newlines) is dropped. A block cut off by
the token limit is not content but a truncated call, as OpenAI returns one: the function's name and the
arguments written so far (finish_reason stays "length"); before its name is complete it is dropped.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One function call: arguments are a JSON object as text, as OpenAI's API carries them."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def parse_call(body: str) -> ToolCall | None:
    """The call inside one <tool_call> block, or None when it is not {"name": str, "arguments": object}."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*(,\s*"(?:arguments|parameters)"\s*:\s*)?', re.S)


def partial_call(body: str) -> ToolCall | None:
    """A block cut off mid-JSON: its call with the arguments text so far, or None while the name is unfinished."""
    m = _HEAD.match(body)
    if m is None:
        return None
    try:
        name = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    return ToolCall(name, body[m.end() :] if m.group(2) else "") if name else None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may still grow into it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Feed text deltas in; get (content delta, completed calls) out. `calls` keeps every call seen."""

    def __init__(self) -> None:
        self.buf = ""  # text not yet classified
        self.in_call = False
        self.ws = ""  # trailing whitespace of the content, held until we know a call does not follow
        self.calls: list[ToolCall] = []
        self.after_call = False  # no content since the last call
        self.ws_before = ""  # the whitespace in front of the open block

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        content, calls = [], []
        while True:
            if not self.in_call:
                i = self.buf.find(OPEN)
                if i == -1:
                    keep = _held_prefix(self.buf, OPEN)
                    content.append(self._content(self.buf[: len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                content.append(self._content(self.buf[:i]))
                self.buf, self.in_call = self.buf[i + len(OPEN) :], True
                self.ws_before, self.ws = self.ws, ""  # dropped if this block is a valid call
            else:
                j = self.buf.find(CLOSE)
                if j == -1:
                    break
                body, self.buf, self.in_call = self.buf[:j], self.buf[j + len(CLOSE) :], False
                call = parse_call(body)
                if call is None:
                    content.append(self._content(self.ws_before + OPEN + body + CLOSE))
                else:
                    calls.append(call)
                    self.calls.append(call)
                    self.after_call, self.ws = True, ""
        return "".join(content), calls

    def finish(self, truncated: bool = False) -> tuple[str, list[ToolCall]]:
        """The sequence ended: an unclosed block still counts as a call when its JSON is complete, and when
        the token limit cut it (`truncated`) it is a partial call (or nothing), never content."""
        content, calls = "", []
        if self.in_call:
            call = parse_call(self.buf) or (partial_call(self.buf) if truncated else None)
            if call is not None:
                calls.append(call)
                self.calls.append(call)
            elif not truncated:
                content = self._content(self.ws_before + OPEN + self.buf)
        else:
            content = self._content(self.buf)
        self.buf, self.in_call = "", False
        if not self.calls:
            content, self.ws = content + self.ws, ""
        return content, calls

    def _content(self, text: str) -> str:
        """Release text, keeping its trailing whitespace back (dropped if a call comes next)."""
        text = self.ws + text
        if self.calls and self.after_call:  # the newline(s) right after a call are format, not content
            text = text.lstrip()
        stripped = text.rstrip()
        self.ws = text[len(stripped) :]
        if stripped:
            self.after_call = False
        return stripped


def split_reply(text: str) -> tuple[str, list[ToolCall], int]:
    """(content without tool-call blocks, parsed calls, number of <tool_call> blocks opened)."""
    parser = ToolCallParser()
    content, calls = parser.push(text)
    tail, more = parser.finish()
    return (content + tail).strip(), calls + more, text.count(OPEN)
