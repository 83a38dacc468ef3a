"""ROUGE-L (longest common subsequence F-measure), with a tokenizer that sees Chinese.

Why our own: Self-Instruct drops a new instruction whose ROUGE-L against any instruction already in the
pool is >= 0.7. The reference implementation (Google's rouge_score, which the paper used) lower-cases,
keeps only [a-z0-9] runs and drops everything else, so a Chinese instruction becomes zero tokens and
scores 0 against everything: no Chinese near-duplicate would ever be caught. Here a token is a run of
letters/digits in any script (lower-cased), except that every CJK character is a token on its own,
because Chinese has no spaces (the word units of tinychat.data.units, the same convention the quality
filters use). On ASCII English the tokens, and so the scores, equal rouge_score's without stemming
(tests check that against the installed package).

    P = LCS / len(candidate), R = LCS / len(reference), F = 2PR / (P + R)

The LCS is the textbook O(len(a) * len(b)) dynamic programme, one row at a time. Instructions are
tens of tokens, so one comparison is ~1k cell updates; `max_rouge_l` also skips every pool entry whose
length alone caps F below the best score so far (F <= 2 min(a, b) / (a + b)).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tinychat.data.langid import CJK_CLASS

_TOKEN = re.compile(rf"[{CJK_CLASS}]|[^\W_{CJK_CLASS}]+")


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased letter/digit runs; each CJK character alone. ("写诗 in 3 lines" -> 写 诗 in 3 lines)."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (0 when either is empty), symmetric in its arguments."""
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def max_rouge_l(candidate: Sequence[str], pool: Sequence[Sequence[str]]) -> tuple[float, int]:
    """(best ROUGE-L F of `candidate` against any entry of `pool`, that entry's index; -1 for an empty pool)."""
    best, arg, n = 0.0, -1, len(candidate)
    for i, ref in enumerate(pool):
        m = len(ref)
        if n + m == 0 or 2 * min(n, m) / (n + m) <= best:
            continue  # its length alone cannot beat the best so far
        f = rouge_l(candidate, ref)
        if f > best:
            best, arg = f, i
    return best, arg
