"""Does GRPO raise arithmetic once the model knows some? An arithmetic drill, then GRPO, measured on tinyworld.

    .venv/bin/python bench/arith_rl.py --run runs/s5 [--drill-minutes 8] [--grpo-minutes 3] [--out DIR]

Why this exists: in the 15-minute speedrun the tiny model never gets an easy sum right (0% greedy after
SFT; 1.2% of temperature-1 samples and pass@8 9% on the s3 SFT model), so GRPO's group-normalised
advantages are zero for almost every group and arithmetic cannot move (issue 5's goal: GRPO at least
+10 points on arithmetic over SFT). This bench buys the missing arithmetic explicitly and then asks the
RL question of a model that has a signal to sharpen:

1. drill: `tinychat sft` from the run's DPO model (the model the speedrun's GRPO starts from) on the
   run's own SFT rows plus --drill-rows fresh easy arithmetic conversations (tinyworld's question
   templates, English and Chinese), for --drill-minutes, with the cpu-tiny [sft] settings;
2. grpo: `tinychat grpo` from the drilled model on --rl-rows fresh arithmetic prompts (exact-answer
   reward plus the format reward), for --grpo-minutes, with the cpu-tiny [grpo] settings;
3. the tinyworld arithmetic suite (and facts_trained, refusal: what the drill may cost) on the first
   --limit eval questions, greedy, before and after GRPO.

No problem of the run's eval sets (arithmetic, arithmetic_tool) appears in any row written here.
Everything goes under --out (default RUN/arith_rl); results.json holds the numbers.

Measured on run s5 (2026-11-23, 2-core CPU, 100 questions per suite; docs/post-training.md):
  default (drill on arithmetic + the SFT rows, 8 min): arithmetic 1% -> 9% (facts_trained 21% -> 52%),
      then GRPO 3 min: 4%
  --no-mix-sft (arithmetic only): 1% -> 25% (facts_trained 21% -> 0%), then GRPO 3 min: 14%
The drill's own validation accuracy (arithmetic only) was 0% at step 200, 6% at 400 and 47% at 554:
arithmetic takes off after ~400 answer-only optimizer steps, more than a 15-minute speedrun can spend.

Round 23 of docs/speedrun.md drills the pretrained base instead (2026-12-05, rw0; --limit 300 and the suites
there were run by hand the same way):
  --init runs/rw0/checkpoints/pretrain --no-mix-sft --drill-minutes 8 --drill-lr 1e-3 --drill-seq-len 128
      --drill-batch 16 --skip-grpo: 1,336 steps, arithmetic 82.3%, facts_trained 0%
  the same with --replay-sft 3500: arithmetic 53.0%, facts_trained 88.7%
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tinychat.cli import main as tinychat
from tinychat.world import arith
from tinychat.world.drills import arithmetic, held_out
from tinychat.world.facts import LANGS
from tinychat.world.load import load_jsonl
from tinychat.world.messages import user

SUITES = ("arithmetic", "facts_trained", "refusal")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def asked(rng: random.Random, exclude: set[str], n: int, seen: set[str]) -> list[tuple[arith.Problem, str, str]]:
    """n distinct easy problems (none in exclude or seen; seen records them), each as (problem, lang, question)."""
    out = []
    for p in arith.sample(rng, "easy", exclude, n, seen):
        lang = rng.choice(LANGS)
        out.append((p, lang, arith.question(p, lang, rng)))
    return out


def rl_rows(rng: random.Random, exclude: set[str], n: int) -> list[dict]:
    """GRPO rows: the question, with the answer its reward checks."""
    return [
        {"messages": [user(q)], "answer": str(p.value), "aliases": [], "check": "number", "lang": lang}
        for p, lang, q in asked(rng, exclude, n, set())
    ]


def evaluate(model: Path, world: Path, limit: int, out: Path) -> dict[str, float]:
    args = ["--model", str(model), "--world", str(world), "--suite", *SUITES, "--limit", str(limit), "--out", str(out)]
    rc = tinychat(["eval", *args])
    if rc:
        raise SystemExit(f"evaluation of {model} failed")
    suites = json.loads(out.read_text())["suites"]
    return {s: suites[s]["accuracy"] for s in SUITES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished speedrun directory (world/, checkpoints/dpo)")
    ap.add_argument("--config", default="configs/cpu-tiny.toml")
    ap.add_argument("--init", default="", help="model to drill (default RUN/checkpoints/dpo)")
    ap.add_argument("--drill-minutes", type=float, default=8.0)
    ap.add_argument("--drill-rows", type=int, default=40000, help="capped by the ~13.7k distinct easy problems")
    ap.add_argument("--mix-sft", action=argparse.BooleanOptionalAction, default=True, help="add the run SFT rows")
    ap.add_argument("--replay-sft", type=int, default=0, help="with --no-mix-sft: add this many of the run's SFT rows")
    ap.add_argument("--drill-lr", type=float, default=0.0, help="0 = the config's [sft] lr")
    ap.add_argument("--drill-seq-len", type=int, default=0, help="0 = the config's; 128 buys more steps per minute")
    ap.add_argument("--drill-batch", type=int, default=0, help="0 = the config's")
    ap.add_argument("--skip-grpo", action="store_true", help="stop after the drill (and its evaluation)")
    ap.add_argument("--grpo-minutes", type=float, default=3.0)
    ap.add_argument("--grpo-lr", type=float, default=0.0, help="0 = the config's")
    ap.add_argument("--rl-rows", type=int, default=4000)
    ap.add_argument("--limit", type=int, default=100, help="eval questions per suite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    run = Path(a.run)
    world = run / "world"
    init = Path(a.init) if a.init else run / "checkpoints" / "dpo"
    if not (init / "config.json").is_file() or not (world / "eval").is_dir():
        raise SystemExit(f"{run} is not a finished speedrun: it needs world/eval and {init}")
    out = Path(a.out) if a.out else run / "arith_rl"
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(a.seed)
    exclude = held_out(world)
    seen: set[str] = set()  # sample() records keys here, so validation problems are never drilled
    val = arithmetic(rng, exclude, 200, seen)
    drill = arithmetic(rng, exclude, a.drill_rows, seen)
    if a.mix_sft:
        drill += load_jsonl(world / "sft" / "train.jsonl")
    elif a.replay_sft:
        drill += random.Random(a.seed + 1).sample(load_jsonl(world / "sft" / "train.jsonl"), a.replay_sft)
    rng.shuffle(drill)
    rl = rl_rows(rng, exclude, a.rl_rows + 64)
    files = {
        "drill": write_jsonl(out / "drill.jsonl", drill),
        "drill_val": write_jsonl(out / "drill_val.jsonl", val),
        "rl": write_jsonl(out / "rl.jsonl", rl[64:]),
        "rl_val": write_jsonl(out / "rl_val.jsonl", rl[:64]),
    }
    common = ["--config", a.config, "--runs_dir", str(out), "--run", "bench"]
    results: dict[str, dict[str, float]] = {"start": evaluate(init, world, a.limit, out / "eval_start.json")}
    drill_args = ["--train.max_time", str(a.drill_minutes)]
    for flag, value in (
        ("--train.lr", a.drill_lr),
        ("--train.seq_len", a.drill_seq_len),
        ("--train.batch_size", a.drill_batch),
    ):
        drill_args += [flag, str(value)] if value else []
    rc = tinychat(
        ["sft", *common, "--init", str(init), "--data", str(files["drill"]), "--val_data", str(files["drill_val"]),
         *drill_args]
    )  # fmt: skip
    if rc:
        return rc
    drilled = out / "bench" / "checkpoints" / "sft"
    results["drill"] = evaluate(drilled, world, a.limit, out / "eval_drill.json")
    if a.skip_grpo:
        (out / "results.json").write_text(json.dumps({"args": vars(a), "accuracy": results}, indent=1))
        for s in SUITES:
            print(f"{s:<15}" + "".join(f"{100 * results[k][s]:>9.1f}%" for k in results))
        return 0
    grpo = ["grpo", *common, "--init", str(drilled), "--data", str(files["rl"]), "--val_data", str(files["rl_val"])]
    grpo += ["--train.max_time", str(a.grpo_minutes), "--max_new_tokens", "16"]
    if a.grpo_lr:
        grpo += ["--train.lr", str(a.grpo_lr)]
    rc = tinychat(grpo)
    if rc:
        return rc
    results["grpo"] = evaluate(out / "bench" / "checkpoints" / "grpo", world, a.limit, out / "eval_grpo.json")
    report = {"args": vars(a), "accuracy": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'suite':<15}" + "".join(f"{k:>10}" for k in results))
    for s in SUITES:
        print(f"{s:<15}" + "".join(f"{100 * results[k][s]:>9.1f}%" for k in results))
    gain = 100 * (results["grpo"]["arithmetic"] - results["drill"]["arithmetic"])
    print(f"GRPO - drill on arithmetic: {gain:+.1f} points (n={a.limit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
