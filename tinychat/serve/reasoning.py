"""A reply's leading <think> block, returned apart as `reasoning_content` (DeepSeek's API, vLLM's reasoning parsers).

Why: the chat template renders an assistant turn's reasoning_content as "<think>\\n...\\n</think>\\n\\n" before
its content (tinychat/tokenizer/chat.py), and tinychat's speedrun models think before a formatted English
answer (docs/world.md): "<think>\\nIt is headquartered in Dalzan.\\n</think>\\n\\n{"answer": "Dalzan"}". A
client that asked for JSON should get JSON in `content`, with the reasoning beside it; sending the message
back as it came (reasoning_content and content) renders the same tokens again.

Only a block that opens the reply counts, as in vLLM's deepseek_r1 and qwen3 parsers; "<think>" later in a
reply is text. A block that never closes (the token limit fell inside it) is all reasoning. The newlines
the template puts around the block are not part of either field.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
_TAIL = "\n" + CLOSE  # what may end the reasoning; held back while it could still be a partial tag


class ReasoningSplitter:
    """One choice's streamed text in, (reasoning, content) increments out; `final` on the last piece."""

    def __init__(self) -> None:
        self.state = "start"  # start -> (head -> think -> gap ->) content
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.pending += text
        reasoning = content = ""
        while True:
            p = self.pending
            if self.state == "start":
                if p.startswith(OPEN):
                    self.pending, self.state = p[len(OPEN) :], "head"
                elif OPEN.startswith(p) and not final:
                    break  # "" or "<thi": wait for more
                else:
                    self.state = "content"
            elif self.state == "head":  # the template's newline after <think>
                if not p and not final:
                    break
                self.pending, self.state = p.removeprefix("\n"), "think"
            elif self.state == "think":
                end = p.find(CLOSE)
                if end >= 0:
                    reasoning += p[:end].removesuffix("\n")
                    self.pending, self.state = p[end + len(CLOSE) :], "gap"
                    continue
                keep = 0 if final else _partial_tail(p)
                reasoning += p[: len(p) - keep]
                self.pending = p[len(p) - keep :]
                break
            elif self.state == "gap":  # the template's blank line after </think>
                self.pending = p.lstrip("\n")
                if not self.pending and not final:
                    break
                self.state = "content"
            else:
                content += p
                self.pending = ""
                break
        return reasoning, content


def _partial_tail(text: str) -> int:
    """Length of the longest suffix of `text` that could begin "\\n</think>" or "</think>"."""
    for k in range(min(len(text), len(_TAIL)), 0, -1):
        s = text[-k:]
        if _TAIL.startswith(s) or CLOSE.startswith(s):
            return k
    return 0


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole reply."""
    reasoning, content = ReasoningSplitter().feed(text, final=True)
    return (reasoning if text.startswith(OPEN) else None), content
