"""Fit the model to the machine: the largest of a ladder of shapes that gets enough pretraining steps in
the time budget, chosen from measured step times, not guessed.

Why: the speedrun stores its facts only after enough optimiser steps (docs/speedrun.md: between ~350 and
~900 for the tiny model), and laptop CPUs differ by 2-3x in training speed. A CPU with fast bf16 trains the
3-layer tiny model at 4.7-7k tokens/s; one with AVX2 only trains in fp32 at ~2.6k, gets a third of the steps
and learns almost nothing in the same minutes (round 11). A shape that suits one machine starves on the
other, so the plan has to shrink with the machine.

How: each candidate's training step is timed on random tokens (its real forward with the fused head and
loss, backward and optimiser step, under the loop's autocast; two warm-up steps, then the fastest of
three), and the steps it would get are the stage's time budget (less its reserve, priced as the loop prices
it, and less the later work the caller prices for that shape: the speedrun's evaluation is slower for a wider
model) over that time. The first shape, largest first, that reaches `target_steps` is chosen; if none does,
the fastest. A shape may name its own target after an '@' ("n_layer=6@1100"): a deeper model needs more
steps than the default before it pays (docs/speedrun.md, rounds 10 and 21), so it is tried first and taken
only on a machine fast enough for it. A machine slower than that costs the shapes' few probe steps (~4 s
each) and gets what it got before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tinychat.device import pick_device
from tinychat.errors import UserError
from tinychat.model.config import ModelConfig, resolve
from tinychat.model.transformer import Model
from tinychat.train.config import TrainConfig
from tinychat.train.loop import time_budget
from tinychat.train.mfu import autocast_dtype
from tinychat.train.optim import build_optimizer
from tinychat.train.pretrain import lm_loss


def shape_target(text: str, default: int) -> tuple[str, int]:
    """'n_layer=6@1100' -> ('n_layer=6', 1100); a shape without '@' needs `default` steps."""
    shape, sep, steps = text.partition("@")
    if not sep:
        return text.strip(), default
    if not steps.strip().isdigit() or int(steps) <= 0:
        raise UserError(f"shape '{text}': the steps after '@' must be a positive whole number.")
    return shape.strip(), int(steps)


def parse_shape(text: str) -> dict[str, Any]:
    """'n_layer=2,d_model=192' -> {'n_layer': 2, 'd_model': 192}: [model] options, integers or numbers (a
    target written after '@' is not an option, and is ignored here)."""
    known = {f for f in ModelConfig.__dataclass_fields__}
    out: dict[str, Any] = {}
    for part in (p.strip() for p in shape_target(text, 0)[0].split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise UserError(f"shape '{text}': '{part}' is not a [model] option written as key=value.")
        try:
            out[key] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise UserError(f"shape '{text}': the value of {key} is not a number.") from None
    if not out:
        raise UserError("an empty shape; write at least one [model] option as key=value.")
    return out


def step_seconds(mcfg: ModelConfig, train: TrainConfig, device: torch.device, steps: int = 3, warmup: int = 2) -> float:
    """Seconds of one training step of a fresh `mcfg` model on random (batch, seq_len) tokens: the fastest of
    `steps` after `warmup` untimed ones. The fastest, because interference only ever adds time: inside a
    speedrun one probe read 1.75 s where the same step, alone, takes 1.14-1.17 s."""
    torch.manual_seed(0)
    model = Model(mcfg).to(device).train()
    optimizer = build_optimizer(model, train, device)
    amp = autocast_dtype(device, train.precision)
    x = torch.randint(0, mcfg.vocab_size, (train.batch_size, train.seq_len + 1), device=device)
    times = []
    for i in range(warmup + steps):  # the first steps allocate and warm caches: not timed
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = lm_loss(model, x[:, :-1], x[:, 1:]) / x[:, 1:].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def predicted_steps(train: TrainConfig, seconds_per_step: float, later_seconds: float = 0.0) -> int:
    """Steps the time budget holds at this step time, after the reserve the loop would keep at that rate and
    `later_seconds` kept back for later work."""
    tokens = train.batch_size * train.seq_len
    budget = time_budget(train, 20, 20 * tokens, 20 * seconds_per_step) - later_seconds
    return max(int(budget / seconds_per_step), 0)


def pick(predicted: Sequence[int], seconds: Sequence[float], targets: Sequence[int]) -> int:
    """The first shape (largest first) predicted to reach its target, else the fastest."""
    for i, (n, need) in enumerate(zip(predicted, targets, strict=True)):
        if n >= need:
            return i
    return min(range(len(seconds)), key=lambda i: seconds[i])


def choose_shape(
    model: ModelConfig,
    train: TrainConfig,
    shapes: Sequence[str],
    target_steps: int,
    vocab_size: int,
    later: Callable[[ModelConfig], float] | None = None,
    later_steps: float = 0.0,
) -> dict[str, Any]:
    """Time the shapes in order and stop at the first that reaches its target; returns the record the
    speedrun keeps (runs/NAME/sizing.json): every shape measured, its step time, the seconds `later` prices
    the work after pretraining at for it plus `later_steps` of its own steps (stages budgeted in steps of the
    same shape, such as the speedrun's drill and anneal), both kept back from the budget, its predicted steps,
    the choice. `later` is not called for a shape whose own steps already leave it short of its target (its
    later_seconds are then None, its predicted steps an upper bound): on a 2-core CPU that trains in fp32 each
    such call is a generation probe of 2-4 s for a shape that cannot be chosen."""
    if not train.max_time:
        raise UserError("choosing a model shape needs a time budget (train.max_time) to predict steps in.")
    device = pick_device(train.device)
    measured: list[dict[str, Any]] = []
    targets: list[int] = []
    for text in shapes:
        targets.append(shape_target(text, target_steps)[1])
        overrides = parse_shape(text)
        mcfg = resolve(model, vocab_size=vocab_size, **overrides)
        sec = step_seconds(mcfg, train, device)
        later_s = later_steps * sec
        steps = predicted_steps(train, sec, later_s)  # at most this: `later` only takes more
        priced = later is not None and steps >= targets[-1]
        if priced:
            later_s += later(mcfg)
            steps = predicted_steps(train, sec, later_s)
        measured.append({"shape": text, "seconds_per_step": round(sec, 4), "predicted_steps": steps})
        if later or later_steps:
            measured[-1]["later_seconds"] = round(later_s, 1) if priced or not later else None
        if steps >= targets[-1]:
            break
    chosen = pick([m["predicted_steps"] for m in measured], [m["seconds_per_step"] for m in measured], targets)
    return {"target_steps": target_steps, "measured": measured, "chosen": measured[chosen]["shape"]}
