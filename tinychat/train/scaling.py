"""Scaling laws: train a sweep of model sizes x token budgets, fit L(N, D), predict a larger run, then run it.

`tinychat scaling --data DIR --tokenizer DIR --sizes 32 48 64 96 --tokens 50000 100000 200000 400000`
pretrains one model per (width, token budget) with pretrain's own objective and loop, fits Chinchilla's
third approach (Hoffmann et al. 2022)

    L(N, D) = E + A / N^alpha + B / D^beta

to the final validation losses (N: non-embedding parameters, Kaplan's choice, because at these sizes the
8k-entry embedding table would otherwise be most of N while costing almost no compute per token; D:
training tokens), then trains the held-out run (`--heldout-size`, `--heldout-tokens`: larger in both N and
D than anything fitted) and reports how far its loss landed from the prediction. Everything lands in
RUNS_DIR/NAME/: sweep/ (one pretrain run per point, reused when the sweep is run again), scaling.json,
scaling.md and plots/ (loss curves, the fit, the compute-optimal frontier).

The fit is Chinchilla's: the Huber loss (delta 1e-3) between log L and the log of the prediction written as
a log-sum-exp, minimised by L-BFGS from a grid of starting points; the best start wins. Intervals come
from the bootstrap: the sweep's runs resampled with replacement and refitted.

The models are a family of one shape: n_layer blocks of width d_model with head_dim-wide heads (as many key/value
heads) and a SwiGLU of 3 x d_model, trained with one recipe (AdamW, cosine, warmup a tenth of the
run), the same batch for every run. What changes between runs is width and token budget only.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.train.config import TrainConfig


@dataclass
class ScalingConfig:
    run: str = field("scaling", help="run name: the sweep and its report go to RUNS_DIR/NAME")
    runs_dir: str = field("runs")
    data: str = field("", help="tokenized data directory (default RUNS_DIR/NAME/data/tokens)")
    tokenizer: str = field("", help="tokenizer directory (default RUNS_DIR/NAME/tokenizer)")
    sizes: list[int] = field([32, 48, 64, 96], help="model widths (d_model) of the sweep")
    tokens: list[int] = field([50_000, 100_000, 200_000, 400_000], help="training-token budgets of the sweep")
    heldout_size: int = field(128, help="width of the larger run whose loss the fit predicts")
    heldout_tokens: int = field(800_000, help="token budget of the larger run (0 = fit and plot only)")
    n_layer: int = field(4, help="blocks of every model in the sweep")
    head_dim: int = field(16, help="per-head width; heads = d_model / head_dim")
    bootstrap: int = field(100, help="bootstrap refits for the intervals")
    lrs: list[float] = field(
        [], help="instead of the law: a learning-rate sweep at every --sizes width, standard and μP"
    )
    lr_tokens: int = field(100_000, help="training tokens of each learning-rate sweep run")
    mup_base: int = field(0, help="μP base width (0 = the smallest of --sizes)")
    mup: bool = field(False, help="train the law's sweep and its held-out run under μP (else standard)")
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            batch_size=8,
            seq_len=128,
            lr=3e-3,
            eval_every=0,
            eval_batches=1000,
            checkpoint_every=0,
            keep_checkpoints=1,
            tensorboard=False,
            log_every=50,
        )
    )


# ------------------------------------------------------------------------------------------ the sweep
def model_overrides(width: int, cfg: ScalingConfig) -> dict[str, Any]:
    if width % cfg.head_dim:
        raise UserError(f"scaling: width {width} must be a multiple of --head-dim ({cfg.head_dim}).")
    heads = width // cfg.head_dim
    return dict(
        d_model=width,
        n_layer=cfg.n_layer,
        n_head=heads,
        n_kv_head=heads,
        head_dim=cfg.head_dim,
        d_ff=3 * width,
        max_seq_len=max(cfg.train.seq_len, 128),
    )


def mup_width(cfg: ScalingConfig) -> int:
    """The μP base width: --mup-base, or the smallest width of the sweep."""
    return cfg.mup_base or min(cfg.sizes)


def train_point(
    cfg: ScalingConfig, width: int, tokens: int, lr: float | None = None, mup_base: int = 0
) -> dict[str, Any]:
    """One pretrain run of the sweep (or its earlier result): final validation loss and its loss curve."""
    from tinychat.model.config import ModelConfig
    from tinychat.train.pretrain import PretrainConfig, run_pretrain

    root = Path(cfg.runs_dir) / cfg.run / "sweep"
    name = f"d{width}_t{tokens}" + (f"_lr{lr:g}" if lr else "") + (f"_mup{mup_base}" if mup_base else "")
    result_file = root / name / "result.json"
    if result_file.is_file():
        return {**json.loads(result_file.read_text()), "name": name}  # results written before "name" was kept
    run_dir = Path(cfg.runs_dir) / cfg.run
    per_step = cfg.train.batch_size * cfg.train.seq_len
    steps = max(1, tokens // per_step)
    train = dataclasses.replace(
        cfg.train,
        max_tokens=0,
        max_steps=steps,
        warmup_steps=max(1, steps // 10),
        lr=lr or cfg.train.lr,
        mup_base_width=mup_base,
    )
    pcfg = PretrainConfig(
        run=name,
        runs_dir=str(root),
        data=cfg.data or str(run_dir / "data" / "tokens"),
        tokenizer=cfg.tokenizer or str(run_dir / "tokenizer"),
        samples=[],
        model=ModelConfig(**model_overrides(width, cfg)),
        train=train,
    )
    result = run_pretrain(pcfg)
    from tinychat.model.transformer import Model

    model = Model.from_pretrained(str(result.model_dir))
    curve = []
    for line in (root / name / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            curve.append((rec["tokens"], rec["loss"]))
    point = {
        "name": name,  # the run's directory under sweep/ (its model: checkpoints/pretrain)
        "width": width,
        "tokens": steps * per_step,
        "params": model.num_params(exclude_embeddings=True),
        "params_total": model.num_params(),
        "flops_per_token": model.flops_per_token(cfg.train.seq_len),
        "lr": train.lr,
        "mup_base": mup_base,
        "val_loss": result.last_eval["val_loss"],
        "curve": curve[:: max(1, len(curve) // 60)] + curve[-1:],
    }
    result_file.write_text(json.dumps(point))
    return point


# ------------------------------------------------------------------------------------------ the fit
PARAMS = ("E", "A", "alpha", "B", "beta")


def predict(fit: dict[str, float], n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
    return fit["E"] + fit["A"] / np.power(n, fit["alpha"]) + fit["B"] / np.power(d, fit["beta"])


def _fit_once(log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor, start: list[float]) -> tuple[float, list]:
    """One L-BFGS run from `start` = (e, a, alpha, b, beta), E = exp(e), A = exp(a), B = exp(b)."""
    theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        e, a, alpha, b, beta = theta
        pred = torch.logsumexp(torch.stack([e.expand_as(log_n), a - alpha * log_n, b - beta * log_d]), dim=0)
        loss = torch.nn.functional.huber_loss(pred, log_l, delta=1e-3, reduction="sum")
        loss.backward()
        return loss

    opt.step(objective)
    return objective().item(), theta.detach().tolist()


# starting points (e, a, alpha, b, beta): a coarser version of Chinchilla's grid
GRID = list(itertools.product([0.0, 1.0], [0.0, 5.0, 10.0], [0.2, 0.5, 1.0], [0.0, 5.0, 10.0], [0.2, 0.5]))


def fit_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: list | None = None) -> dict[str, float]:
    """Chinchilla approach 3: the best of L-BFGS runs from a grid of starting points."""
    ln, ld, ll = (torch.tensor(np.log(v), dtype=torch.float64) for v in (n, d, loss))
    best = (math.inf, None)
    for start in starts or GRID:
        obj, theta = _fit_once(ln, ld, ll, list(start))
        if math.isfinite(obj) and obj < best[0] and all(map(math.isfinite, theta)):
            best = (obj, theta)
    if best[1] is None:
        raise UserError("scaling: the fit did not converge from any starting point.")
    e, a, alpha, b, beta = best[1]
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta, "huber": best[0]}


def bootstrap(n: np.ndarray, d: np.ndarray, loss: np.ndarray, fit: dict, k: int, seed: int = 0) -> list[dict]:
    """Refits on the runs resampled with replacement, started from the full fit (and a few grid points)."""
    rng = np.random.default_rng(seed)
    start = [math.log(fit["E"]), math.log(fit["A"]), fit["alpha"], math.log(fit["B"]), fit["beta"]]
    out = []
    for _ in range(k):
        idx = rng.integers(0, len(n), len(n))
        if len(set(n[idx])) < 2 or len(set(d[idx])) < 2:
            continue  # a resample with one size or one budget cannot separate the two terms
        out.append(fit_law(n[idx], d[idx], loss[idx], starts=[start, *GRID[::27]]))
    return out


def interval(values: list[float]) -> list[float]:
    return [float(np.percentile(values, 5)), float(np.percentile(values, 95))]


def compute_optimal(fit: dict, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chinchilla's frontier for C = 6 N D: N_opt = G (C/6)^(beta/(alpha+beta)),
    G = (alpha A / (beta B))^(1/(alpha+beta)); D_opt = C / (6 N_opt)."""
    a, b = fit["alpha"], fit["beta"]
    g = (a * fit["A"] / (b * fit["B"])) ** (1 / (a + b))
    n_opt = g * np.power(flops / 6, b / (a + b))
    return n_opt, flops / (6 * n_opt)


# ------------------------------------------------------------------------------------------ report
def plot(points: list[dict], held: dict | None, fit: dict, out: Path) -> list[str]:
    import matplotlib  # the [eval] extra; the CLI names it when it is missing

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({p["width"] for p in points} | ({held["width"]} if held else set()))
    colors = {w: plt.cm.viridis(i / max(1, len(widths) - 1)) for i, w in enumerate(widths)}
    runs = points + ([held] if held else [])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in runs:
        t, loss = zip(*p["curve"])
        ax.plot(t, loss, color=colors[p["width"]], lw=1, alpha=0.8, ls="--" if p is held else "-")
    for w in widths:
        ax.plot([], [], color=colors[w], label=f"d_model {w}")
    ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="train loss", title="loss curves")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    d_grid = np.geomspace(min(p["tokens"] for p in runs) / 2, max(p["tokens"] for p in runs) * 2, 100)
    for w in widths:
        mine = [p for p in runs if p["width"] == w]
        n = mine[0]["params"]
        ax.plot(d_grid, predict(fit, n, d_grid), color=colors[w], lw=1)
        for p in mine:
            ax.scatter(
                p["tokens"], p["val_loss"], color=colors[w], marker="*" if p is held else "o", s=90 if p is held else 25
            )
        ax.plot([], [], color=colors[w], label=f"N={n:,} (d {w})")
    ax.set(xscale="log", xlabel="training tokens D", ylabel="validation loss", title="L(N, D) fit; star: held-out run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_fit.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    flops = np.geomspace(min(6 * p["params"] * p["tokens"] for p in runs) / 3, 1e16, 100)
    n_opt, d_opt = compute_optimal(fit, flops)
    ax.plot(flops, n_opt, label="N_opt(C)")
    ax.plot(flops, d_opt, label="D_opt(C)")
    for p in runs:
        ax.scatter(6 * p["params"] * p["tokens"], p["params"], color=colors[p["width"]], s=15)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="compute C = 6 N D (FLOPs)",
        ylabel="parameters / tokens",
        title="compute-optimal frontier (dots: the sweep's runs, N)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling_frontier.png", dpi=120)
    plt.close(fig)
    return ["scaling_curves.png", "scaling_fit.png", "scaling_frontier.png"]


def report(points: list[dict], held: dict | None, fit: dict, boots: list[dict], pred: dict) -> str:
    lines = ["| d_model | N (non-embedding) | D (tokens) | C = 6ND | val loss | fit |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["width"], p["tokens"])):
        c = 6 * p["params"] * p["tokens"]
        lines.append(
            f"| {p['width']} | {p['params']:,} | {p['tokens']:,} | {c:.2e} | {p['val_loss']:.4f} | "
            f"{predict(fit, p['params'], p['tokens']):.4f} |"
        )
    lines += ["", "| parameter | fit | 90% bootstrap interval |", "|---|---|---|"]
    for k in PARAMS:
        lo, hi = interval([b[k] for b in boots]) if boots else (float("nan"), float("nan"))
        lines.append(f"| {k} | {fit[k]:.4g} | [{lo:.4g}, {hi:.4g}] |")
    if held:
        lines += [
            "",
            f"held-out run: d_model {held['width']}, N = {held['params']:,}, D = {held['tokens']:,}: predicted "
            f"{pred['predicted']:.4f} (90% interval {pred['interval'][0]:.4f} to {pred['interval'][1]:.4f}), "
            f"measured {held['val_loss']:.4f}, error {pred['error_pct']:+.2f}%",
        ]
    return "\n".join(lines) + "\n"


def lr_sweep(cfg: ScalingConfig) -> int:
    """Does the best learning rate stay put as the model widens? Each width at each LR, with standard
    parameterisation (one LR for everything, init std fixed) and with μP (train/optim.py)."""
    base = mup_width(cfg)
    out = Path(cfg.runs_dir) / cfg.run
    runs = []
    for mup, width, lr in itertools.product((0, base), sorted(set(cfg.sizes)), sorted(set(cfg.lrs))):
        p = train_point(cfg, width, cfg.lr_tokens, lr=lr, mup_base=mup)
        runs.append(p)
        print(f"scaling: {'μP' if mup else 'SP'} d_model {width}, lr {lr:g}: val loss {p['val_loss']:.4f}")
    lines = ["| parameterisation | d_model | " + " | ".join(f"lr {lr:g}" for lr in sorted(set(cfg.lrs))) + " | best |"]
    lines.append("|---" * (len(set(cfg.lrs)) + 3) + "|")
    best: dict[str, dict[int, float]] = {"SP": {}, "μP": {}}
    for mup, width in itertools.product((0, base), sorted(set(cfg.sizes))):
        mine = sorted((p for p in runs if p["width"] == width and p["mup_base"] == mup), key=lambda p: p["lr"])
        kind = "μP" if mup else "SP"
        top = min(mine, key=lambda p: p["val_loss"])
        best[kind][width] = top["lr"]
        cells = [f"**{p['val_loss']:.4f}**" if p is top else f"{p['val_loss']:.4f}" for p in mine]
        lines.append(f"| {kind} | {width} | " + " | ".join(cells) + f" | {top['lr']:g} |")
    text = "\n".join(lines) + "\n"
    plot_lr(runs, base, out / "plots")
    (out / "lr_sweep.md").write_text(text)
    (out / "lr_sweep.json").write_text(json.dumps({"runs": runs, "best": best, "mup_base": base}, indent=1))
    print(text + f"-> {out / 'lr_sweep.md'}, {out / 'plots' / 'lr_transfer.png'}")
    return 0


def plot_lr(runs: list[dict], base: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({p["width"] for p in runs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mup in zip(axes, (0, base)):
        for i, w in enumerate(widths):
            mine = sorted((p for p in runs if p["width"] == w and p["mup_base"] == mup), key=lambda p: p["lr"])
            color = plt.cm.viridis(i / max(1, len(widths) - 1))
            ax.plot([p["lr"] for p in mine], [p["val_loss"] for p in mine], "o-", color=color, label=f"d_model {w}")
            top = min(mine, key=lambda p: p["val_loss"])
            ax.scatter([top["lr"]], [top["val_loss"]], s=120, facecolors="none", edgecolors=color)
        ax.set(xscale="log", xlabel="learning rate", title=f"μP (base width {base})" if mup else "standard")
    axes[0].set_ylabel("validation loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "lr_transfer.png", dpi=120)
    plt.close(fig)


def warn_fixed_warmup(cfg: ScalingConfig) -> None:
    """Every point warms up for a tenth of its own steps (train_point), so that runs of every length keep the
    same schedule shape; an explicit --train.warmup_steps would not, and is ignored: say so."""
    if cfg.train.warmup_steps != TrainConfig.warmup_steps:
        w = cfg.train.warmup_steps
        print(f"scaling: --train.warmup_steps {w} is ignored: each run warms up for a tenth of its steps")


def run(cfg: ScalingConfig) -> int:
    warn_fixed_warmup(cfg)
    if cfg.lrs:
        return lr_sweep(cfg)
    if len(set(cfg.sizes)) < 2 or len(set(cfg.tokens)) < 2:
        raise UserError("scaling: the fit needs at least two --sizes and two --tokens.")
    out = Path(cfg.runs_dir) / cfg.run
    mup = mup_width(cfg) if cfg.mup else 0
    points = []
    for width, tokens in itertools.product(sorted(set(cfg.sizes)), sorted(set(cfg.tokens))):
        points.append(train_point(cfg, width, tokens, mup_base=mup))
        print(f"scaling: d_model {width}, {points[-1]['tokens']:,} tokens: val loss {points[-1]['val_loss']:.4f}")
    n, d, loss = (np.array([p[k] for p in points], dtype=np.float64) for k in ("params", "tokens", "val_loss"))
    fit = fit_law(n, d, loss)
    boots = bootstrap(n, d, loss, fit, cfg.bootstrap)
    held, pred = None, {}
    if cfg.heldout_tokens:
        from tinychat.model.config import ModelConfig
        from tinychat.model.transformer import Model

        tok_n = Model(ModelConfig(vocab_size=8, **model_overrides(cfg.heldout_size, cfg))).num_params(True)
        per_step = cfg.train.batch_size * cfg.train.seq_len
        tok_d = max(1, cfg.heldout_tokens // per_step) * per_step
        predicted = float(predict(fit, tok_n, tok_d))
        pred = {"predicted": predicted, "interval": interval([float(predict(b, tok_n, tok_d)) for b in boots])}
        print(
            f"scaling: predicted val loss {predicted:.4f} for d_model {cfg.heldout_size} ({tok_n:,} params), "
            f"{tok_d:,} tokens"
        )
        held = train_point(cfg, cfg.heldout_size, cfg.heldout_tokens, mup_base=mup)
        pred["measured"] = held["val_loss"]
        pred["error_pct"] = 100 * (predicted - held["val_loss"]) / held["val_loss"]
    plots = plot(points, held, fit, out / "plots")
    text = report(points, held, fit, boots, pred)
    (out / "scaling.md").write_text(text)
    (out / "scaling.json").write_text(
        json.dumps({"points": points, "heldout": held, "fit": fit, "bootstrap": boots, "prediction": pred}, indent=1)
    )
    print(text + f"-> {out / 'scaling.md'}, {', '.join(str(out / 'plots' / p) for p in plots)}")
    return 0
