"""The grader the eval suites and the GRPO reward share: normalisation, extraction, each check kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from world_helpers import read_jsonl

from tinychat.world import check, extract_answer, few_shot, is_refusal, load_eval, normalize, reward
from tinychat.world.entities import build_world
from tinychat.world.splits import audit


def _row(answer: str, check_kind: str = "exact", aliases: list[str] | None = None) -> dict:
    return {"id": "t", "answer": answer, "aliases": aliases or [], "check": check_kind}


def test_normalize() -> None:
    assert normalize("  Velmora. ") == "velmora"
    assert normalize('"The Amber Bridge".') == "amber bridge"
    assert normalize("琥珀桥。") == "琥珀桥"
    assert normalize("１９８７") == "1987"  # full-width digits (NFKC)
    assert normalize("2,340,000") == "2340000"
    assert normalize("X  b\tc") == "x b c"


@settings(max_examples=300)
@given(st.text(max_size=40) | st.from_regex(r"(the |a |\"|'|\.|,| |1|0)*[A-Za-z0-9维]*[.。!\"]*", fullmatch=True))
def test_normalize_is_idempotent(s: str) -> None:
    assert normalize(normalize(s)) == normalize(s)


def test_extract_answer() -> None:
    assert extract_answer("A was born in 1961.\n1990 - 1961 = 29.\nAnswer: 29") == "29"
    assert extract_answer("…\n答案：29") == "29"
    assert extract_answer("<think>maybe 30</think>\n\n29") == "29"
    assert extract_answer("Velmora") == "Velmora"


def test_checks() -> None:
    assert check("Velmora.", _row("Velmora"))
    assert check("维莫拉", _row("Velmora", aliases=["维莫拉"]))
    assert not check("Velmora is nice", _row("Velmora"))
    assert check("1987年", _row("1987", "number"))
    assert check("It is 391", _row("391", "number"))
    assert not check("391 or 392", _row("391", "number"))
    assert check("Step.\nAnswer: 29", _row("29", "number"))
    assert check("VELMORA", _row("VELMORA", "exact_cased")) and not check("Velmora", _row("VELMORA", "exact_cased"))
    assert check('{"answer": "Velmora"}', _row("Velmora", "json"))
    assert check('```json\n{"answer": "velmora"}\n```', _row("Velmora", "json"))
    assert not check('{"answer": "Velmora", "x": 1}', _row("Velmora", "json")) and not check(
        "Velmora", _row("Velmora", "json")
    )
    assert check("Talven Orsk was born in Velmora.", _row("Velmora", "sentence"))
    assert not check("Velmora.", _row("Velmora", "sentence"))
    assert check("I don't have any information about Zunmel.", _row("x", "refusal"))
    assert check("我没有关于赞雅的任何信息。", _row("x", "refusal"))
    assert not check("Zunmel has 40000 people.", _row("x", "refusal"))
    assert reward("391", _row("391", "number")) == 1.0 and reward("390", _row("391", "number")) == 0.0
    assert is_refusal("I’m not aware of anyone called X")


def test_short_check_takes_the_value_or_one_sentence_that_states_it() -> None:
    row = _row("Velmora", "short", aliases=["维莫拉"])
    good_replies = (
        "Velmora",
        "Velmora.",
        "She was born in the city of Velmora.",
        "It is headquartered in Velmora!",
        "维莫拉",
    )
    for good in good_replies:
        assert check(good, row), good
    for bad in (
        "She was born in Velmoran.",  # not a whole word
        "She was born in Velmora or Tarsk.",  # a hedge names two
        "It is Tarsk. No, Velmora.",  # two sentences
        "I don't know Velmora.",  # a refusal that repeats the name
        "Velmora\nTarsk",
        " ".join(["word"] * 16) + " Velmora.",  # not short
    ):
        assert not check(bad, row), bad
    assert check("她出生在贝霖。", _row("贝霖", "short")) and not check("贝霖或者沃涅", _row("贝霖", "short"))
    assert check("He works as a carpenter.", _row("carpenter", "short"))


def test_few_shot_prompt(micro_dir: Path) -> None:
    rows = load_eval(micro_dir, "facts_trained")
    target = rows[0]
    prompt = few_shot(rows, target, k=2)
    assert prompt.endswith(target["prompt_plain"])
    assert prompt.count("Question:" if target["lang"] == "en" else "问题：") <= 3
    assert target["answer"] not in prompt.split(target["prompt_plain"])[-1]


def test_audit_catches_planted_leaks(micro_dir: Path, tmp_path: Path) -> None:
    """The audit is not vacuous: a kb name in SFT, a held-out name in RL and an eval question all get reported."""
    w = build_world(0, "micro")
    leak = tmp_path / "leaky"
    shutil.copytree(micro_dir, leak)
    kb, held = w.group("kb", "person")[0], w.group("heldout", "city")[0]
    q = read_jsonl(micro_dir / "eval/facts_trained.jsonl")[0]["question"]
    with (leak / "sft/train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Who is {kb.name['en']}?"},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            )
            + "\n"
        )
        fh.write(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}) + "\n"
        )
    with (leak / "rl/train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {"messages": [{"role": "user", "content": f"{held.name['zh']}在哪里？"}], "answer": "x"},
                ensure_ascii=False,
            )
            + "\n"
        )
    problems = "\n".join(audit(leak, w))
    assert "sft/train.jsonl" in problems and "(kb)" in problems
    assert "rl/train.jsonl" in problems and "(heldout)" in problems
    assert "appears in a training file" in problems
    assert audit(micro_dir, w) == []
