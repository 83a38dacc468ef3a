"""Batched greedy completion of token-id prompts, and loading a model directory with its tokenizer.

Why an interface this small: evaluation suites, the RAG answer measurement and the agent's local backend
only need "continue these prompts, greedily, at most N tokens, stop at these strings". Keeping it a
two-member protocol lets a test drive a tool loop with a scripted object (deterministic replies) and the
real path run the KV-cache generator, batched across every question of a suite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tinychat.errors import UserError


class Completer(Protocol):
    """Greedy continuation of token-id prompts; `tokenizer` renders prompts and `max_seq_len` bounds them."""

    tokenizer: Any
    max_seq_len: int

    def complete(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]: ...


class LocalCompleter:
    """A tinychat Model on this machine: greedy, KV cache, prompts batched `batch_size` at a time.

    Prompts are sorted by length before batching so rows of a batch pad little, and answers are put back
    in the caller's order. A prompt longer than the context allows is cut from the left (keeping the
    question, dropping the oldest few-shot examples or system text); `truncated` counts those.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64, precision: str = "fp32") -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, max(1, batch_size)
        self.max_seq_len = int(model.cfg.max_seq_len)
        self.precision = precision
        self.truncated = 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(next(self.model.parameters()).device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def complete(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        from tinychat.infer.generate import generate
        from tinychat.infer.sampling import SamplingParams

        if not prompts:
            return []
        max_new = max(1, min(max_new_tokens, self.max_seq_len - 1))
        keep = self.max_seq_len - max_new
        cut = []
        for p in prompts:
            if len(p) > keep:
                self.truncated += 1
                p = p[-keep:]
            cut.append(list(p) or [self.tokenizer.eot_id])
        order = sorted(range(len(cut)), key=lambda i: len(cut[i]))
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new, stop=[s for s in stop if s], seed=0)
        out: list[str] = [""] * len(cut)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            with torch.no_grad(), self._autocast():
                gens = generate(self.model, self.tokenizer, [cut[i] for i in idx], params)
            for i, g in zip(idx, gens):
                out[i] = g.text
        return out


def load(model_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """(Model, Tokenizer) of a model directory or hub id; the tokenizer must sit in the same directory."""
    from tinychat.model import Model
    from tinychat.model.hub import resolve_model_dir
    from tinychat.tokenizer import Tokenizer

    d = resolve_model_dir(model_dir)
    if not d.is_dir():
        raise UserError(f"model directory {d} does not exist.")
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"{d} has no tokenizer.json; evaluation needs the model's tokenizer in the same directory.")
    model = Model.from_pretrained(str(d), dtype=torch.float32, device=device)
    tok = Tokenizer.from_pretrained(d)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{d}: the tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}.")
    return model.eval(), tok
