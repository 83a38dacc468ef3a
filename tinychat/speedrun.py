"""`tinychat speedrun`: raw text to a trained model on a laptop CPU, every stage in order, resumable.

Stages run in pipeline order; each is skipped when its output already exists, so re-running continues
where a previous run stopped and never redoes finished work. Each stage's options come from the
preset file (configs/PRESET.toml) through the same config system as the stand-alone commands, so
`tinychat speedrun` and running the commands by hand do exactly the same thing. The time budget is
split across stages by the preset's per-stage `max_time` and scaled by --budget-minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tinychat.config import ConfigError, field, load_toml, parse_args
from tinychat.errors import UserError

if TYPE_CHECKING:
    from tinychat.model.config import ModelConfig
    from tinychat.train.config import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class SpeedrunConfig:
    preset: str = field("cpu-tiny", help="a preset in configs/ (or a path to a TOML file)")
    run: str = field("speedrun", help="run name: everything goes to RUNS_DIR/NAME")
    runs_dir: str = field("runs")
    budget_minutes: float = field(0.0, help="total time budget; 0 = the preset's own")
    world_size: str = field("small", help="tinyworld size: micro, small or medium")
    seed: int = field(0, help="world seed")
    vocab_size: int = field(8192, help="tokenizer vocabulary size")
    whole_words: bool = field(
        True, help="the tokenizer learns no merge across the edge of a Chinese name or value of the world"
    )
    val_fraction: float = field(0.05, help="share of pretraining documents held out for bits per byte")
    stages: list[str] = field([], help="run only these stages (default: all)")
    eval_limit: int = field(24, help="questions per evaluation suite for the final model")
    stage_eval_limit: int = field(0, help="questions per suite for the earlier stages (0 = eval_limit)")
    apply_limit: int = field(48, help="knowledge-base questions for the final model (agent tasks: half as many)")
    apply_k: int = field(
        1, help="retrieved chunks in each knowledge-base prompt: the tiny model reads one (docs/speedrun.md, round 26)"
    )
    eval_bpb_tokens: int = field(8192, help="validation tokens for bits per byte at each stage")
    copy_drills: bool = field(
        False, help="a copy-drill stage before pretraining ([copy-drills] in the preset; pretraining continues it)"
    )
    drills: list[str] = field(
        [],
        help="drill kinds (arithmetic, calculator, reading, agent, multistep, instruction) for a drill stage after "
        "pretraining and an anneal after it ([world_drills], [drill], [anneal] in the preset; docs/speedrun.md, round "
        "24); none = neither stage",
    )
    anneal_drills: list[str] = field(
        [],
        help="drill kinds whose rows join only the anneal's mix (anneal_drill_rows of each), not the drill stage: "
        "a skill the anneal's many mixed steps teach without a drill's erasure (multistep: round 31; instruction: "
        "round 34)",
    )
    drill_steps: dict[str, int] = field(
        {"arithmetic": 150, "calculator": 150, "reading": 500, "agent": 300, "multistep": 150, "instruction": 150},
        help="the drill's steps for each kind it drills, summed (the calculator alone: 150; with arithmetic: 300); "
        "a kind not named here leaves [drill.train] max_steps as it is",
    )
    drill_seq_len: dict[str, int] = field(
        {"reading": 512, "agent": 1024},
        help="the drill's window for kinds whose rows need more than [drill.train] seq_len, the longest over the kinds "
        "drilled: a reading row is ~220 tokens (up to ~350), and 256-token windows with 4 questions a passage did not "
        "take off in 500 steps (round 26); an agent row is ~730 (up to ~960: two tool schemas, 2-3 search results); "
        "its steps are priced by their tokens",
    )
    drill_step_tokens: int = field(
        8192,
        help="when drill_seq_len widens the drill's window, its batch shrinks to hold at most this many tokens a step "
        "(rows are packed: 8 x 1024 shows an agent drill as many rows as 16 x 512 shows reading)",
    )
    anneal_drill_rows: dict[str, int] = field(
        {"arithmetic": 3000, "calculator": 1000, "reading": 1000, "agent": 500, "multistep": 2000, "instruction": 3000},
        help="drill rows of each kind kept in the anneal's mix, so the drilled skill survives it (a worked sum is "
        "~45 tokens, a calculator row ~230, an agent row ~730, a multistep solution ~90, an instruction row ~40)",
    )
    chat_in_pretrain: bool = field(
        True, help="mix the world's SFT conversations into the pretraining tokens ([data_tokenize] chat_weights)"
    )
    shapes: list[str] = field(
        [],
        help="model shapes to fit to this machine, largest first, each [model] options as 'key=value,...', "
        "optionally '@STEPS', a target of its own (tinychat.train.sizing); empty = the preset's [model] as it is",
    )
    target_steps: int = field(
        0, help="with shapes: pretraining steps the chosen shape must be predicted to reach in its time budget"
    )
    later_work: float = field(
        0.0,
        help="with shapes: the work after pretraining that no stage budget bounds (stage overheads, evaluation, "
        "apply), in units of the generation probe's time (generation_seconds); pretraining then gets what the "
        "budget leaves; 0 = pretraining keeps its preset max_time and reserve",
    )
    end_margin: float = field(30.0, help="with later_work: seconds of the budget the plan leaves unused")


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p
    cand = CONFIG_DIR / f"{name}.toml"
    if not cand.is_file():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))) or "none found"
        raise UserError(f"unknown preset '{name}'; presets in {CONFIG_DIR}: {known}.")
    return cand


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    run: Callable[[], object]
    minutes: float = 0.0  # the preset's budget for this stage (informational for data stages)


class Speedrun:
    def __init__(self, cfg: SpeedrunConfig) -> None:
        self.cfg = cfg
        self.preset_file = preset_path(cfg.preset)
        self.preset = load_toml(self.preset_file)
        self.run_dir = Path(cfg.runs_dir) / cfg.run
        self.base_budget = float(self.preset.get("speedrun", {}).get("budget_minutes", 15.0))
        self.scale = (cfg.budget_minutes / self.base_budget) if cfg.budget_minutes else 1.0
        self.stage_t0 = time.perf_counter()  # when the running stage started (seconds_left)
        self.stage_name = "pretrain"  # the running stage: its time so far is counted from stage_t0, not timings
        self._probe: dict[str, float] = {}  # generation_seconds per model shape

    # ------------------------------------------------------------------ helpers
    @property
    def drill_kinds(self) -> list[str]:
        """The drill stage's kinds; [] (no drill or anneal stage) for `--drills none`."""
        return [k for k in self.cfg.drills if k != "none"]

    @property
    def anneal_only(self) -> list[str]:
        """Kinds whose drill rows only the anneal's mix gets (anneal_drills, less the drilled kinds)."""
        return [k for k in self.cfg.anneal_drills if k not in self.drill_kinds]

    def stage_config(self, cls: type, section: str, argv: list[str]) -> object:
        """A stage's config exactly as `tinychat SECTION --config PRESET ARGV` would build it."""
        from tinychat.cli import preset_sections

        return parse_args(cls, ["--config", str(self.preset_file), *argv], section=section, sections=preset_sections())

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def scaled(self, cfg: object) -> object:
        """Scale a training stage's time budget by --budget-minutes."""
        train = getattr(cfg, "train", None)
        if train is not None and train.max_time:
            train.max_time = round(train.max_time * self.scale, 3)
        return cfg

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        return [
            Stage("world", lambda: (self.path("world", "manifest.json")).is_file(), self.world),
            Stage("tokenizer", lambda: self.path("tokenizer", "tokenizer.json").is_file(), self.tokenizer),
            Stage("data", lambda: self.path("data", "tokens", "index.json").is_file(), self.data),
            *([Stage("copy", lambda: self.done("copy"), self.copy_drills)] if self.cfg.copy_drills else []),
            Stage("pretrain", lambda: self.done("pretrain"), self.pretrain),
            *(
                [
                    Stage("drill", lambda: self.done("drill") or self.skipped("drill"), self.drill),
                    Stage("anneal", lambda: self.done("anneal") or self.skipped("anneal"), self.anneal),
                ]
                if self.drill_kinds
                else []
            ),
            Stage("sft", lambda: self.done("sft"), lambda: self.post("tinychat.train.sft", "SFTConfig", "sft")),
            Stage("dpo", lambda: self.done("dpo"), lambda: self.post("tinychat.train.dpo", "DPOConfig", "dpo")),
            Stage("grpo", lambda: self.done("grpo"), lambda: self.post("tinychat.train.grpo", "GRPOConfig", "grpo")),
            Stage("eval", lambda: not self.unevaluated(), self.evaluate),
            Stage("apply", lambda: self.path("eval", "apply.json").is_file(), self.apply),
            Stage("report", lambda: False, self.report),  # always re-rendered: cheap, and reflects every stage
        ]

    TRAINED = ("pretrain", "drill", "anneal", "sft", "dpo", "grpo")

    def unevaluated(self) -> list[str]:
        return [s for s in self.TRAINED if self.done(s) and not self.path("eval", f"{s}.json").is_file()]

    def evaluate(self) -> None:
        """Every trained stage on the same suites and validation tokens: what each stage taught the model."""
        from tinychat.eval import evaluate_stage

        final = next((s for s in reversed(self.TRAINED) if self.done(s)), None)
        for stage in self.unevaluated():
            t0 = time.perf_counter()
            limit = self.cfg.eval_limit if stage == final else (self.cfg.stage_eval_limit or self.cfg.eval_limit)
            # a base model that met the chat format in pretraining is asked through the template too
            mode = "chat" if stage != "pretrain" or self.cfg.chat_in_pretrain else "base"
            evaluate_stage(self.run_dir, stage, mode=mode, limit=limit, bpb_tokens=self.cfg.eval_bpb_tokens)
            print(f"    evaluated {stage} in {_fmt(time.perf_counter() - t0)}", flush=True)

    def apply(self) -> None:
        """The final model with the world's knowledge base and the agent's tools, versus without them."""
        from tinychat.eval.apply import apply_eval

        final = next((s for s in reversed(self.TRAINED) if self.done(s)), None)
        if final is None or final == "pretrain":
            print("    skipped: no chat model (run sft first)", flush=True)
            return
        r = apply_eval(
            self.run_dir,
            self.path("checkpoints", final),
            self.cfg.apply_limit,
            self.cfg.apply_limit // 2,
            self.cfg.apply_k,
        )
        a, g = r["answers"], r["agent"]
        print(
            f"    kb_qa {a['accuracy_without_kb']:.3f} -> {a['accuracy_with_kb']:.3f} with the knowledge base; "
            f"agent tasks {g['success_without_tools']:.3f} -> {g['success_with_tools']:.3f} with tools",
            flush=True,
        )

    def report(self) -> None:
        from tinychat.eval import write_report

        print(f"    report card: {write_report(self.run_dir)}", flush=True)

    def done(self, stage: str) -> bool:
        """A training stage is done once its final model directory exists (step checkpoints do not count)."""
        return self.path("checkpoints", stage, "config.json").is_file()

    def world(self) -> None:
        from tinychat.world.generate import generate_world

        generate_world(self.path("world"), seed=self.cfg.seed, size=self.cfg.world_size)

    def tokenizer(self) -> None:
        from tinychat.tokenizer.train import TokenizerTrainConfig
        from tinychat.tokenizer.train import run as train_tok
        from tinychat.world import chinese_words, load_world

        words = []
        if self.cfg.whole_words:
            words_file = self.path("tokenizer_words.txt")
            words_file.write_text("\n".join(chinese_words(load_world(self.path("world")))) + "\n", encoding="utf-8")
            words = ["--words", str(words_file)]
        cfg = self.stage_config(
            TokenizerTrainConfig,
            "tokenizer_train",
            [
                "--input",
                str(self.path("world", "pretrain", "train.jsonl")),
                "--chat-input",  # the chat template's text too: tool schemas must not eat the context
                str(self.path("world", "sft", "train.jsonl")),
                "--vocab-size",
                str(self.cfg.vocab_size),
                "--out",
                str(self.path("tokenizer")),
                *words,
            ],
        )
        train_tok(cfg)

    def data(self) -> None:
        from tinychat.data.prepare import PrepareConfig
        from tinychat.data.prepare import run as prepare

        clean = self.path("data", "clean")
        if not (clean / "stats.json").is_file():
            shutil.rmtree(clean, ignore_errors=True)
            prepare(
                self.stage_config(
                    PrepareConfig,
                    "data_prepare",
                    [str(self.path("world", "pretrain", "train.jsonl")), "--out", str(clean)],
                )
            )
        sft_rows = [self.path("world", "sft", "train.jsonl")] if self.cfg.chat_in_pretrain else []
        self.tokenize(self.path("data", "tokens"), sft_rows)

    def tokenize(self, out: Path, chat: list[Path]) -> None:
        """`tinychat data tokenize` of the cleaned text into `out`, with these chat rows mixed in ([data_tokenize]
        chat_weights): the data stage's tokens, and the anneal's with the drill rows added."""
        from tinychat.data.tokenize import TokenizeConfig
        from tinychat.data.tokenize import run as tokenize

        shutil.rmtree(out, ignore_errors=True)  # a half-written one cannot exist (atomic), an old one is stale
        argv = [str(self.path("data", "clean")), "--tokenizer", str(self.path("tokenizer")), "--out", str(out)]
        argv += ["--val-fraction", str(self.cfg.val_fraction), *(["--chat", *map(str, chat)] if chat else [])]
        tokenize(self.stage_config(TokenizeConfig, "data_tokenize", argv))

    def copy_drills(self) -> None:
        """Pure copy drills for a fresh model of the fitted shape, so that pretraining starts with the circuit
        that copies from the context (tinychat.train.copy_drills); budgeted in steps, since the plateau it must
        pass is, and its time is taken from pretraining's."""
        from tinychat.train.copy_drills import CopyDrillsConfig, run_copy_drills

        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir, "--resume", *self.shape_args()]
        cfg = self.stage_config(CopyDrillsConfig, "copy-drills", argv)
        if run_copy_drills(self.scaled(cfg)).interrupted:
            raise KeyboardInterrupt

    def pretrain(self) -> None:
        from tinychat.train.pretrain import PretrainConfig, run_pretrain

        init = ["--init", str(self.path("checkpoints", "copy"))] if self.cfg.copy_drills else []
        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir, "--resume", *init, *self.shape_args()]
        cfg = self.scaled(self.stage_config(PretrainConfig, "pretrain", argv))
        if self.cfg.copy_drills:  # drill rows keep the circuit the copy stage formed, over the same ids
            from tinychat.train.copy_drills import CopyDrillsConfig

            cfg.drill_alphabet = self.stage_config(CopyDrillsConfig, "copy-drills", []).alphabet
        copy_minutes = self._load_timings().get("copy", 0.0) / 60 if self.cfg.copy_drills else 0.0
        # with a plan, the copy stage's time is already spent and counted; else it comes out of pretraining's
        if not self.planned(cfg) and cfg.train.max_time and copy_minutes:
            cfg.train.max_time = round(max(cfg.train.max_time - copy_minutes, 0.1 * cfg.train.max_time), 3)
            print(f"pretrain: {cfg.train.max_time:.2f} min after {copy_minutes:.2f} min of copy drills", flush=True)
        result = run_pretrain(cfg)
        if result.interrupted:
            raise KeyboardInterrupt

    def drill(self) -> None:
        """Pure drill rows of the chosen kinds (`tinychat world drills`, counts from [world_drills]), then
        `tinychat sft --stage drill` on them from the pretrained model with the preset's [drill] settings: many
        steps at a high learning rate on one skill alone, which a skill that mixing never teaches needs (docs/
        speedrun.md, round 24). Budgeted in steps (`drill_steps` per kind, else [drill.train] max_steps; max_time
        caps it)."""
        from tinychat.train.sft import run_sft
        from tinychat.world.drills import DrillsConfig, build, write

        rows = self.path("drills")
        dcfg = self.stage_config(DrillsConfig, "world_drills", ["--world", str(self.path("world")), "--out", str(rows)])
        dcfg.rows = self.drill_rows({k: n for k, n in dcfg.rows.items() if k in self.drill_kinds})
        if empty := [k for k in self.drill_kinds if not dcfg.rows.get(k)]:
            raise UserError(f"drill kind '{empty[0]}' has no rows; give it a count in [world_drills] rows.")
        write(dcfg)
        left = dict(self.cfg.anneal_drill_rows)  # the first rows of each kind, as many as the table says
        anneal = []
        for line in (rows / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True):
            kind = json.loads(line)["skill"].removesuffix("_drill")
            if left.get(kind, 0) > 0:
                left[kind] -= 1
                anneal.append(line)
        if only := {k: left.get(k, 0) for k in self.anneal_only}:  # rows for the anneal alone, never drilled
            extra, _ = build(
                self.path("world"), only, val=0, seed=dcfg.seed + 1, multistep_direct=dcfg.multistep_direct
            )
            anneal += [json.dumps(r, ensure_ascii=False) + "\n" for r in extra]
        (rows / "anneal.jsonl").write_text("".join(anneal), encoding="utf-8")
        if reason := self.drill_unaffordable():
            self.skip("drill", reason)
            return
        argv = [
            *("--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir, "--resume", "--stage", "drill"),
            *("--init", str(self.path("checkpoints", "pretrain"))),
            *("--data", str(rows / "train.jsonl"), "--val_data", str(rows / "val.jsonl")),
        ]
        if run_sft(self.drill_config(argv)).interrupted:
            raise KeyboardInterrupt

    def drill_rows(self, preset: dict[str, int]) -> dict[str, int]:
        """Rows of each kind for a drill of several kinds: a kind in `drill_steps` gets that many steps' worth of
        tokens (its rows' mean length with the run's tokenizer, measured on 100 of them), so that the shuffled mix
        gives each kind the steps it is budgeted. With the preset's counts an agent row (~730 tokens) outweighed
        reading rows (~210): reading got ~280 of its 500 steps (round 27). One kind keeps the preset's count."""
        from tinychat.tokenizer.tokenizer import Tokenizer
        from tinychat.world.drills import build

        kinds = [k for k in self.drill_kinds if k in self.cfg.drill_steps]
        if len(self.drill_kinds) < 2 or len(kinds) < 2:
            return preset
        tok = Tokenizer.from_pretrained(self.path("tokenizer"))
        sample, _ = build(self.path("world"), dict.fromkeys(kinds, 100), val=0)
        tokens: dict[str, list[int]] = {k: [] for k in kinds}
        for r in sample:
            tokens[r["skill"].removesuffix("_drill")].append(len(tok.render_chat(r["messages"], r.get("tools")).ids))
        train = self.drill_config(["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir]).train
        step = train.batch_size * train.seq_len
        return {**preset, **{k: math.ceil(self.cfg.drill_steps[k] * step * len(t) / sum(t)) for k, t in tokens.items()}}

    def anneal(self) -> None:
        """Pretraining continued from the drilled model on its own mix (the documents and the chat rows) with
        `anneal_drill_rows` drill rows of each kind added: the drill erased what pretraining stored, and a mix that
        keeps some drill rows brings that back without losing the drilled skill (rounds 5 and 24). `tinychat pretrain
        --stage anneal` with the preset's [anneal] settings, on tokens made as the data stage makes its own."""
        from tinychat.train.pretrain import PretrainConfig, run_pretrain

        tokens = self.path("data", "anneal_tokens")
        init = self.path("checkpoints", "pretrain" if self.skipped("drill") else "drill")  # no drill: pretraining's
        argv = [
            *("--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir, "--resume", "--stage", "anneal"),
            *("--init", str(init), "--data", str(tokens)),
        ]
        cfg = self.scaled(self.stage_config(PretrainConfig, "anneal", argv))
        self.replan_anneal(cfg)
        if self.skipped("anneal"):
            return
        if not (tokens / "index.json").is_file():
            self.tokenize(tokens, [self.path("world", "sft", "train.jsonl"), self.path("drills", "anneal.jsonl")])
        if run_pretrain(cfg).interrupted:
            raise KeyboardInterrupt

    def replan_anneal(self, cfg: object) -> None:
        """With a plan (see planned): the anneal trains for what the budget leaves once the time spent, SFT's, DPO's
        and GRPO's budgets, the plan's later work and the end margin are taken, not for its max_steps; at least
        half the time it was priced at, at most its max_time. Why: pretraining's budget is fixed before the drill
        and the anneal run, so it prices them at the sizing probe's eager step x STEP_OVERHEAD, and both now
        compile (a 2-core EPYC's run ended 2 minutes inside the 15, the drill and anneal 65 s under their price:
        docs/speedrun.md, round 29). The anneal continues pretraining on the same mix, so it is where the time
        the plan could not foresee trains the model instead of idling at the end. Kept in plan.json
        (anneal_minutes), so a resumed anneal keeps it."""
        plan = self._load_plan()
        if plan is None or not cfg.train.max_time:
            return  # no plan (a run budgeted in steps, or one without later_work): max_steps as the preset says
        if "anneal" in plan.get("skipped", {}):
            return  # left out before, on a resume: anneal() sees it
        if "anneal_minutes" not in plan:
            priced = self.stepped_seconds("anneal")
            left = self.seconds_left(per_shape=True) - plan["later_seconds"]  # per_shape: the anneal's own steps out
            least = 0.0 if self.skipped("drill") else 0.5 * priced  # a drilled model needs its facts back
            if left < self.MIN_ANNEAL_SECONDS and not least:
                self.skip("anneal", f"{max(left, 0):.0f} s of the budget are left for it")
                return
            plan["anneal_minutes"] = round(min(max(left, least), cfg.train.max_time * 60) / 60, 3)
            plan["anneal_priced_seconds"] = round(priced, 1)
            self._save_plan(plan)
        minutes, priced = plan["anneal_minutes"], plan["anneal_priced_seconds"] / 60
        said = f"{minutes:.2f} min, what the budget leaves (priced at {priced:.2f} min before pretraining)"
        self._take_budget(cfg, minutes, "max_steps", f"anneal: {said}")

    def _load_plan(self) -> dict[str, float] | None:
        """runs/NAME/plan.json, kept by the first stage that planned; None before one has."""
        f = self.path("plan.json")
        return json.loads(f.read_text()) if f.is_file() else None

    def _save_plan(self, plan: dict[str, float]) -> None:
        self.path("plan.json").write_text(json.dumps(plan, indent=1))

    MIN_ANNEAL_SECONDS = 30.0  # an anneal shorter than this (~40 steps on a CPU that trains in fp32) is left out

    def skipped(self, stage: str) -> bool:
        """A stage the plan left out of this run (plan.json `skipped`): the budget could not hold it."""
        plan = self._load_plan() or {}
        return stage in plan.get("skipped", {})

    def skip(self, stage: str, reason: str) -> None:
        """Leave `stage` out of this run and say why, in plan.json (so a resumed run leaves it out too, and the
        report says so) and on the console."""
        plan = self._load_plan() or {}
        plan.setdefault("skipped", {})[stage] = reason
        self._save_plan(plan)
        print(f"{stage}: left out of this run: {reason}", flush=True)

    def drill_unaffordable(self) -> str:
        """Why the drill does not fit the budget, or "" when it does (or when no plan prices it). The drill and the
        anneal's least time (half its price: the anneal brings back the facts the drill erases) at pretraining's
        own measured rate, x RESERVE_OVERHEAD, against what is left once the later stages' budgets, the later
        work and the end margin are taken. Why: pretraining's reserve never stops it before `reserve_floor` steps,
        so on a CPU that trains in fp32 at half the rate of a fast-bf16 one (0.70 s a step for the narrow shape)
        the floor takes the drill's and anneal's time and the run ended at 20m24s, with held-out facts at 54%
        after the drill and a 2-minute anneal against 71% after pretraining (docs/speedrun.md, round 36).
        Without the drill the anneal, pretraining continued on its own mix, takes what is left.

        The reason ends with the budget that would hold the drill on this machine (budget_holding_drill)."""
        plan = self._load_plan()
        per_token = self.measured_seconds_per_token("pretrain")
        if plan is None or "later_seconds" not in plan or per_token is None:
            return ""
        train = self.stepped_train("drill")
        drill = train.max_steps * train.batch_size * train.seq_len * per_token * self.RESERVE_OVERHEAD
        need = drill + 0.5 * self.stepped_seconds("anneal")
        left = self.seconds_left(per_shape=True) - plan["later_seconds"]
        if left >= need:
            return ""
        return (
            f"its {train.max_steps} steps and the anneal's least time need {need:.0f} s at pretraining's rate "
            f"({1 / per_token:,.0f} tokens/s), and the budget has {max(left, 0):.0f} s left for them; "
            f"--budget-minutes {self.budget_holding_drill(need - left)} would hold them on this machine"
        )

    def budget_holding_drill(self, short: float) -> int:
        """The whole minutes of --budget-minutes whose extra time holds `short` more seconds at the drill stage.

        Where the drill does not fit, pretraining's floor (`reserve_floor` steps) set its length, not the
        budget, so a larger budget reaches the drill stage at the same time: each extra minute gives it 60 s,
        less what that minute adds to SFT's, DPO's and GRPO's budgets (they scale with it; the drill's and
        anneal's steps, the later work and the end margin do not). An estimate at the hour's speed: on a CPU
        without bf16 a 15-minute run was 392 s or more short (-> 24 or more), and a 30-minute one on a host 12%
        slower 37 s short (-> 31; docs/speedrun.md, round 37)."""
        minutes = sum(cfg.train.max_time for cfg in self.later_configs().values())
        scaled = minutes * 60 / self.base_budget  # seconds per budget minute
        return math.ceil(self.base_budget * self.scale + short / (60 - scaled))

    def later_configs(self) -> dict[str, object]:
        """SFT's, DPO's and GRPO's configs from the preset, their time budgets not yet scaled by --budget-minutes."""
        from tinychat.train.dpo import DPOConfig
        from tinychat.train.grpo import GRPOConfig
        from tinychat.train.sft import SFTConfig

        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir]
        later = [(SFTConfig, "sft"), (DPOConfig, "dpo"), (GRPOConfig, "grpo")]
        return {s: self.stage_config(c, s, argv) for c, s in later}

    def measured_seconds_per_token(self, stage: str) -> float | None:
        """Seconds per token of a finished stage's training steps from step 20 on (its metrics.jsonl rows: past the
        first steps' compilation, evaluations and checkpoints included), or None without 20 more steps."""
        from tinychat.train.metrics import read_metrics

        rows = [r for r in read_metrics(self.run_dir, stage, "train") if r.get("step", 0) >= 20]
        if len(rows) < 20:
            return None
        tokens = rows[-1]["tokens"] - rows[0]["tokens"]  # the rows count tokens from the stage's start
        return (rows[-1]["time"] - rows[0]["time"]) / tokens if tokens > 0 else None

    @staticmethod
    def _take_budget(cfg: object, minutes: float, replaced: str, message: str) -> None:
        """A stage trains for the plan's `minutes`; the budget they replace (`replaced` of its train config) is
        zeroed, and the split is printed."""
        cfg.train.max_time = minutes
        setattr(cfg.train, replaced, 0)
        print(message, flush=True)

    def planned(self, cfg: object) -> bool:
        """With `later_work`: pretraining's max_time becomes what the run's budget leaves once the time spent so
        far, the later stages' own budgets, the later work priced at this machine's measured generation speed
        and `end_margin` are taken (the loop's rate-priced reserve is then off). Why: a reserve priced at the
        training rate mispriced work whose speed is the machine's inference speed (two minutes unused on a fast
        machine, 2.5 minutes over on a slow one: docs/speedrun.md, rounds 9, 11 and 17). The drill's and anneal's
        steps are not taken at the sizing probe's price: max_time keeps their time, and the loop's reserve
        (stepped_tokens) takes it back at pretraining's own measured rate. Kept in runs/NAME/plan.json, so a
        resumed pretraining keeps the same budget. False when there is no plan."""
        if not (self.cfg.later_work and self.cfg.shapes and self.cfg.target_steps and cfg.train.max_time):
            return False
        plan = self._load_plan()
        if plan is None:
            from tinychat.model.config import resolve

            vocab = self.vocab_size()
            if vocab is None:
                return False  # pretraining itself says what is missing, in one sentence
            later = self.later_seconds(resolve(cfg.model, vocab_size=vocab))
            reserve = self.stepped_tokens()
            left = self.seconds_left(per_shape=bool(reserve))  # with a reserve, not the drill's and anneal's price
            plan = {
                "budget_seconds": round(self.base_budget * self.scale * 60, 1),
                "left_seconds": round(left, 1),
                "later_seconds": round(later, 1),
                "pretrain_minutes": round(max(left - later, 0.1 * cfg.train.max_time * 60) / 60, 3),
                "reserve_tokens": reserve,
                "reserve_floor": cfg.train.reserve_floor if reserve else 0,  # the steps the reserve leaves in any case
            }
            self._save_plan(plan)
        said = (
            f"{plan['left_seconds'] / 60:.2f} left for it and the later work, priced at {plan['later_seconds']:.0f} s"
        )
        if plan.get("reserve_tokens"):
            said += f", less {plan['reserve_tokens'] / 1e6:.2f}M tokens of drill and anneal at its own rate"
            if cfg.train.reserve_floor:
                said += f" (not before step {cfg.train.reserve_floor})"
        self._take_budget(
            cfg,
            plan["pretrain_minutes"],
            "reserve_tokens",
            f"pretrain: {plan['pretrain_minutes']:.2f} min: {said} on this machine",
        )
        cfg.train.reserve_tokens = plan.get("reserve_tokens", 0)
        cfg.train.reserve_cap = self.RESERVE_CAP
        return True

    RESERVE_OVERHEAD = 1.1  # a drill or anneal step's wall time against a pretraining step's, both compiled
    # (evaluation, loading, its own compile: round 33's runs, 1.08-1.16)
    RESERVE_CAP = 0.9  # the reserve is training at training's rate, not inference priced at it: no fp32 overpricing

    def stepped_tokens(self) -> int:
        """Tokens of the drill's and anneal's steps still to run, x RESERVE_OVERHEAD: the reserve pretraining keeps
        for them at its own measured rate (train.reserve_tokens). Why: priced at the sizing probe's eager step
        (stepped_seconds) they cost what the probe read, and on one machine it read 0.37 s in some runs and
        0.41-0.46 s in others for the same compiled 0.38 s step; the runs that read fast gave pretraining ~1 minute
        more and the anneal 320-353 steps instead of 450-500, and ended with multistep 40.5% against 56.3% and
        held-out facts 68.2% against 71.9% (docs/speedrun.md, round 34). 0 without a plan for them."""
        todo = self.stepped_todo()
        if not todo:
            return 0
        trains = [self.stepped_train(s) for s in todo]
        if not all(t.max_steps for t in trains):
            return 0  # a stage budgeted in minutes only: the probe's price, as before
        return round(sum(t.max_steps * t.batch_size * t.seq_len for t in trains) * self.RESERVE_OVERHEAD)

    def vocab_size(self) -> int | None:
        """The run's tokenizer's vocabulary size; None before the tokenizer stage has written it."""
        from tinychat.tokenizer import Tokenizer

        if not self.path("tokenizer", "tokenizer.json").is_file():
            return None
        return Tokenizer.from_pretrained(self.path("tokenizer")).vocab_size

    def seconds_left(self, per_shape: bool = False) -> float:
        """Seconds of the budget left for pretraining and the later unbudgeted work: the budget, less the
        finished stages' time, this stage's so far, the later training stages' budgets and the end margin.
        per_shape=True leaves out the steps of the stages budgeted in steps (drill, anneal), for a caller that
        prices them otherwise: at each model shape's own step time (fitted_shape), or with pretraining's reserve
        at its measured rate (planned)."""
        budgets = [self.scaled(c).train.max_time * 60 for s, c in self.later_configs().items() if not self.done(s)]
        budgets += [self.stepped_seconds(s, per_shape) for s in self.stepped_todo()]
        timings = self._load_timings()
        spent = sum(t for name, t in timings.items() if name != self.stage_name) + time.perf_counter() - self.stage_t0
        return self.base_budget * self.scale * 60 - spent - sum(budgets) - self.cfg.end_margin

    STEP_OVERHEAD = 1.3  # a drill or anneal step against the sizing probe's (evaluation, checkpoints, loading)

    STEPPED = ("drill", "anneal")

    def drill_config(self, argv: list[str]) -> object:
        """The drill stage's SFTConfig: the preset's [drill] with max_steps the sum of `drill_steps` over the
        kinds drilled (each kind needs its own steps: round 25). --budget-minutes scales its max_time cap like
        every stage's, not its steps: those are what the kinds need at any budget (round 30)."""
        from tinychat.train.sft import SFTConfig

        cfg = self.stage_config(SFTConfig, "drill", argv)
        if self.drill_kinds and all(k in self.cfg.drill_steps for k in self.drill_kinds):
            cfg.train.max_steps = sum(self.cfg.drill_steps[k] for k in self.drill_kinds)
        window = max([cfg.train.seq_len, *(self.cfg.drill_seq_len.get(k, 0) for k in self.drill_kinds)])
        if window > cfg.train.seq_len:
            cfg.train.batch_size = max(1, min(cfg.train.batch_size, self.cfg.drill_step_tokens // window))
            cfg.train.seq_len = window
        return self.scaled(cfg)

    def stepped_train(self, stage: str) -> object:
        """The train config of a stage budgeted in steps, as the stage will run it."""
        from tinychat.train.pretrain import PretrainConfig

        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir]
        if stage == "drill":
            return self.drill_config(argv).train
        return self.scaled(self.stage_config(PretrainConfig, stage, argv)).train

    def stepped_todo(self) -> list[str]:
        """The stages budgeted in steps that this run has and has not finished."""
        return [s for s in self.STEPPED if self.drill_kinds and not self.done(s) and not self.skipped(s)]

    def stepped_steps(self) -> float:
        """The drill's and anneal's steps still to run, in sizing-probe steps (x STEP_OVERHEAD)."""
        return sum(self.probe_steps(self.stepped_train(s)) for s in self.stepped_todo()) * self.STEP_OVERHEAD

    def probe_steps(self, train: TrainConfig) -> float:
        """A stage's max_steps in pretraining steps, the sizing probe's: scaled by its tokens per step (a reading
        drill's 512-token windows cost two 256-token pretraining steps)."""
        from tinychat.train.pretrain import PretrainConfig

        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir]
        pre = self.stage_config(PretrainConfig, "pretrain", argv).train
        return train.max_steps * (train.batch_size * train.seq_len) / (pre.batch_size * pre.seq_len)

    def stepped_seconds(self, stage: str, per_shape: bool = False) -> float:
        """The time a stage budgeted in steps (drill, anneal) is priced at: its max_steps at the chosen shape's
        measured seconds per step (its steps are of that shape and about its tokens) times STEP_OVERHEAD, capped by
        its max_time; its max_time alone if it has no max_steps or no shape is chosen yet; 0 for steps that
        per_shape leaves to the caller."""
        train = self.stepped_train(stage)
        cap = train.max_time * 60
        if not train.max_steps:
            return cap
        if per_shape:
            return 0.0
        record_file = self.path("sizing.json")
        if not record_file.is_file():
            return cap
        record = json.loads(record_file.read_text())
        step = next((m["seconds_per_step"] for m in record["measured"] if m["shape"] == record["chosen"]), None)
        if step is None:
            return cap
        priced = self.probe_steps(train) * step * self.STEP_OVERHEAD
        return min(cap, priced) if cap else priced

    def later_seconds(self, mcfg: ModelConfig) -> float:
        """The work after pretraining that no budget bounds, priced for a model of `mcfg`: `later_work` times
        generation_seconds (measured once per shape)."""
        key = json.dumps(dataclasses.asdict(mcfg), sort_keys=True)
        if key not in self._probe:
            self._probe[key] = generation_seconds(mcfg)
        return self.cfg.later_work * self._probe[key]

    def shape_args(self) -> list[str]:
        """--model.KEY VALUE flags of the shape fitted to this machine ([] when none is)."""
        from tinychat.train.pretrain import PretrainConfig

        argv = ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir]
        shape = self.fitted_shape(self.scaled(self.stage_config(PretrainConfig, "pretrain", argv)))
        return [a for k, v in shape.items() for a in (f"--model.{k}", str(v))]

    def fitted_shape(self, cfg: object) -> dict[str, object]:
        """The [model] options of the shape fitted to this machine (tinychat.train.sizing), chosen once per run
        and kept in runs/NAME/sizing.json so that a resumed run trains the same shape; {} when the preset
        fits none (no `shapes`) or a run from before sizing is resumed. A copy-drill stage trains it too."""
        from tinychat.train.sizing import choose_shape, parse_shape

        if not (self.cfg.shapes and self.cfg.target_steps) or not cfg.train.max_time:
            return {}
        record_file = self.path("sizing.json")
        if record_file.is_file():
            return parse_shape(json.loads(record_file.read_text())["chosen"])
        if any(p.name.startswith("step_") for s in ("copy", "pretrain") for p in self.path("checkpoints", s).glob("*")):
            return {}  # started with the preset's shape before sizing existed: keep it
        vocab = self.vocab_size()
        if vocab is None:
            return {}  # pretraining itself says what is missing, in one sentence
        later, steps = None, 0.0
        if self.cfg.later_work:  # priced per shape, out of what the budget leaves (see planned)
            cfg.train.max_time, cfg.train.reserve_tokens = self.seconds_left(per_shape=True) / 60, 0
            later, steps = self.later_seconds, self.stepped_steps()
        record = choose_shape(cfg.model, cfg.train, self.cfg.shapes, self.cfg.target_steps, vocab, later, steps)
        record_file.write_text(json.dumps(record, indent=1))
        tried = "; ".join(
            f"{m['shape']}: {m['seconds_per_step']:.2f} s/step, ~{m['predicted_steps']} steps"
            if m["seconds_per_step"] is not None
            else f"{m['shape']}: not timed, at most ~{m['predicted_steps']} steps"
            for m in record["measured"]
        )
        print(f"pretrain: model shape {record['chosen']} (target {self.cfg.target_steps} steps; {tried})")
        return parse_shape(record["chosen"])

    def post(self, module: str, cls_name: str, section: str) -> None:
        """A post-training stage, exactly as `tinychat SECTION --config PRESET --run NAME --resume` runs it."""
        import importlib

        mod = importlib.import_module(module)
        cfg = self.stage_config(
            getattr(mod, cls_name), section, ["--run", self.cfg.run, "--runs-dir", self.cfg.runs_dir, "--resume"]
        )
        result = getattr(mod, f"run_{section}")(self.scaled(cfg))
        if result.interrupted:
            raise KeyboardInterrupt

    # ------------------------------------------------------------------ driver
    def run(self) -> int:
        stages = self.stages()
        names = [s.name for s in stages]
        unknown = [s for s in self.cfg.stages if s not in names]
        if unknown:
            raise UserError(f"unknown stage '{unknown[0]}'; stages are {', '.join(names)}.")
        from tinychat.world.drills import KINDS

        if bad := [k for k in self.cfg.drills if k not in (*KINDS, "none")]:
            raise UserError(f"unknown drill kind '{bad[0]}'; kinds are {', '.join(KINDS)}, or none.")
        if bad := [k for k in self.cfg.anneal_drills if k not in KINDS]:
            raise UserError(f"unknown anneal drill kind '{bad[0]}'; kinds are {', '.join(KINDS)}.")
        if empty := [k for k in self.anneal_only if self.cfg.anneal_drill_rows.get(k, 0) < 1]:
            raise UserError(f"anneal drill kind '{empty[0]}' has no rows; give it a count in anneal_drill_rows.")
        if self.cfg.apply_k < 1:
            raise UserError(f"apply_k must be at least 1 (chunks in a knowledge-base prompt), got {self.cfg.apply_k}.")
        chosen = [s for s in stages if not self.cfg.stages or s.name in self.cfg.stages]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"speedrun {self.cfg.run}: preset {self.preset_file.name}, budget "
            f"{self.base_budget * self.scale:.1f} min, into {self.run_dir}",
            flush=True,
        )
        timings = self._load_timings()
        t_all = time.perf_counter()
        for i, stage in enumerate(chosen, 1):
            head = f"[{i}/{len(chosen)}] {stage.name:<10}"
            if stage.done():
                print(f"{head} done already, skipped", flush=True)
                continue
            print(f"{head} running ...", flush=True)
            t0 = self.stage_t0 = time.perf_counter()
            self.stage_name = stage.name
            stage.run()
            dt = time.perf_counter() - t0
            timings[stage.name] = dt
            self._save_timings(timings)
            print(f"{head} done in {_fmt(dt)}", flush=True)
        print(f"speedrun finished in {_fmt(time.perf_counter() - t_all)} (stage times in {self.path('timings.json')})")
        self.print_next_steps()
        return 0

    def print_next_steps(self) -> None:
        last = next((name for name in ("grpo", "dpo", "sft") if self.done(name)), None)
        if last:
            final = self.path("checkpoints", last)
            print(f"chat with it:  tinychat chat --model {final}")
            print(f"serve it:      tinychat serve --model {final}   (OpenAI-compatible API and web chat)", flush=True)
        elif self.done("pretrain"):
            final = self.path("checkpoints", "pretrain")
            print(f'try it:  tinychat generate --model {final} --prompt "12 + 7 =" --temperature 0', flush=True)

    def _load_timings(self) -> dict[str, float]:
        try:
            return json.loads(self.path("timings.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _save_timings(self, timings: dict[str, float]) -> None:
        tmp = self.path("timings.json.tmp")
        tmp.write_text(json.dumps(timings, indent=1))
        tmp.replace(self.path("timings.json"))


def generation_seconds(mcfg: ModelConfig, rows: int = 64, prompt_len: int = 96, new_tokens: int = 32) -> float:
    """Seconds a fresh model of `mcfg`, loaded as evaluation loads it (fused q/k/v and gate/up, fp32 projections
    over packed weights, CPU), takes to continue `rows` random prompts of `prompt_len` tokens greedily by
    `new_tokens` tokens: the fastest of three after an untimed one, since interference only adds time. The unit
    in which the speedrun prices the work after pretraining that no budget bounds: evaluation and apply are
    batched greedy generation of this kind, and the stages' own overheads are taken to scale with it.
    About 0.4 s for the speedrun's narrow shape on a 2-core EPYC."""
    import torch

    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.model.packed import pack_linears
    from tinychat.model.transformer import Model

    torch.manual_seed(0)
    model = pack_linears(Model(mcfg).eval().fuse_projections())
    prompts = torch.randint(0, mcfg.vocab_size, (rows, prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_on_eos=False)
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        with torch.no_grad():
            generate_ids(model, prompts.tolist(), params)
        if i:
            times.append(time.perf_counter() - t0)
    return min(times)


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def with_preset_defaults(cfg: SpeedrunConfig) -> SpeedrunConfig:
    """Fields left at their defaults take the preset's [speedrun] values; flags given explicitly win."""
    table = load_toml(preset_path(cfg.preset)).get("speedrun", {})
    default = SpeedrunConfig()
    known = {f.name for f in dataclasses.fields(SpeedrunConfig)}
    for key, value in table.items():
        if key not in known:
            raise UserError(f"preset {cfg.preset}: unknown key speedrun.{key}; known: {', '.join(sorted(known))}.")
        if getattr(cfg, key) == getattr(default, key):
            setattr(cfg, key, value)
    return cfg


def run(cfg: SpeedrunConfig) -> int:
    try:
        return Speedrun(with_preset_defaults(cfg)).run()
    except ConfigError as e:
        raise UserError(f"preset {cfg.preset}: {e}") from None
    except KeyboardInterrupt:
        print("speedrun interrupted; run the same command again to continue.", file=sys.stderr)
        return 130
