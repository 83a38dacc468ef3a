"""The PEFT family compared on one tinyworld task the base model cannot do, with the same budget for every method.

    .venv/bin/python bench/peft.py --run runs/s1 [--out runs/peft-bench] [--steps 60] [--methods lora,prompt]

The task, a new answer format: with the system message "Format: bracket." a fact question must be answered
as `<<answer>>` and nothing else (`<<1935>>`, `<<knitting>>`). The base (the speedrun's SFT model of --run)
never saw that system message or format, so it scores ~0%; what it knows of the facts bounds every method
(the base's own accuracy on the same questions in its usual format is printed as the ceiling).
Training rows: --train-rows of the run's SFT facts rows (questions it was tuned on), re-answered in the new
format. Evaluation: the 300 questions of the run's eval/facts_trained.jsonl (reserved from every training
split), greedy, graded exactly (answer or alias, world.answers.normalize), 95% Wilson intervals.

Every method trains through the real CLI (`tinychat sft --peft.method M`, one subprocess each) with the
same steps, batch size and sequence length (so the same tokens); the learning rate is each method's usual
one (LRS below; the virtual-token methods need far larger steps, as their papers use). Defaults: 60 steps of
4 packed rows of 128 tokens (~30k tokens, about one pass over the 1000 rows). Measured per method:
trainable parameters (% of the model), accuracy, forgetting (bits per byte on the world's plain validation
text, after minus before), peak memory (the training process's max RSS), the adapter file's size, and
training tokens/s relative to full fine-tuning (a shared machine: the lead re-times on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tinychat.errors import UserError
from tinychat.train.config import TrainConfig

SYSTEM = "Format: bracket."
METHODS = ["none", "lora", "ia3", "prompt", "prefix", "mam", "houlsby", "parallel", "dora", "qlora", "ptuning",
           "ptuning_v2", "unipelt"]  # fmt: skip
WDS: dict[str, float] = {}  # AdamW decay per method where --weight-decay overrides the loop's default
LRS = {"none": 1e-3, "lora": 5e-3, "dora": 5e-3, "qlora": 5e-3, "ia3": 2e-2, "prompt": 5e-2, "ptuning": 2e-2,
       "prefix": 2e-2, "ptuning_v2": 2e-2, "houlsby": 5e-3, "parallel": 5e-3, "mam": 5e-3,
       "unipelt": 5e-3}  # fmt: skip
EXTRA = {"lora": ["--lora.rank", "4"], "dora": ["--lora.rank", "4"], "qlora": ["--lora.rank", "4"],
         "prompt": ["--peft.init_text", "Format: bracket. Answer as <<answer>>."],
         "ptuning_v2": ["--peft.init_text", "Format: bracket. Answer as <<answer>>."]}  # fmt: skip


def per_method(items: list[str]) -> dict[str, float]:
    """METHOD=VALUE flags as {method: value}."""
    return {m: float(v) for m, _, v in (item.partition("=") for item in items)}


def bracket(answer: str) -> str:
    return f"<<{answer}>>"


def in_format(reply: str) -> bool:
    """The reply is `<<...>>`, right answer or not: whether a method learned the format at all."""
    s = reply.strip()
    return s.startswith("<<") and s.endswith(">>") and len(s) > 4


def graded(reply: str, row: dict[str, Any]) -> bool:
    """Exactly `<<answer>>` (or an alias), compared after world.answers.normalize."""
    from tinychat.world.answers import normalize

    s = reply.strip()
    if not in_format(s):
        return False
    return normalize(s[2:-2]) in {normalize(a) for a in [row["answer"], *row.get("aliases", [])]}


def make_data(run: Path, out: Path, n_rows: int, seed: int) -> Path:
    """The training rows: the run's SFT facts questions, answered in the new format under the new system message."""
    rows = [json.loads(x) for x in (run / "world" / "sft" / "train.jsonl").read_text().splitlines()]
    facts = [r for r in rows if r.get("skill") == "facts" and len(r["messages"]) == 2]
    random.Random(seed).shuffle(facts)
    path = out / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in facts[:n_rows]:
            q, a = r["messages"][0]["content"], r["messages"][1]["content"]
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q},
                    {"role": "assistant", "content": bracket(a)}]  # fmt: skip
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def accuracy(
    model: torch.nn.Module, tok: Any, rows: list[dict], system: bool, check: Any, fmt: list[int] | None = None
) -> tuple[float, int]:
    """Greedy replies to `rows` (with or without the new system message), graded by `check`; `fmt`, when
    given, gets the count of replies in the new format appended."""
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.train.chat_data import render
    from tinychat.train.rollout import decode_reply

    model.eval()
    sys_msg = [{"role": "system", "content": SYSTEM}] if system else []
    prompts = [render(tok, sys_msg + r["messages"], None, r["id"], generation_prompt=True).ids for r in rows]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    correct = formatted = 0
    with torch.no_grad():
        for i in range(0, len(prompts), 32):
            out, _, _ = generate_ids(model, prompts[i : i + 32], params, set(tok.stop_ids))
            replies = [decode_reply(tok, o) for o in out]
            correct += sum(check(reply, r) for reply, r in zip(replies, rows[i : i + 32]))
            formatted += sum(map(in_format, replies))
    if fmt is not None:
        fmt.append(formatted)
    return correct / len(rows), len(rows)


def bpb(model: torch.nn.Module, tok: Any, text: Path, tokens: int) -> float:
    from tinychat.eval.bpb import bits_per_byte

    return bits_per_byte(model.eval(), tok, text, seq_len=256, max_tokens=tokens)["bpb"]


def train(method: str, base: Path, data: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One `tinychat sft` subprocess; returns its peak RSS (MiB) and wall time."""
    args = [sys.executable, "-m", "tinychat.cli", "sft", "--init", str(base), "--data", str(data),
            "--runs_dir", str(out), "--run", "runs", "--stage", method, "--peft.method", method,
            "--train.max_steps", str(a.steps), "--train.batch_size", str(a.batch_size), "--train.seq_len",
            str(a.seq_len), "--train.lr", str(LRS[method]), "--train.warmup_steps", str(max(1, a.steps // 10)),
            "--train.eval_every", "0", "--train.checkpoint_every", "0", "--train.tensorboard", "false",
            "--train.seed", str(a.seed), *(["--train.weight_decay", str(WDS[method])] if method in WDS else []),
            "--eval_rows", "0", *EXTRA.get(method, [])]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise UserError(f"bench/peft.py: training {method} failed:\n{log[-2000:]}")
    summary = next((x for x in log.splitlines() if x.startswith("peft: ")), "")
    return {"peak_mib": usage.ru_maxrss / 1024, "train_s": time.perf_counter() - t0, "summary": summary}


def trainable(method: str, base: Path, tok: Any, virtual_tokens: int = 0) -> tuple[int, int]:
    """(trainable, total) parameters of the base with the method applied, as `sft` applies it."""
    from tinychat.model import Model
    from tinychat.model.peft import PeftConfig, apply_peft
    from tinychat.model.peft.lora import LoraConfig

    model = Model.from_pretrained(str(base), dtype=torch.float32)
    total = model.num_params()
    if method == "none":
        return total, total
    rank = int(EXTRA[method][1]) if method in ("lora", "dora", "qlora") else 0
    extra = EXTRA.get(method, [])
    targets = extra[extra.index("--lora.targets") + 1 :] if "--lora.targets" in extra else None
    apply_peft(
        model,
        PeftConfig(method=method, virtual_tokens=virtual_tokens or PeftConfig.virtual_tokens),
        LoraConfig(rank=rank) if targets is None else LoraConfig(rank, targets=targets),
    )
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def adapter_file(stage: Path) -> Path:
    for p in (stage / "adapter" / "adapter_model.safetensors", stage / "adapter_model.safetensors"):
        if p.is_file():
            return p
    return stage / "model.safetensors"  # full fine-tuning: the whole model is the "adapter"


def tokens_per_s(out: Path, stage: str) -> float:
    recs = [json.loads(x) for x in (out / "runs" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tok_per_s"] for r in recs if r["stage"] == stage and r["kind"] == "train"]
    speeds = speeds[len(speeds) // 2 :]  # the second half: past warm-up and the first step's allocations
    return sum(speeds) / max(len(speeds), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a speedrun run directory (checkpoints/sft, world/)")
    ap.add_argument("--out", type=Path, default=Path("runs/peft-bench"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128, help="packed rows of this many tokens (a fact QA is ~30)")
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=300)
    ap.add_argument("--bpb-tokens", type=int, default=16384, help="plain validation tokens for bits per byte")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's learning rate")
    ap.add_argument("--lora-targets", default="", help="lora/dora/qlora: projections to adapt, e.g. q,v")
    ap.add_argument("--lora-rank", type=int, default=4, help="lora/dora/qlora: the rank r")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="lora/dora/qlora: the update's scale is alpha / r")
    ap.add_argument("--rslora", action="store_true", help="rsLoRA's scale alpha / sqrt(r) instead of alpha / r")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="lora/dora/qlora: dropout on the adapter's input")
    ap.add_argument("--weight-decay", action="append", default=[], metavar="METHOD=WD",
                    help="a method's AdamW decay (default 0.1); on an adapter it pulls toward the base")  # fmt: skip
    ap.add_argument(
        "--virtual-tokens", type=int, default=0, help="prompt/ptuning/prefix/ptuning_v2/mam/unipelt: n (0 = 20)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-from", type=Path, help="results.json of an earlier run: reuse its base accuracies")
    a = ap.parse_args()
    # the levers against forgetting: a method's learning rate and decay, LoRA's target projections
    LRS.update(per_method(a.lr))
    WDS.update(per_method(a.weight_decay))
    alpha = a.lora_alpha * (a.lora_rank**0.5 if a.rslora else 1.0)  # rsLoRA: alpha/sqrt(r) == (alpha*sqrt(r))/r
    for m in ("prompt", "ptuning", "prefix", "ptuning_v2", "mam", "unipelt") if a.virtual_tokens else ():
        EXTRA[m] = [*EXTRA.get(m, []), "--peft.virtual_tokens", str(a.virtual_tokens)]
    for m in ("lora", "dora", "qlora"):
        EXTRA[m] = ["--lora.rank", str(a.lora_rank), "--lora.alpha", str(alpha), "--lora.dropout", str(a.lora_dropout)]
        if a.lora_targets:
            EXTRA[m] += ["--lora.targets", *a.lora_targets.split(",")]
    from tinychat.eval.report import wilson
    from tinychat.model import Model
    from tinychat.tokenizer import Tokenizer
    from tinychat.world.answers import check

    base = a.run / "checkpoints" / "sft"
    text = a.run / "world" / "pretrain" / "val.jsonl"
    tok = Tokenizer.from_pretrained(base)
    rows = [json.loads(x) for x in (a.run / "world" / "eval" / "facts_trained.jsonl").read_text().splitlines()]
    rows = rows[: a.eval_rows]
    data = make_data(a.run, a.out, a.train_rows, a.seed)
    torch.manual_seed(a.seed)
    model = Model.from_pretrained(str(base), dtype=torch.float32)
    base_bpb = bpb(model, tok, text, a.bpb_tokens)
    if a.base_from:  # another run's base accuracies (same --run and --eval-rows): not re-measured
        known = json.loads(a.base_from.read_text())["base"]
        ceiling, base_new, n = known["ceiling"], known["new_format"], len(rows)
    else:
        ceiling, n = accuracy(model, tok, rows, False, check)
        base_new, _ = accuracy(model, tok, rows, True, graded)
    print(f"base: usual format {ceiling:.1%} (the ceiling), new format {base_new:.1%}, bpb {base_bpb:.4f} (n={n})")
    results = []
    for method in a.methods.split(","):
        run = train(method, base, data, a.out, a)
        stage = a.out / "runs" / "checkpoints" / method
        tuned = Model.from_pretrained(str(stage), dtype=torch.float32)
        fmt: list[int] = []
        acc, n = accuracy(tuned, tok, rows, True, graded, fmt)
        k, total = trainable(method, base, tok, a.virtual_tokens)
        r = {"method": method, "trainable": k, "total": total, "accuracy": acc, "n": n,
             "interval": wilson(acc, n), "in_format": fmt[0] / n,
             "forgetting_bpb": bpb(tuned, tok, text, a.bpb_tokens) - base_bpb,
             "peak_mib": run["peak_mib"], "adapter_bytes": adapter_file(stage).stat().st_size,
             "tok_per_s": tokens_per_s(a.out, method), "lr": LRS[method],
             "weight_decay": WDS.get(method, TrainConfig.weight_decay), "lora_dropout": a.lora_dropout,
             "seed": a.seed, "steps": a.steps, "virtual_tokens": a.virtual_tokens or None}  # fmt: skip
        results.append(r)
        print(json.dumps(r), flush=True)
        summary = {"base": {"ceiling": ceiling, "new_format": base_new, "bpb": base_bpb}, "results": results}
        (a.out / "results.json").write_text(json.dumps(summary, indent=1))
    table(results, ceiling, base_new)
    return 0


def table(results: list[dict], ceiling: float, base_new: float) -> None:
    full = next((r for r in results if r["method"] == "none"), None)
    print(f"\nbase model: {base_new:.1%} in the new format; {ceiling:.1%} in its usual format (the ceiling)\n")
    print(
        "| method | trainable | accuracy [95% CI] | forgetting (Δ bpb) | peak memory | adapter | tokens/s (rel.) | lr |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["interval"]
        rel = r["tok_per_s"] / full["tok_per_s"] if full else float("nan")
        name = "full fine-tuning" if r["method"] == "none" else r["method"]
        print(f"| {name} | {100 * r['trainable'] / r['total']:.3f}% | {r['accuracy']:.1%} [{lo:.1%}–{hi:.1%}] "
              f"(n={r['n']}) | {r['forgetting_bpb']:+.4f} | {r['peak_mib']:.0f} MiB | "
              f"{r['adapter_bytes'] / 1024:,.0f} KiB | {rel:.2f}x | {r['lr']:g} |")  # fmt: skip
    if full:  # the goal: >= 90% of full fine-tuning's accuracy, <= 3% trainable, <= half its forgetting
        ok = [r for r in results if r["method"] != "none" and 100 * r["trainable"] / r["total"] <= 3.0]
        for r in sorted(ok, key=lambda r: -r["accuracy"]):
            meets = r["accuracy"] >= 0.9 * full["accuracy"] and r["forgetting_bpb"] <= full["forgetting_bpb"] / 2
            print(f"{r['method']}: {r['accuracy'] / max(full['accuracy'], 1e-9):.0%} of full fine-tuning's accuracy, "
                  f"{r['forgetting_bpb'] / full['forgetting_bpb']:.0%} of its forgetting: "
                  f"goal {'met' if meets else 'not met'}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
