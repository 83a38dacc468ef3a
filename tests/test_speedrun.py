"""`tinychat speedrun --preset micro` end to end: every stage's artefact, re-running skips finished work,
and the report card's numbers are exactly those the run recorded in metrics.jsonl."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tinychat.cli import main
from tinychat.eval.backend import detect_mode
from tinychat.speedrun import CONFIG_DIR
from tinychat.train.sizing import parse_shape

STAGES = ("pretrain", "sft", "dpo", "grpo")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("speedrun")
    assert main(["speedrun", "--preset", "micro", "--runs-dir", str(runs), "--run", "m"]) == 0
    return runs / "m"


def test_every_stage_leaves_its_artefact(micro_run: Path):
    assert (micro_run / "world" / "manifest.json").is_file()
    assert (micro_run / "tokenizer" / "tokenizer.json").is_file()
    words = (micro_run / "tokenizer_words.txt").read_text(encoding="utf-8").split()  # kept whole by the tokenizer
    assert words and all(w.isprintable() for w in words)
    assert (micro_run / "data" / "clean" / "stats.json").is_file()
    assert (micro_run / "data" / "tokens" / "index.json").is_file()
    for stage in STAGES:
        final = micro_run / "checkpoints" / stage
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file(), stage
        assert (final / "tokenizer.json").is_file(), stage
        assert (micro_run / "eval" / f"{stage}.json").is_file(), stage
    timings = json.loads((micro_run / "timings.json").read_text())
    assert set(timings) >= {"world", "tokenizer", "data", *STAGES, "eval", "report"}
    assert (micro_run / "report.md").is_file() and list((micro_run / "plots").glob("*.png"))
    answers = json.loads((micro_run / "eval" / "apply.json").read_text())["answers"]
    assert answers["k"] == 1 and "top-1 hybrid sources" in (micro_run / "report.md").read_text()  # apply_k


def test_pretraining_mixes_in_the_conversations_and_the_final_model_gets_the_most_questions(micro_run: Path):
    index = json.loads((micro_run / "data" / "tokens" / "index.json").read_text())
    assert index["chat"]["rows"] > 0 and index["chat"]["by_skill"]["facts"]["rows"] > 0
    recs = [json.loads(line) for line in (micro_run / "metrics.jsonl").read_text().splitlines()]
    suites = [r for r in recs if r["kind"] == "eval_suite" and r["suite"] == "facts_trained"]
    mode = {r["stage"]: r["mode"] for r in suites}
    n = {r["stage"]: r["n"] for r in suites}
    assert mode["pretrain"] == "chat"  # it has met the chat format, so it is asked through the template
    for stage in STAGES:  # and its config.json says so, for `tinychat eval --mode auto` on the directory alone
        final = micro_run / "checkpoints" / stage
        record = json.loads((final / "config.json").read_text())
        assert record["tinychat_stage"] == stage and record["tinychat_chat"] is True, stage
        assert detect_mode(final, stage=stage) == "chat", stage
    assert n["grpo"] == 6 and n["pretrain"] == n["sft"] == 3  # micro: eval_limit 6, stage_eval_limit 3
    assert all(r["refused"] is not None for r in suites)


def test_rerun_skips_finished_stages(micro_run: Path, capsys):
    before = (micro_run / "checkpoints" / "pretrain" / "model.safetensors").stat().st_mtime_ns
    assert main(["speedrun", "--preset", "micro", "--runs-dir", str(micro_run.parent), "--run", "m"]) == 0
    out = capsys.readouterr().out
    for stage in ("world", "tokenizer", "data", *STAGES, "eval"):
        assert f"{stage:<10} done already, skipped" in out, stage
    assert (micro_run / "checkpoints" / "pretrain" / "model.safetensors").stat().st_mtime_ns == before


def test_report_numbers_equal_the_recorded_metrics(micro_run: Path):
    report = (micro_run / "report.md").read_text()
    recs = [json.loads(line) for line in (micro_run / "metrics.jsonl").read_text().splitlines()]
    for stage in STAGES:
        bpb = [r for r in recs if r["stage"] == stage and r["kind"] == "eval_suite" and r["suite"] == "bpb"][-1]
        assert f"| {stage} | {bpb['val_bpb']:.4f} |" in report, stage
        train = [r for r in recs if r["stage"] == stage and r["kind"] == "train"]
        assert f"| {stage} |" in report and f"{train[-1]['loss']:.4f}" in report, stage
        refusal = [r for r in recs if r["stage"] == stage and r["kind"] == "eval_suite" and r["suite"] == "refusal"]
        assert refusal and refusal[-1]["n"] > 0


def test_the_copy_drill_stage_runs_first_and_pretraining_continues_it(micro_run: Path):
    runs = micro_run.parent
    for part in ("world", "tokenizer", "data"):  # the same inputs as the micro run: only the new stages run
        shutil.copytree(micro_run / part, runs / "c" / part)
    args = ["speedrun", "--preset", "micro", "--runs-dir", str(runs), "--run", "c", "--copy_drills", "true"]
    assert main([*args, "--stages", "copy", "pretrain"]) == 0
    run = runs / "c"
    assert (run / "checkpoints" / "copy" / "model.safetensors").is_file()
    assert set(json.loads((run / "timings.json").read_text())) == {"copy", "pretrain"}
    assert f'init = "{run / "checkpoints" / "copy"}"' in (run / "config.pretrain.toml").read_text()
    drills = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in drills if r["stage"] == "copy" and r["kind"] == "train"] == list(range(1, 7))


def test_drill_and_anneal_stages_run_between_pretraining_and_sft(micro_run: Path):
    """`--drills`: a drill stage (sft on pure drill rows from the pretrained model), an anneal (pretraining
    continued from the drilled model on the run's mix plus some drill rows), and SFT then starts from the anneal."""
    runs = micro_run.parent
    for part in ("world", "tokenizer", "data", "checkpoints/pretrain"):
        shutil.copytree(micro_run / part, runs / "dr" / part)
    args = [
        "speedrun",
        "--preset",
        "micro",
        "--runs-dir",
        str(runs),
        "--run",
        "dr",
        "--drills",
        "arithmetic",
    ]
    assert main([*args, "--stages", "drill", "anneal", "sft", "--anneal_drill_rows", "{arithmetic = 10}"]) == 0
    run = runs / "dr"
    for stage in ("drill", "anneal", "sft"):
        assert (run / "checkpoints" / stage / "model.safetensors").is_file(), stage
    rows = [json.loads(line) for line in (run / "drills" / "train.jsonl").read_text().splitlines()]
    assert {r["skill"] for r in rows} == {"arithmetic_drill"}  # micro's 128-token window: no room for the others
    assert len((run / "drills" / "anneal.jsonl").read_text().splitlines()) == 10
    assert f'init = "{run / "checkpoints" / "pretrain"}"' in (run / "config.drill.toml").read_text()
    assert f'init = "{run / "checkpoints" / "drill"}"' in (run / "config.anneal.toml").read_text()
    assert "lr = 0.001" in (run / "config.drill.toml").read_text()  # [drill.train], not [sft.train]
    assert "max_steps = 2" in (run / "config.drill.toml").read_text()  # micro's drill_steps for arithmetic
    chat = json.loads((run / "data" / "anneal_tokens" / "index.json").read_text())["chat"]["by_skill"]
    assert chat["facts"]["rows"] > 0 and chat["arithmetic_drill"]["rows"] > 0
    assert f'init = "{run / "checkpoints" / "anneal"}"' in (run / "config.sft.toml").read_text()
    assert main([*args, "--drills", "juggling", "--stages", "drill"]) == 2
    assert main([*args[:-2], "--drills", "none", "--stages", "drill"]) == 2  # no drill stage to run


def test_anneal_drills_join_the_anneal_but_not_the_drill(micro_run: Path):
    """`--anneal_drills multistep instruction`: the world's word problems and instruction questions go into the
    anneal's mix only, as many as anneal_drill_rows says, the problems in the form [world_drills] multistep_direct
    sets; the drill stage trains on its own kinds alone. Unknown or rowless kinds are errors."""
    runs = micro_run.parent
    for part in ("world", "tokenizer", "data", "checkpoints/pretrain"):
        shutil.copytree(micro_run / part, runs / "ad" / part)
    args = ["speedrun", "--preset", "micro", "--runs-dir", str(runs), "--run", "ad", "--drills", "arithmetic"]
    rows = ["--anneal_drill_rows", "{arithmetic = 10, multistep = 7, instruction = 5}"]
    only = ["--anneal_drills", "multistep", "instruction"]
    assert main([*args, *only, *rows, "--stages", "drill", "anneal"]) == 0
    run = runs / "ad"
    drilled = [json.loads(line)["skill"] for line in (run / "drills" / "train.jsonl").read_text().splitlines()]
    annealed = [json.loads(line) for line in (run / "drills" / "anneal.jsonl").read_text().splitlines()]
    skills = [r["skill"] for r in annealed]
    assert set(drilled) == {"arithmetic_drill"}
    assert [skills.count(f"{k}_drill") for k in ("arithmetic", "multistep", "instruction")] == [10, 7, 5]
    # [world_drills] multistep_direct = 0 (the micro preset, as cpu-tiny): every problem worked in the reply
    assert not [r for r in annealed if r["skill"] == "multistep_drill" and "reasoning_content" in r["messages"][-1]]
    chat = json.loads((run / "data" / "anneal_tokens" / "index.json").read_text())["chat"]["by_skill"]
    assert chat["multistep_drill"]["rows"] > 0 and chat["instruction_drill"]["rows"] > 0
    assert main([*args, "--anneal_drills", "juggling", "--stages", "drill"]) == 2
    assert main([*args, "--anneal_drills", "multistep", "--anneal_drill_rows", "{arithmetic = 3}"]) == 2


def test_a_drill_of_several_kinds_gives_each_kind_its_steps_worth_of_rows(micro_run: Path):
    """drill_steps buy a kind that many steps' worth of tokens in the shuffled mix: reading's 500 steps are ~5 times
    as many rows as agent's 300 (an agent row is ~3x longer), not the preset's 13,000 against 8,000."""
    from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults
    from tinychat.tokenizer.tokenizer import Tokenizer
    from tinychat.world.drills import build

    runs = micro_run.parent
    for part in ("world", "tokenizer"):
        shutil.copytree(micro_run / part, runs / "mix" / part)

    def speedrun(*kinds: str) -> Speedrun:
        return Speedrun(
            with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(runs), run="mix", drills=list(kinds)))
        )

    rows = speedrun("reading", "agent").drill_rows({"reading": 13000, "agent": 8000})
    tok = Tokenizer.from_pretrained(runs / "mix" / "tokenizer")
    sample, _ = build(runs / "mix" / "world", {"reading": 100, "agent": 100}, val=0)
    for kind, steps in (("reading", 500), ("agent", 300)):
        lens = [
            len(tok.render_chat(r["messages"], r.get("tools")).ids) for r in sample if r["skill"] == f"{kind}_drill"
        ]
        assert rows[kind] * sum(lens) / len(lens) == pytest.approx(steps * 8 * 1024, rel=0.01)
    assert rows["reading"] > 2 * rows["agent"]
    assert speedrun("calculator").drill_rows({"calculator": 3000}) == {"calculator": 3000}  # one kind: as set


def _fitting_run(
    micro_run: Path, tmp_path: Path, shapes: str, target_steps: int, name: str, extra: str = ""
) -> list[str]:
    """`tinychat speedrun` args for run NAME: the micro preset with these [speedrun] shapes (and `extra` lines)
    and a 5-minute pretraining budget (max_steps still ends it), on a copy of the micro run's world, tokenizer
    and data."""
    text = (CONFIG_DIR / "micro.toml").read_text()
    head = f"[speedrun]\nshapes = {shapes}\ntarget_steps = {target_steps}\n{extra}"
    text = text.replace("[speedrun]\n", head, 1)
    text = text.replace("[pretrain.train]\n", "[pretrain.train]\nmax_time = 5.0\n", 1)
    preset = tmp_path / f"{name}.toml"
    preset.write_text(text)
    runs = micro_run.parent
    for part in ("world", "tokenizer", "data"):
        shutil.copytree(micro_run / part, runs / name / part)
    return ["speedrun", "--preset", str(preset), "--runs-dir", str(runs), "--run", name]


def test_the_pretraining_shape_is_fitted_to_the_machine_once(micro_run: Path, tmp_path: Path, capsys):
    """No shape reaches an impossible target, so the fastest timed trains (on a CPU the cheapest is timed first,
    and a larger one its step rules out is not timed); the choice is kept in sizing.json, and the SFT stage
    continues that shape."""
    args = _fitting_run(micro_run, tmp_path, '["n_layer=2", "n_layer=1,d_ff=64"]', 1000000000, "f")
    runs = micro_run.parent
    assert main([*args, "--stages", "pretrain", "sft", "report"]) == 0
    run = runs / "f"
    report = (run / "report.md").read_text()
    assert "## Model shape fitted to this machine" in report and "**chosen**" in report
    record = json.loads((run / "sizing.json").read_text())
    assert [m["shape"] for m in record["measured"]] == ["n_layer=2", "n_layer=1,d_ff=64"]
    timed = [m for m in record["measured"] if m["seconds_per_step"] is not None]  # the cheapest, and any in reach
    assert record["chosen"] == min(timed, key=lambda m: m["seconds_per_step"])["shape"] == "n_layer=1,d_ff=64"
    assert f"model shape {record['chosen']}" in capsys.readouterr().out
    chosen = parse_shape(record["chosen"])
    for stage in ("pretrain", "sft"):
        cfg = json.loads((run / "checkpoints" / stage / "config.json").read_text())
        assert cfg["num_hidden_layers"] == chosen["n_layer"]
    (run / "sizing.json").write_text(json.dumps({**record, "chosen": "n_layer=2"}))
    shutil.rmtree(run / "checkpoints")
    assert main([*args, "--stages", "pretrain"]) == 0  # a kept choice is not measured again
    assert "model shape" not in capsys.readouterr().out
    assert json.loads((run / "checkpoints" / "pretrain" / "config.json").read_text())["num_hidden_layers"] == 2


def test_pretraining_gets_what_the_budget_leaves_after_the_later_work_priced_on_this_machine(
    micro_run: Path, tmp_path: Path, capsys
):
    """With later_work, pretraining's max_time is the budget less the time spent, the later stages' budgets,
    the end margin and later_work times the generation probe of the chosen shape (each shape priced in the
    sizing too); the plan is kept, so a resumed pretraining keeps it."""
    extra = "later_work = 100\nend_margin = 30\n"
    args = _fitting_run(micro_run, tmp_path, '["n_layer=2", "n_layer=1,d_ff=64"]', 1, "pl", extra)
    argv = [*args, "--budget-minutes", "20", "--stages", "pretrain"]  # micro's later stages: steps, not minutes
    assert main([*argv, "report"]) == 0
    run = micro_run.parent / "pl"
    plan = json.loads((run / "plan.json").read_text())
    record = json.loads((run / "sizing.json").read_text())
    chosen = next(m for m in record["measured"] if m["shape"] == record["chosen"])
    assert chosen["later_seconds"] == plan["later_seconds"] > 0  # the same probe, measured once
    assert plan["budget_seconds"] == 1200
    assert 1200 - 30 - 60 < plan["left_seconds"] < 1200 - 30  # only this stage's few seconds spent
    assert plan["pretrain_minutes"] == pytest.approx((plan["left_seconds"] - plan["later_seconds"]) / 60, abs=0.01)
    pretrain = (run / "config.pretrain.toml").read_text()
    assert f"max_time = {plan['pretrain_minutes']}" in pretrain and "reserve_tokens = 0" in pretrain
    assert "later work, priced at" in capsys.readouterr().out
    report = (run / "report.md").read_text()
    assert f"Pretraining got {plan['pretrain_minutes']:.2f} minutes" in report and "later work (s)" in report
    (run / "plan.json").write_text(json.dumps({**plan, "pretrain_minutes": 7.5}))
    shutil.rmtree(run / "checkpoints")
    assert main(argv) == 0  # a kept plan is not priced again
    assert "max_time = 7.5" in (run / "config.pretrain.toml").read_text()


def test_generation_seconds_times_a_fresh_model_of_the_shape():
    from tinychat.model.config import ModelConfig, resolve
    from tinychat.speedrun import generation_seconds

    small = resolve(ModelConfig(preset="tiny"), vocab_size=256, n_layer=1, d_model=64, head_dim=16, d_ff=128)
    large = resolve(ModelConfig(preset="tiny"), vocab_size=256, n_layer=4, d_model=256, d_ff=1024)
    fast, slow = generation_seconds(small, rows=8, prompt_len=16), generation_seconds(large, rows=8, prompt_len=16)
    assert 0 < fast < slow  # 16x the matmul work in the second


def test_the_copy_drill_stage_trains_the_fitted_shape_in_pretrainings_time(micro_run: Path, tmp_path: Path):
    args = [*_fitting_run(micro_run, tmp_path, '["n_layer=1,d_ff=64"]', 1, "cf"), "--copy_drills", "true"]
    runs = micro_run.parent
    assert main([*args, "--stages", "copy", "pretrain"]) == 0
    run = runs / "cf"
    assert json.loads((run / "sizing.json").read_text())["chosen"] == "n_layer=1,d_ff=64"
    for stage in ("copy", "pretrain"):
        cfg = json.loads((run / "checkpoints" / stage / "config.json").read_text())
        assert (cfg["num_hidden_layers"], cfg["intermediate_size"]) == (1, 64)
    copy_minutes = json.loads((run / "timings.json").read_text())["copy"] / 60
    pretrain = (run / "config.pretrain.toml").read_text()
    assert f"max_time = {round(5.0 - copy_minutes, 3)}" in pretrain  # the drills' minutes came out of pretraining's
    assert "drill_alphabet = 64" in pretrain  # pretraining's drill rows use the copy stage's ids (micro: 64)


def test_unknown_preset_and_stage_are_one_sentence_errors(tmp_path: Path, capsys):
    assert main(["speedrun", "--preset", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "micro", "--runs-dir", str(tmp_path), "--stages", "bake"]) == 2
    assert "unknown stage 'bake'" in capsys.readouterr().err
    assert main(["speedrun", "--preset", "micro", "--runs-dir", str(tmp_path), "--apply_k", "0"]) == 2
    assert "apply_k must be at least 1" in capsys.readouterr().err


def test_the_drill_and_anneal_are_priced_at_the_chosen_shapes_step_time(tmp_path: Path):
    """cpu-tiny's drill (150 steps for the calculator, 300 with arithmetic: drill_steps) and anneal (450) are
    budgeted in steps of 16 x 256 tokens; the plan prices them at the sizing probe's step time of the chosen
    shape (one of pretraining's 8 x 256-token steps since round 38, so two a step) x STEP_OVERHEAD, capped by
    their max_time, and leaves them to the shape choice (per shape) while no shape is chosen."""
    from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults

    run = Speedrun(
        with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p", drills=["calculator"]))
    )
    assert run.drill_kinds == ["calculator"]
    assert run.stepped_seconds("drill") == 10.0 * 60  # no shape chosen yet: the cap
    assert run.stepped_seconds("drill", per_shape=True) == 0.0
    assert run.stepped_steps() == pytest.approx((150 + 450) * 2 * run.STEP_OVERHEAD)
    (tmp_path / "p").mkdir()
    record = {"measured": [{"shape": "a", "seconds_per_step": 0.5}, {"shape": "b", "seconds_per_step": 0.2}]}
    (tmp_path / "p" / "sizing.json").write_text(json.dumps({**record, "chosen": "b"}))
    assert run.stepped_seconds("drill") == pytest.approx(150 * 2 * 0.2 * run.STEP_OVERHEAD)
    both = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p")))
    assert both.drill_kinds == ["calculator", "arithmetic"]  # the default since round 29
    assert both.stepped_seconds("drill") == pytest.approx(300 * 2 * 0.2 * run.STEP_OVERHEAD)  # 150 per kind
    assert run.stepped_seconds("anneal") == pytest.approx(min(450 * 2 * 0.2 * run.STEP_OVERHEAD, 4.0 * 60))
    reading = Speedrun(
        with_preset_defaults(
            SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p", drills=["calculator", "reading"])
        )
    )
    drill = reading.drill_config(["--run", "p", "--runs-dir", str(tmp_path)]).train
    assert (drill.seq_len, drill.max_steps) == (512, 150 + 500)  # drill_seq_len: the longest window drilled
    assert run.drill_config(["--run", "p", "--runs-dir", str(tmp_path)]).train.seq_len == 256
    # 16 x 512-token windows are priced as four of pretraining's 8 x 256-token steps, and capped by max_time
    assert reading.stepped_seconds("drill") == pytest.approx(min(650 * 4 * 0.2 * run.STEP_OVERHEAD, 10.0 * 60))
    agent = Speedrun(
        with_preset_defaults(
            SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p", drills=["reading", "agent"])
        )
    )
    drill = agent.drill_config(["--run", "p", "--runs-dir", str(tmp_path)]).train
    # agent rows need 1024-token windows; the batch halves so a step holds drill_step_tokens, as reading's did
    assert (drill.seq_len, drill.batch_size, drill.max_steps) == (1024, 8, 500 + 300)
    assert agent.probe_steps(drill) == pytest.approx(800 * 4)  # 8 x 1024 tokens: four of pretraining's 8 x 256
    none = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), drills=["none"])))
    assert none.drill_kinds == [] and "drill" not in [s.name for s in none.stages()]


def test_pretraining_keeps_the_drill_and_anneal_steps_at_its_own_rate(tmp_path: Path, capsys):
    """cpu-tiny's plan gives pretraining the drill's and anneal's time too, and a reserve of their tokens
    (x RESERVE_OVERHEAD) that the loop prices at pretraining's measured rate: the sizing probe's eager step read
    0.37-0.46 s for the same compiled 0.38 s (round 34). A kept plan sets the same reserve on a resume."""
    from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults
    from tinychat.train.pretrain import PretrainConfig

    run = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p")))
    assert run.stepped_tokens() == round((300 + 450) * 16 * 256 * run.RESERVE_OVERHEAD)
    none = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), drills=["none"])))
    assert none.stepped_tokens() == 0
    (tmp_path / "p").mkdir()
    plan = {"budget_seconds": 900.0, "left_seconds": 700.0, "later_seconds": 100.0, "pretrain_minutes": 10.0}
    (tmp_path / "p" / "plan.json").write_text(json.dumps({**plan, "reserve_tokens": 3_000_000}))
    cfg = run.stage_config(PretrainConfig, "pretrain", ["--run", "p", "--runs-dir", str(tmp_path)])
    assert run.planned(cfg)
    assert (cfg.train.max_time, cfg.train.reserve_tokens, cfg.train.reserve_cap) == (10.0, 3_000_000, run.RESERVE_CAP)
    assert "less 3.00M tokens of drill and anneal at its own rate" in capsys.readouterr().out
    from tinychat.eval.report import _plan_lines

    said = " ".join(_plan_lines(tmp_path / "p" / "plan.json"))
    assert "kept 3.00M tokens" in said and "floor" not in said  # a plan from before round 35: no floor
    assert cfg.train.reserve_floor == 1300  # the preset's: below it the facts are not stored yet (rounds 35, 38)
    (tmp_path / "p" / "plan.json").write_text(json.dumps({**plan, "reserve_tokens": 3_000_000, "reserve_floor": 650}))
    assert "floor of 650 steps, which the anneal gives way to, held it" in " ".join(
        _plan_lines(tmp_path / "p" / "plan.json", 650)
    )
    assert "650 steps, which the anneal gives way to, was passed (702 steps)" in " ".join(
        _plan_lines(tmp_path / "p" / "plan.json", 702)
    )
    (tmp_path / "p" / "plan.json").write_text(json.dumps(plan))  # a plan from before round 34: no reserve
    cfg = run.stage_config(PretrainConfig, "pretrain", ["--run", "p", "--runs-dir", str(tmp_path)])
    assert run.planned(cfg) and cfg.train.reserve_tokens == 0
    assert "kept" not in " ".join(_plan_lines(tmp_path / "p" / "plan.json"))


def test_the_anneal_trains_for_what_the_budget_leaves_when_it_starts(tmp_path: Path, capsys):
    """With a plan, the anneal's max_steps give way to a time budget: what is left once the stages run so far, the
    later stages' budgets, the plan's later work and the end margin are taken, at least half its priced time and
    at most its max_time; kept in plan.json. Without a plan it keeps its steps."""
    import time

    from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults
    from tinychat.train.pretrain import PretrainConfig

    run = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p")))
    argv = ["--run", "p", "--runs-dir", str(tmp_path)]
    cfg = run.stage_config(PretrainConfig, "anneal", argv)
    (tmp_path / "p").mkdir()
    run.replan_anneal(cfg)  # no plan.json: the preset's steps
    assert (cfg.train.max_steps, cfg.train.max_time) == (450, 4.0)
    record = {"measured": [{"shape": "b", "seconds_per_step": 0.1}], "chosen": "b"}  # an 8 x 256 pretraining step
    (tmp_path / "p" / "sizing.json").write_text(json.dumps(record))
    timings = {"world": 10.0, "tokenizer": 10.0, "data": 10.0, "pretrain": 400.0, "drill": 50.0}
    (tmp_path / "p" / "timings.json").write_text(json.dumps(timings))
    plan = {"budget_seconds": 900.0, "later_seconds": 100.0, "pretrain_minutes": 6.0}
    (tmp_path / "p" / "plan.json").write_text(json.dumps(plan))
    run.stage_name, run.stage_t0 = "anneal", time.perf_counter()
    run.replan_anneal(cfg)
    # 900 - 480 spent - (SFT 90 + DPO 30 + GRPO 60) - 30 margin - 100 later work = 110 s
    assert cfg.train.max_steps == 0 and cfg.train.max_time == pytest.approx(110 / 60, abs=0.01)
    kept = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert kept["anneal_minutes"] == cfg.train.max_time
    assert kept["anneal_priced_seconds"] == pytest.approx(450 * 2 * 0.1 * run.STEP_OVERHEAD, abs=0.1)
    assert "anneal: 1.83 min" in capsys.readouterr().out
    from tinychat.eval.report import _plan_lines

    assert "The anneal got 1.83 minutes" in " ".join(_plan_lines(tmp_path / "p" / "plan.json"))  # the report's line
    (tmp_path / "p" / "timings.json").write_text(json.dumps({**timings, "pretrain": 900.0}))
    cfg = run.stage_config(PretrainConfig, "anneal", argv)
    run.replan_anneal(cfg)  # the kept plan, not priced again
    assert cfg.train.max_time == kept["anneal_minutes"]
    (tmp_path / "p" / "plan.json").write_text(json.dumps(plan))
    cfg = run.stage_config(PretrainConfig, "anneal", argv)
    run.replan_anneal(cfg)  # behind schedule: half the priced time, not nothing
    assert cfg.train.max_time == pytest.approx(0.5 * 450 * 0.2 * run.STEP_OVERHEAD / 60, abs=0.01)
    (tmp_path / "p" / "timings.json").write_text(json.dumps({**timings, "pretrain": 0.0}))
    (tmp_path / "p" / "plan.json").write_text(json.dumps(plan))
    cfg = run.stage_config(PretrainConfig, "anneal", argv)
    run.replan_anneal(cfg)  # far ahead: at most its max_time
    assert cfg.train.max_time == 4.0


def _pretrain_metrics(run_dir: Path, tokens_per_second: float, steps: int = 60) -> None:
    """metrics.jsonl rows of a pretraining that ran `steps` steps of 4,096 tokens at this rate."""
    rows = [
        {"stage": "pretrain", "kind": "train", "step": i, "time": i * 4096 / tokens_per_second, "tokens": i * 4096}
        for i in range(1, steps + 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_drill_is_left_out_when_it_and_the_anneals_least_time_do_not_fit(tmp_path: Path, capsys):
    """The drill runs only when the budget left holds it and half the anneal's price (the anneal brings back the
    facts the drill erases), the drill priced at pretraining's measured rate: a CPU that trains in fp32 at half a
    fast one's rate reached the reserve's floor of 650 steps with no time left, and the run ended at 20m24s.
    Without the drill the anneal needs no least time: it takes what is left, or is left out under 30 s."""
    import time

    from tinychat.eval.report import _plan_lines
    from tinychat.speedrun import Speedrun, SpeedrunConfig, with_preset_defaults
    from tinychat.train.pretrain import PretrainConfig

    run = Speedrun(with_preset_defaults(SpeedrunConfig(preset="cpu-tiny", runs_dir=str(tmp_path), run="p")))
    d = tmp_path / "p"
    d.mkdir()
    assert run.drill_unaffordable() == ""  # no plan, no measured rate: the drill runs as the preset says
    (d / "sizing.json").write_text(json.dumps({"measured": [{"shape": "b", "seconds_per_step": 0.2}], "chosen": "b"}))
    plan = {"budget_seconds": 900.0, "later_seconds": 100.0, "pretrain_minutes": 6.0}
    (d / "plan.json").write_text(json.dumps(plan))
    assert run.drill_unaffordable() == ""  # a plan but no pretraining steps measured yet
    _pretrain_metrics(d, 10_000.0)
    assert run.measured_seconds_per_token("pretrain") == pytest.approx(1 / 10_000)
    run.stage_name, run.stage_t0 = "drill", time.perf_counter()
    # need: 300 drill steps x 4,096 tokens at 10k tokens/s x 1.1 = 135 s, + half the anneal's 450 steps, each two
    # 0.2 s probe steps of 8 x 256 tokens, x 1.3
    need = 300 * 4096 / 10_000 * run.RESERVE_OVERHEAD + 0.5 * 450 * 2 * 0.2 * run.STEP_OVERHEAD
    # left: 900 - spent - (SFT 90 + DPO 30 + GRPO 60) - 30 margin - 100 later work
    (d / "timings.json").write_text(json.dumps({"pretrain": 589.0 - need}))
    assert run.drill_unaffordable() == ""  # it fits, with a second to spare
    (d / "timings.json").write_text(json.dumps({"pretrain": 600.0 - need}))
    reason = run.drill_unaffordable()
    assert f"need {need:.0f} s at pretraining's rate (10,000 tokens/s)" in reason and "has 0 s left" not in reason
    # 10 s short: each budget minute gives the drill 60 s less SFT's, DPO's and GRPO's 3 min / 15 of it = 48 s
    assert reason.endswith("--budget-minutes 16 would hold them on this machine")
    assert run.budget_holding_drill(480.0) == 25 and run.budget_holding_drill(481.0) == 26
    _pretrain_metrics(d, 5_000.0)  # a machine at half the rate: the drill's own steps cost twice as much
    (d / "timings.json").write_text(json.dumps({"pretrain": 590.0 - need}))
    assert run.drill_unaffordable() != ""

    run.skip("drill", reason)
    assert run.skipped("drill") and not run.skipped("anneal")
    assert f"drill: left out of this run: {reason}" in capsys.readouterr().out
    assert run.stepped_todo() == ["anneal"]  # the plan prices the anneal alone now
    assert f"The drill was left out of this run: {reason}." in _plan_lines(d / "plan.json")
    assert json.loads((d / "plan.json").read_text())["later_seconds"] == 100.0  # the rest of the plan is kept

    # the anneal takes what is left, with no least time: 900 - 700 - 180 - 30 - 100 < 0 ... left out
    (d / "timings.json").write_text(json.dumps({"pretrain": 700.0}))
    run.stage_name, run.stage_t0 = "anneal", time.perf_counter()
    cfg = run.stage_config(PretrainConfig, "anneal", ["--run", "p", "--runs-dir", str(tmp_path)])
    run.replan_anneal(cfg)
    assert run.skipped("anneal") and "anneal_minutes" not in json.loads((d / "plan.json").read_text())
    assert "anneal: left out of this run: 0 s of the budget are left for it" in capsys.readouterr().out
    assert [s.name for s in run.stages() if not s.done()][:2] == ["world", "tokenizer"]
    assert {s.name: s.done() for s in run.stages()}["drill"] and {s.name: s.done() for s in run.stages()}["anneal"]

    # 90 s left: the anneal trains for them from pretraining's model, not half its price
    plan = json.loads((d / "plan.json").read_text())
    plan["skipped"].pop("anneal")
    (d / "plan.json").write_text(json.dumps(plan))
    (d / "timings.json").write_text(json.dumps({"pretrain": 500.0}))
    cfg = run.stage_config(PretrainConfig, "anneal", ["--run", "p", "--runs-dir", str(tmp_path)])
    run.replan_anneal(cfg)
    assert cfg.train.max_time == pytest.approx(90 / 60, abs=0.01) and not run.skipped("anneal")


def test_a_run_whose_budget_cannot_hold_the_drill_anneals_pretrainings_model(micro_run: Path, capsys):
    """End to end: a plan with no time left for the drill (a machine too slow for it) leaves the drill out and says
    so; micro's anneal is budgeted in steps (no max_time), so it runs them from pretraining's model, and SFT
    follows it. A rerun does not try the drill again. (cpu-tiny's anneal, budgeted in time, is left out too when
    under 30 s are left: the test above.)"""
    runs = micro_run.parent
    for part in ("world", "tokenizer", "data", "checkpoints/pretrain"):
        shutil.copytree(micro_run / part, runs / "sk" / part)
    run = runs / "sk"
    _pretrain_metrics(run, 1_000.0)
    plan = {"budget_seconds": 900.0, "later_seconds": 1e6, "pretrain_minutes": 1.0}
    (run / "plan.json").write_text(json.dumps(plan))
    args = ["speedrun", "--preset", "micro", "--runs-dir", str(runs), "--run", "sk", "--drills", "arithmetic"]
    assert main([*args, "--stages", "drill", "anneal", "sft"]) == 0
    out = capsys.readouterr().out
    assert "drill: left out of this run: its 2 steps and the anneal's least time need" in out
    assert not (run / "checkpoints" / "drill").exists() and (run / "drills" / "anneal.jsonl").is_file()
    assert f'init = "{run / "checkpoints" / "pretrain"}"' in (run / "config.anneal.toml").read_text()
    assert f'init = "{run / "checkpoints" / "anneal"}"' in (run / "config.sft.toml").read_text()
    assert set(json.loads((run / "plan.json").read_text())["skipped"]) == {"drill"}
    assert main([*args, "--stages", "drill"]) == 0
    assert "drill      done already, skipped" in capsys.readouterr().out
