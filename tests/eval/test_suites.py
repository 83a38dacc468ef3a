"""Every suite runs for base and chat models and returns a sane structure; prompts and grading are right."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_helpers import ScriptedCompleter, last_user_turn

from tinychat.errors import UserError
from tinychat.eval.backend import LocalCompleter, detect_mode, load
from tinychat.eval.suites import SUITES, SuiteOptions, base_prompt, limited, load_rows, run_suite, run_suites


def check_structure(r: dict, name: str, mode: str, n: int) -> None:
    assert r["suite"] == name and r["mode"] == mode and r["n"] == n
    assert r["accuracy"] is not None and 0.0 <= r["accuracy"] <= 1.0
    assert r["correct"] == round(r["accuracy"] * n)
    assert set(r["by_lang"]) <= {"en", "zh"} and sum(v["n"] for v in r["by_lang"].values()) == n
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in r["by_lang"].values())
    assert len(r["samples"]) <= 3 and all(
        set(s) == {"id", "question", "reply", "answer", "correct"} for s in r["samples"]
    )
    json.dumps(r)  # recordable as is


@pytest.mark.parametrize("mode", ["base", "chat"])
def test_every_suite_runs_on_the_tiny_model(tiny_model_dir: Path, world_dir: Path, mode: str) -> None:
    model, tok = load(tiny_model_dir)
    completer = LocalCompleter(model, tok, batch_size=16)
    opts = SuiteOptions(limit=4, max_new_tokens=8, cot_max_new_tokens=12)
    results = run_suites(completer, world_dir, list(SUITES), mode, opts)  # type: ignore[arg-type]
    assert list(results) == list(SUITES)
    for name, r in results.items():
        n = len(limited(load_rows(world_dir, SUITES[name].source), 4))
        check_structure(r, name, mode, n)
    ms = results["multistep"]
    assert set(ms["by_mode"]) == {"cot", "direct"} and ms["by_mode"]["cot"]["n"] == ms["by_mode"]["direct"]["n"]
    assert ("tool" in results["arithmetic_tool"]) == (mode == "chat")
    assert "tool" not in results["arithmetic_notool"]


def test_scripted_right_answers_score_full_marks(tiny_tokenizer, world_dir: Path) -> None:
    """A "model" that answers each chat question with its expected answer scores 100%: grading is consistent."""
    rows = {r["question"]: r for s in ("facts_trained", "instruction", "refusal") for r in load_rows(world_dir, s)}

    def answer(prompt: str) -> str:
        r = rows[last_user_turn(prompt)]
        if r["check"] == "json":
            return json.dumps({"answer": r["answer"]}, ensure_ascii=False)
        if r["check"] == "sentence":
            return r["reference"]
        return r["answer"]

    fake = ScriptedCompleter(tiny_tokenizer, answer)
    for name in ("facts_trained", "instruction", "refusal"):
        assert run_suite(fake, world_dir, name, "chat", SuiteOptions())["accuracy"] == 1.0, name
    assert fake.calls == 3  # one batched call per suite


def test_a_direct_multistep_answer_may_think_first(tiny_tokenizer, world_dir: Path) -> None:
    """A chat model asked for the answer alone may reason in a <think> block first (as the SFT rows teach): the
    grader reads the answer after the block, and a direct row gets the step-by-step budget to think in."""
    rows = {r["question"]: r for r in load_rows(world_dir, "multistep")}
    budgets: list[int] = []

    def answer(prompt: str) -> str:
        r = rows[last_user_turn(prompt)]
        return r["reference"] if r["mode"] == "cot" else f"<think>\nthe steps\n</think>\n\n{r['answer']}"

    class Recording(ScriptedCompleter):
        def complete(self, prompts: list[list[int]], max_new_tokens: int, stop=()) -> list[str]:  # noqa: ANN001
            budgets.extend([max_new_tokens] * len(prompts))
            return super().complete(prompts, max_new_tokens, stop)

    opts = SuiteOptions(max_new_tokens=8, cot_max_new_tokens=12)
    r = run_suite(Recording(tiny_tokenizer, answer), world_dir, "multistep", "chat", opts)
    assert r["by_mode"]["direct"]["accuracy"] == 1.0 and r["accuracy"] == 1.0
    assert set(budgets) == {12}
    budgets.clear()
    run_suite(Recording(tiny_tokenizer, lambda p: "x"), world_dir, "multistep", "base", opts)
    assert set(budgets) == {8, 12}  # a base model's direct answer is one line, as before


def test_base_prompts_are_few_shot(tiny_tokenizer, world_dir: Path) -> None:
    rows = load_rows(world_dir, "facts_heldout")
    fake = ScriptedCompleter(tiny_tokenizer, lambda p: " wrong\nQuestion: more text")
    r = run_suite(fake, world_dir, "facts_heldout", "base", SuiteOptions(limit=2, shots=2))
    first = fake.prompts[0]
    assert first.endswith(rows[0]["prompt_plain"]) or first.endswith(rows[1]["prompt_plain"])
    assert first.count("Question:") + first.count("问题：") == 3  # 2 solved examples + the open question
    assert r["samples"][0]["reply"] == "wrong"  # cut at the newline that ends a one-line answer


def test_multistep_base_prompt_uses_reasoning_and_hides_the_pair(world_dir: Path) -> None:
    rows = load_rows(world_dir, "multistep")
    cot = next(r for r in rows if r["mode"] == "cot")
    prompt = base_prompt(rows, cot, 2)
    pair = next(r for r in rows if r["problem_id"] == cot["problem_id"] and r["mode"] == "direct")
    assert pair["prompt_plain"] not in prompt and prompt.endswith(cot["prompt_plain"])
    shots = [r for r in rows if r["mode"] == "cot" and r["lang"] == cot["lang"] and r["id"] != cot["id"]][:2]
    assert all(s["reference"] in prompt for s in shots)
    kept = limited(rows, 4)
    assert len(kept) == 4 and {r["mode"] for r in kept} == {"cot", "direct"}
    assert len({r["problem_id"] for r in kept}) == 2


def test_unknown_suite_and_missing_world(tiny_tokenizer, tmp_path: Path) -> None:
    fake = ScriptedCompleter(tiny_tokenizer, lambda p: "")
    with pytest.raises(UserError, match="unknown suite"):
        run_suite(fake, tmp_path, "nope", "chat")
    with pytest.raises(UserError, match="does not exist"):
        run_suite(fake, tmp_path, "facts_trained", "chat")


def test_detect_mode(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert detect_mode(tiny_model_dir) == "chat"  # ChatML template, no other hint
    assert detect_mode(tiny_model_dir, stage="pretrain") == "base"
    assert detect_mode(tiny_model_dir, stage="dpo") == "chat"
    ck = tmp_path / "run" / "checkpoints"
    shutil.copytree(tiny_model_dir, ck / "pretrain")
    assert detect_mode(ck / "pretrain") == "base"
    (ck / "pretrain" / "step_000010").mkdir()
    assert detect_mode(ck / "pretrain" / "step_000010") == "base"
    shutil.copytree(tiny_model_dir, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**cfg, "tinychat_stage": "pretrain"}))
    assert detect_mode(tmp_path / "plain") == "base"
    # what training records wins over every other rule: a pretrained model that met chat rows is asked as a chat
    # model whatever stage the caller names; one that met plain text only is a base model even after "sft"
    record = {**cfg, "tinychat_stage": "pretrain", "tinychat_chat": True}
    (tmp_path / "plain" / "config.json").write_text(json.dumps(record))
    assert detect_mode(tmp_path / "plain") == "chat" and detect_mode(tmp_path / "plain", stage="pretrain") == "chat"
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**cfg, "tinychat_chat": False}))
    assert detect_mode(tmp_path / "plain", stage="sft") == "base"
    shutil.copytree(tmp_path / "plain", ck / "sft")
    assert detect_mode(ck / "sft") == "base"
    tc = json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({**tc, "chat_template": None}))
    (tmp_path / "plain" / "chat_template.jinja").unlink()
    assert detect_mode(tmp_path / "plain") == "base"
