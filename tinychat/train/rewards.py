"""Verifiable rewards for RL (GRPO, or PPO without a reward model): plain Python callables.

A reward function is `fn(reply: str, row: dict, finished: bool) -> float`, where `row` is the RL row
the prompt came from ({"messages", "answer", ...}) and `finished` says the reply ended by itself (an
end-of-turn token) rather than at the length limit. `--rewards answer format` picks them by name;
`module.path:function` names any importable callable of that signature (a user's own checker).

Why exact answers: on tinyworld (and math-style data) correctness is decidable, so RL needs no learned
judge to exploit. Rows from tinyworld carry a "check" field and are graded by tinyworld's own checker
(the eval suites use the same one, so training and evaluation agree); other rows by normalised exact
match, or equality of the last number for numeric answers.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from tinychat.errors import UserError

RewardFn = Callable[[str, Mapping[str, Any], bool], float]

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"(?:answer\s*:|答案\s*[:：])", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_STRIP = "\"'`“”‘’「」《》()（）[]*.,!?;:。！？，、；：… \n\t"


def normalize(text: str) -> str:
    """NFKC, case-folded, outer quotes/punctuation and a leading article dropped, spaces collapsed."""
    s = unicodedata.normalize("NFKC", text).strip().strip(_STRIP).casefold()
    s = re.sub(r"^(the|a|an)\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    return re.sub(r"\s+", " ", s).strip()


def final_answer(reply: str) -> str:
    """What follows the last "Answer:" (first line), else the whole reply; <think> blocks ignored."""
    text = _THINK.sub("", reply).strip()
    marks = list(_ANSWER.finditer(text))
    if marks:
        text = text[marks[-1].end() :].strip().split("\n")[0]
    return text.strip()


def exact_match(reply: str, answer: str, aliases: list[str] | tuple[str, ...] = ()) -> bool:
    """Generic grading: the normalised final answer equals the answer or an alias, or, for a numeric
    answer, the last number in it equals the answer."""
    got = normalize(final_answer(reply))
    targets = {normalize(str(a)) for a in [answer, *aliases]}
    if got in targets:
        return True
    want = normalize(str(answer)).replace(",", "")
    if _NUMBER.fullmatch(want):
        nums = _NUMBER.findall(got.replace(",", ""))
        return bool(nums) and float(nums[-1]) == float(want)
    return False


def answer_reward(reply: str, row: Mapping[str, Any], finished: bool = True) -> float:
    """1.0 for a correct final answer, else 0.0 (tinyworld rows: tinyworld's checker; others: exact_match)."""
    if "check" in row:
        from tinychat.world.answers import check  # lazily: only rows that name a tinyworld check need it

        return 1.0 if check(reply, row) else 0.0
    return 1.0 if exact_match(reply, str(row["answer"]), row.get("aliases") or ()) else 0.0


def format_reward(reply: str, row: Mapping[str, Any], finished: bool = True) -> float:
    """1.0 when the reply is well-formed: it ended by itself, is not empty, and leaves no markup open.

    A refusal of a prompt that has an answer earns nothing either. Measured on cpu-tiny: while no answer
    was right yet, "I don't know X." was the cheapest well-formed reply, and GRPO drove refusal on
    tinyworld's eval from 75% to 100% while everything else fell (docs/post-training.md).
    """
    from tinychat.world.answers import is_refusal  # lazily, like answer_reward's checker

    text = reply.strip()
    if not finished or not text:
        return 0.0
    if row.get("answer") and row.get("check") != "refusal" and is_refusal(text):
        return 0.0
    for opening, closing in (("<think>", "</think>"), ("<tool_call>", "</tool_call>")):
        if text.count(opening) != text.count(closing):
            return 0.0
    return 1.0


REWARDS: dict[str, RewardFn] = {"answer": answer_reward, "format": format_reward}


def resolve_rewards(names: list[str]) -> list[RewardFn]:
    """Reward functions by name (see REWARDS) or by "module.path:function"."""
    out = []
    for name in names:
        if name in REWARDS:
            out.append(REWARDS[name])
            continue
        module, _, attr = name.partition(":")
        if not attr:
            raise UserError(f"--rewards: unknown reward {name!r}; use {', '.join(REWARDS)} or module.path:function.")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--rewards: cannot import {name!r} ({e}).") from None
        if not callable(fn):
            raise UserError(f"--rewards: {name!r} is not callable.")
        out.append(fn)
    if not out:
        raise UserError("--rewards must name at least one reward function.")
    return out
