"""Cleaning: canonical Unicode, no control characters, tidy whitespace, and idempotent."""

from __future__ import annotations

import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.data.clean import CleanConfig, clean_text


def test_clean_examples():
    cfg = CleanConfig()
    assert clean_text("cafe\u0301", cfg) == "caf\u00e9"  # NFC
    assert clean_text("a\x00b\x07c\u200bd\ufeffe\x1b", cfg) == "abcde"
    assert clean_text("line  \r\nnext\t\rthird", cfg) == "line\nnext\nthird"
    assert clean_text("\n\n  para one\n\n\n\n\npara two   \n\n", cfg) == "para one\n\npara two"
    assert clean_text("a\u00a0b\u2003c", cfg) == "a b c"
    assert clean_text("\u3000\u3000中文段落", cfg) == "\u3000\u3000中文段落"  # ideographic indent kept
    assert clean_text("    code\n\tindent", cfg) == "code\n\tindent"  # leading spaces of the doc stripped only
    assert clean_text("\x00\x01\x02  \n", cfg) == ""
    assert clean_text("x\x00", CleanConfig(enabled=False)) == "x\x00"
    assert clean_text("a\x00  ", CleanConfig(whitespace=False)) == "a  "


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_clean_is_idempotent_and_canonical(text):
    cfg = CleanConfig()
    once = clean_text(text, cfg)
    assert clean_text(once, cfg) == once
    assert unicodedata.is_normalized("NFC", once)
    assert not any(c in once for c in "\x00\r\x0b\x0c\ufeff")
