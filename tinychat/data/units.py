"""Word units as numpy arrays: boundaries and hashes computed on code points, no Python loop per word.

Why: the quality n-gram checks and the MinHash shingles both need every word of every document as an
integer. Doing that with a Python loop (split, then crc32 per word) was the slowest part of prepare.
Here a document becomes a uint32 array of lower-cased code points; two lookup tables mark word
characters (letters, digits, combining marks) and CJK characters; unit boundaries are where the mask
changes (and around every CJK character, which is a unit on its own since Chinese has no spaces);
unit hashes come from prefix sums of a polynomial hash, all vectorised.

The hash of a unit is a pure function of its code points, so every process computes the same ids
(unlike Python's per-process salted hash()).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tinychat.data.langid import CJK_CLASS

_TABLE_SIZE = 0x30000  # BMP + the supplementary planes that hold CJK ideographs
_Q = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so it has an inverse mod 2^64
_Q_INV = np.uint64(pow(0x100000001B3, -1, 2**64))


# bit flags of the code point table
WORD, CJK, LETTER, SPACE = 1, 2, 4, 8


@lru_cache(maxsize=1)
def _table() -> np.ndarray:
    """uint8 flags per code point (WORD | CJK | LETTER | SPACE), built once per process (~0.1 s)."""
    flags = np.zeros(_TABLE_SIZE, dtype=np.uint8)
    for cp in range(_TABLE_SIZE):
        ch = chr(cp)
        if ch.isalpha():
            flags[cp] |= WORD | LETTER
        elif ch.isalnum() or (cp >= 0x300 and unicodedata.category(ch)[0] == "M"):
            flags[cp] |= WORD
        elif ch.isspace():
            flags[cp] |= SPACE
    ranges = CJK_CLASS.replace("-", "")  # pairs of (lo, hi) characters
    for lo, hi in zip(ranges[::2], ranges[1::2]):
        flags[ord(lo) : min(ord(hi), _TABLE_SIZE - 1) + 1] |= WORD | CJK | LETTER
    return flags


@dataclass
class TextArrays:
    """What the quality filters and MinHash need from a document, computed in one vectorised pass.

    ids, lens     hash and length of each word unit (see unit_arrays)
    n_words       whitespace-separated words; word_chars: their total length
    letter_words  whitespace words with at least one letter; symbol_words: with no letter or digit
    cjk_chars     CJK characters in the text
    """

    ids: np.ndarray
    lens: np.ndarray
    n_words: int
    word_chars: int
    letter_words: int
    symbol_words: int
    cjk_chars: int


def text_arrays(text: str) -> TextArrays:
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    flags = _table()[np.minimum(cp, _TABLE_SIZE - 1)]
    ids, lens = _units(text.lower(), flags)
    space = (flags & SPACE) != 0
    # whitespace words: a word starts at a non-space character preceded by a space (or the start)
    starts = ~space & np.concatenate(([True], space[:-1]))
    word_of = np.cumsum(starts) - 1  # word index of each character (meaningful where not space)
    n_words = int(starts.sum())
    in_word = ~space
    has_letter = np.zeros(n_words, dtype=bool)
    has_letter[word_of[in_word & ((flags & LETTER) != 0)]] = True
    has_word_char = np.zeros(n_words, dtype=bool)
    has_word_char[word_of[in_word & ((flags & WORD) != 0)]] = True
    return TextArrays(
        ids=ids,
        lens=lens,
        n_words=n_words,
        word_chars=int(in_word.sum()),
        letter_words=int(has_letter.sum()),
        symbol_words=int(n_words - has_word_char.sum()),
        cjk_chars=int(((flags & CJK) != 0).sum()),
    )


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads the polynomial hash's structure over all 64 bits."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def unit_arrays(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, lengths int64) of the document's word units, in order.

    A unit is a maximal run of word characters (letters, digits, combining marks) on the lower-cased
    text, except that every CJK character is a unit by itself.
    """
    low = text.lower()
    cp = np.frombuffer(low.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return _units(low, _table()[np.minimum(cp, _TABLE_SIZE - 1)])


def _units(low: str, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Units of the lower-cased text `low`; `flags` may come from the original text (lower() keeps
    every character's class and, for the scripts we segment, its position)."""
    cp = np.frombuffer(low.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if len(cp) != len(flags):  # lower() changed the length (e.g. "İ"): recompute flags on `low`
        flags = _table()[np.minimum(cp, _TABLE_SIZE - 1)]
    if len(cp) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    w, c = (flags & WORD) != 0, (flags & CJK) != 0
    prev_w = np.concatenate(([False], w[:-1]))
    prev_c = np.concatenate(([False], c[:-1]))
    next_w = np.concatenate((w[1:], [False]))
    next_c = np.concatenate((c[1:], [False]))
    starts = np.flatnonzero(w & (~prev_w | c | prev_c))
    ends = np.flatnonzero(w & (~next_w | c | next_c)) + 1
    assert len(starts) == len(ends)
    if len(starts) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    # G[i] = sum_{j<i} cp[j] * Q^j  =>  hash[s, e) = (G[e] - G[s]) * Q^-s = sum_{j=s}^{e-1} cp[j] * Q^(j-s)
    g = np.zeros(len(cp) + 1, dtype=np.uint64)
    np.cumsum(cp.astype(np.uint64) * _powers(_Q, len(cp)), out=g[1:])
    h = (g[ends] - g[starts]) * _powers(_Q_INV, int(starts[-1]) + 1)[starts]
    lens = ends - starts
    return _mix(h ^ lens.astype(np.uint64)), lens.astype(np.int64)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 (numpy integer multiplication wraps, which is what we want)."""
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    if n > 1:
        np.cumprod(np.full(n - 1, base, dtype=np.uint64), out=out[1:])
    return out
