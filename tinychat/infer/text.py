"""Incremental detokenisation with stop strings: shared by batched generation and the serving engine.

Why one class for both: streaming text correctly is subtle (a multi-byte character split over two
tokens, a stop string split over two tokens) and must behave the same in `tinychat generate`, the
server and the terminal chat.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextTracker:
    """Incremental detokenisation of one sequence, with stop-string detection and safe streaming.

    Text is handed out as it becomes final: a trailing partial UTF-8 character, or text that could
    still turn into a stop string, is held back until the next token decides it.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:  # noqa: ANN001 - any tinychat/HF-like tokenizer
        self.tok, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters already handed to the caller
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        for s in self.stop:
            i = text.find(s)
            if i != -1:
                self.text, self.stopped = text[:i], True
                return self._flush(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # an unfinished multi-byte character
        for s in self.stop:  # hold back a suffix that is a prefix of a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._flush(safe)

    def finish(self) -> str:
        """Everything still held back (the sequence ended, so nothing can complete a stop string now)."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta
