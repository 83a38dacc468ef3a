"""Language identification that is light, offline and honest about its reach.

How it decides, in two stages:
1. Script. Code points are bucketed into scripts with one vectorised searchsorted. Han (with no
   kana) -> "zh"; Han with kana -> "ja"; Hangul -> "ko"; Greek -> "el"; Hebrew -> "he"; Thai -> "th".
   Cyrillic, Arabic and Devanagari are returned as script codes "cyrl", "arab", "deva" because
   several languages share each and this module cannot tell them apart.
2. For Latin script, a stop-word profile: the share of words that are frequent function words of
   English, French, German, Spanish, Italian, Portuguese or Dutch. The lists are chosen to be
   distinctive; prose in any of these languages has 25-50% such words, junk and word lists have few.

What it cannot do: tell Chinese written only in Han characters from Japanese kanji-only text,
Simplified from Traditional Chinese, or any Latin-script language outside the seven above (they come
back as the closest of the seven with a low score, or "und"). Good enough to keep English and Chinese
and drop the rest, which is what the corpus filter needs.

Score: in [0, 1]; for script decisions the dominant script's share of letters, for Latin languages
that share times the stop-word evidence (saturating at 15% stop words) times the winner's share of the
stop-word votes (a word listed for several languages splits its vote between them: "on" is English
and French, "in" English, German, Dutch and Italian).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tinychat.config import field

# Half-open code point ranges [lo, hi) -> script. Everything else (digits, punctuation, symbols) is
# not a letter and does not vote.
_RANGES: list[tuple[int, int, str]] = [
    (0x41, 0x5B, "latn"),
    (0x61, 0x7B, "latn"),
    (0xC0, 0xD7, "latn"),
    (0xD8, 0xF7, "latn"),
    (0xF8, 0x250, "latn"),
    (0x370, 0x400, "grek"),
    (0x400, 0x530, "cyrl"),
    (0x590, 0x600, "hebr"),
    (0x600, 0x700, "arab"),
    (0x900, 0x980, "deva"),
    (0xE00, 0xE80, "thai"),
    (0x1100, 0x1200, "hang"),
    (0x1E00, 0x1F00, "latn"),
    (0x3040, 0x3100, "kana"),
    (0x3130, 0x3190, "hang"),
    (0x31F0, 0x3200, "kana"),
    (0x3400, 0x4DC0, "hani"),
    (0x4E00, 0xA000, "hani"),
    (0xAC00, 0xD7B0, "hang"),
    (0xF900, 0xFB00, "hani"),
    (0x20000, 0x2FA20, "hani"),
]
SCRIPTS = sorted({s for _, _, s in _RANGES})
_BOUNDS = np.array(sorted({b for lo, hi, _ in _RANGES for b in (lo, hi)}), dtype=np.uint32)
# bin i of searchsorted(side="right") covers [_BOUNDS[i-1], _BOUNDS[i]); map each bin to a script index
_BIN_SCRIPT = np.full(len(_BOUNDS) + 1, -1, dtype=np.int64)
for _lo, _hi, _s in _RANGES:
    _BIN_SCRIPT[int(np.searchsorted(_BOUNDS, _lo, side="right"))] = SCRIPTS.index(_s)
_SCRIPT_LANG = {"hani": "zh", "hang": "ko", "grek": "el", "hebr": "he", "thai": "th"}

# Characters that are written without spaces between words: each is its own "word" unit.
CJK_CLASS = "\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_LATIN_WORD = re.compile(r"[^\W\d_]+")


_STOPWORD_TEXT: dict[str, str] = {
    "en": (
        "the and of to is a an in on was that for with as it be by this are from at or have they which you "
        "were their has been would there what will when who more can not but his her she he we had its into "
        "than them only about also these after other some could should our your one all"
    ),
    "fr": (
        "le les des est et une du dans qui pour pas sur au avec ce elle sont mais nous vous leur aux "
        "cette été fait comme ne son ses par je on tout sont être ont"
    ),
    "de": (
        "der die und das ist nicht ein eine zu den von mit sich auf für dem auch es wird wie oder aber "
        "sind noch nach bei einer werden wurde kann über durch hat ich wir im des"
    ),
    "es": (
        "el los las del y es por con para como más pero sus este esta son entre cuando muy sin sobre "
        "también fue hay ya donde porque está han lo al se le"
    ),
    "it": (
        "il di che è della per non sono gli delle nel alla anche più questo dei ma ha degli tra essere "
        "molto cui stato sua suo lo si"
    ),
    "pt": (
        "o os do da dos das em não uma com mais mas ao pelo pela foi são também seu sua isso muito "
        "quando já ele ela nos às"
    ),
    "nl": (
        "het een van en niet zijn voor met op aan dat ook maar bij als wordt worden naar uit werd nog "
        "heeft hebben deze kan zo dan over wat er"
    ),
}
_STOPWORDS = {lang: frozenset(words.split()) for lang, words in _STOPWORD_TEXT.items()}
LATIN_LANGS = tuple(_STOPWORDS)
_WORD_LANGS: dict[str, tuple[str, ...]] = {}  # stop word -> the languages that list it
for _lang, _words in _STOPWORDS.items():
    for _w in _words:
        _WORD_LANGS[_w] = (*_WORD_LANGS.get(_w, ()), _lang)


@dataclass
class LangIdConfig:
    enabled: bool = field(True, help="identify each document's language and filter on it")
    keep: list[str] = field(["en", "zh"], help="languages to keep (codes as in docs/data.md); empty keeps all")
    min_score: float = field(0.5, help="drop documents whose language score is below this")
    sample_chars: int = field(4000, help="look at this many characters from the start of each document")


def script_counts(text: str) -> dict[str, int]:
    """Letters per script, computed on UTF-32 code points with numpy (no Python loop per character)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    bins = _BIN_SCRIPT[np.searchsorted(_BOUNDS, cp, side="right")]
    counts = np.bincount(bins[bins >= 0], minlength=len(SCRIPTS))
    return {s: int(c) for s, c in zip(SCRIPTS, counts) if c}


def detect_language(text: str, sample_chars: int = 4000) -> tuple[str, float]:
    """(language code, score in [0, 1]); "und" with score 0 when there is too little text to tell."""
    sample = text[:sample_chars]
    counts = script_counts(sample)
    letters = sum(counts.values())
    if letters < 5:
        return "und", 0.0
    han, kana = counts.get("hani", 0), counts.get("kana", 0)
    if han + kana > 0 and kana >= 0.1 * (han + kana) and han + kana >= max(counts.values()):
        return "ja", (han + kana) / letters
    script = max(counts, key=lambda s: counts[s])
    share = counts[script] / letters
    if script != "latn":
        return _SCRIPT_LANG.get(script, script), share
    words = _LATIN_WORD.findall(sample.lower())
    if not words:
        return "und", 0.0
    counts_w = Counter(words)  # count once, then look up each language's (short) list in it
    hits = {lang: 0 for lang in LATIN_LANGS}  # occurrences of the language's stop words
    votes = dict.fromkeys(LATIN_LANGS, 0.0)  # the same, a shared word's vote split between its languages
    for w, n in counts_w.items():
        langs = _WORD_LANGS.get(w)
        if langs:
            for lang in langs:
                hits[lang] += n
                votes[lang] += n / len(langs)
    best = max(LATIN_LANGS, key=lambda lang: votes[lang])  # ties: first in LATIN_LANGS, deterministic
    if hits[best] == 0:
        return "und", 0.0
    evidence = min(1.0, hits[best] / len(words) / 0.15)
    return best, share * evidence * votes[best] / sum(votes.values())
