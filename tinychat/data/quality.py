"""Heuristic quality filters in the style of Gopher (Rae et al. 2021), RefinedWeb and FineWeb.

Why heuristics and not a classifier: they are cheap, explainable per document, need no model, and
catch most machine-generated junk (menus, keyword lists, SEO spam, tables of numbers, repeated
boilerplate) that web text is full of. Each check has its own threshold in the config and its own
drop counter, so a user can see which rule removed what and loosen exactly that one.

Checks, in order (a document is dropped by the first that fails, and counted under its name):
  words          number of word units outside [min_words, max_words]
  mean_word_len  mean length of whitespace words outside [min, max]        (skipped for CJK text)
  symbol_ratio   ("#" + "..." + "…") per word above the maximum
  alpha_words    share of whitespace words containing a letter below the minimum (numbers, junk);
                 words of punctuation only ("-", "|") are left out of the count
  bullet_lines   share of lines starting with a bullet above the maximum (menus)
  ellipsis_lines share of lines ending in an ellipsis above the maximum (truncated snippets)
  line_punct     share of lines ending in terminal punctuation below the minimum (FineWeb: 0.12)
  dup_lines      share of lines, or of characters in lines, that repeat an earlier line
  top_ngram      characters covered by the single most frequent n-gram, n = 2, 3, 4
  dup_ngram      characters covered by n-grams that occur more than once, n = 5..10

"Word units" are letter/digit runs, with every CJK character counted as a unit (Chinese has no spaces;
a character is the closest cheap analogue of a word), so length and repetition checks work on
Chinese too. The n-gram checks hash units to integers once and work on numpy arrays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tinychat.config import field
from tinychat.data.units import TextArrays, text_arrays

QUALITY_CHECKS = (
    "words",
    "mean_word_len",
    "symbol_ratio",
    "alpha_words",
    "bullet_lines",
    "ellipsis_lines",
    "line_punct",
    "dup_lines",
    "top_ngram",
    "dup_ngram",
)
_TERMINAL = tuple(".!?\"'”’」』》）)。！？…；;:：")
_BULLETS = tuple("•●·▪‣◦-*–—>")
_MUL = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class QualityConfig:
    enabled: bool = field(True, help="run the heuristic quality filters at all")
    min_words: int = field(50, help="drop documents with fewer word units (a CJK character counts as one)")
    max_words: int = field(100_000, help="drop documents with more word units")
    min_mean_word_len: float = field(3.0, help="drop when mean whitespace-word length is below (not for CJK)")
    max_mean_word_len: float = field(10.0, help="drop when mean whitespace-word length is above (not for CJK)")
    max_symbol_word_ratio: float = field(0.1, help="drop when ('#' + ellipses) per word is above")
    min_alpha_word_frac: float = field(0.8, help="drop when fewer words contain a letter")
    max_bullet_line_frac: float = field(0.9, help="drop when more lines start with a bullet")
    max_ellipsis_line_frac: float = field(0.3, help="drop when more lines end with an ellipsis")
    min_line_punct_frac: float = field(0.12, help="drop when fewer lines end in terminal punctuation")
    max_dup_line_frac: float = field(0.3, help="drop when more lines repeat an earlier line")
    max_dup_line_char_frac: float = field(0.2, help="drop when more characters are in repeated lines")
    max_top_ngram_frac: list[float] = field(
        [0.20, 0.18, 0.16], help="for n = 2, 3, 4: max share of characters in the most frequent n-gram"
    )
    max_dup_ngram_frac: list[float] = field(
        [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        help="for n = 5..10: max share of characters in repeated n-grams",
    )


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of each length-n window of ids: shape (len(ids) - n + 1,), uint64, wrapping."""
    m = len(ids) - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    for k in range(n):
        h = h * _MUL + ids[k : k + m]
    return h


def _sorted_runs(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, run_starts, run_lengths) of equal values in h sorted: one argsort, cheaper than np.unique."""
    order = np.argsort(h, kind="stable")
    s = h[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    lengths = np.diff(np.append(starts, len(s)))
    return order, starts, lengths


def top_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Share of characters covered by occurrences of the most frequent n-gram (Gopher's measure)."""
    if len(ids) < n:
        return 0.0
    order, starts, lengths = _sorted_runs(ngram_hashes(ids, n))
    best = int(np.argmax(lengths))  # ties: the smallest hash, deterministic
    if lengths[best] <= 1:
        return 0.0
    first = int(order[starts[best]])  # stable sort: the first occurrence in the text
    return float(lengths[best] * lens[first : first + n].sum() / max(1, lens.sum()))


def dup_ngram_frac(ids: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Share of characters in units covered by some n-gram that occurs more than once in the document."""
    if len(ids) < n:
        return 0.0
    order, starts, lengths = _sorted_runs(ngram_hashes(ids, n))
    dup_sorted = np.repeat(lengths > 1, lengths)
    if not dup_sorted.any():
        return 0.0
    dup_starts = order[dup_sorted]
    # coverage of [s, s+n) for every duplicated start, via a difference array and a running sum
    diff = np.zeros(len(ids) + 1, dtype=np.int64)
    np.add.at(diff, dup_starts, 1)
    np.add.at(diff, dup_starts + n, -1)
    covered = np.cumsum(diff[:-1]) > 0
    return float(lens[covered].sum() / max(1, lens.sum()))


def quality_check(text: str, cfg: QualityConfig, arrays: TextArrays | None = None) -> str | None:
    """Name of the first failing check (see the module docstring), or None when the document passes.

    `arrays` is units.text_arrays(text) when the caller already has it (prepare reuses it for MinHash).
    """
    if not cfg.enabled:
        return None
    a = text_arrays(text) if arrays is None else arrays
    ids, lens = a.ids, a.lens
    if not cfg.min_words <= len(ids) <= cfg.max_words:
        return "words"
    n_words = max(1, a.n_words)
    if a.cjk_chars < 0.3 * max(1, a.word_chars):  # mean word length means nothing without spaces
        mean_len = a.word_chars / n_words
        if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
            return "mean_word_len"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n_words > cfg.max_symbol_word_ratio:
        return "symbol_ratio"
    # like datatrove's Gopher filter, pure punctuation ("-", "|", "...") does not count as a word here
    if a.letter_words / max(1, a.n_words - a.symbol_words) < cfg.min_alpha_word_frac:
        return "alpha_words"
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    n_lines = max(1, len(lines))
    if sum(ln.startswith(_BULLETS) for ln in lines) / n_lines > cfg.max_bullet_line_frac:
        return "bullet_lines"
    if sum(ln.endswith(("...", "…")) for ln in lines) / n_lines > cfg.max_ellipsis_line_frac:
        return "ellipsis_lines"
    if sum(ln.endswith(_TERMINAL) for ln in lines) / n_lines < cfg.min_line_punct_frac:
        return "line_punct"
    seen: Counter[str] = Counter()
    dup_lines = dup_chars = 0
    for ln in lines:
        if seen[ln]:
            dup_lines += 1
            dup_chars += len(ln)
        seen[ln] += 1
    total_chars = max(1, sum(map(len, lines)))
    if dup_lines / n_lines > cfg.max_dup_line_frac or dup_chars / total_chars > cfg.max_dup_line_char_frac:
        return "dup_lines"
    for n, limit in enumerate(cfg.max_top_ngram_frac, start=2):
        if top_ngram_frac(ids, lens, n) > limit:
            return "top_ngram"
    limits = cfg.max_dup_ngram_frac
    for i, limit in enumerate(limits):
        frac = dup_ngram_frac(ids, lens, 5 + i)
        if frac > limit:
            return "dup_ngram"
        if frac <= min(limits[i:]):
            break  # coverage by repeated (n+1)-grams is within coverage by repeated n-grams: all pass
    return None
