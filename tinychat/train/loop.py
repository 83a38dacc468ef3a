"""The one training loop. Every objective (pretrain, SFT, reward, DPO, PPO, GRPO, distillation) runs here.

An objective only says what a step's batches are and what the loss of a batch is (`Objective` below);
the loop owns everything else: device and precision (fp16 with dynamic loss scaling), DDP/FSDP2, gradient
accumulation, the optimiser and schedule, clipping, budgets, evaluation, metrics, checkpoints, exact resume,
Ctrl-C and the NaN guard. So a new objective is one small file, and a fix to the loop reaches all of them.

Loss normalisation: an objective returns the *sum* of its per-unit losses for a micro-batch and the
number of units (target tokens, pairs, ...). The loop divides by the global count over all
micro-batches and ranks, so gradient accumulation and data parallelism give exactly the gradient of
the mean over the global batch, whatever the split.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinychat.data.shards import write_json_atomic
from tinychat.errors import UserError
from tinychat.model.hf import copy_tokenizer
from tinychat.model.moe import clear_router_stats, router_losses
from tinychat.tokenizer import Tokenizer
from tinychat.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tinychat.train.config import TrainConfig
from tinychat.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, wrap_model
from tinychat.train.ema import WeightEMA
from tinychat.train.metrics import Console, MetricsLog
from tinychat.train.mfu import autocast_dtype, peak_flops
from tinychat.train.optim import build_optimizer, lr_factor
from tinychat.train.parallel import clip_grad_norm
from tinychat.train.pipeline import Pipeline, PipelineForward
from tinychat.train.sparsity import SparsityMask
from tinychat.train.twins import apply_twins, fold_state


class Objective:
    """What an objective supplies to the loop; subclasses override the first five methods."""

    name: str = "objective"
    # whether the model met the chat template in training (post-training rows, or chat rows mixed into the
    # pretraining text): config.json records it as "tinychat_chat", and evaluation then asks the model through
    # the template (tinychat.eval.backend.detect_mode)
    chat: bool = False

    def setup(self, ctx: TrainContext) -> None:
        """Called once the device and world are known, before the first batch."""
        self.ctx = ctx

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        """This rank's micro-batches for optimiser step `step` (deterministic in step, rank, world)."""
        raise NotImplementedError

    def count(self, batch: Any) -> int:
        """Units the loss is averaged over (target tokens, pairs, ...)."""
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Tokens the model processes for this batch (forward), for throughput and MFU."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over units, {metric: summed value over units}) for one micro-batch."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Validation numbers; run on every rank (collectives allowed), logged by rank 0. A true "done" ends
        training early (every rank must agree)."""
        return {}

    def pipeline_io(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Pipeline parallelism only: the batch as (model input, target) tensors, cut into micro-batches along
        dim 0; the loss is then `pipeline_loss(model(input), target)`, computed on the last stage."""
        raise UserError(f"{self.name} does not support pipeline parallelism (pp in --train.mesh).")

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Pipeline parallelism only: the summed loss of one micro-batch from the last stage's output."""
        raise UserError(f"{self.name} does not support pipeline parallelism (pp in --train.mesh).")

    def progress(self, step: int) -> float:
        """Passes over the training data so far (for an epoch budget); 0 if not meaningful."""
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_model(self, model: torch.nn.Module, path: Path, state_dict: dict | None) -> None:
        """Write the trained module as a model directory (default: an HF causal LM)."""
        from tinychat.model.hf import save_pretrained

        save_pretrained(model, path, dtype=torch.float32, state_dict=state_dict)


@dataclass
class TrainContext:
    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    stage: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def grad_scaler(ctx: TrainContext) -> torch.amp.GradScaler:
    """Dynamic loss scaling, on for fp16 only: fp16's 5 exponent bits flush small gradients to zero without it.

    The scaler multiplies the loss before backward, divides the gradients again before clipping
    (`unscale_`), skips an optimiser step whose gradients overflowed (inf/NaN) and halves the scale, and
    doubles it after 2000 clean steps. Under FSDP each rank sees only its shard of the gradients, so the
    sharded scaler agrees on "overflowed" across ranks (DDP's gradients are already all-reduced).
    """
    enabled = ctx.amp_dtype == torch.float16
    if enabled and ((ctx.cfg.distributed == "fsdp" and ctx.dist.world > 1) or ctx.dist.mesh is not None):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(ctx.device.type, enabled=True)
    return torch.amp.GradScaler(ctx.device.type, enabled=enabled)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    model_dir: Path
    interrupted: bool = False
    last_eval: dict[str, Any] = field(default_factory=dict)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _step_budget(cfg: TrainConfig, tokens_per_step: int) -> int | None:
    budgets = []
    if cfg.max_steps:
        budgets.append(cfg.max_steps)
    if cfg.max_tokens:
        budgets.append(math.ceil(cfg.max_tokens / max(tokens_per_step, 1)))
    return min(budgets) if budgets else None


def time_budget(
    cfg: TrainConfig, step: int, tokens: int, elapsed: float, origin: tuple[float, int] | None = None
) -> float:
    """Seconds the time budget allows: max_time, less the time reserve_tokens take at the rate measured so far
    (from step 20 on; at most reserve_cap of the budget). A slower machine thus stops earlier and leaves later
    work whose cost grows with its slowness (the speedrun's drill and anneal, which train at this rate) its
    time. The cap matters where training is slow for a reason later work does not share: a CPU without fast
    bf16 trains in fp32 at half the rate but evaluates about as fast (docs/speedrun.md, round 11).
    `origin` = (elapsed, tokens) at step 20, which the loop passes: the rate is then measured from there, without
    the first steps' compilation (~40 s of inductor on a fresh clone, 10-15% of a speedrun's pretraining: priced
    into the reserve it would take the cap at step 20 and end the stage within ~100 steps).
    `reserve_floor` steps are kept whatever the reserve says, up to max_time: below ~650 pretraining steps the
    speedrun's model has not stored the facts yet (held-out facts after pretraining 17-46% at 389-511 steps, 45-82%
    at 594-700), and a run that lost a minute to an uncached compile and a slower hour had stopped at 489
    (docs/speedrun.md, round 35); the anneal, budgeted in what time is left, gives way instead."""
    total = cfg.max_time * 60
    if not cfg.reserve_tokens or step < 20 or tokens <= 0:
        return total
    start, done = origin if origin is not None else (0.0, 0)
    if tokens <= done:
        return total
    per_token = (elapsed - start) / (tokens - done)
    budget = total - min(cfg.reserve_tokens * per_token, total * cfg.reserve_cap)
    if cfg.reserve_floor > step:  # from that step on the reserve decides again, and stops the stage
        floor = start + (cfg.reserve_floor * tokens / step - done) * per_token  # its steps at the measured rate
        budget = max(budget, min(floor, total))
    return budget


class _Interrupt:
    """First Ctrl-C: finish the step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.flag = False
        self.previous = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    objective: Objective,
    module: torch.nn.Module,
    cfg: TrainConfig,
    run_dir: str | Path,
    stage: str,
    tokenizer_dir: str | Path | None = None,
    resume: bool = False,
    dist_info: DistInfo | None = None,
) -> TrainResult:
    """Train `module` with `objective` until a budget is spent; the result lands in run_dir/checkpoints/stage."""
    run_dir = Path(run_dir)
    stage_dir = run_dir / "checkpoints" / stage
    info = dist_info or init_distributed(cfg.device, cfg.mesh)
    device = info.device
    if not any((cfg.max_steps, cfg.max_tokens, cfg.max_time, cfg.epochs)):
        raise UserError("no training budget: set one of --train.max_steps, max_tokens, max_time or epochs.")
    if not 0.0 <= cfg.reserve_cap <= 1.0:
        raise UserError(f"--train.reserve_cap is a share of max_time between 0 and 1, not {cfg.reserve_cap}.")
    if cfg.reserve_floor < 0:
        raise UserError(f"--train.reserve_floor is a step count, 0 or more, not {cfg.reserve_floor}.")
    torch.manual_seed(cfg.seed)
    amp = autocast_dtype(device, cfg.precision)
    ctx = TrainContext(cfg, info, device, amp, run_dir, stage)
    raw = module.to(device)
    sharded = info.mesh is not None or (cfg.distributed == "fsdp" and info.world > 1)
    if cfg.twin_tokens:
        if sharded or tokenizer_dir is None:
            raise UserError("--train.twin_tokens needs whole parameters on each rank and the run's tokenizer.")
        n_pairs = apply_twins(raw, Tokenizer.from_pretrained(tokenizer_dir))
        if info.is_main:
            print(f"{stage}: {n_pairs} twin-token pairs share part of their embedding (--train.twin_tokens)")
    flops_tok = raw.flops_per_token(cfg.seq_len) if hasattr(raw, "flops_per_token") else 0.0  # the whole model's
    model = wrap_model(raw, info, cfg.distributed, cfg.activation_checkpointing, cfg.compile)
    optimizer = build_optimizer(model, cfg, device)
    mask = SparsityMask(raw) if cfg.keep_sparsity else None
    if mask is not None and (sharded or not mask):
        raise UserError(
            "--train.keep_sparsity needs whole parameters on each rank (no FSDP or tensor parallelism) and a "
            "model with zeros in its block Linears (`tinychat prune --method magnitude`)."
        )
    if cfg.ema and sharded:
        raise UserError("--train.ema needs whole parameters on each rank (no FSDP, tensor or pipeline parallelism).")
    ema = WeightEMA(raw, cfg.ema) if cfg.ema else None
    scaler = grad_scaler(ctx)
    objective.setup(ctx)
    pipe, eval_model = None, raw
    if info.mesh is not None and info.mesh["pp"].size() > 1:
        if scaler.is_enabled():
            raise UserError("pipeline parallelism does not support fp16 loss scaling; use --train.precision bf16.")
        pipe = Pipeline(model, info.mesh, device, cfg.pp_schedule, cfg.pp_microbatches, objective.pipeline_loss)
        eval_model = PipelineForward(pipe, raw.cfg.d_model, raw.cfg.vocab_size)

    log = MetricsLog(run_dir, stage, info.is_main, cfg.tensorboard)
    step, tokens, elapsed = 0, 0, 0.0
    origin: tuple[float, int] | None = None  # (elapsed, tokens) at step 20: the reserve's rate is measured from there
    if resume:
        ckpt = latest_checkpoint(stage_dir)
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, stage=pipe is not None)
            step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
            origin = tuple(state["rate_origin"]) if state.get("rate_origin") else None
            objective.load_state_dict(state.get("objective", {}))
            if scaler.is_enabled() and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])
            log.truncate_after(step)
            if ema is not None and not ema.load(ckpt) and info.is_main:
                print(f"note: {ckpt} holds no weight average; it starts again from the resumed weights", flush=True)
            if info.is_main:
                print(f"resumed {stage} from {ckpt} at step {step}", flush=True)
    elif latest_checkpoint(stage_dir) is not None and info.is_main:
        print(f"note: {stage_dir} holds checkpoints from an earlier run; starting fresh (use --resume to continue)")

    peak = 0.0
    if info.is_main:
        measured = peak_flops(device, amp or torch.float32, cfg.peak_flops)
        log.log(step, measured.record(), kind="peak")
        print(f"{stage}: {measured.describe()}", file=sys.stderr, flush=True)
        peak = measured.flops
    first = objective.micro_batches(step, raw)
    tokens_per_step = sum(objective.tokens(b) for b in first) * info.world
    total_steps = _step_budget(cfg, tokens_per_step)
    console = Console(info.is_main, total_steps, cfg.log_every, stage)
    is_ddp = hasattr(model, "no_sync")
    is_fsdp = hasattr(model, "set_requires_gradient_sync")

    def budget_progress(step: int, elapsed: float) -> float:
        """How much of the first budget to run out is spent (>= 1: stop); also drives the LR schedule."""
        return max(
            step / total_steps if total_steps else 0.0,
            elapsed / max(time_budget(cfg, step, tokens, elapsed, origin), 1e-9) if cfg.max_time else 0.0,  # cap 1: 0
            objective.progress(step) / cfg.epochs if cfg.epochs else 0.0,
        )

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "elapsed": elapsed,
            "rate_origin": list(origin) if origin else None,
            "stage": stage,
            "objective": objective.state_dict(),
            "world": info.world,
            "devices": info.devices,
            "grad_scaler": scaler.state_dict(),  # {} unless fp16
        }

    def checkpoint() -> Path:
        path = save_checkpoint(
            stage_dir, step, raw, optimizer, trainer_state(), tokenizer_dir, cfg.keep_checkpoints, info.is_main, pipe
        )
        if ema is not None and info.is_main:
            ema.save(path)
        barrier()
        return path

    last_loss, last_eval, interrupted = float("nan"), {}, False
    pending = first
    t_start = time.perf_counter() - elapsed
    with _Interrupt() as stop:
        while True:
            progress = budget_progress(step, elapsed)
            if progress >= 1.0:
                break
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, progress, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            batches = pending if pending is not None else objective.micro_batches(step, raw)
            pending = None
            model.train()
            count = all_reduce_sum(torch.tensor(float(sum(objective.count(b) for b in batches)), device=device))
            if count.item() <= 0:
                raise UserError(f"{stage}: step {step} has no training targets (every label is masked).")
            scale = info.world / count.item()  # DDP/FSDP average over ranks; undo it to get the global mean
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=device)
            if pipe is not None:  # the schedule runs forward and backward over its own micro-batches
                ios = [objective.pipeline_io(b) for b in batches]
                with ctx.autocast():
                    loss_sum = pipe.train_step(torch.cat([x for x, _ in ios]), torch.cat([y for _, y in ios]), scale)
                batches_left = []
            else:
                batches_left = batches
            for i, batch in enumerate(batches_left):
                last = i == len(batches_left) - 1
                if is_fsdp:
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if is_ddp and not last else contextlib.nullcontext()
                with sync:
                    clear_router_stats(raw)
                    with ctx.autocast():
                        loss, extra = objective.loss(model, batch)
                        aux, aux_metrics = router_losses(raw, objective.count(batch))  # MoE; (0, {}) if dense
                    extra = {**extra, **aux_metrics}
                    scaler.scale((loss.float() + aux) * scale).backward()
                loss_sum += loss.detach().float()
                for k, v in extra.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float()
            scaler.unscale_(optimizer)  # clip (and report) the true gradients, not the scaled ones
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            if info.mesh is not None:  # tensor / pipeline parallel: gradients on several meshes
                pp_group = pipe.group if pipe is not None else None
                grad_norm = torch.tensor(clip_grad_norm(list(model.parameters()), max_norm, pp_group))
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            reduced = all_reduce_sum(torch.stack([loss_sum, *sums.values()])) / count
            loss_value = reduced[0].item()
            loss_scale = scaler.get_scale() if scaler.is_enabled() else None
            finite_grads = math.isfinite(float(grad_norm))
            # fp16: an overflow skips the step and halves the scale; one even below scale 1 is a real divergence
            overflow = not finite_grads and loss_scale is not None and loss_scale >= 1.0
            if not math.isfinite(loss_value) or not (finite_grads or overflow):
                console.close()
                good = latest_checkpoint(stage_dir)
                where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {float(grad_norm)}"
                raise TrainingDiverged(
                    f"{stage}: the {what} is not finite at step {step}; stopped without saving, {where} "
                    "(lower --train.lr or raise --train.warmup_steps)."
                )
            scaler.step(optimizer)  # optimizer.step(), unless the fp16 gradients overflowed
            if mask is not None:
                mask.apply()  # a pruned weight stays pruned (train/sparsity.py)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.update(step)
            step_tokens = sum(objective.tokens(b) for b in batches) * info.world
            tokens += step_tokens
            dt = time.perf_counter() - t0
            elapsed = time.perf_counter() - t_start
            if step == 20 and origin is None:
                origin = (elapsed, tokens)
            tok_s = step_tokens / dt
            mfu = flops_tok * tok_s / (peak * info.devices) if peak and flops_tok else 0.0
            last_loss = loss_value
            rec = {
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tok_per_s": tok_s,
                "mfu": mfu,
                "step_time": dt,
                "elapsed": elapsed,
                **{k: v.item() for k, v in zip(sums, reduced[1:])},
            }
            if loss_scale is not None:
                rec.update(loss_scale=loss_scale, skipped=int(overflow))
            log.log(step, rec)
            eta = ""
            if total_steps:
                eta = f" | eta {(total_steps - step) * elapsed / max(step, 1) / 60:.1f}m"
            console.update(step, f"loss {loss_value:.4f} | {tok_s:,.0f} tok/s | mfu {mfu:.1%}{eta}")

            done_now = budget_progress(step, elapsed) >= 1.0  # the final evaluation and checkpoint follow
            if cfg.eval_every and step % cfg.eval_every == 0 and not done_now:
                last_eval = _evaluate(objective, eval_model, step, log, console, info)
                if last_eval.get("done"):  # the objective met its own goal: the final evaluation and save follow
                    break
            if stop.flag:
                interrupted = True
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not done_now:
                checkpoint()
        last_eval = _evaluate(objective, eval_model, step, log, console, info) if not interrupted else last_eval
        if ema is not None and not interrupted:  # the saved model is the average: its numbers too
            with ema.swapped_in():
                averaged = _evaluate(objective, eval_model, step, log, console, info, prefix="ema_")
            last_eval = {**last_eval, **averaged}
        path = checkpoint()
        if not interrupted:
            _save_final(objective, raw, stage_dir, tokenizer_dir, ctx, pipe, ema)
    console.close()
    log.close()
    if interrupted and info.is_main:
        print(f"interrupted at step {step}; saved {path}; continue with --resume", flush=True)
    return TrainResult(step, tokens, elapsed, last_loss, stage_dir, interrupted, last_eval)


def _evaluate(
    objective: Objective,
    model: torch.nn.Module,
    step: int,
    log: MetricsLog,
    console: Console,
    info: DistInfo,
    prefix: str = "",
) -> dict[str, Any]:
    """Evaluate the unwrapped module: no DDP hooks, and no torch.compile recompilation for no-grad shapes."""
    model.eval()
    with torch.no_grad():
        result = {prefix + k: v for k, v in objective.evaluate(model, step).items()}
    scalars = {k: v for k, v in result.items() if isinstance(v, int | float)}
    log.log(step, result, kind="eval")
    if scalars:
        console.write(f"eval @ {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    for sample in result.get("samples", [])[:3] if info.is_main else []:
        console.write(f"  sample: {json.dumps(sample, ensure_ascii=False)[:200]}")
    return result


def _save_final(
    objective: Objective,
    raw: torch.nn.Module,
    stage_dir: Path,
    tokenizer_dir: str | Path | None,
    ctx: TrainContext,
    pipe: Pipeline | None = None,
    ema: WeightEMA | None = None,
) -> None:
    """The stage's result as a plain model directory at checkpoints/STAGE/ (step dirs stay beside it); with
    --train.ema the weight average."""
    from tinychat.train.checkpoint import gather_stages, gather_state

    model_sd, _ = gather_stages(raw, None, pipe) if pipe else gather_state(raw, None)
    if ema is not None:
        model_sd = ema.merged(model_sd)
    model_sd = fold_state(raw, model_sd)
    if ctx.dist.is_main:
        objective.save_model(raw, stage_dir, model_sd)
        copy_tokenizer(tokenizer_dir, stage_dir)
        record_stage(stage_dir, ctx.stage, objective.chat)
    barrier()


def record_stage(model_dir: Path, stage: str, chat: bool) -> None:
    """config.json's record of how the model was trained: "tinychat_stage" and "tinychat_chat" (see Objective.chat),
    read by tinychat.eval.backend.detect_mode. transformers keeps unknown keys as attributes and ignores them. A
    prompt/prefix adapter's directory has no config.json: nothing is recorded there."""
    path = model_dir / "config.json"
    if path.is_file():
        write_json_atomic(path, {**json.loads(path.read_text()), "tinychat_stage": stage, "tinychat_chat": chat})
