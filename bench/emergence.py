"""Emergence, measured: tinyworld suite accuracy against model size and compute, beside a smooth metric.

    .venv/bin/python bench/emergence.py --run runs/d0 --out runs/emergence \
        [--sizes 64 128 256] [--tokens 600000 1200000 2400000] [--suites multistep,facts_trained]

The seed essays say abilities such as multi-step reasoning "emerge": absent in small models, present past
some scale. Schaeffer et al. (2023) answer that a sharp rise is often the metric's doing: exact match on a
multi-token answer multiplies many per-token probabilities, so it jumps where the per-token likelihood
climbs smoothly. This bench puts both side by side on one sweep.

1. The sweep: `tinychat scaling` (the real CLI, one subprocess; runs reused when run again) pretrains one
   model per (width, token budget) on the --run's own pretraining mix (runs/NAME/data/tokens: tinyworld's
   text plus its chat conversations, the speedrun's pretraining data) with its tokenizer, the speedrun's
   batch shape (16 x 256) and learning rate. Token budgets above the mix's size are several epochs, as in
   the speedrun itself. `--heldout-tokens 0`: the law is fitted and plotted but not tested here.
2. Every model answers the --suites (all rows, greedy, through the chat template, as the speedrun grades
   its pretrained model): exact-match accuracy with 95% Wilson intervals.
3. The smooth metric: the mean log-probability per token the model gives the reference reply (for
   multistep's chain-of-thought rows the whole worked chain, for direct rows the answer), teacher-forced
   after the same chat prompt; and the mean probability of the whole reference reply (the product of its
   token probabilities, which is what exact match needs).

Writes OUT/emergence.json, OUT/emergence.md and OUT/plots/emergence.png (accuracy and per-token log-
probability against training compute C = 6ND, one line per width).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tinychat.errors import UserError


def sweep(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Run (or reuse) the scaling sweep; return its points, each with its model directory."""
    args = [sys.executable, "-m", "tinychat.cli", "scaling", "--runs-dir", str(a.out.parent), "--run", a.out.name,
            "--data", str(a.run / "data" / "tokens"), "--tokenizer", str(a.run / "tokenizer"),
            "--sizes", *map(str, a.sizes), "--tokens", *map(str, a.tokens), "--heldout-tokens", "0",
            "--n-layer", str(a.n_layer), "--head-dim", str(a.head_dim), "--bootstrap", "20",
            "--train.seq_len", str(a.seq_len), "--train.batch_size", str(a.batch_size), "--train.lr", str(a.lr),
            "--train.eval_batches", "20", "--train.peak_flops", "1"]  # fmt: skip
    subprocess.run(args, check=True)
    points = json.loads((a.out / "scaling.json").read_text())["points"]
    for p in points:
        p["model_dir"] = str(a.out / "sweep" / p["name"] / "checkpoints" / "pretrain")
    return points


def reference_logprob(model: torch.nn.Module, tok: Any, rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Teacher-forced log-probability of each row's reference reply after its chat prompt: per row, the mean
    log-probability per reply token and the whole reply's probability (exp of the summed log-probability)."""
    scores = []
    with torch.no_grad():
        for r in rows:
            prompt = tok.render_chat(r["messages"], None, add_generation_prompt=True).ids
            reply = tok.encode(r.get("reference") or r["answer"])
            ids = torch.tensor([prompt + reply])  # (1, T)
            logits = model(ids[:, :-1]).float()  # (1, T-1, V)
            logp = torch.log_softmax(logits, -1)[0, len(prompt) - 1 :]  # rows predicting the reply: (R, V)
            lp = logp.gather(-1, torch.tensor(reply)[:, None])[:, 0]  # (R,)
            scores.append((lp.mean().item(), math.exp(lp.sum().item())))
    return scores


def mean_scores(scores: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "logprob_per_token": sum(s[0] for s in scores) / len(scores),
        "p_whole_reply": sum(s[1] for s in scores) / len(scores),
    }


def measure(point: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """Suite accuracies and reference log-probabilities of one sweep model (cached beside its result)."""
    cache = Path(point["model_dir"]).parent.parent / "emergence.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from tinychat.eval.backend import LocalCompleter, load
    from tinychat.eval.suites import SUITES, SuiteOptions, load_rows, run_suites

    model, tok = load(point["model_dir"], "cpu")
    model.eval()
    graded = run_suites(LocalCompleter(model, tok, 64, "fp32"), a.run / "world", a.suites, "chat", SuiteOptions())
    out: dict[str, Any] = {"suites": {}}
    for name in a.suites:
        s = graded[name]
        rows = load_rows(a.run / "world", SUITES[name].source)
        scores = reference_logprob(model, tok, rows)
        entry = {"accuracy": s["accuracy"], "n": s["n"], **mean_scores(scores)}
        for mode, by_mode in s.get("by_mode", {}).items():  # multistep: chain of thought and direct apart
            mine = [sc for sc, r in zip(scores, rows) if r.get("mode") == mode]
            entry[mode] = {**by_mode, **mean_scores(mine)}
        out["suites"][name] = entry
    cache.write_text(json.dumps(out, indent=1))
    return out


def table(points: list[dict[str, Any]], suites: list[str]) -> str:
    from tinychat.eval.report import wilson

    head = "| d_model | N (non-embedding) | D (tokens) | C = 6ND | val loss |"
    sep = "|---:|---:|---:|---:|---:|"
    for s in suites:
        head += f" {s} [95% CI] | {s} log p / token | {s} P(whole reply) |"
        sep += "---|---:|---:|"
    lines = [head, sep]
    for p in sorted(points, key=lambda p: (p["width"], p["tokens"])):
        c = 6 * p["params"] * p["tokens"]
        row = f"| {p['width']} | {p['params']:,} | {p['tokens']:,} | {c:.2e} | {p['val_loss']:.3f} |"
        for s in suites:
            e = p["emergence"]["suites"][s]
            lo, hi = wilson(e["accuracy"], e["n"])
            row += (f" {e['accuracy']:.1%} [{lo:.1%}–{hi:.1%}] | {e['logprob_per_token']:.3f} |"
                    f" {e['p_whole_reply']:.3f} |")  # fmt: skip
        lines.append(row)
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], suites: list[str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    widths = sorted({p["width"] for p in points})
    fig, axes = plt.subplots(len(suites), 2, figsize=(10, 3.6 * len(suites)), squeeze=False)
    for row, s in enumerate(suites):
        for i, w in enumerate(widths):
            mine = sorted((p for p in points if p["width"] == w), key=lambda p: p["tokens"])
            c = [6 * p["params"] * p["tokens"] for p in mine]
            color = plt.cm.viridis(i / max(1, len(widths) - 1))
            acc = [p["emergence"]["suites"][s]["accuracy"] for p in mine]
            lp = [p["emergence"]["suites"][s]["logprob_per_token"] for p in mine]
            axes[row][0].plot(c, acc, "o-", color=color, label=f"d_model {w}")
            axes[row][1].plot(c, lp, "o-", color=color, label=f"d_model {w}")
        axes[row][0].set(xscale="log", xlabel="training compute C = 6ND", ylabel=f"{s}: exact match", ylim=(0, 1))
        axes[row][1].set(xscale="log", xlabel="training compute C = 6ND", ylabel=f"{s}: log p per reference token")
        axes[row][0].legend()
    fig.tight_layout()
    path = out / "emergence.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a speedrun run directory (data/tokens, tokenizer, world)")
    ap.add_argument("--out", type=Path, default=Path("runs/emergence"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--tokens", type=int, nargs="+", default=[600_000, 1_200_000, 2_400_000])
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--suites", type=lambda s: s.split(","), default=["multistep", "facts_trained"])
    a = ap.parse_args()
    for need in (a.run / "data" / "tokens", a.run / "tokenizer", a.run / "world" / "eval"):
        if not need.exists():
            raise UserError(f"bench/emergence.py: {need} does not exist; --run must be a speedrun run directory.")
    points = sweep(a)
    for p in points:
        p["emergence"] = measure(p, a)
        print(f"d_model {p['width']}, {p['tokens']:,} tokens: " + ", ".join(
            f"{s} {p['emergence']['suites'][s]['accuracy']:.1%}" for s in a.suites), flush=True)  # fmt: skip
    text = table(points, a.suites)
    (a.out / "emergence.md").write_text(text)
    (a.out / "emergence.json").write_text(json.dumps(points, indent=1))
    print(text + f"-> {a.out / 'emergence.md'}, {plot(points, a.suites, a.out / 'plots')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
