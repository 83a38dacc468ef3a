"""An exponential moving average of the weights: checkpoint averaging done on the fly (`--train.ema DECAY`).

Why: the seed essays' Llama 3 recipe ends post-training by averaging checkpoints, and weight averaging
(EMA, or LAWA's average of the last k checkpoints) smooths the noise that the last steps' gradients
leave in the weights, most where the learning rate stays high. The average does not change training:
the optimiser steps the raw weights exactly as without it, so one run gives both models, and the
comparison between them is exact (docs/speedrun.md).

What is saved: the stage's final model directory holds the average; every step checkpoint holds the raw
weights (it resumes training) and the average beside them (ema.safetensors), so `--resume` continues
both. The average is kept in fp32 on the weights' device, one copy of the trainable parameters.

Warm-up: the decay at optimiser step t is min(decay, (1 + t) / (10 + t)), so the first steps' random
weights do not linger in the average of a short stage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinychat.errors import UserError

EMA_FILE = "ema.safetensors"


class WeightEMA:
    """The average of `model`'s trainable floating-point parameters, keyed by their state-dict names."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"--train.ema must be a decay in (0, 1), such as 0.99; got {decay}.")
        self.decay = decay
        named = [
            (k, v)
            for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter) and v.requires_grad and v.is_floating_point()
        ]
        self.names = [k for k, _ in named]  # a tied weight appears under both its names: averaged alike
        self.params = [v for _, v in named]
        self.avg = [v.detach().float().clone() for v in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights in after optimiser step `step` (1 for the first)."""
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: a.detach().cpu().contiguous() for k, a in zip(self.names, self.avg)}

    def merged(self, model_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model state dict with the averaged tensors in place of the raw ones (buffers, frozen ones kept)."""
        avg = self.state_dict()
        return {k: avg[k].to(v.dtype) if k in avg else v for k, v in model_sd.items()}

    def save(self, path: Path) -> None:
        save_file(self.state_dict(), str(path / EMA_FILE))

    def load(self, path: Path) -> bool:
        """Restore the average saved beside checkpoint `path`; False if it has none."""
        f = path / EMA_FILE
        if not f.is_file():
            return False
        saved = load_file(str(f))
        missing = [k for k in self.names if k not in saved]
        if missing:
            raise UserError(f"{f} does not average this model's {missing[0]}; resume without --train.ema.")
        for k, a in zip(self.names, self.avg):
            a.copy_(saved[k])
        return True

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the average inside the block (to evaluate it), its raw weights again after."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(self.params, raw):
                    p.copy_(r)
