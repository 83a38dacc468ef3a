"""Speculative decoding for one sequence: a cheap proposer guesses k tokens, the target checks them in one call.

Why: at batch 1 on a CPU a forward call costs about the same for 1 token as for 5 (per-call overhead
and weight traffic dominate), so every accepted guess is a token almost for free. Two proposers:
  * a draft model (a smaller model with the same tokenizer, e.g. tiny drafting for small);
  * prompt lookup (draft-free): the last n tokens are searched for earlier in the context and the
    tokens that followed them are proposed; strong when the output repeats the prompt (RAG, code, edits).
Verification keeps the target's distribution exactly (Leviathan et al. 2023, Chen et al. 2023): draft
token d with draft probability q(d) is accepted with probability min(1, p(d) / q(d)); at the first
rejection the token is drawn from the residual max(0, p - q), renormalised; when every guess is accepted,
one more token is drawn from p. Greedy decoding is the limit: a guess is kept iff it is the target's
argmax, so the output is token-for-token that of plain greedy decoding (the tests check both).
Penalties depend on every earlier token and are not supported here (the caller falls back to plain decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinychat.errors import UserError
from tinychat.infer.sampling import BatchSampling, SamplingParams, filter_logits


@dataclass
class Speculative:
    """How to propose: a draft model, or prompt lookup when `draft` is None."""

    draft: torch.nn.Module | None = None
    k: int = 4  # tokens proposed per round
    ngram_max: int = 3  # prompt lookup: longest suffix searched for
    ngram_min: int = 1
    stats: dict[str, int] = field(default_factory=lambda: {"proposed": 0, "accepted": 0, "rounds": 0})

    @property
    def acceptance(self) -> float:
        return self.stats["accepted"] / max(1, self.stats["proposed"])


def probs_of(logits: torch.Tensor, sp: BatchSampling) -> torch.Tensor:
    """The distribution plain sampling draws from: temperature, then top-k/top-p/min-p, softmax (rows of (N, V))."""
    scaled = logits.float() / sp.temperature.clamp(min=1e-5)[:, None]
    return (filter_logits(scaled, sp) if sp.needs_filter else scaled).softmax(-1)


def lookup(context: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens."""
    for n in range(min(n_max, len(context) - 1), n_min - 1, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == tail:
                return context[start + n : start + n + k]
    return []


@torch.no_grad()
def speculative_generate_ids(
    model,  # noqa: ANN001 - the target tinychat Model
    prompt: list[int],
    params: SamplingParams,
    spec: Speculative,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int, int], bool] | None = None,
) -> tuple[list[int], str]:
    """(new ids, finish reason) for one prompt; on_token(0, id) as in generate_ids (True stops)."""
    params.validate()
    if params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
        raise UserError("speculative decoding does not support repetition/presence/frequency penalties.")
    draft = spec.draft
    if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
        raise UserError(
            f"the draft model's vocabulary ({draft.cfg.vocab_size}) differs from the target's "
            f"({model.cfg.vocab_size}); a draft must share the target's tokenizer."
        )
    device = next(model.parameters()).device
    stop_ids = set(stop_ids or ()) if params.stop_on_eos else set()
    greedy = params.temperature == 0
    sp = BatchSampling.stack([params], device)
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    virtual = getattr(model, "virtual_tokens", None)  # a prompt/prefix adapter's n positions come first
    nv = virtual.num_tokens if virtual is not None else 0
    ctx = model.cfg.max_seq_len - nv
    if len(prompt) >= ctx:
        raise UserError(f"the prompt has {len(prompt)} tokens but the context window is {ctx}.")
    budget = min(params.max_new_tokens, ctx - len(prompt))
    if draft is not None and draft.cfg.max_seq_len < len(prompt) + budget:
        raise UserError(f"the draft model's context window ({draft.cfg.max_seq_len}) is shorter than this generation.")
    cache = model.new_cache(1, max_len=len(prompt) + budget + spec.k + 1)
    dcache = draft.new_cache(1, max_len=len(prompt) + budget + spec.k + 1) if draft is not None else None
    tokens = list(prompt)  # the context; its last token is not in the target's cache yet ("pending")
    if len(prompt) > 1:
        model(torch.tensor([prompt[:-1]], device=device), cache)
    fed_draft = 0  # context tokens the draft's cache holds
    out: list[int] = []
    V = model.cfg.vocab_size
    while len(out) < budget:
        # 1. propose up to k tokens (never past the budget)
        k = min(spec.k, budget - len(out) - 1)
        guesses: list[int] = []
        q_rows: list[torch.Tensor] = []  # the draft's distributions (sampling with a draft model)
        if k > 0 and draft is not None:
            d_logits = draft(torch.tensor([tokens[fed_draft:]], device=device), dcache)[0, -1]
            fed_draft = len(tokens)
            for i in range(k):
                if greedy:
                    g = int(d_logits.argmax())
                else:
                    q = probs_of(d_logits[None], sp)[0]
                    g = int(torch.multinomial(q, 1, generator=gen))
                    q_rows.append(q)
                guesses.append(g)
                if i < k - 1:
                    d_logits = draft(torch.tensor([[g]], device=device), dcache)[0, -1]
                    fed_draft += 1
        elif k > 0:
            guesses = lookup(tokens, k, spec.ngram_max, spec.ngram_min)
        # 2. one target call scores the pending token's successor and every guess: (g+1, V)
        logits = model(torch.tensor([[tokens[-1], *guesses]], device=device), cache)[0]
        # 3. accept a prefix of the guesses, then one token from the target (the residual, or a bonus)
        accepted: list[int] = []
        nxt = None
        if greedy:
            best = logits.argmax(-1).tolist()
            for i, g in enumerate(guesses):
                if g != best[i]:
                    break
                accepted.append(g)
            nxt = best[len(accepted)]
        else:
            p_all = probs_of(logits, BatchSampling.stack([params] * len(logits), device))
            for i, g in enumerate(guesses):
                q = q_rows[i] if q_rows else torch.zeros(V, device=device).index_fill_(0, torch.tensor(g), 1.0)
                if float(torch.rand((), generator=gen)) < min(1.0, float(p_all[i, g]) / float(q[g])):
                    accepted.append(g)
                    continue
                residual = (p_all[i] - q).clamp(min=0)  # lookup's q is one-hot: p with g taken out
                nxt = int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
                break
            if nxt is None:
                nxt = int(torch.multinomial(p_all[len(accepted)], 1, generator=gen))
        spec.stats["rounds"] += 1
        spec.stats["proposed"] += len(guesses)
        spec.stats["accepted"] += len(accepted)
        # 4. drop the rejected guesses' keys/values (the next call writes over them)
        keep = len(tokens) + len(accepted)
        cache.rewind(nv + keep)  # the target's cache holds the virtual tokens first
        if dcache is not None:
            fed_draft = min(fed_draft, keep)
            dcache.rewind(fed_draft)
        for tok in [*accepted, nxt]:
            if tok in stop_ids:
                return out, "stop"
            out.append(tok)
            tokens.append(tok)
            if on_token is not None and on_token(0, tok):
                return out, "stop"
            if len(out) >= budget:
                return out, "length"
    return out, "length"
