"""Mixture of experts against a dense model of the same active size, with and without the router z-loss.

    .venv/bin/python bench/moe.py --run runs/s1 [--steps 150] [--out runs/moe_bench]

Three `tinychat pretrain` runs on the run's tokenizer and tinyworld token shards, same seed, same steps,
same batches (the loader's order depends only on the seed); a variant already trained under OUT is not
trained again, so `--only dense`, `--only moe` and `--only moe_noz` may run as three parallel jobs and a
final plain invocation prints the table:
- dense: a SwiGLU MLP of --d-ff per layer;
- moe: --experts experts of d_ff / k each, k = --k per token (so k experts cost one dense MLP: equal
  active parameters, the router aside), load-balancing loss and z-loss at the model defaults;
- moe_noz: the same with --model.moe_z_coef 0.
It prints one table (parameters total and active, final validation bits per byte, training tokens/s,
loss spikes (see `spikes`), the router's mean logsumexp^2 at the end) and writes OUT/results.json and two plots:
OUT/expert_load.png (each expert's share of routed tokens over training, all layers averaged) and
OUT/loss.png (training loss of the three runs). Tokens/s are relative numbers only: on a shared
machine say "under load" next to them; steps, tokens and bits per byte do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tinychat.cli import main as tinychat


def records(out: Path, name: str, kind: str) -> list[dict]:
    path = out / name / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind and r["stage"] == "pretrain"]


def spikes(losses: list[float], ref: list[float], window: int = 20, jump: float = 0.1) -> tuple[int, float]:
    """(loss spikes, the largest): steps where the gap to the dense run's loss on the same batch rises more than
    `jump` nats above that gap's median over the previous `window` steps.

    The runs see identical batches, so a small batch's swings (the same in every run) cancel in the gap, and
    an MoE run merely being behind the dense one (a steady gap) is not a spike either."""
    gap = [a - b for a, b in zip(losses, ref)]
    excess = [gap[i] - statistics.median(gap[i - window : i]) for i in range(window, len(gap))]
    return sum(e > jump for e in excess), max(excess, default=0.0)


def bench_parser(doc: str, out: str, seq_len: int, batch_size: int) -> argparse.ArgumentParser:
    """The options bench/moe.py and bench/alibi.py share: data run, output, steps and the small model's shape."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with tokenizer/ and data/tokens/")
    ap.add_argument("--out", default=out)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    return ap


def pretrain_argv(args: argparse.Namespace, name: str, eval_every: int, *extra: str, steps: int = 0) -> list[str]:
    """`tinychat pretrain` of variant `name` under args.out: the shared shape and schedule (`steps`, default
    --steps), then `extra`."""
    run = Path(args.run)
    argv = ["pretrain", "--runs-dir", args.out, "--run", name, "--tokenizer", str(run / "tokenizer"), "--samples"]
    argv += ["--data", str(run / "data" / "tokens"), "--model.d_model", str(args.d_model), "--model.n_head", "4"]
    argv += ["--model.n_layer", str(args.n_layer), "--model.n_kv_head", "2", "--model.head_dim", "32"]
    argv += ["--model.d_ff", str(args.d_ff), "--train.max_steps", str(steps or args.steps), "--train.lr", str(args.lr)]
    argv += ["--train.seq_len", str(args.seq_len), "--train.batch_size", str(args.batch_size)]
    argv += ["--train.eval_every", str(eval_every), "--train.eval_batches", "8", "--train.warmup_steps", "30"]
    argv += ["--train.checkpoint_every", "0", "--train.tensorboard", "false", "--train.log_every", "50"]
    argv += ["--train.precision", "bf16", "--train.seed", "0", "--train.peak_flops", "1"]
    return [*argv, *extra]


def main() -> int:
    ap = bench_parser(__doc__, "runs/moe_bench", seq_len=128, batch_size=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=["dense", "moe", "moe_noz"], help="train/report these variants")
    ap.add_argument(
        "--dense-steps",
        type=int,
        default=0,
        help="steps of the dense run (default --steps): --steps times the dense/MoE tokens/s ratio measured on a "
        "quiet machine compares them at equal wall time",
    )
    args = ap.parse_args()
    out = Path(args.out)
    moe = ["--model.n_experts", str(args.experts), "--model.experts_per_token", str(args.k)]
    variants = {"dense": [], "moe": moe, "moe_noz": [*moe, "--model.moe_z_coef", "0"]}
    for name in args.only:
        if (out / name / "checkpoints" / "pretrain" / "config.json").is_file():
            continue  # trained by an earlier invocation (e.g. the three variants run as parallel --only jobs)
        steps = args.dense_steps if name == "dense" and args.dense_steps else args.steps
        if tinychat(pretrain_argv(args, name, max(steps // 4, 1), *variants[name], steps=steps)) != 0:
            return 1
    results = {}
    dense = [r["loss"] for r in records(out, "dense", "train")] if "dense" in args.only else []
    for name in args.only:
        train, evals = records(out, name, "train"), records(out, name, "eval")
        losses = [r["loss"] for r in train]
        cfg = json.loads((out / name / "checkpoints" / "pretrain" / "config.json").read_text())
        results[name] = {
            "val_bpb": evals[-1]["val_bpb"],
            "val_bpb_curve": [(r["step"], r["val_bpb"]) for r in evals],
            "final_loss": statistics.mean(losses[-20:]),
            "tok_per_s": statistics.median(r["tok_per_s"] for r in train),
            "spikes": spikes(losses, dense) if dense and name != "dense" else (0, 0.0),
            "router_z": train[-1].get("moe_z"),
            "max_load": train[-1].get("moe_max_load"),
            "params": params(cfg),
        }
    print(f"{'run':<8} {'params':>8} {'active':>8} {'val bpb':>8} {'loss':>6} {'tok/s*':>7} {'spikes':>10} {'z':>6}")
    for name, r in results.items():
        z = f"{r['router_z']:.2f}" if r["router_z"] is not None else "-"
        print(
            f"{name:<8} {r['params'][0] / 1e6:>7.2f}M {r['params'][1] / 1e6:>7.2f}M {r['val_bpb']:>8.4f} "
            f"{r['final_loss']:>6.3f} {r['tok_per_s']:>7.0f} {r['spikes'][0]:>5d}/{r['spikes'][1]:.2f} {z:>6}"
        )
    print("* tokens/s under whatever load the machine had: compare runs of one invocation only")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(out, args.only, args.experts)
    return 0


def params(cfg: dict) -> tuple[int, int]:
    """(total, active) parameters without embeddings, from a saved config."""
    import torch

    from tinychat.model.hf import config_from_hf
    from tinychat.model.moe import inactive_params
    from tinychat.model.transformer import Model

    mcfg = config_from_hf(cfg)
    with torch.device("meta"):
        model = Model(mcfg)
    total = model.num_params(exclude_embeddings=True)
    return total, total - inactive_params(mcfg)


def plot(out: Path, names: list[str], n_experts: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'tinychat[eval]')", file=sys.stderr)
        return
    if "moe" in names:
        train = records(out, "moe", "train")
        fig, ax = plt.subplots(figsize=(7, 4))
        for e in range(n_experts):
            ax.plot([r["step"] for r in train], [r[f"moe_load_e{e}"] for r in train], label=f"expert {e}", lw=1)
        ax.axhline(1 / n_experts, color="k", ls="--", lw=0.8, label="balanced")
        ax.set(xlabel="step", ylabel="share of routed tokens", title="Expert load over training (mean of layers)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        train = records(out, name, "train")
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=name, lw=1)
    ax.set(xlabel="step", ylabel="training loss (nats/token)", title="Dense vs MoE, with and without z-loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    print(f"plots -> {out / 'expert_load.png'}, {out / 'loss.png'}")


if __name__ == "__main__":
    sys.exit(main())
