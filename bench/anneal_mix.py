"""What a row kind in the anneal's mix costs and buys, without a whole speedrun: the anneal alone, from a run's
drilled model, once per variant of its extra rows, then the suites.

    .venv/bin/python bench/anneal_mix.py runs/NAME --variants none ms1500:cot ms3000:cot ms3000:both \
        ms3000:cot:numeric ms3000:cot:all:en [--steps 0] [--out runs/anneal_mix]

A variant is `none` (the default anneal's drill rows: arithmetic and calculator, no word problems) or
`msN:FORM[:KINDS[:LANGS]]`: those rows plus N word problems over the world's trained entities (the multistep
drill's rows, tinychat.world.drills.multistep_rows: no eval question), FORM cot (worked in the reply), direct
(steps in a <think> block) or both (half each), KINDS all, numeric or lookup, LANGS en, zh or en,zh. Either may
end in `+inN[:KINDS]`: N questions about the trained entities with an instruction (tinychat.world.drills.
instruction_rows: capitals and the other language unless KINDS, a comma list of the eval's instruction kinds,
says otherwise; no (entity, fact, instruction) the eval asks). Each variant
tokenizes the run's cleaned text with its world's SFT rows and these rows (`tinychat data tokenize` with the
preset's chat weights), anneals from runs/NAME/checkpoints/drill with the run's own anneal settings
(config.anneal.toml) for the same number of steps as its anneal took (or --steps), and evaluates the four suites
the problems can move (chat, n = 300, 95% Wilson intervals). The run must have drilled and annealed.

Why (docs/speedrun.md, round 32): round 31's 6,000 problems in the anneal cost held-out facts 11 points, and a
whole run per variant is 15 minutes and one seed's noise on top. An anneal alone is ~3.5 minutes on 2 cores and
every variant starts from the same weights. Accuracy, not speed: run it alone only for its wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from tinychat.eval.report import wilson
from tinychat.world import multistep
from tinychat.world.drills import INSTRUCTION_KINDS, instruction_rows, multistep_rows

SUITES = ("facts_trained", "facts_heldout", "multistep", "instruction")
KINDS = {
    "all": multistep.KINDS,
    "numeric": multistep.NUMERIC_KINDS,
    "lookup": tuple(k for k in multistep.KINDS if k not in multistep.NUMERIC_KINDS),
}


def anneal_steps(run: Path) -> int:
    """The steps the run's own anneal took (its metrics log)."""
    steps = 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d.get("stage") == "anneal" and "step" in d:
            steps = max(steps, int(d["step"]))
    return steps


def variant_rows(run: Path, spec: str) -> list[str]:
    """The anneal's drill rows without word problems or instruction rows, plus the variant's (see the module
    docstring)."""
    spec, *more = spec.split("+")
    lines = (run / "drills" / "anneal.jsonl").read_text().splitlines(True)
    base = [ln for ln in lines if "multistep_drill" not in ln and "instruction_drill" not in ln]
    for part in more:  # inN[:KIND,KIND]: N instruction rows (tinychat.world.drills.instruction_rows)
        n, _, kinds = part.partition(":")
        if not n.startswith("in") or not n[2:].isdigit():
            raise SystemExit(f"bad variant part {part!r}: inN[:upper,lang,json,sentence,number_only,one_word]")
        asked = tuple(kinds.split(",")) if kinds else INSTRUCTION_KINDS
        rows = instruction_rows(random.Random(11), run / "world", int(n[2:]), asked)
        base += [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
    if spec == "none":
        return base
    n, form, kinds, langs = (spec.split(":") + ["both", "all", "en,zh"][len(spec.split(":")) - 1 :])[:4]
    if not n.startswith("ms") or form not in ("cot", "direct", "both") or kinds not in KINDS:
        raise SystemExit(f"bad variant {spec!r}: none, or msN:cot|direct|both[:all|numeric|lookup[:en,zh]]")
    direct = {"cot": 0.0, "direct": 1.0, "both": 0.5}[form]
    rows = multistep_rows(random.Random(7), run / "world", int(n[2:]), direct, KINDS[kinds], tuple(langs.split(",")))
    return base + [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]


def tinychat(*args: str, log: Path) -> None:
    with log.open("w") as f:
        if subprocess.run([sys.executable, "-m", "tinychat.cli", *args], stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"tinychat {args[0]} failed; see {log}")


def probe(run: Path, spec: str, steps: int, out: Path, preset: str) -> dict:
    d = out / spec.replace(":", "_").replace(",", "")
    d.mkdir(parents=True, exist_ok=True)
    rows = d / "rows.jsonl"
    rows.write_text("".join(variant_rows(run, spec)), encoding="utf-8")
    tokens = d / "tokens"
    chat = [str(run / "world" / "sft" / "train.jsonl"), str(rows)]
    tinychat(
        *("data", "tokenize", str(run / "data" / "clean"), "--tokenizer", str(run / "tokenizer")),
        *("--out", str(tokens), "--val_fraction", "0.05", "--progress", "false", "--force", "true", "--chat", *chat),
        *("--config", preset),
        log=d / "tokenize.log",
    )
    tinychat(
        *("pretrain", "--config", str(run / "config.anneal.toml"), "--run", d.name, "--runs_dir", str(out)),
        *("--data", str(tokens), "--init", str(run / "checkpoints" / "drill"), "--tokenizer", str(run / "tokenizer")),
        *("--resume", "false", "--train.max_time", "0", "--train.max_steps", str(steps)),
        log=d / "anneal.log",
    )
    tinychat(
        *("eval", "--model", str(out / d.name / "checkpoints" / "anneal"), "--world", str(run / "world")),
        *("--mode", "chat", "--suite", *SUITES, "--limit", "300", "--out", str(d / "eval.json")),
        log=d / "eval.log",
    )
    return json.loads((d / "eval.json").read_text())["suites"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a speedrun's directory (runs/NAME) that drilled and annealed")
    ap.add_argument("--variants", nargs="+", default=["none", "ms1500:cot"])
    ap.add_argument("--steps", type=int, default=0, help="anneal steps (0: as many as the run's own anneal)")
    ap.add_argument("--preset", default="configs/cpu-tiny.toml", help="its [data_tokenize] chat weights")
    ap.add_argument("--out", type=Path, default=Path("runs/anneal_mix"))
    args = ap.parse_args()
    steps = args.steps or anneal_steps(args.run)
    print(f"{args.run}: the anneal alone from its drilled model, {steps} steps per variant")
    print("| variant | " + " | ".join(SUITES) + " |")
    print("|---|" + "---:|" * len(SUITES))
    for spec in args.variants:
        suites = probe(args.run, spec, steps, args.out / args.run.name, args.preset)
        cells = []
        for s in SUITES:
            acc, n = suites[s]["accuracy"], suites[s]["n"]
            lo, hi = wilson(acc, n)
            by = "/".join(f"{v['accuracy'] * 100:.0f}" for v in suites[s]["by_lang"].values())
            cells.append(f"{acc * 100:.1f} [{lo * 100:.0f}-{hi * 100:.0f}] ({by})")
        print(f"| {spec} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
