"""Grading a model's reply against an eval or RL row: normalisation, answer extraction, one `check`.

Why here: the eval suites and the GRPO reward must agree on what counts as correct, so both import this.
Every row names its `check`:
  exact        normalised reply equals the answer or an alias
  short        as exact, or one short sentence (at most 16 words, no second sentence, no "or") that contains
               the answer or an alias as whole words: "She was born in the city of Lommunyar."
  number       as exact, or the last number in the reply equals the answer (commas and "年" ignored)
  exact_cased  equal after stripping, with case kept (the "answer in capital letters" instruction)
  json         the reply is a JSON object whose "answer" passes `exact` (code fences allowed)
  sentence     a full sentence (ends with . or 。, longer than the answer) that contains the answer
  refusal      the reply says it does not know (see REFUSAL_MARKERS)
Normalisation (SQuAD-style, plus CJK): NFKC, case-fold, drop a leading article, surrounding quotes and
trailing punctuation, collapse spaces, drop thousands separators. A step-by-step reply is graded on what
follows its last "Answer:" / "答案：", and a <think>...</think> block is ignored.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

_PUNCT = ".,!?;:。！？，、；：…"
_QUOTES = "\"'`“”‘’「」『』《》()（）[]【】*"
_ARTICLE = re.compile(r"^(?:(?:the|a|an)\s+)+", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_ANSWER = re.compile(r"(?:answer\s*:|答案\s*[:：])", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
REFUSAL_MARKERS = (
    "don't have any information",
    "do not have any information",
    "not aware of",
    "i don't know",
    "i do not know",
    "no information",
    "can't answer",
    "cannot answer",
    "documents do not say",
    "没有关于",
    "不知道",
    "没有听说过",
    "没有相关信息",
    "无法回答",
    "文档中没有",
)


def normalize(text: str) -> str:
    """The comparable form of an answer; see the module docstring. Idempotent (applied until it settles)."""
    s = text
    for _ in range(100):  # each round peels a layer (quotes, punctuation, articles); real answers take 1-2
        prev = s
        s = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", s).casefold())
        s = s.strip().strip(_QUOTES).rstrip(_PUNCT).strip()
        s = _ARTICLE.sub("", s)
        s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
        s = re.sub(r"\s+", " ", s).strip()
        if s == prev:
            break
    return s


def extract_answer(reply: str) -> str:
    """The part of a reply that is the answer: after the last 'Answer:' if any, minus <think> blocks."""
    text = _THINK.sub("", reply).strip()
    marks = list(_ANSWER.finditer(text))
    if marks:
        text = text[marks[-1].end() :].strip().split("\n")[0]
    return text.strip()


def numbers(text: str) -> list[str]:
    """Integers and decimals in a text, thousands separators removed."""
    return [n.replace(",", "") for n in _NUMBER.findall(unicodedata.normalize("NFKC", text))]


def is_refusal(reply: str) -> bool:
    low = unicodedata.normalize("NFKC", reply).casefold().replace("’", "'")
    return any(m in low for m in REFUSAL_MARKERS)


def _targets(row: Mapping[str, Any]) -> set[str]:
    return {normalize(a) for a in [row["answer"], *row.get("aliases", [])]}


_HEDGE = re.compile(r"\b(?:or|either)\b|或|还是")  # 或 covers 或者
_SENTENCE_END = re.compile(r"[.!?。！？](?:\s|$)")


def _states(ans: str, targets: set[str]) -> bool:
    """Is `ans` one short sentence that contains a target as whole words (CJK: as a substring)?"""
    s = unicodedata.normalize("NFKC", ans).strip()
    if not s or "\n" in s or len(s.split()) > 16 or _HEDGE.search(s.casefold()) or is_refusal(s):
        return False
    if len(_SENTENCE_END.findall(s)) > 1:  # "It is A. Or B." is two answers
        return False
    norm = normalize(s)
    for t in targets:
        if not t:
            continue
        if re.search(r"[\u3400-\u9fff]", t):
            if t in norm:
                return True
        elif re.search(r"(?<!\w)" + re.escape(t) + r"(?!\w)", norm):
            return True
    return False


def check(reply: str, row: Mapping[str, Any]) -> bool:
    """True when `reply` answers `row` correctly under the row's `check` (default "exact")."""
    kind = row.get("check", "exact")
    if kind == "refusal":
        return is_refusal(reply)
    ans = extract_answer(reply)
    if kind == "exact":
        return normalize(ans) in _targets(row)
    if kind == "short":
        targets = _targets(row)
        return normalize(ans) in targets or _states(ans, targets)
    if kind == "number":
        if normalize(ans) in _targets(row):
            return True
        nums = numbers(ans)
        return bool(nums) and nums[-1] == normalize(row["answer"])
    if kind == "exact_cased":
        return unicodedata.normalize("NFKC", ans).strip().rstrip(_PUNCT).strip() == row["answer"]
    if kind == "json":
        body = re.sub(r"^```(?:json)?\s*|\s*```$", "", ans.strip())
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return False
        return isinstance(obj, dict) and set(obj) == {"answer"} and normalize(str(obj["answer"])) in _targets(row)
    if kind == "sentence":
        s = unicodedata.normalize("NFKC", ans).strip()
        norm = normalize(s)
        return (
            s.endswith((".", "。"))
            and any(t and t in norm for t in _targets(row))
            and len(norm) > len(normalize(row["answer"])) + 3
        )
    raise ValueError(f"unknown check {kind!r} in row {row.get('id', '?')}")


def reward(reply: str, row: Mapping[str, Any]) -> float:
    """1.0 for a correct reply, else 0.0: the verifiable reward for RL rows."""
    return 1.0 if check(reply, row) else 0.0
