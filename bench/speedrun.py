"""The speedrun over several world seeds: mean and spread of every measure the report card shows.

    .venv/bin/python bench/speedrun.py                          # seeds 0 1 2, the preset's 15 minutes each
    .venv/bin/python bench/speedrun.py --budget-minutes 60      # the same stages with every budget x4
    .venv/bin/python bench/speedrun.py --runs runs/s2 runs/s3   # only summarise runs that already exist

Why: one speedrun on one world is a single sample. With n=300 questions a rate's 95% interval is about
±6 points, and a different world seed changes which facts are easy; a recipe change is believed when it
holds across seeds. Runs go to runs/bench-B{budget}-s{seed} and are resumable (an existing finished run
is only summarised). This is a benchmark, not a test: 45 minutes at the default budget, on a quiet
machine (timed stages spend wall time, so load changes the result).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

STAGES = ("pretrain", "sft", "dpo", "grpo")


def final_stage(run: Path) -> str | None:
    return next((s for s in reversed(STAGES) if (run / "eval" / f"{s}.json").is_file()), None)


def measures(run: Path) -> dict[str, float]:
    """Every rate of the final model (suite accuracies, false refusal, kb/agent, alignment tax), in percent."""
    out: dict[str, float] = {}
    final = final_stage(run)
    if final is None:
        raise SystemExit(f"{run} has no evaluated stage; run the speedrun first.")
    ev = json.loads((run / "eval" / f"{final}.json").read_text())
    for name, r in ev["suites"].items():
        out[name] = 100 * r["accuracy"]
        if r.get("refused") is not None:
            out[f"{name} refused"] = 100 * r["refused"]
    apply = run / "eval" / "apply.json"
    a = json.loads(apply.read_text()) if apply.is_file() else None
    if a is not None and a.get("model", final) != final:  # a later `apply` of another checkpoint overwrote it
        print(f"{run}: eval/apply.json is of {a['model']}, not the final {final}; its kb/agent rows are left out")
        a = None
    if a is not None:
        out["kb_qa with kb"] = 100 * a["answers"]["accuracy_with_kb"]
        out["kb_qa without"] = 100 * a["answers"]["accuracy_without_kb"]
        out["agent with tools"] = 100 * a["agent"]["success_with_tools"]
        out["agent without"] = 100 * a["agent"]["success_without_tools"]
    base = json.loads((run / "eval" / "pretrain.json").read_text()).get("bpb")
    if base and ev.get("bpb"):
        out["bpb change vs base"] = 100 * (ev["bpb"]["bpb"] / base["bpb"] - 1)
    timings = run / "timings.json"
    if timings.is_file():
        out["minutes"] = sum(json.loads(timings.read_text()).values()) / 60
    return out


def summary(runs: list[Path]) -> str:
    rows = [measures(r) for r in runs]
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    head = f"{'measure':<28}" + "".join(f"{r.name:>14}" for r in runs) + f"{'mean':>9}{'sd':>7}"
    lines = [head]
    for k in keys:
        vals = [r[k] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"{k:<28}" + "".join(f"{v:>14.1f}" for v in vals) + f"{statistics.mean(vals):>9.1f}{sd:>7.1f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget-minutes", type=float, default=0.0, help="0 = the preset's own (15)")
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--runs", type=Path, nargs="*", help="summarise these finished runs instead of running")
    args = ap.parse_args()
    runs = args.runs
    if not runs:
        runs = []
        for seed in args.seeds:
            name = f"bench-B{args.budget_minutes or 15:g}-s{seed}"
            cmd = [sys.executable, "-m", "tinychat.cli", "speedrun", "--preset", args.preset, "--run", name]
            cmd += ["--runs-dir", args.runs_dir, "--seed", str(seed)]
            if args.budget_minutes:
                cmd += ["--budget-minutes", str(args.budget_minutes)]
            print("$", " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:
                return 1
            runs.append(Path(args.runs_dir) / name)
    print(summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
