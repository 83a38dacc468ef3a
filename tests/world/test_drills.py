"""tinychat.world.drills: pure drill rows that never touch the world's eval sets or its entities."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from tinychat.agent.calculator import calculate
from tinychat.cli import main as tinychat
from tinychat.world import drills, multistep
from tinychat.world.answers import extract_answer, is_refusal
from tinychat.world.arith import CALCULATOR_TOOL
from tinychat.world.drills import DrillsConfig, build, held_out, write
from tinychat.world.entities import build_world
from tinychat.world.evalsets import SEARCH_TOOL
from tinychat.world.load import load_jsonl, load_world
from tinychat.world.render import LANG


def _text(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False)


def test_counts_kinds_and_validation_split(micro_dir: Path) -> None:
    train, val = build(micro_dir, {"arithmetic": 40, "calculator": 20, "reading": 30}, val=5)
    skills = [r["skill"] for r in train]
    assert (skills.count("arithmetic_drill"), skills.count("calculator_drill"), skills.count("reading_drill")) == (
        40,
        20,
        30,
    )
    assert len(val) == 15
    assert not {_text(r) for r in val} & {_text(r) for r in train}


def test_no_eval_problem_is_drilled(micro_dir: Path) -> None:
    exclude = held_out(micro_dir)
    assert exclude, "the micro world asks arithmetic"
    train, val = build(micro_dir, {"arithmetic": 200, "calculator": 200}, val=10)
    for r in train + val:
        user = r["messages"][0]["content"]
        calls = [tc["function"]["arguments"] for m in r["messages"] for tc in m.get("tool_calls", [])]
        exprs = [json.loads(a)["expression"] for a in calls]
        assert not set(exprs) & exclude
        assert extract_answer(r["messages"][-1]["content"]).lstrip("-").isdigit(), user  # worked, then the number


def test_calculator_rows_call_with_the_question_and_answer_the_result(micro_dir: Path) -> None:
    train, _ = build(micro_dir, {"calculator": 30}, val=0)
    for r in train:
        user, call, result, answer = r["messages"]
        expr = json.loads(call["tool_calls"][0]["function"]["arguments"])["expression"]
        assert r["tools"][0]["function"]["name"] == "calculator"
        assert result["role"] == "tool" and answer["content"] == result["content"]
        assert calculate(expr) == result["content"]


def test_reading_rows_show_one_chunk_and_ask_what_it_states(micro_dir: Path) -> None:
    train, val = build(micro_dir, {"reading": 80}, val=8)
    names = {nm for e in load_world(micro_dir)["entities"] for nm in e["name"].values()}
    answers = refusals = unseen = 0
    for r in train + val:
        assert not any(nm in _text(r) for nm in names)
        if r["messages"][0]["role"] != "system":  # no passage: every question refused, naming its entity
            unseen += 1
            assert all(is_refusal(m["content"]) for m in r["messages"][1::2])
            continue
        sys_msg, *turns = r["messages"]
        assert sys_msg["role"] == "system" and sys_msg["content"].count("[1] source: ") == 1
        assert "[2]" not in sys_msg["content"]  # one passage, as the speedrun's top-1 prompt shows it
        assert len(turns) >= 2 and len(turns) % 2 == 0
        for q, a in zip(turns[::2], turns[1::2]):
            assert (q["role"], a["role"]) == ("user", "assistant")
            if a["content"] in drills.RAG_NO_ANSWER.values():
                refusals += 1
            else:
                assert a["content"] in sys_msg["content"]  # only reading gives it
                answers += 1
    assert 0.08 < unseen / len(train + val) < 0.3  # ~1 in 6
    assert answers > 3 * len(train)  # several questions a passage
    assert 0 < refusals < answers / 5  # ~1 in 12
    assert not {r["messages"][0]["content"] for r in val} & {r["messages"][0]["content"] for r in train}


def _check_agent_row(r: dict) -> None:
    """A solution as the agent loop runs it: searches whose queries are names the model has seen (in the
    question or an earlier result), results formatted as the search tool formats 2 hits with the name's own
    document first, then the calculator on numbers read from those results, and its result as the answer."""
    assert r["tools"] == [SEARCH_TOOL, CALCULATOR_TOOL]
    user, *steps, final = r["messages"]
    assert user["role"] == "user" and final["role"] == "assistant" and not final.get("tool_calls")
    calls, results = steps[0::2], steps[1::2]
    assert 2 <= len(calls) <= 4 and all(m["role"] == "tool" for m in results)  # 1-3 searches, the calculator
    seen = user["content"]
    for call, result in zip(calls[:-1], results[:-1]):
        fn = call["tool_calls"][0]["function"]
        query = json.loads(fn["arguments"])["query"]
        assert fn["name"] == "search" and query in seen  # copied, never recalled
        hits = result["content"].split("\n\n[2] source: ")
        assert len(hits) == 2 and hits[0].startswith("[1] source: ") and query in hits[0]
        seen += result["content"]
    fn = calls[-1]["tool_calls"][0]["function"]
    expr = json.loads(fn["arguments"])["expression"]
    assert fn["name"] == "calculator" and all(x in seen for x in re.findall(r"\d+", expr))
    assert calculate(expr) == results[-1]["content"] == final["content"]


def test_agent_rows_search_read_and_calculate(micro_dir: Path) -> None:
    train, val = build(micro_dir, {"agent": 40}, val=6)
    names = {nm for e in load_world(micro_dir)["entities"] for nm in e["name"].values()}
    assert len(train) == 40 and len(val) == 6
    for r in train + val:
        assert r["skill"] == "agent_drill" and not any(nm in _text(r) for nm in names)
        _check_agent_row(r)
    assert {r["lang"] for r in train} == {"en", "zh"}
    assert not {r["messages"][0]["content"] for r in val} & {r["messages"][0]["content"] for r in train}
    # the world's own SFT agent rows (its "ragtrain" entities) are solved the same way
    sft = [r for r in load_jsonl(micro_dir / "sft" / "train.jsonl") if r["skill"] == "agent"]
    assert sft
    for r in sft:
        _check_agent_row(r)


def _is_direct(q: str) -> bool:
    return any(q.endswith(x) for lang in ("en", "zh") for x in LANG[lang].DIRECT_SUFFIX)


def _base_question(q: str) -> str:
    """A multistep question without its "think step by step" or "answer directly" suffix."""
    for lang in ("en", "zh"):
        for suffix in (*LANG[lang].COT_SUFFIX, *LANG[lang].DIRECT_SUFFIX):
            if q.endswith(suffix):
                return q.removesuffix(suffix).rstrip()
    return q


def test_multistep_rows_solve_the_worlds_own_problems_but_no_eval_one(micro_dir: Path) -> None:
    asked = {_base_question(r["question"]) for r in load_jsonl(micro_dir / "eval" / "multistep.jsonl")}
    w = load_world(micro_dir)
    world = build_world(w["seed"], w["size"])
    drawn = multistep.sample(world, "trained", random.Random(0), 400, set())
    assert asked & {p.question[g] for p in drawn for g in ("en", "zh")}, "unexcluded draws would hit the eval set"
    train, val = build(micro_dir, {"multistep": 60}, val=6)
    assert len(train) == 60 and len(val) == 6
    assert not {r["messages"][0]["content"] for r in val} & {r["messages"][0]["content"] for r in train}
    trained = {e.name[g] for e in world.group("trained") for g in ("en", "zh")}
    direct = 0
    for r in train + val:
        q, turn = r["messages"][0]["content"], r["messages"][1]
        steps = turn.get("reasoning_content") or turn["content"]  # direct: the steps thought; cot: said
        direct += "reasoning_content" in turn
        assert r["skill"] == "multistep_drill" and _base_question(q) not in asked
        assert ("reasoning_content" in turn) == (_base_question(q) == q or _is_direct(q))
        assert any(nm in q + steps for nm in trained)  # the run's own entities: recall, then compose
        answer = extract_answer(turn["content"])
        assert answer and ("\n" not in turn["content"]) == ("reasoning_content" in turn)
        lead = re.search(r"(\d+) ([+-]) (\d+)[:：]", steps)
        if lead:  # a numeric kind: the columns' problem gives the answer
            a, op, b = int(lead[1]), lead[2], int(lead[3])
            assert answer == str(a + b if op == "+" else a - b)
    assert {r["lang"] for r in train} == {"en", "zh"}
    assert 10 < direct < 56  # about half of 66 answer directly after thinking


def test_instruction_rows_ask_capitals_and_the_other_language_but_no_eval_triple(micro_dir: Path) -> None:
    """Trained entities' facts with the capitals or other-language instruction, answered with the value so
    written after the fact is thought in the question's language; no (entity, fact, instruction) of the eval set."""
    from tinychat.world.evalsets import instruction_kinds
    from tinychat.world.facts import FACTS
    from tinychat.world.render import n_questions, question

    w = load_world(micro_dir)
    world = build_world(w["seed"], w["size"])
    asked = {(r["entity"], r["fact"], r["instruction"]) for r in load_jsonl(micro_dir / "eval" / "instruction.jsonl")}
    asked_q = {r["question"] for r in load_jsonl(micro_dir / "eval" / "instruction.jsonl")}
    which = {  # a training wording -> the (entity, fact, language) it asks about
        question(world, e, f, g, i): (e, f, g)
        for e in world.group("trained")
        for f in FACTS[e.kind]
        for g in ("en", "zh")
        for i in range(n_questions(f))
    }
    hit = {(e.id, f, k) for e in world.group("trained") for f in FACTS[e.kind] for k in ("upper", "lang")}
    assert hit & asked, "unexcluded draws would hit the eval set"
    train, val = build(micro_dir, {"instruction": 80}, val=4)
    assert len(train) == 80 and len(val) == 4
    assert len({_text(r) for r in train + val}) == 84  # distinct draws: validation never repeats a training row
    kinds = set()
    for r in train + val:
        q, turn = r["messages"][0]["content"], r["messages"][1]
        base = next(b for b in sorted(which, key=len, reverse=True) if q.startswith(b))
        e, f, g = which[base]
        kind = "upper" if q.endswith(LANG["en"].INSTRUCTIONS["upper"]) else "lang"
        kinds.add(kind)
        assert r["skill"] == "instruction_drill" and r["lang"] == g and q not in asked_q
        assert (e.id, f, kind) not in asked and kind in instruction_kinds(world, e, f, g)
        other = "zh" if g == "en" else "en"
        assert turn["content"] == (world.value(e, f, g).upper() if kind == "upper" else world.value(e, f, other))
        assert turn["reasoning_content"]  # the fact recalled in the question's language first
        if kind == "lang":
            assert world.value(e, f, g) in turn["reasoning_content"]
    assert kinds == {"upper", "lang"}


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_multistep_direct_sets_the_share_of_thinking_rows(micro_dir: Path, share: float) -> None:
    """0: every problem asked step by step and worked in the reply (round 32's anneal rows); 1: every one asked
    for the answer, its steps in a <think> block."""
    train, val = build(micro_dir, {"multistep": 30}, val=2, multistep_direct=share)
    thinking = ["reasoning_content" in r["messages"][1] for r in train + val]
    assert len(thinking) == 32 and set(thinking) == {bool(share)}


def test_same_seed_same_rows(micro_dir: Path) -> None:
    a = build(micro_dir, {"arithmetic": 10, "reading": 10}, val=2, seed=3)
    b = build(micro_dir, {"arithmetic": 10, "reading": 10}, val=2, seed=3)
    assert a == b


def test_write_and_cli(micro_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = write(DrillsConfig(world=str(micro_dir), out=str(tmp_path / "d"), rows={"calculator": 12}, val=3))
    assert info["train_rows"] == 12
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 12
    assert len((tmp_path / "d" / "val.jsonl").read_text().splitlines()) == 3
    rc = tinychat(
        ["world", "drills", "--world", str(micro_dir), "--out", str(tmp_path / "e"), "--rows", "{arithmetic = 5}"]
    )
    assert rc == 0 and "wrote 5 drill rows" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "{arithmetic = 0}"], "no drill rows asked for"),
        (["--rows", "{arithmetic = 4, calculator = -3}"], ">= 0"),
        (["--rows", "{juggling = 3}"], "unknown drill kind"),
        (["--rows", "{multistep = 3}", "--multistep_direct", "1.5"], "between 0 and 1"),
    ],
)
def test_bad_input_is_one_sentence(
    micro_dir: Path, tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = tinychat(["world", "drills", "--world", str(micro_dir), "--out", str(tmp_path / "x"), *args])
    assert rc != 0 and message in capsys.readouterr().err


def test_not_a_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tinychat(
        ["world", "drills", "--world", str(tmp_path), "--out", str(tmp_path / "x"), "--rows", "{calculator = 3}"]
    )
    assert rc != 0 and "is not a tinyworld directory" in capsys.readouterr().err
