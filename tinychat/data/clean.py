"""Text normalisation: Unicode NFC, control characters, boilerplate whitespace.

Why before everything else: the filters, the dedup hashes and the tokenizer should all see one
canonical spelling of a text. "é" typed as e + combining accent and "é" precomposed must hash the
same; a stray NUL or a form feed from a PDF converter must not reach the tokenizer; trailing spaces
and runs of blank lines from HTML extraction waste tokens and defeat exact dedup.

What is deliberately NOT done: NFKC (it rewrites full-width CJK punctuation and ligatures, which
changes meaning for Chinese text), lowercasing, or collapsing spaces inside a line (code and tables
rely on them). Zero-width joiners stay (emoji sequences need them).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from tinychat.config import field

# C0 controls except \t \n \r, DEL, C1 controls, and invisible format characters that carry no text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u2060\ufeff\ufff9-\ufffb\ufffe\uffff]")
# Odd spaces (no-break, en/em/thin..., narrow no-break, math space) become a plain space.
# U+3000 (ideographic space) is kept: Chinese typesetting uses it for paragraph indents.
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_LINE_SEP = re.compile("\r\n?|[\u2028\u2029\x85]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass
class CleanConfig:
    enabled: bool = field(True, help="run the normalisation step at all")
    nfc: bool = field(True, help="Unicode NFC normalisation (canonical composition)")
    control_chars: bool = field(True, help="remove control and invisible format characters (keeps tab/newline)")
    whitespace: bool = field(
        True,
        help="unify newlines and odd spaces, strip trailing spaces, collapse 3+ newlines to a blank line",
    )


def clean_text(text: str, cfg: CleanConfig) -> str:
    """The normalised text (may be empty: the caller drops empty documents and counts them)."""
    if not cfg.enabled:
        return text
    if cfg.nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if cfg.control_chars:
        # \r is a line separator, handled by the whitespace step; if that step is off keep it as is.
        text = _CONTROL.sub("", text)
    if cfg.whitespace:
        # the `in` gates are C-speed scans; most documents need none of these rewrites
        if "\r" in text or "\u2028" in text or "\u2029" in text or "\x85" in text:
            text = _LINE_SEP.sub("\n", text)
        text = _ODD_SPACE.sub(" ", text)
        if " \n" in text or "\t\n" in text:
            text = _TRAILING_WS.sub("", text)
        if "\n\n\n" in text:
            text = _BLANK_RUNS.sub("\n\n", text)
        text = text.strip(" \t\n")  # not str.strip(): it would eat a leading U+3000 indent
    return text
