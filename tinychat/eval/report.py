"""`tinychat report RUN`: the run's report card, runs/NAME/report.md with PNG plots in runs/NAME/plots/.

Every number comes from a file the run wrote while it ran: metrics.jsonl (training steps, training-time
evaluations, and the "eval_suite" lines of `tinychat eval` / the speedrun's evaluation), timings.json
(wall time per stage) and environment.json (machine, versions, git commit). Nothing is recomputed or
measured again here, so re-rendering is cheap, works on another machine, and gives the same file.
Where several evaluations of one (stage, suite) were recorded, the latest line wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.config import field
from tinychat.errors import UserError

# Pipeline order; stages not listed here follow in the order they first appear in metrics.jsonl.
STAGE_ORDER = ("copy", "pretrain", "drill", "anneal", "sft", "reward", "dpo", "ppo", "grpo", "distill")


@dataclass
class ReportConfig:
    run: str = field("", positional=True, help="run name under --runs-dir, or the path of a run directory")
    runs_dir: str = field("runs")
    plots: bool = field(True, help="draw the PNG plots (matplotlib)")


# ---------------------------------------------------------------------------------------------- reading
def read_records(run_dir: Path) -> list[dict[str, Any]]:
    from tinychat.train.metrics import read_metrics

    return read_metrics(run_dir)


def read_timings(run_dir: Path) -> dict[str, float]:
    try:
        data = json.loads((run_dir / "timings.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


def ordered_stages(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in records:
        s = r.get("stage")
        if isinstance(s, str) and s not in seen:
            seen.append(s)
    known = [s for s in STAGE_ORDER if s in seen]
    return known + [s for s in seen if s not in known]


@dataclass
class RunData:
    """What the report shows, gathered from the run's files (see the module docstring)."""

    name: str
    stages: list[str]
    train: dict[str, list[dict[str, Any]]]  # stage -> train records in order
    evals: dict[str, list[dict[str, Any]]]  # stage -> training-time eval records
    suites: dict[str, dict[str, dict[str, Any]]]  # stage -> suite -> latest eval_suite record
    timings: dict[str, float]
    environment: dict[str, Any] | None
    run_dir: Path | None = None
    peaks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # stage -> its MFU peak record

    def suite_names(self) -> list[str]:
        names: list[str] = []
        for stage in self.stages:
            for s in self.suites.get(stage, {}):
                if s != "bpb" and s not in names:
                    names.append(s)
        return names

    def params(self, stage: str) -> int | None:
        for rec in self.suites.get(stage, {}).values():
            if isinstance(rec.get("params"), int):
                return rec["params"]
        return None


def gather(run_dir: Path) -> RunData:
    from tinychat.eval import environment

    records = read_records(run_dir)
    stages = ordered_stages(records)
    train: dict[str, list[dict[str, Any]]] = {s: [] for s in stages}
    evals: dict[str, list[dict[str, Any]]] = {s: [] for s in stages}
    suites: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in stages}
    peaks: dict[str, dict[str, Any]] = {}
    for r in records:
        s, kind = r.get("stage"), r.get("kind")
        if s not in train:
            continue
        if kind == "train":
            train[s].append(r)
        elif kind == "eval":
            evals[s].append(r)
        elif kind == "peak":
            peaks[s] = r
        elif kind == "eval_suite" and isinstance(r.get("suite"), str):
            suites[s][r["suite"]] = r  # later lines replace earlier ones: the latest evaluation wins
    timings = read_timings(run_dir)
    return RunData(run_dir.name, stages, train, evals, suites, timings, environment.read(run_dir), run_dir, peaks)


# ---------------------------------------------------------------------------------------------- formatting
def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate p measured on n questions (honest at 0%, 100% and small n)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fmt_rate(p: float | None, n: Any) -> str:
    """'54.0% [47.1–60.8] (n=200)': the rate, its 95% interval and the number of questions."""
    if p is None:
        return "—"
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return fmt_pct(p)
    lo, hi = wilson(p, n)
    return f"{100 * p:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] (n={n})"


def fmt_num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def median(records: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)]
    return statistics.median(vals) if vals else None


# ---------------------------------------------------------------------------------------------- sections
def section_environment(d: RunData) -> list[str]:
    env = d.environment
    lines = ["## Machine and software", ""]
    if env is None:
        from tinychat.eval import environment

        env = environment.capture()
        lines += ["The run recorded no environment.json; this describes the machine that rendered the report.", ""]
    hw, ver, git = env.get("hardware", {}), env.get("versions", {}), env.get("git")
    ram = hw.get("ram_bytes")
    rows = [
        [
            "CPU",
            f"{hw.get('cpu', '?')} ({hw.get('cores', '?')} usable cores, {hw.get('torch_threads', '?')} torch threads)",
        ],
        ["RAM", f"{ram / 2**30:.1f} GiB" if isinstance(ram, int | float) else "—"],
        ["GPU", ", ".join(hw.get("gpus") or []) or "none"],
        ["Python", str(ver.get("python", "—"))],
        ["torch", str(ver.get("torch", "—"))],
        ["tinychat", str(ver.get("tinychat", "—"))],
        [
            "git commit",
            f"{git['commit']}{' (uncommitted changes)' if git.get('dirty') else ''}" if git else "not a git checkout",
        ],
    ]
    return lines + table(["", "recorded"], rows) + [""]


def section_timings(d: RunData) -> list[str]:
    if not d.timings:
        return ["## Wall time", "", "No timings.json (written by `tinychat speedrun`).", ""]
    total = sum(d.timings.values())
    rows = [[s, fmt_seconds(t), fmt_pct(t / total if total else None)] for s, t in d.timings.items()]
    rows.append(["**total**", f"**{fmt_seconds(total)}**", ""])
    return ["## Wall time per stage", "", *table(["stage", "wall time", "share"], rows), ""]


def section_sizing(d: RunData) -> list[str]:
    """The model shape the speedrun fitted to this machine (runs/NAME/sizing.json), when it fitted one."""
    rec = _json_file(d.run_dir / "sizing.json" if d.run_dir else None)
    if not isinstance(rec, dict) or not isinstance(rec.get("measured"), list):
        return []
    measured = [m for m in rec["measured"] if isinstance(m, dict)]
    priced = any("later_seconds" in m for m in measured)
    rows = [
        [
            f"`{m.get('shape')}`",
            fmt_num(m.get("seconds_per_step")),
            *([fmt_num(m.get("later_seconds"), 1)] if priced else []),
            fmt_num(m.get("predicted_steps")),
            "**chosen**" if m.get("shape") == rec.get("chosen") else "",
        ]
        for m in measured
    ]
    intro = (
        f"Pretraining's model shape: the first, largest first, predicted to reach {fmt_num(rec.get('target_steps'))} "
        "steps (or the target written after its '@') in its time budget, else the fastest; each timed on random "
        "tokens before training (tinychat.train.sizing). A dash: not timed, since on a CPU the cheapest shape's step "
        "scaled by FLOPs already left it short, or its later work not priced, since its own steps did."
    )
    later = ["later work (s)"] if priced else []
    head = ["shape ([model] options)", "seconds per step", *later, "predicted steps", ""]
    out = ["## Model shape fitted to this machine", "", intro, "", *table(head, rows), ""]
    pretrained = d.train.get("pretrain") or [{}]
    return out + _plan_lines(d.run_dir / "plan.json", pretrained[-1].get("step"))


def _json_file(f: Path | None) -> object:
    """A run's optional JSON record; None when it is missing or unreadable (the report leaves its section out)."""
    try:
        return json.loads(f.read_text()) if f and f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _plan_lines(f: Path, pretrain_steps: int | None = None) -> list[str]:
    """The speedrun's split of its budget (runs/NAME/plan.json), when it priced the later work; `pretrain_steps`,
    the steps pretraining ran, say whether the reserve's floor held it."""
    plan = _json_file(f)
    if not isinstance(plan, dict) or not isinstance(plan.get("pretrain_minutes"), (int, float)):
        return []
    budget, left, later = (fmt_num(plan.get(k), 0) for k in ("budget_seconds", "left_seconds", "later_seconds"))
    lines = [
        f"Pretraining got {plan['pretrain_minutes']:.2f} minutes: of the {budget} s budget, {left} s were left for it "
        "and the later work once the time spent, the later stages' budgets and the end margin were taken, and "
        f"{later} s of that went to the later work that no budget bounds "
        "(evaluation, apply, stage overheads), priced by a generation probe on this machine "
        "(tinychat.speedrun.generation_seconds)."
    ]
    if isinstance(plan.get("reserve_tokens"), int) and plan["reserve_tokens"]:  # the speedrun's stepped_tokens
        lines.append(
            f"Those minutes include the drill's and the anneal's: pretraining kept {plan['reserve_tokens'] / 1e6:.2f}M "
            "tokens of their steps back at its own measured rate and stopped when the rest was spent."
        )
        floor = plan.get("reserve_floor")
        if isinstance(floor, int) and floor and isinstance(pretrain_steps, int):
            held = "held it: the reserve would have stopped it earlier" if pretrain_steps <= floor else "was passed"
            lines[-1] += f" Its floor of {floor} steps, which the anneal gives way to, {held} ({pretrain_steps} steps)."
    skipped = plan.get("skipped")
    if isinstance(skipped, dict):  # the speedrun's skip: stages the budget could not hold
        for stage, reason in skipped.items():
            lines.append(f"The {stage} was left out of this run: {reason}.")
    if isinstance(plan.get("anneal_minutes"), (int, float)):  # the speedrun's replan_anneal
        priced = fmt_num(plan.get("anneal_priced_seconds"), 0)
        lines.append(
            f"The anneal got {plan['anneal_minutes']:.2f} minutes, what the budget left when it started (priced "
            f"at {priced} s before pretraining)."
        )
    return [*lines, ""]


PEAK_KEYS = ("peak_flops", "probe_min", "probe_median", "probe_max")


def section_training(d: RunData) -> list[str]:
    rows = []
    for s in d.stages:
        tr = d.train[s]
        if not tr:
            continue
        last = tr[-1]
        rows.append(
            [
                s,
                fmt_count(d.params(s)),
                f"{last.get('step', len(tr)):,}",
                fmt_count(last.get("tokens")),
                fmt_num(last.get("loss")),
                fmt_count(median(tr, "tok_per_s")),
                fmt_pct(median(tr, "mfu")),
                fmt_seconds(last.get("elapsed")),
            ]
        )
    if not rows:
        return []
    head = [
        "stage",
        "parameters",
        "steps",
        "tokens seen",
        "final loss",
        "tokens/s (median step)",
        "MFU (median step)",
        "training time",
    ]
    out = ["## Training", "", *table(head, rows), ""]
    peak_rows = [
        [
            s,
            *(f"{p[k] / 1e12:.3f}" if isinstance(p.get(k), int | float) else "—" for k in PEAK_KEYS),
            p.get("source", "?"),
        ]
        for s, p in d.peaks.items()
    ]
    if peak_rows:
        out += [
            "MFU is measured against the peak below (TFLOP/s): the best of five matmul probes at the stage's start",
            "and of earlier probes on this machine, unless pinned with --train.peak_flops. The spread of the probes",
            "shows how much else the machine was doing.",
            "",
            *table(["stage", "peak used", "probe min", "probe median", "probe max", "source"], peak_rows),
            "",
        ]
    val_rows = []
    for s in d.stages:
        if not d.evals[s]:
            continue
        last = d.evals[s][-1]
        scalars = {
            k: v
            for k, v in last.items()
            if k not in ("stage", "kind", "step", "time") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        shown = ", ".join(f"{k} {fmt_num(v)}" for k, v in scalars.items())
        val_rows.append([s, f"{last.get('step', 0):,}", shown or "—"])
    if val_rows:
        out += ["Last training-time evaluation of each stage (each objective's own validation numbers):", ""]
        out += [*table(["stage", "step", "values"], val_rows), ""]
    return out


def _cell(rec: dict[str, Any] | None, key: str = "accuracy") -> str:
    if rec is None:
        return "—"
    return fmt_rate(rec.get(key), rec.get("n"))


def section_suites(d: RunData) -> list[str]:
    names = d.suite_names()
    stages = [s for s in d.stages if any(k != "bpb" for k in d.suites[s])]
    if not names or not stages:
        return []
    rows = [["*mode*", *[next(iter(d.suites[s].values())).get("mode", "?") for s in stages]]]
    for name in names:
        rows.append([name, *[_cell(d.suites[s].get(name)) for s in stages]])
        for lang in ("en", "zh"):
            cells = [d.suites[s].get(name, {}).get("by_lang", {}).get(lang) for s in stages]
            if any(cells):
                rows.append([f"&nbsp;&nbsp;{name} · {lang}", *[fmt_pct(c["accuracy"]) if c else "—" for c in cells]])
        for m in ("cot", "direct"):
            cells = [d.suites[s].get(name, {}).get("by_mode", {}).get(m) for s in stages]
            if any(cells):
                label = "chain of thought" if m == "cot" else "direct answer"
                rows.append([f"&nbsp;&nbsp;{name} · {label}", *[fmt_pct(c["accuracy"]) if c else "—" for c in cells]])
        refused = [d.suites[s].get(name, {}).get("refused") for s in stages]
        if any(r is not None for r in refused):
            rows.append([f"&nbsp;&nbsp;{name} · refused (false refusal)", *[fmt_pct(r) for r in refused]])
        tools = [d.suites[s].get(name, {}).get("tool") for s in stages]
        if any(tools):
            rows.append([f"&nbsp;&nbsp;{name} · tool used", *[fmt_pct(t["use_rate"]) if t else "—" for t in tools]])
            rows.append(
                [f"&nbsp;&nbsp;{name} · valid tool calls", *[fmt_pct(t["validity_rate"]) if t else "—" for t in tools]]
            )
    return [
        "## Evaluation",
        "",
        "Accuracy on the tinyworld eval sets (known answers: facts as the value or one short sentence stating it,",
        "formats and numbers exactly; base models few-shot, chat models through the chat template; greedy),",
        "with the 95% Wilson interval in brackets: with n=24 a rate moves about",
        "±20 points, with n=200 about ±7. Rows indented under a suite break it down by language, by chain of",
        "thought vs direct answer, and by calculator use.",
        "",
        *table(["suite", *stages], rows),
        "",
    ]


def shared_accuracy(outcomes: list[str]) -> tuple[list[float], int]:
    """Each stage's accuracy on the rows every one of them answered (per-row strings of 1/0/., see
    eval/suites.py `outcomes`), and how many rows that is."""
    common = [i for i in range(min(map(len, outcomes))) if all(o[i] != "." for o in outcomes)]
    if not common:
        return [], 0
    return [sum(o[i] == "1" for i in common) / len(common) for o in outcomes], len(common)


def section_stage_gains(d: RunData) -> list[str]:
    """What each stage added: accuracy on the same questions for every stage (the final model answers more
    of them than the earlier ones), with the change from the stage before in points."""
    stages = [s for s in d.stages if any(k != "bpb" for k in d.suites[s])]
    if len(stages) < 2:
        return []
    rows = []
    for name in d.suite_names():
        outs = [d.suites[s].get(name, {}).get("outcomes") for s in stages]
        if not all(isinstance(o, str) and o for o in outs) or len({len(o) for o in outs}) != 1:
            continue
        accs, n = shared_accuracy(outs)
        if not n:
            continue
        cells = [fmt_pct(accs[0])]
        cells += [f"{fmt_pct(a)} ({100 * (a - b):+.1f})" for b, a in zip(accs, accs[1:])]
        rows.append([name, str(n), *cells])
    if not rows:
        return []
    return [
        "## What each stage added",
        "",
        "Each stage on the same questions (those every stage answered), with the change from the stage before",
        "in points. Differences within a stage's 95% interval (about ±10 points at n = 100) are noise.",
        "",
        *table(["suite", "n", *stages], rows),
        "",
    ]


def section_alignment_tax(d: RunData) -> list[str]:
    stages = [s for s in d.stages if "bpb" in d.suites[s]]
    if not stages:
        return []
    base = next((s for s in stages if d.suites[s]["bpb"].get("mode") == "base"), stages[0])
    b0 = d.suites[base]["bpb"].get("val_bpb")
    rows = []
    for s in stages:
        r = d.suites[s]["bpb"]
        v = r.get("val_bpb")
        delta = f"{v - b0:+.4f}" if isinstance(v, float) and isinstance(b0, float) and s != base else "—"
        rows.append([s, fmt_num(v), delta, fmt_num(r.get("val_ppl"), 2), fmt_count(r.get("val_tokens"))])
    src = d.suites[stages[0]]["bpb"].get("source", "?")
    return [
        "## Alignment tax",
        "",
        f"Bits per byte on the same held-out text ({src}) after each stage; Δ is the change from the base model",
        f"({base}). Post-training that forgets plain text shows up as a positive Δ.",
        "",
        *table(["stage", "bits per byte", "Δ vs base", "perplexity", "tokens scored"], rows),
        "",
    ]


def section_harness(d: RunData) -> list[str]:
    rows = []
    for s in d.stages:
        for name, rec in d.suites[s].items():
            if name.startswith("lm_eval:"):
                metrics = rec.get("metrics", {})
                shown = ", ".join(f"{k} {fmt_num(v)}" for k, v in metrics.items() if "stderr" not in k)
                rows.append([s, name.removeprefix("lm_eval:"), shown])
    return ["## lm-evaluation-harness", "", *table(["stage", "task", "metrics"], rows), ""] if rows else []


def section_apply(d: RunData) -> list[str]:
    from tinychat.eval.apply import section

    return section(d.run_dir) if d.run_dir is not None else []


# ---------------------------------------------------------------------------------------------- writing
def render(d: RunData, plot_files: list[tuple[str, str]], plot_note: str = "") -> str:
    lines = [
        f"# Report card: {d.name}",
        "",
        "Built from this run's metrics.jsonl, timings.json and environment.json by `tinychat report`.",
        "",
    ]
    lines += section_environment(d)
    lines += section_timings(d)
    lines += section_training(d)
    lines += section_sizing(d)
    lines += section_suites(d)
    lines += section_stage_gains(d)
    lines += section_alignment_tax(d)
    lines += section_harness(d)
    lines += section_apply(d)
    if plot_files or plot_note:
        lines += ["## Plots", ""]
        lines += [f"![{title}](plots/{name})" for name, title in plot_files]
        lines += [plot_note] if plot_note else []
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path, plots: bool = True) -> Path:
    """Render runs/NAME/report.md (+ plots/*.png) from the run's recorded files; returns the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist.")
    d = gather(run_dir)
    if not d.stages and not d.timings:
        raise UserError(f"{run_dir} has no metrics.jsonl records and no timings.json; nothing to report.")
    plot_files: list[tuple[str, str]] = []
    note = ""
    if plots:
        try:
            from tinychat.eval.plots import draw_all
        except ImportError:
            note = "(plots skipped: matplotlib is not installed; pip install 'tinychat[eval]')"
        else:
            plot_files = draw_all(d, run_dir / "plots")
    path = run_dir / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(d, plot_files, note), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run(cfg: ReportConfig) -> int:
    if not cfg.run:
        raise UserError("name the run: tinychat report NAME [--runs-dir DIR].")
    cand = Path(cfg.runs_dir) / cfg.run
    run_dir = cand if cand.is_dir() or not Path(cfg.run).is_dir() else Path(cfg.run)
    path = write_report(run_dir, cfg.plots)
    print(f"report -> {path}")
    return 0
