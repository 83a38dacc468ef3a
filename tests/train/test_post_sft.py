"""`tinychat sft` through the real CLI (default --init and data from the run directory), SFT with LoRA,
and every post-training command's bad-input errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from post_helpers import RUN, common, fresh_run, metrics, user, write_jsonl
from train_helpers import run_cmd

from tinychat.cli import main

pytest_plugins = ("post_helpers",)  # its fixtures: toy_runs, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_learns_the_replies_and_the_next_stage_starts_from_it(toy_runs: Path):
    run = fresh_run(toy_runs, "chain")  # only pretrain/ and world/: sft and grpo find their inputs by default
    args = ["--train.max_steps", "30", "--train.lr", "3e-3", "--train.eval_every", "15", "--eval_rows", "8"]
    r = run_cmd([sys.executable, "-m", "tinychat.cli", "sft", *common(toy_runs, run.name), *args])
    assert r.returncode == 0, r.stderr
    assert "sft: 120 conversations" in r.stdout and "val_loss" in r.stdout
    evals = metrics(run, "sft", "eval")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["eval_accuracy"] == 1.0
    out = run / "checkpoints" / "sft"
    assert (out / "tokenizer.json").is_file()
    transformers = pytest.importorskip("transformers")
    from tinychat.model import Model

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(16, 200, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, Model.from_pretrained(str(out))(x), atol=1e-4, rtol=0)
    # grpo with no --init starts from this run's sft model (there is no dpo stage)
    grpo = ["--train.max_steps", "1", "--samples", "2", "--max_new_tokens", "4", "--eval_rows", "0", "--lora.rank", "2"]
    assert main(["grpo", *common(toy_runs, run.name), *grpo]) == 0
    adapter = json.loads((run / "checkpoints" / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == out.absolute()


def test_sft_with_lora_writes_the_merged_model_and_the_adapter(toy_runs: Path):
    from tinychat.model import Model
    from tinychat.train.post import load_causal_lm

    args = [
        "--train.max_steps",
        "6",
        "--train.lr",
        "1e-2",
        "--lora.rank",
        "4",
        "--lora.targets",
        "q,v,up",
        "--pack",
        "false",
        "--stage",
        "sft_lora",
        "--init",
        str(toy_runs / RUN / "checkpoints" / "pretrain"),
    ]
    assert main(["sft", *common(toy_runs), *args]) == 0
    stage = toy_runs / RUN / "checkpoints" / "sft_lora"
    x = torch.randint(16, 200, (2, 9))
    with torch.no_grad():
        merged = Model.from_pretrained(str(stage))(x)
        via_adapter = load_causal_lm(stage / "adapter")(x)  # base from adapter_config.json + adapter, merged
        base = Model.from_pretrained(str(toy_runs / RUN / "checkpoints" / "pretrain"))(x)
    torch.testing.assert_close(via_adapter, merged, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-4
    conf = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "up_proj", "v_proj"] and conf["r"] == 4


@pytest.mark.parametrize(
    ("command", "good", "missing"),
    [
        ("sft", {"messages": [user("a"), {"role": "assistant", "content": "b"}]}, "messages"),
        ("reward", {"prompt": "a", "chosen": "b", "rejected": "c"}, "rejected"),
        ("dpo", {"prompt": "a", "chosen": "b", "rejected": "c"}, "chosen"),
        ("ppo", {"messages": [user("a")]}, "messages"),
        ("grpo", {"messages": [user("a")], "answer": "1"}, "answer"),
    ],
)
def test_a_missing_field_names_the_file_and_line(toy_runs: Path, tmp_path: Path, capsys, command, good, missing):
    bad = {k: v for k, v in good.items() if k != missing}
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, bad, good])
    init = str(toy_runs / RUN / "checkpoints" / "pretrain")
    rl = ["--max_new_tokens", "8"] if command in ("ppo", "grpo") else []
    code = main([command, *common(toy_runs, "bad"), "--init", init, "--data", str(data), "--train.max_steps", "1", *rl])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{data} line 3: field '{missing}' is missing ({command} rows need" in err
    assert not (toy_runs / "bad" / "checkpoints").exists()  # nothing trained, nothing written


def test_missing_inputs_say_what_to_do(toy_runs: Path, tmp_path: Path, capsys):
    assert main(["dpo", *common(tmp_path / "runs", "empty"), "--train.max_steps", "1"]) == 2
    assert "no --init given and there is no model at" in capsys.readouterr().err
    init = ["--init", str(toy_runs / RUN / "checkpoints" / "pretrain")]
    assert main(["sft", *common(tmp_path / "runs", "empty"), *init, "--train.max_steps", "1"]) == 2
    assert "world generate" in capsys.readouterr().err  # no --data and no tinyworld in the run
    no_rm = fresh_run(toy_runs, "no_rm").name
    assert main(["ppo", *common(toy_runs, no_rm), *init, "--train.max_steps", "1", "--max_new_tokens", "8"]) == 2
    assert "no reward model at" in capsys.readouterr().err
    assert main(["sft", *common(toy_runs), *init, "--train.seq_len", "4096", "--train.max_steps", "1"]) == 2
    assert "context window" in capsys.readouterr().err
    assert main(["grpo", *common(toy_runs), *init, "--rewards", "nope", "--max_new_tokens", "8"]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_a_lora_run_resumes_exactly_from_its_step_checkpoint(toy_runs: Path):
    """Step checkpoints of a LoRA run hold the adapter tensors beside the frozen base: --resume continues."""
    import shutil

    args = ["dpo", *common(toy_runs, "resume"), "--init", str(toy_runs / RUN / "checkpoints" / "pretrain"),
            "--data", str(toy_runs / RUN / "world" / "preference" / "train.jsonl"), "--lora.rank", "2",
            "--train.max_steps", "6", "--train.checkpoint_every", "2"]  # fmt: skip
    assert main(args) == 0
    ref = metrics(toy_runs / "resume", "dpo")
    shutil.rmtree(toy_runs / "resume" / "checkpoints" / "dpo" / "step_000006")
    assert main([*args, "--resume"]) == 0
    assert [r["loss"] for r in metrics(toy_runs / "resume", "dpo")] == [r["loss"] for r in ref]


def test_skill_weights_copy_rows_by_their_skill_the_same_way_every_run():
    from tinychat.train.sft import weigh

    rows = [(f"row {i}", {"skill": skill, "i": i}) for i in range(200) for skill in ("facts", "agent", "rag", "")]
    out = weigh(rows, {"*": 1.0, "agent": 0.0, "rag": 0.5, "facts": 2})
    count = {s: sum(r["skill"] == s for _, r in out) for s in ("facts", "agent", "rag", "")}
    assert count["facts"] == 400 and count["agent"] == 0 and count[""] == 200  # "*" covers rows without a skill
    assert 70 < count["rag"] < 130  # each kept with odds 0.5
    assert out == weigh(rows, {"*": 1.0, "agent": 0.0, "rag": 0.5, "facts": 2})
    assert weigh(rows, {}) is rows


def test_sft_skill_weights_from_the_preset_and_their_errors(toy_runs: Path, tmp_path: Path, capsys):
    rows = [
        {"messages": [user(f"q{i}"), {"role": "assistant", "content": "a"}], "skill": s}
        for i, s in enumerate(["facts"] * 6 + ["agent"] * 4)
    ]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    base = [*common(toy_runs, "weights"), "--data", str(data), "--train.max_steps", "1", "--eval_rows", "0"]
    base += ["--init", str(toy_runs / RUN / "checkpoints" / "pretrain")]

    def preset(body: str) -> str:
        path = tmp_path / "preset.toml"
        path.write_text("[sft.skill_weights]\n" + body)
        return str(path)

    assert main(["sft", "--config", preset('"*" = 1.0\nagent = 0.0\nfacts = 2\n'), *base]) == 0
    assert "sft: 12 conversations" in capsys.readouterr().out  # 6 facts rows twice, no agent rows
    assert main(["sft", "--config", preset("agent = -1\n"), *base]) == 2
    assert "skill_weights must be numbers >= 0, got {'agent': -1}." in capsys.readouterr().err
    assert main(["sft", "--config", preset('"*" = 0\n'), *base]) == 2
    assert "leave none of the rows of" in capsys.readouterr().err


def test_validation_tasks_grade_a_worked_reply_by_its_final_answer(tiny_tokenizer):
    """A row without "answer" is graded by its last reply's final answer, as the model's reply is: a drill's
    worked sum is right when the model's own working ends in the same "Answer: 132", and a plain reply is
    compared whole as before."""
    from tinychat.train.rewards import answer_reward
    from tinychat.train.sft import task_prompts

    worked = "7 + 5 = 12 (2). 8 + 4 + 1 = 13 (132).\nAnswer: 132"
    rows = [
        ("a:1", {"messages": [user("What is 87 plus 45?"), {"role": "assistant", "content": worked}]}),
        ("a:2", {"messages": [user("Say hello."), {"role": "assistant", "content": "Hello there"}]}),
        ("a:3", {"messages": [user("87 + 45?"), {"role": "assistant", "content": "It is 132."}], "answer": "132"}),
    ]
    tasks = task_prompts(tiny_tokenizer, rows)
    assert [t.row["answer"] for t in tasks] == ["132", "Hello there", "132"]
    assert answer_reward(worked, tasks[0].row) == 1.0  # the same working, read back: right
    assert answer_reward("7 + 5 = 12 (2). 8 + 4 + 1 = 12 (122).\nAnswer: 122", tasks[0].row) == 0.0
    assert answer_reward("Hello there", tasks[1].row) == 1.0
