"""The engine's sampler: one (B, V) logits batch per step, every row with its own knobs and generator.

Why resident tensors: a sequence's sampling parameters, its logit bias and banned ids, and its
seen-token mask and output counts (for penalties) are written once into per-row tensors when it is
admitted; a step only indexes them by the rows running. Nothing is built from Python lists per token,
and work nobody asked for (penalties, top-k/p filtering, logprobs) is skipped per batch.
Each row draws from its own torch.Generator, so a seeded request's tokens do not depend on its batch-mates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinychat.infer.engine.request import GenerationRequest, TokenLogprob
from tinychat.infer.sampling import BatchSampling, apply_penalties, filter_logits
from tinychat.infer.structured import Constraint

PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class RowState:
    """What the sampler keeps per running sequence besides the resident tensors."""

    row: int
    req: GenerationRequest
    gen: torch.Generator
    constraint: Constraint | None
    flags: tuple[bool, bool, bool]  # samples, filters, penalises
    bias_ids: torch.Tensor | None  # logit bias and banned ids, built once at admission
    bias_vals: torch.Tensor | None


class Sampler:
    def __init__(self, rows: int, vocab_size: int, stop_ids: list[int], device: torch.device) -> None:
        self.V, self.device, self.stop_ids = vocab_size, device, stop_ids
        self.table = torch.zeros(rows, len(PARAMS), device=device)  # SamplingParams per row
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # prompt + output tokens
        self.counts = torch.zeros(rows, vocab_size, device=device)  # output token counts

    def admit(self, row: int, req: GenerationRequest, choice: int, constraint: Constraint | None) -> RowState:
        p = req.params
        self.table[row] = torch.tensor([float(getattr(p, k)) for k in PARAMS])
        flags = BatchSampling.flags(p)
        if flags[2]:
            self.seen[row].zero_()
            self.seen[row, torch.tensor(req.prompt_ids, device=self.device)] = True
            self.counts[row].zero_()
        gen = torch.Generator(device=self.device)
        if p.seed is not None:
            gen.manual_seed((p.seed * 1_000_003 + choice) % 2**63)
        else:
            gen.seed()
        bias = dict(req.logit_bias or {})
        for t in req.banned_ids:
            bias[t] = float("-inf")
        ids = vals = None
        if bias:
            ids = torch.tensor(list(bias), device=self.device)
            vals = torch.tensor(list(bias.values()), device=self.device)
        return RowState(row, req, gen, constraint, flags, ids, vals)

    @staticmethod
    def in_graph(st: RowState) -> bool:
        """Whether compiled.sampled_steps samples this row as `sample` would: temperature and logit bias only
        (no penalties, top-k/p/min-p filters, grammar or logprobs)."""
        return not (st.flags[1] or st.flags[2]) and st.constraint is None and st.req.logprobs is None

    def graph_inputs(
        self, states: list[RowState], rows: int, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias (rows, V), temperature (rows,), noise (steps, rows, V)) for compiled.sampled_steps: `sample`'s
        logit bias and temperature per state, and `steps` Exp(1) draws of each sampling row's generator, in the
        order `steps` calls of `sample` would draw them. Rows past the states are padding (greedy, no bias)."""
        bias = torch.zeros(rows, self.V, device=self.device)
        noise = torch.ones(steps, rows, self.V, device=self.device)
        temperature = torch.zeros(rows, device=self.device)
        rows_of = torch.tensor([s.row for s in states], dtype=torch.long, device=self.device)
        temperature[: len(states)] = self.table[rows_of, 0]
        for i, s in enumerate(states):
            if s.bias_ids is not None:
                bias[i].index_add_(0, s.bias_ids, s.bias_vals)
            if s.flags[0]:
                for j in range(steps):
                    noise[j, i].exponential_(1.0, generator=s.gen)
        return bias, temperature, noise

    def sample(self, states: list[RowState], logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """Tokens (and logprobs where asked) for each state's row of logits (B, V)."""
        raw = logits.float()
        samples = any(s.flags[0] for s in states)
        filters = any(s.flags[1] for s in states)
        penalises = any(s.flags[2] for s in states)
        rows = torch.tensor([s.row for s in states], device=self.device) if (samples or penalises) else None
        x = raw
        if penalises:
            t = self.table[rows]
            sp = BatchSampling(*t.unbind(1), any_sampling=samples, needs_filter=filters, needs_penalties=True)
            sp.top_k = sp.top_k.long()
            x = apply_penalties(raw, self.seen[rows], self.counts[rows], sp)
        modified = penalises
        for i, s in enumerate(states):
            if s.bias_ids is not None or s.constraint is not None:
                if not modified:
                    x, modified = raw.clone(), True
                if s.bias_ids is not None:
                    x[i].index_add_(0, s.bias_ids, s.bias_vals)
                if s.constraint is not None:
                    allowed = s.constraint.allowed().to(self.device)
                    if not bool(allowed.any()):
                        allowed[self.stop_ids] = True  # a grammar with no way on: end the sequence
                    x[i].masked_fill_(~allowed, float("-inf"))
        tokens = x.argmax(-1)
        if samples:
            t = self.table[rows]
            sp = BatchSampling(*t.unbind(1), any_sampling=True, needs_filter=filters, needs_penalties=penalises)
            sp.top_k = sp.top_k.long()
            scaled = x / sp.temperature.clamp(min=1e-5)[:, None]
            probs = (filter_logits(scaled, sp) if filters else scaled).softmax(-1)
            u = torch.ones_like(probs)
            for i, s in enumerate(states):  # each row's own generator: its draws do not depend on the batch
                if s.flags[0]:
                    u[i].exponential_(1.0, generator=s.gen)
            tokens = torch.where(sp.temperature > 0, (probs / u).argmax(-1), tokens)
        if penalises:
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1
        toks = tokens.tolist()
        lps: list[TokenLogprob | None] = [None] * len(states)
        want = [i for i, s in enumerate(states) if s.req.logprobs is not None]
        if want:
            lp = F.log_softmax(raw[want], dim=-1)
            for j, i in enumerate(want):
                k = states[i].req.logprobs or 0
                top = lp[j].topk(k) if k else None
                pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                lps[i] = TokenLogprob(toks[i], float(lp[j, toks[i]]), pairs)
        return toks, lps
