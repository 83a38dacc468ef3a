"""Turning next-token logits into tokens: penalties, truncation (top-k, top-p, min-p) and sampling.

Everything works on a whole batch at once (B, V) so the generation loop and the serving engine never
loop over sequences in Python. Each row may carry its own parameters (the engine mixes requests), so
every knob is a (B,) tensor internally; `SamplingParams` is the per-request, user-facing form.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tinychat.errors import UserError


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus mass kept
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    repetition_penalty: float = 1.0  # CTRL/HF style: >1 discourages tokens already in the context
    presence_penalty: float = 0.0  # OpenAI style: subtract once if the token appeared in the output
    frequency_penalty: float = 0.0  # OpenAI style: subtract per appearance in the output
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    seed: int | None = None

    def validate(self) -> None:
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg + ".")


@dataclass
class BatchSampling:
    """SamplingParams stacked into (B,) tensors, so mixed requests are sampled in one call."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor

    # decided once per batch so the decode loop skips work (a full-vocabulary sort) nobody asked for;
    # a caller that knows them from the Python-side parameters passes them and saves the device syncs
    any_sampling: bool | None = None
    needs_filter: bool | None = None
    needs_penalties: bool | None = None

    def __post_init__(self) -> None:
        if self.any_sampling is None:
            self.any_sampling = bool((self.temperature > 0).any())
        if self.needs_filter is None:
            self.needs_filter = bool((self.top_k > 0).any() or (self.top_p < 1).any() or (self.min_p > 0).any())
        if self.needs_penalties is None:
            self.needs_penalties = bool(
                (self.repetition_penalty != 1).any()
                or (self.presence_penalty != 0).any()
                or (self.frequency_penalty != 0).any()
            )

    def select(self, rows: torch.Tensor) -> BatchSampling:
        """The parameters of `rows` only, in that order (the decided flags carry over)."""
        cols = {f.name: getattr(self, f.name) for f in fields(self)}
        return BatchSampling(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in cols.items()})

    @staticmethod
    def flags(p: SamplingParams) -> tuple[bool, bool, bool]:
        """(samples, filters, penalises) of one request, from its Python-side parameters."""
        return (
            p.temperature > 0,
            p.temperature > 0 and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0),
            p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0,
        )

    @classmethod
    def stack(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> BatchSampling:
        def col(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        return cls(
            col("temperature"),
            col("top_k", torch.long),
            col("top_p"),
            col("min_p"),
            col("repetition_penalty"),
            col("presence_penalty"),
            col("frequency_penalty"),
        )


def apply_penalties(
    logits: torch.Tensor,  # (B, V) float32
    context_mask: torch.Tensor,  # (B, V) bool: token appears in prompt or output
    output_counts: torch.Tensor,  # (B, V) times each token appeared in the output so far
    sp: BatchSampling,
) -> torch.Tensor:
    if not sp.needs_penalties:
        return logits
    rp = sp.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rp, logits * rp)
    logits = torch.where(context_mask, penalised, logits)
    logits = logits - sp.frequency_penalty[:, None] * output_counts
    return logits - sp.presence_penalty[:, None] * (output_counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, sp: BatchSampling) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows with the knob off are untouched."""
    V = logits.shape[-1]
    neg = torch.finfo(logits.dtype).min
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(sp.top_k > 0, sp.top_k.clamp(max=V), torch.full_like(sp.top_k, V))
    drop = ranks >= k[:, None]
    probs = sorted_logits.softmax(-1)
    # top-p: keep the smallest prefix whose mass reaches p (the token that crosses p is kept)
    mass_before = probs.cumsum(-1) - probs
    drop |= mass_before >= sp.top_p[:, None]
    drop |= probs < sp.min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, neg)
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, sp: BatchSampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) after penalties; temperature 0 rows are greedy."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    if not sp.any_sampling:
        return greedy
    t = sp.temperature.clamp(min=1e-5)[:, None]
    scaled = logits / t
    probs = (filter_logits(scaled, sp) if sp.needs_filter else scaled).softmax(-1)
    # exponential-race sampling (argmax p/E) is one vectorised call and honours the generator
    u = torch.empty_like(probs).exponential_(1.0, generator=generator)
    sampled = (probs / u).argmax(-1)
    return torch.where(sp.temperature > 0, sampled, greedy)
