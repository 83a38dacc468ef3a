"""A scripted stand-in for a model: the suites' Completer interface with replies chosen by the test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


class ScriptedCompleter:
    """complete() decodes each prompt and answers reply(prompt_text); stop strings cut the reply as a model's would."""

    def __init__(self, tokenizer: Any, reply: Callable[[str], str], max_seq_len: int = 100_000) -> None:
        self.tokenizer, self.reply, self.max_seq_len = tokenizer, reply, max_seq_len
        self.prompts: list[str] = []
        self.calls = 0  # batched calls made

    def complete(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.prompts.append(text)
            r = self.reply(text)
            for s in stop:
                if s in r:
                    r = r[: r.index(s)]
            out.append(r)
        return out


def last_user_turn(prompt: str) -> str:
    """The text of the last user turn of a ChatML prompt (the question asked)."""
    turn = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    return turn.split("<|im_end|>", 1)[0]
