"""Training speed, tinychat vs a plain nanoGPT-style loop, in one run: throughput and MFU, or time to equal loss.

    .venv/bin/python bench/train.py [--presets tiny,small] [--steps 30] [--compile]
    .venv/bin/python bench/train.py --time-to-loss [--ttl-seconds 150] [--presets tiny,small] [--out ttl.json]

Throughput (default). Both train on the same batches of real text (the Python standard library's source,
tokenized with a BPE tokenizer trained here — offline and deterministic) with the same batch shape,
learning rate and schedule. tinychat runs through its real training loop (tinychat.train.loop.train);
the baseline is bench/nanogpt_baseline.py. Printed: tokens/s (median step after warm-up), MFU against
this machine's measured matmul peak, the mean loss of the last steps, and the ratio. Same recipe and the
same optimizer implementation (AdamW, fused as tinychat's loop builds it: see baseline_optimizer), so the
ratio is speed per step of the two blocks — tinychat's (RMSNorm, SwiGLU, RoPE, GQA, QK-norm) against
GPT-2's (LayerNorm, GELU, learned positions) — and nothing else. The header prints both sides' optimizer
and learning rate.

Time to loss (--time-to-loss). Issue 4's goal is "at least 1.3x faster than the baseline on CPU at
equal loss", which is a wall-clock question about model + recipe, not tokens/s: tinychat's
Qwen3-style model (RMSNorm, RoPE, SwiGLU, GQA, QK-norm, tied embeddings) with tinychat's shipped
recipe, against nanoGPT's GPT-2 block (LayerNorm, GELU, learned positions, tied embeddings) with
nanoGPT's own recipe, each for the same wall-clock budget. Every choice, and why:

* Data: the speedrun's own. A tinyworld is generated (SpeedrunConfig's world size and seed), a BPE
  tokenizer of the speedrun's vocabulary size is trained on its pretraining text, and that text is
  tokenized into shards by tinychat.data.tokenize with the speedrun's val_fraction — the held-out
  documents are the validation set the speedrun reports. (The speedrun runs `data prepare` first:
  cleaning, PII scrubbing, and de-duplication that drops 36 of 5,220 documents; skipped here.) Both
  models read identical batches in identical order: the tinychat arm through PretrainObjective's
  PackedLoader, the baseline through a PackedLoader with the same seed; the batch shape is the
  recipe's for both.
* Models: the preset's widths for both. tinychat's tiny/small presets use d_ff = 3d and GQA, which
  makes a block exactly as large as GPT-2's 12d^2, so the counts match to within the baseline's
  learned position table (both counts are printed).
* Precision: one for both, the one the speedrun uses on this machine (`precision = "auto"`: bf16
  autocast where the matmul probe shows it faster, else fp32); --precision overrides.
* tinychat's recipe: configs/cpu-tiny.toml's [pretrain] training config unchanged (AdamW fused,
  lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, 50 warm-up steps, cosine to 0.05x, grad clip
  1.0), with the budget swapped: max_time = --ttl-seconds. The same recipe for the small preset —
  it is what ships; nothing is tuned on the validation set here.
* The baseline's recipe: nanoGPT's setting for small models, config/train_shakespeare_char.py
  ("baby GPT"): AdamW lr 1e-3, betas 0.9/0.99 (nanoGPT raises beta2 there because a step has few
  tokens — ours have fewer still), fused like tinychat's (nanoGPT's own is non-fused on a CPU),
  weight decay 0.1 on matrices, cosine to lr/10, grad clip 1.0,
  dropout 0 (nanoGPT's pretraining default; both models have none). Its warm-up of 100 iterations was
  sized for a 5,000-iteration run; here both arms use tinychat's 50 steps, so the warm-up is not a
  difference (at a few hundred steps, 100 would cost the baseline). --baseline-lr gives nanoGPT's
  GPT-2 default 6e-4 (or anything else) to check the baseline is not lr-starved.
* Schedule over the time budget, for both: the learning rate follows lr_factor(step, elapsed /
  budget) and training stops when the budget is spent — tinychat's loop does exactly this with
  max_time (budget_progress), and the baseline loop below copies those semantics.
* Evaluation never runs inside the timed region. About every --ttl-seconds/20 seconds each arm copies
  its weights (tens of ms, subtracted from the clock); after its run every copy is evaluated on all
  the validation batches under the same autocast. A point is (training seconds excluding the copies,
  tokens seen, val loss); there is one at step 0 and one at the end.
* Result: L* = the higher of the two final val losses, normally the baseline's (L_b). The seconds
  (and tokens) each run took to first reach L* are interpolated linearly between its points, and the
  ratio is baseline seconds / tinychat seconds ("x faster at equal loss"); the same with tokens. If
  tinychat ends above the baseline, L* is tinychat's final loss and the ratio comes out below 1.
  Comparing a mid-run point of tinychat (learning rate not yet annealed) with the annealed end of
  the baseline favours the baseline, so the ratio is conservative for tinychat.
The arms run one after the other in this process (baseline first), so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nanogpt_baseline import GPT  # noqa: E402

from tinychat.model import Model, preset  # noqa: E402
from tinychat.train.config import TrainConfig  # noqa: E402
from tinychat.train.loop import Objective, train  # noqa: E402
from tinychat.train.metrics import read_metrics  # noqa: E402
from tinychat.train.mfu import autocast_dtype, measure_peak_flops  # noqa: E402
from tinychat.train.optim import lr_factor  # noqa: E402
from tinychat.train.pretrain import PretrainObjective, lm_loss, summed_ce  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def corpus_tokens(vocab: int, n_tokens: int) -> torch.Tensor:
    from tinychat.tokenizer import train_tokenizer

    root = Path(argparse.__file__).parent  # the standard library's own source: real text, always present
    files = sorted(root.glob("*.py"))[:200]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = train_tokenizer(texts, vocab)
    ids: list[int] = []
    for t in tok.encode_batch(texts):
        ids.extend(t + [tok.eot_id])
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


class StreamObjective(Objective):
    """Batches cut from one token tensor by step — identical for tinychat and the baseline."""

    name = "bench"

    def __init__(self, data: torch.Tensor, batch: int, seq: int, fused: bool = True) -> None:
        self.data, self.B, self.T, self.fused = data, batch, seq, fused

    def batch_at(self, step: int) -> Batch:
        n = self.B * (self.T + 1)
        start = (step * n) % (len(self.data) - n)
        w = self.data[start : start + n].view(self.B, self.T + 1)
        return w[:, :-1], w[:, 1:]

    def micro_batches(self, step, model):  # noqa: ANN001
        return [self.batch_at(step)]

    def count(self, b) -> int:  # noqa: ANN001
        return b[1].numel()

    def tokens(self, b) -> int:  # noqa: ANN001
        return b[0].numel()

    def loss(self, model: torch.nn.Module, b: Batch) -> tuple[torch.Tensor, dict]:
        if self.fused:  # the shipped path: the head and the loss in row chunks (model/loss.py)
            return lm_loss(model, *b), {}
        return summed_ce(model(b[0]), b[1]), {}  # the (tokens, vocab) logits, then the cross-entropy


def amp_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


def train_tinychat(model: Model, objective: Objective, cfg: TrainConfig) -> list[dict]:
    """Train through tinychat's real loop in a scratch run directory; its per-step records (metrics.jsonl)."""
    with tempfile.TemporaryDirectory() as d:
        train(objective, model, cfg, d, "bench")
        return read_metrics(Path(d), "bench", "train")


# What each arm is, printed in both modes' headers so that every ratio says what it compares.
TINYCHAT_BLOCK = "RMSNorm, SwiGLU, RoPE, GQA, QK-norm, tied embeddings"
BASELINE_BLOCK = "LayerNorm, GELU MLP, learned positions, tied embeddings"
# tinychat.train.optim.build_optimizer asks for fused AdamW on a CPU (and CUDA); the baseline gets the same.
FUSED = True


def baseline_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    """nanoGPT's parameter groups (decay on matrices only), in the AdamW implementation tinychat's loop uses.

    nanoGPT's own configure_optimizer is non-fused on a CPU; building the same groups with fused=FUSED
    (and tinychat's eps) takes the optimizer kernel out of the comparison.
    """
    groups = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2)).param_groups
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if g["params"]]
    betas = (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=FUSED or None)


def optimizer_line(impl: str, c: TrainConfig) -> str:
    return (
        f"  {impl:<9} AdamW {'fused' if FUSED else 'non-fused'}, lr {c.lr:g}, betas {c.beta1}/{c.beta2}, "
        f"wd {c.weight_decay}, warmup {c.warmup_steps}, {c.schedule} to {c.min_lr_ratio:g}x, clip {c.grad_clip}; "
        f"block: {TINYCHAT_BLOCK if impl == 'tinychat' else BASELINE_BLOCK}"
    )


def train_baseline(
    model: GPT,
    cfg: TrainConfig,
    batch_at: Callable[[int], Batch],
    amp: torch.dtype | None,
    after_step: Callable[[torch.nn.Module, int], None] | None = None,
) -> list[dict]:
    """nanoGPT's training step, looped with tinychat's budget semantics so both arms stop and anneal alike.

    Budget: cfg.max_steps and/or cfg.max_time (minutes); the learning rate is lr_factor(step, progress)
    where progress is the larger spent share, as budget_progress() in tinychat.train.loop. Returns
    records with the keys tinychat's loop logs (step, loss, tokens, step_time, elapsed).
    """
    opt = baseline_optimizer(model, cfg)
    recs: list[dict] = []
    step, tokens, elapsed = 0, 0, 0.0
    t_start = time.perf_counter()
    while True:
        progress = max(
            step / cfg.max_steps if cfg.max_steps else 0.0, elapsed / (cfg.max_time * 60) if cfg.max_time else 0.0
        )
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, progress, cfg)
        x, y = batch_at(step)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        rec = {"step": step, "loss": loss.item(), "tokens": tokens, "step_time": time.perf_counter() - t0}
        elapsed = time.perf_counter() - t_start
        recs.append({**rec, "elapsed": elapsed})
        if after_step is not None:
            after_step(model, step)
    return recs


def run_tinychat(name: str, amp: str, data: torch.Tensor, cfg: TrainConfig, compile: bool, fused: bool = True) -> dict:
    torch.manual_seed(0)
    model = Model(preset(name, vocab_size=int(data.max()) + 1))
    tc = dataclasses.replace(cfg, precision=amp, compile=compile)
    recs = train_tinychat(model, StreamObjective(data, cfg.batch_size, cfg.seq_len, fused), tc)
    flops = model.flops_per_token(cfg.seq_len)
    return summarise([r["step_time"] for r in recs], [r["loss"] for r in recs], flops, cfg, model.num_params())


def run_baseline(name: str, amp: str, data: torch.Tensor, cfg: TrainConfig) -> dict:
    torch.manual_seed(0)
    p = preset(name)
    model = GPT(int(data.max()) + 1, p.d_model, p.n_layer, p.n_head, cfg.seq_len)
    obj = StreamObjective(data, cfg.batch_size, cfg.seq_len)
    recs = train_baseline(model, cfg, obj.batch_at, amp_dtype(amp))
    n = sum(p.numel() for p in model.parameters())
    times, losses = [r["step_time"] for r in recs], [r["loss"] for r in recs]
    return summarise(times, losses, model.flops_per_token(cfg.seq_len), cfg, n)


def summarise(times: list[float], losses: list[float], flops: float, cfg: TrainConfig, params: int) -> dict:
    warm = max(3, len(times) // 3)
    tok_s = cfg.batch_size * cfg.seq_len / statistics.median(times[warm:])
    return {"tok_s": tok_s, "flops": flops, "loss": statistics.mean(losses[-5:]), "params": params}


def throughput(args: argparse.Namespace) -> None:
    cfg = TrainConfig(
        device="cpu",  # the baseline always runs on the CPU, and the peak below is the CPU's
        max_steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=2e-3,
        warmup_steps=5,
        eval_every=0,
        checkpoint_every=0,
        tensorboard=False,
        log_every=10**9,
    )
    data = corpus_tokens(8192, 2_000_000)
    cpu = torch.device("cpu")
    peak = {
        a: measure_peak_flops(cpu, d, seconds=1.5, use_cache=False)
        for a, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured matmul peak: "
        f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s; "
        f"{args.steps} steps of {args.batch_size}x{args.seq_len} tokens, {len(data):,} tokens of stdlib source"
    )
    print("same recipe and optimizer for both; the ratio compares the blocks' speed per step:")
    for impl in ("tinychat", "baseline"):
        print(optimizer_line(impl, cfg))
    head = f"{'preset':<7}{'prec':<6}{'impl':<20}{'params':>8}{'tok/s':>9}{'MFU':>7}{'loss':>8}{'vs baseline':>13}"
    print(head)
    for name in args.presets.split(","):
        for amp in ("fp32", "bf16"):
            rows = [
                ("nanoGPT baseline", run_baseline(name, amp, data, cfg)),
                ("tinychat", run_tinychat(name, amp, data, cfg, compile=False)),
                ("tinychat logits+CE", run_tinychat(name, amp, data, cfg, compile=False, fused=False)),
            ]
            if args.compile:
                rows.append(("tinychat+compile", run_tinychat(name, amp, data, cfg, compile=True)))
            base = rows[0][1]["tok_s"]
            for impl, r in rows:
                mfu = r["flops"] * r["tok_s"] / peak[amp]
                print(
                    f"{name:<7}{amp:<6}{impl:<20}{r['params'] / 1e6:>7.1f}M{r['tok_s']:>9.0f}{mfu:>7.1%}"
                    f"{r['loss']:>8.3f}{r['tok_s'] / base:>12.2f}x",
                    flush=True,
                )


# ---------------------------------------------------------------- time to loss

# nanoGPT's config/train_shakespeare_char.py, its setting for small models (see the module docstring);
# warmup_steps comes from tinychat's recipe so that the warm-up is not one of the differences.
NANOGPT_RECIPE = dict(
    lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, min_lr_ratio=0.1, schedule="cosine"
)
TTL_POINTS = 20  # weight copies per run: enough to interpolate, few enough to evaluate quickly afterwards


def shipped_recipe() -> TrainConfig:
    """The pretraining TrainConfig the speedrun uses: configs/cpu-tiny.toml's [train] + [pretrain.train]."""
    from tinychat.cli import COMMANDS
    from tinychat.config import parse_args
    from tinychat.speedrun import SpeedrunConfig, preset_path
    from tinychat.train.pretrain import PretrainConfig

    argv = ["--config", str(preset_path(SpeedrunConfig().preset))]
    sections = {c.replace(" ", "_") for c in COMMANDS}
    return parse_args(PretrainConfig, argv, section="pretrain", sections=sections).train


def tinyworld_tokens(root: Path) -> tuple[Path, Any]:
    """The speedrun's data under root: world -> tokenizer -> token shards with a validation split."""
    from tinychat.data.tokenize import TokenizeConfig, tokenize
    from tinychat.speedrun import SpeedrunConfig
    from tinychat.tokenizer import train_tokenizer
    from tinychat.world.generate import generate_world

    sr = SpeedrunConfig()
    world = generate_world(root / "world", seed=sr.seed, size=sr.world_size)
    text = world.path("pretrain/train.jsonl")
    with text.open(encoding="utf-8") as f:
        tok = train_tokenizer((json.loads(line)["text"] for line in f), sr.vocab_size)
    out = root / "tokens"
    cfg = TokenizeConfig(input=[text], out=out, val_fraction=sr.val_fraction, workers=1, progress=False)
    tokenize(cfg, tok)
    return out, tok


class Snapshots:
    """Copies of the weights taken about every `every` seconds, so evaluation can wait until training is over.

    Called after every step; `spent` is the seconds spent copying so far, which the curve subtracts
    from the training clock (a copy at step s happens after that step's `elapsed` was recorded).
    """

    def __init__(self, every: float, model: torch.nn.Module) -> None:
        self.every, self.spent = every, 0.0
        self.items: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # (step, spent before, weights)
        self.take(model, 0)  # the initial weights, before the clock starts: not counted
        self.spent = 0.0

    def take(self, model: torch.nn.Module, step: int) -> None:
        t0 = time.perf_counter()
        if not self.items or self.items[-1][0] != step:
            self.items.append((step, self.spent, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        self.spent += time.perf_counter() - t0
        self.last = time.perf_counter()

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        if time.perf_counter() - self.last >= self.every:
            self.take(model, step)


class SnapshotObjective(PretrainObjective):
    """tinychat's pretraining objective, whose evaluation (every step) is a clock-gated weight copy."""

    def __init__(self, data_dir: Path, tok: Any, cfg: TrainConfig, snapshots: Snapshots) -> None:
        super().__init__(data_dir, tok, cfg, samples=[])
        self.snapshots = snapshots

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        self.snapshots(model, step)
        return {}


@torch.no_grad()
def curve(
    model: torch.nn.Module,
    snaps: Snapshots,
    recs: list[dict],
    loss_fn: Callable[[Batch], torch.Tensor],
    val: list[Batch],
    amp: torch.dtype | None,
) -> list[dict]:
    """(seconds of training excluding copies, tokens, val loss) at every copy: the mean loss over `val`."""
    by_step = {0: {"elapsed": 0.0, "tokens": 0}} | {r["step"]: r for r in recs}
    points = []
    model.eval()
    for step, spent, state in snaps.items:
        model.load_state_dict(state)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = statistics.fmean(float(loss_fn(b)) for b in val)
        r = by_step[step]
        points.append({"step": step, "seconds": r["elapsed"] - spent, "tokens": r["tokens"], "val_loss": loss})
    return points


def first_reach(points: list[dict], target: float, key: str) -> float | None:
    """`key` (seconds or tokens) where the val loss first falls to `target`, linear between points."""
    if points[0]["val_loss"] <= target:
        return points[0][key]
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= target:
            f = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[key] + f * (b[key] - a[key])
    return None


def ttl_arm(impl: str, name: str, data_dir: Path, tok: Any, cfg: TrainConfig, val: list[Batch]) -> dict:
    """Train one arm for cfg.max_time and return its parameter count, step count and val-loss curve."""
    from tinychat.data.loader import PackedLoader

    amp = amp_dtype(cfg.precision)
    every = cfg.max_time * 60 / TTL_POINTS
    torch.manual_seed(cfg.seed)
    if impl == "tinychat":
        model: torch.nn.Module = Model(preset(name, vocab_size=tok.vocab_size))
        snaps = Snapshots(every, model)
        recs = train_tinychat(model, SnapshotObjective(data_dir, tok, cfg, snaps), cfg)
        params = model.num_params()

        def loss_fn(b: Batch) -> torch.Tensor:
            return lm_loss(model, *b) / b[1].numel()
    else:
        p = preset(name)
        model = GPT(tok.vocab_size, p.d_model, p.n_layer, p.n_head, cfg.seq_len)
        snaps = Snapshots(every, model)
        loader = PackedLoader(data_dir, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        recs = train_baseline(model, cfg, loader.batch, amp, after_step=snaps)
        params = sum(q.numel() for q in model.parameters())

        def loss_fn(b: Batch) -> torch.Tensor:
            return model(*b)

    snaps.take(model, recs[-1]["step"])  # the end of the run (skipped if the last copy was this step)
    points = curve(model, snaps, recs, loss_fn, val, amp)
    return {"params": params, "steps": recs[-1]["step"], "points": points}


def time_to_loss(args: argparse.Namespace) -> None:
    from tinychat.data.loader import val_batches

    base_cfg = shipped_recipe()
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if autocast_dtype(torch.device("cpu"), "auto") is not None else "fp32"
    tc_cfg = dataclasses.replace(
        base_cfg,
        device="cpu",
        precision=precision,
        max_time=args.ttl_seconds / 60,
        max_steps=0,
        max_tokens=0,
        epochs=0.0,
        eval_every=1,  # SnapshotObjective decides by the clock
        checkpoint_every=0,
        tensorboard=False,
        log_every=10**9,
    )
    nano_cfg = dataclasses.replace(tc_cfg, **{**NANOGPT_RECIPE, "lr": args.baseline_lr})
    results: dict[str, Any] = {
        "budget_s": args.ttl_seconds,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "recipes": {"tinychat": dataclasses.asdict(tc_cfg), "baseline": dataclasses.asdict(nano_cfg)},
        "presets": {},
    }
    with tempfile.TemporaryDirectory() as d:
        data_dir, tok = tinyworld_tokens(Path(d))
        index = json.loads((data_dir / "index.json").read_text())
        val = list(val_batches(data_dir, tc_cfg.batch_size, tc_cfg.seq_len))
        print(
            f"time to loss: torch {torch.__version__}, {torch.get_num_threads()} threads, {precision}; "
            f"{args.ttl_seconds:g} s per arm; tinyworld: {index['splits']['train']['tokens']:,} train tokens, "
            f"{len(val) * tc_cfg.batch_size * tc_cfg.seq_len:,} val tokens, vocab {tok.vocab_size}; "
            f"batch {tc_cfg.batch_size}x{tc_cfg.seq_len}"
        )
        print(
            "each arm's own recipe and block; the ratios compare model + recipe"
            + (" at equal learning rates:" if tc_cfg.lr == nano_cfg.lr else " at UNEQUAL learning rates:")
        )
        for impl, c in (("tinychat", tc_cfg), ("baseline", nano_cfg)):
            print(optimizer_line(impl, c), flush=True)
        head = (
            f"{'preset':<7}{'impl':<20}{'params':>8}{'steps':>7}{'tokens':>9}{'train s':>9}{'tok/s':>7}"
            f"{'val loss':>10}{'s to L*':>10}{'tok to L*':>12}"
        )
        print(head, flush=True)
        for name in args.presets.split(","):
            base = ttl_arm("baseline", name, data_dir, tok, nano_cfg, val)
            tiny = ttl_arm("tinychat", name, data_dir, tok, tc_cfg, val)
            results["presets"][name] = report(name, base, tiny)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"curves: {args.out}")


def report(name: str, base: dict, tiny: dict) -> dict:
    """Print one preset's rows and verdict; return them with the ratios (see the module docstring).

    L* is the higher of the two final val losses, a loss both runs reached; each run's seconds and
    tokens to L* are where its curve first got there. Normally L* is the baseline's final loss L_b and
    the baseline first reaches it at its end; taking "first" for both also covers a curve that rose
    again (over-fitting on a repeated corpus), in the baseline's favour.
    """
    l_b, l_t = base["points"][-1]["val_loss"], tiny["points"][-1]["val_loss"]
    target = max(l_b, l_t)
    reach = {
        impl: (first_reach(r["points"], target, "seconds"), first_reach(r["points"], target, "tokens"))
        for impl, r in (("baseline", base), ("tinychat", tiny))
    }
    ratio = reach["baseline"][0] / reach["tinychat"][0]
    tok_ratio = reach["baseline"][1] / reach["tinychat"][1]
    for impl, key, r in (("nanoGPT baseline", "baseline", base), ("tinychat", "tinychat", tiny)):
        end = r["points"][-1]
        s, tok = reach[key]
        print(
            f"{name:<7}{impl:<20}{r['params'] / 1e6:>7.2f}M{r['steps']:>7}{end['tokens'] / 1e6:>8.2f}M"
            f"{end['seconds']:>9.1f}{end['tokens'] / end['seconds']:>7.0f}{end['val_loss']:>10.3f}"
            f"{s:>10.1f}{tok / 1e6:>11.2f}M"
        )
    speed = {k: r["points"][-1]["tokens"] / r["points"][-1]["seconds"] for k, r in (("b", base), ("t", tiny))}
    if not 0.75 <= speed["t"] / speed["b"] <= 1.33:  # the throughput table has them within ~10%
        print(
            f"   warning: tinychat ran at {speed['t'] / speed['b']:.2f}x the baseline's tokens/s; the machine was "
            "probably busy during one arm, and both ratios are unreliable: rerun on a quiet machine"
        )
    whose = "the baseline's final val loss" if l_t <= l_b else "tinychat's final val loss (above the baseline's)"
    verdict = "meets" if ratio >= 1.3 else "misses"
    print(
        f"-> {name}: L* = {whose} {target:.3f}: baseline {reach['baseline'][0]:.1f} s, tinychat "
        f"{reach['tinychat'][0]:.1f} s: tinychat is {ratio:.2f}x faster at equal loss ({tok_ratio:.2f}x in tokens); "
        f"{verdict} the 1.3x goal",
        flush=True,
    )
    return {
        "baseline": base,
        "tinychat": tiny,
        "L_b": l_b,
        "L_t": l_t,
        "L_star": target,
        "seconds_to_L_star": {k: v[0] for k, v in reach.items()},
        "tokens_to_L_star": {k: v[1] for k, v in reach.items()},
        "time_ratio": ratio,
        "token_ratio": tok_ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--steps", type=int, default=30, help="throughput: steps per measurement")
    ap.add_argument("--batch-size", type=int, default=16, help="throughput only (time to loss: the recipe's)")
    ap.add_argument("--seq-len", type=int, default=256, help="throughput only (time to loss: the recipe's)")
    ap.add_argument("--compile", action="store_true", help="throughput: also measure tinychat with torch.compile")
    ap.add_argument("--time-to-loss", action="store_true", help="compare wall-clock time to equal validation loss")
    ap.add_argument("--ttl-seconds", type=float, default=150.0, help="time to loss: training seconds per arm")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="time to loss, both arms")
    ap.add_argument("--baseline-lr", type=float, default=NANOGPT_RECIPE["lr"], help="time to loss: nanoGPT peak lr")
    ap.add_argument("--out", default="", help="time to loss: write the curves and ratios to this JSON file")
    args = ap.parse_args()
    if args.time_to_loss:
        time_to_loss(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
