"""What teaches the calculator in fewer steps than the drill and anneal: short stages from one run's pretrained
model, then the suites. For a machine whose 15 minutes cannot hold the drill (docs/speedrun.md, rounds 36-37).

    .venv/bin/python bench/calculator_probe.py runs/NAME --variants base anneal:150 anneal:150:calc5000 \
        drill:50+anneal:100 drill:100:sft+anneal:100 drill:100:docs+anneal:50 [--limit 100] [--out runs/calc_probe]

Every variant starts from runs/NAME/checkpoints/pretrain and runs its parts in order, each from the last one's
model, with the preset's own settings for that stage (tinychat.speedrun.Speedrun.stage_config: what the speedrun
would run):
- `base`: nothing; the pretrained model's own row.
- `anneal:STEPS[:calcN]`: `tinychat pretrain --stage anneal` on the run's mix plus its anneal rows
  (runs/NAME/drills/anneal.jsonl), with their calculator rows replaced by N fresh ones where `calcN` says so.
- `drill:STEPS[:sft|docs]`: `tinychat sft --stage drill` on 3,000 calculator rows (`tinychat world drills`,
  another seed than the run's), alone or with rows replayed beside them: `sft` the world's SFT rows of the
  short skills (facts, instruction, multistep, refusal, arithmetic, tell_me), `docs` every titled pretraining
  document as a "Tell me about TITLE" question answered by the document.
Then the suites the calculator can move or cost (chat, the first --limit rows, 95% Wilson intervals).

Accuracy, not speed: each part is budgeted in steps. Run it alone only for the wall times it prints.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path

from tinychat.eval.report import wilson
from tinychat.eval.run import evaluate_model
from tinychat.eval.suites import SuiteOptions
from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults
from tinychat.train.pretrain import PretrainConfig, run_pretrain
from tinychat.train.sft import SFTConfig, run_sft
from tinychat.world.drills import build

SUITES = ("facts_trained", "facts_heldout", "arithmetic", "arithmetic_tool", "instruction", "multistep")
REPLAY_SKILLS = {"facts", "instruction", "multistep_cot", "multistep_direct", "refusal", "arithmetic", "tell_me"}
CALC_ROWS = 3000  # a drill's calculator rows: the speedrun's drill trains ~2,600
ROW_SEED = 5  # not the run's own drill seed (0)


def calculator_rows(world: Path, n: int) -> list[str]:
    rows, _ = build(world, {"calculator": n}, val=0, seed=ROW_SEED)
    return [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]


def document_rows(world: Path) -> list[str]:
    """Each titled pretraining document ("TITLE\\n\\nbody") as a question about its title answered by its body."""
    out = []
    for line in (world / "pretrain" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        title, sep, body = json.loads(line)["text"].partition("\n\n")
        if not sep or "\n" in title or len(title) > 40:
            continue  # the sums and word-problem pages have no title
        zh = re.search(r"[\u4e00-\u9fff]", title) is not None
        ask = f"介绍一下{title}。" if zh else f"Tell me about {title}."
        msgs = [{"role": "user", "content": ask}, {"role": "assistant", "content": body}]
        out.append(json.dumps({"messages": msgs, "skill": "tell_me", "lang": "zh" if zh else "en"}, ensure_ascii=False))
    return [r + "\n" for r in out]


def drill_rows(run: Path, replay: str) -> tuple[list[str], list[str]]:
    """The drill's training rows (calculator and any replayed) and its validation rows (32 more calculator rows)."""
    rows = calculator_rows(run / "world", CALC_ROWS + 32)
    rows, val = rows[:CALC_ROWS], rows[CALC_ROWS:]
    if replay == "sft":
        sft = (run / "world" / "sft" / "train.jsonl").read_text(encoding="utf-8").splitlines(True)
        rows += [ln for ln in sft if json.loads(ln)["skill"] in REPLAY_SKILLS]
    elif replay == "docs":
        rows += document_rows(run / "world")
    elif replay:
        raise SystemExit(f"bad replay {replay!r}: sft or docs")
    random.Random(0).shuffle(rows)
    return rows, val


def anneal_rows(run: Path, calc: str) -> list[str]:
    if not (run / "drills" / "anneal.jsonl").is_file():
        raise SystemExit(f"{run} has no drills/anneal.jsonl: a speedrun with drills writes it at its drill stage.")
    lines = (run / "drills" / "anneal.jsonl").read_text(encoding="utf-8").splitlines(True)
    if not calc:
        return lines
    if not calc.startswith("calc") or not calc[4:].isdigit():
        raise SystemExit(f"bad anneal option {calc!r}: calcN")
    return [ln for ln in lines if "calculator_drill" not in ln] + calculator_rows(run / "world", int(calc[4:]))


def setup(run: Path, d: Path) -> None:
    """A run directory for the probe that shares the source run's world, tokenizer, text and pretrained model."""
    shutil.rmtree(d, ignore_errors=True)
    (d / "data").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    for part in ("world", "tokenizer", "data/clean", "checkpoints/pretrain"):
        (d / part).symlink_to((run / part).resolve())


def probe(run: Path, spec: str, out: Path, limit: int, preset: str) -> tuple[dict, list[str]]:
    d = out / re.sub(r"[^a-z0-9]+", "_", spec)
    setup(run, d)
    sr = Speedrun(with_preset_defaults(SpeedrunConfig(preset=preset, run=d.name, runs_dir=str(out))))
    model, said = d / "checkpoints" / "pretrain", []
    for part in [] if spec == "base" else spec.split("+"):
        kind, steps, opt = (part.split(":") + [""])[:3]
        if kind not in ("anneal", "drill") or not steps.isdigit():
            raise SystemExit(f"bad part {part!r}: anneal:STEPS[:calcN] or drill:STEPS[:sft|docs]")
        stage = f"{kind}{len(said)}"
        argv = ["--run", d.name, "--runs-dir", str(out), "--stage", stage, "--init", str(model)]
        t0 = time.perf_counter()
        if kind == "drill":
            rows, val = d / f"{stage}.jsonl", d / f"{stage}_val.jsonl"
            train_rows, val_rows = drill_rows(run, opt)
            rows.write_text("".join(train_rows), encoding="utf-8")
            val.write_text("".join(val_rows), encoding="utf-8")
            argv += ["--data", str(rows), "--val_data", str(val)]
            cfg = sr.stage_config(SFTConfig, "drill", argv)
            cfg.train.max_steps, cfg.train.max_time = int(steps), 0.0
            run_sft(cfg)
        else:
            rows, tokens = d / f"{stage}.jsonl", d / "data" / f"{stage}_tokens"
            rows.write_text("".join(anneal_rows(run, opt)), encoding="utf-8")
            sr.tokenize(tokens, [run / "world" / "sft" / "train.jsonl", rows])
            argv += ["--data", str(tokens), "--train.max_steps", steps, "--train.max_time", "0"]
            run_pretrain(sr.stage_config(PretrainConfig, "anneal", argv))
        said.append(f"{part} {time.perf_counter() - t0:.0f} s")
        model = d / "checkpoints" / stage
    result = evaluate_model(model, suites=SUITES, world_dir=run / "world", mode="chat", opts=SuiteOptions(limit=limit))
    (d / "eval.json").write_text(json.dumps(result, ensure_ascii=False, indent=1))
    return result["suites"], said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a speedrun's directory (runs/NAME) with checkpoints/pretrain")
    ap.add_argument("--variants", nargs="+", default=["base", "anneal:150", "drill:100:sft+anneal:100"])
    ap.add_argument("--limit", type=int, default=100, help="questions per suite (the stage evaluations' 100)")
    ap.add_argument("--preset", default="cpu-tiny", help="the preset whose [drill] and [anneal] settings the parts use")
    ap.add_argument("--out", type=Path, default=Path("runs/calc_probe"))
    args = ap.parse_args()
    print(f"{args.run}: short stages from its pretrained model, then {args.limit} questions per suite")
    print("| variant | " + " | ".join(SUITES) + " | wall |")
    print("|---|" + "---:|" * len(SUITES) + "---|")
    for spec in args.variants:
        suites, said = probe(args.run, spec, args.out / args.run.name, args.limit, args.preset)
        cells = []
        for s in SUITES:
            acc, n = suites[s]["accuracy"], suites[s]["n"]
            lo, hi = wilson(acc, n)
            cells.append(f"{acc * 100:.0f} [{lo * 100:.0f}-{hi * 100:.0f}]")
        print(f"| {spec} | " + " | ".join(cells) + f" | {', '.join(said) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
