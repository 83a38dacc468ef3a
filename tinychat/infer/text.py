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

    Each token costs O(1), not O(length): only a short window of ids is decoded (vLLM's
    prefix/read offsets, the idea behind tokenizers' DecodeStream, kept generic over any tokenizer
    with `decode`), and stop strings are searched only in the text's new tail.
    """

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:  # noqa: ANN001 - any tinychat/HF-like tokenizer
        self.tok, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.emitted = 0  # characters already handed to the caller
        self.text = ""
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to text that is already in self.text
        self._read = 0
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = self.tok.decode(self.ids[self._prefix :])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""  # an unfinished multi-byte character: the next token decides it
        new = window[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        old_len = len(self.text)
        self.text += new
        if self.stop:  # a stop string can only end in the new text: search from just before it
            lo = max(0, old_len - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i != -1]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
                return self._flush(len(self.text))
        safe = len(self.text)
        for s in self.stop:  # hold back a suffix that is a prefix of a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:n]):
                    safe -= n
                    break
        return self._flush(safe)

    def finish(self) -> str:
        """Everything still held back (the sequence ended, so nothing can complete a stop string now)."""
        if self._read < len(self.ids) and not self.stopped:  # an unfinished character: emit what it decodes to
            before = self.tok.decode(self.ids[self._prefix : self._read]) if self._read > self._prefix else ""
            self.text += self.tok.decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted : upto], upto
        return delta
