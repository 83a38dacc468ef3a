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
only on a machine fast enough for it. On a CPU the cheapest shape is timed first, and a larger one whose step,
bounded from below by the cheapest one's scaled by their FLOPs, could not reach its target is not timed at all:
a 2-core CPU that trains in fp32 spent 15-25 s probing two shapes it could never choose (round 36).
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


def pick(predicted: Sequence[int], seconds: Sequence[float | None], targets: Sequence[int]) -> int:
    """The first shape (largest first) predicted to reach its target, else the fastest of those timed."""
    for i, (n, need) in enumerate(zip(predicted, targets, strict=True)):
        if n >= need:
            return i
    timed = [i for i, sec in enumerate(seconds) if sec is not None]
    return min(timed, key=lambda i: seconds[i])


# A larger shape's training step on a CPU takes at least this share of the cheapest shape's step scaled by their
# FLOPs per token: 0.85-0.97 measured on two 2-core EPYCs (fp32 and bf16) for 3 and 6 layers of d_model 256 against
# 3 of d_model 192 (docs/speedrun.md, round 36). On a GPU small shapes are overhead-bound, so every shape is timed.
CPU_FLOPS_SLACK = 0.7


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of a model of `mcfg` (Model.flops_per_token), without allocating its weights."""
    with torch.device("meta"):
        return Model(mcfg).flops_per_token(seq_len)


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
    speedrun keeps (runs/NAME/sizing.json): every shape considered, its step time, the seconds `later` prices
    the work after pretraining at for it plus `later_steps` of its own steps (stages budgeted in steps of the
    same shape, such as the speedrun's drill and anneal), both kept back from the budget, its predicted steps,
    the choice.

    Two shortcuts keep the probes cheap where the budget is tight, each taken only when it cannot change the
    choice by its own measure: on a CPU the cheapest shape (fewest FLOPs per token) is timed first, and a larger
    shape whose step, bounded from below by the cheapest one's scaled by their FLOPs (x CPU_FLOPS_SLACK), would
    leave it short of its target is not timed (its seconds_per_step None, its predicted steps that bound's); and
    `later` is not called for a shape whose own steps already leave it short of its target (later_seconds None,
    its predicted steps an upper bound). On a 2-core CPU that trains in fp32 the ladder's two larger shapes cost
    ~15-25 s of probes that could never be chosen (round 36)."""
    if not train.max_time:
        raise UserError("choosing a model shape needs a time budget (train.max_time) to predict steps in.")
    device = pick_device(train.device)
    targets = [shape_target(text, target_steps)[1] for text in shapes]
    configs = [resolve(model, vocab_size=vocab_size, **parse_shape(text)) for text in shapes]
    records: dict[int, dict[str, Any]] = {}

    def measure(i: int) -> dict[str, Any]:
        mcfg = configs[i]
        sec = step_seconds(mcfg, train, device)
        later_s = later_steps * sec
        steps = predicted_steps(train, sec, later_s)  # at most this: `later` only takes more
        priced = later is not None and steps >= targets[i]
        if priced:
            later_s += later(mcfg)
            steps = predicted_steps(train, sec, later_s)
        rec = {"shape": shapes[i], "seconds_per_step": round(sec, 4), "predicted_steps": steps}
        if later or later_steps:
            rec["later_seconds"] = round(later_s, 1) if priced or not later else None
        return rec

    yardstick = None
    if device.type == "cpu" and len(shapes) > 1:
        flops = [flops_per_token(m, train.seq_len) for m in configs]
        cheapest = min(range(len(shapes)), key=lambda i: flops[i])
        records[cheapest] = measure(cheapest)
        yardstick = (records[cheapest]["seconds_per_step"], flops[cheapest])
    for i in range(len(shapes)):
        if i not in records:
            if yardstick is not None and (bound := yardstick[0] * flops[i] / yardstick[1] * CPU_FLOPS_SLACK) > 0:
                most = predicted_steps(train, bound, later_steps * bound)
                if most < targets[i]:
                    records[i] = {"shape": shapes[i], "seconds_per_step": None, "predicted_steps": most}
                    continue
            records[i] = measure(i)
        if records[i]["predicted_steps"] >= targets[i]:
            break
    order = sorted(records)
    measured = [records[i] for i in order]
    chosen = pick(
        [m["predicted_steps"] for m in measured], [m["seconds_per_step"] for m in measured], [targets[i] for i in order]
    )
    return {"target_steps": target_steps, "measured": measured, "chosen": measured[chosen]["shape"]}
