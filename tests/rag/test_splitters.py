"""Splitters: exact offsets, no lost text, size and overlap bounds (hypothesis), sections and token units."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.errors import UserError
from tinychat.rag.loaders import load_file
from tinychat.rag.splitters import SplitConfig, split_document, split_text, token_length
from tinychat.rag.types import Chunk, LoadedDoc, Section

# text made of English words, Chinese runs, punctuation of both, and every kind of break
_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123", min_size=1, max_size=14)
_HAN = st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x4E80), min_size=1, max_size=30)
_MARK = st.sampled_from([".", "!", "?", ",", ";", "。", "！", "？", "；", "，", "”", ")"])
_SPACE = st.sampled_from([" ", " ", " ", "\n", "\n\n", "\n \n\n", "  ", "\t"])
ENGLISH = st.lists(st.one_of(_WORD, _MARK, _SPACE, _SPACE), max_size=120).map("".join)
CHINESE = st.lists(st.one_of(_HAN, _MARK, st.just("\n\n")), max_size=60).map("".join)
MIXED = st.lists(st.one_of(_WORD, _HAN, _MARK, _SPACE), max_size=120).map("".join)
TEXT = st.one_of(ENGLISH, CHINESE, MIXED, st.text(max_size=300))


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    chunk_size = draw(st.integers(1, 120))
    return chunk_size, draw(st.integers(0, chunk_size - 1))


def word_tokens(text: str) -> int:
    """A stand-in token count: a word, a Chinese character or a punctuation mark is one token."""
    return len(re.findall(r"[A-Za-z0-9]+|\S", text))


def longest_space_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"\s+", text)), default=0)


def check_chunks(
    text: str, chunks: list[Chunk], chunk_size: int, overlap: int, length=len, offset: int = 0, exact_overlap=True
) -> None:
    """Everything the splitter promises, for chunks of `text` (offsets shifted by `offset`)."""
    covered = [False] * len(text)
    for c in chunks:
        s, e = c.start - offset, c.end - offset
        assert text[s:e] == c.text and c.text == c.text.strip() and c.text  # exact, trimmed, non-empty
        assert length(c.text) <= chunk_size
        covered[s:e] = [True] * (e - s)
    lost = [ch for ch, cov in zip(text, covered) if not cov and not ch.isspace()]
    assert not lost, f"text lost: {lost[:10]}"
    for a, b in zip(chunks, chunks[1:]):
        assert a.start < b.start and a.end < b.end
        if b.start < a.end:  # shared text is at most `overlap` long
            assert length(text[b.start - offset : a.end - offset]) <= overlap
        same_section = a.heading == b.heading  # chunks of one section overlap, sections do not
        if exact_overlap and same_section and overlap and longest_space_run(text) < overlap:
            assert b.start < a.end, f"no overlap between {a} and {b}"


@settings(max_examples=300, deadline=None)
@given(text=TEXT, size=sizes(), offset=st.integers(0, 50))
def test_split_text_properties(text: str, size: tuple[int, int], offset: int) -> None:
    chunk_size, overlap = size
    chunks = split_text(text, chunk_size, overlap, offset=offset, heading="H")
    check_chunks(text, chunks, chunk_size, overlap, offset=offset)
    assert all(c.heading == "H" for c in chunks)
    assert chunks == split_text(text, chunk_size, overlap, offset=offset, heading="H")  # deterministic


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(ENGLISH, MIXED), size=sizes())
def test_split_text_with_a_token_length(text: str, size: tuple[int, int]) -> None:
    chunk_size, overlap = size
    chunks = split_text(text, chunk_size, overlap, length=word_tokens)
    check_chunks(text, chunks, chunk_size, overlap, length=word_tokens, exact_overlap=False)


@settings(max_examples=150, deadline=None)
@given(text=MIXED, cuts=st.lists(st.integers(0, 10_000), max_size=6), size=sizes())
def test_split_document_keeps_chunks_inside_sections(text: str, cuts: list[int], size: tuple[int, int]) -> None:
    bounds = sorted({c % (len(text) + 1) for c in cuts})
    sections = [Section(f"s{i}", s, e) for i, (s, e) in enumerate(zip(bounds, bounds[1:])) if s < e]
    doc = LoadedDoc(source="/x", title="x", text=text, kind="txt", content_hash="0", sections=sections)
    chunk_size, overlap = size
    chunks = split_document(doc, SplitConfig(chunk_size=chunk_size, overlap=overlap))
    check_chunks(text, chunks, chunk_size, overlap, exact_overlap=False)
    for c in chunks:
        inside = [s for s in sections if s.start <= c.start and c.end <= s.end]
        assert [s.heading for s in inside] == ([c.heading] if c.heading else [])


def test_prefers_paragraphs_then_sentences_and_overlaps_whole_pieces() -> None:
    text = "Alpha one. Alpha two.\n\nBeta one. Beta two.\n\nGamma one is much longer. Gamma two. Gamma three."
    assert [c.text for c in split_text(text, chunk_size=45, overlap=0)] == [
        "Alpha one. Alpha two.\n\nBeta one. Beta two.",
        "Gamma one is much longer. Gamma two.",
        "Gamma three.",
    ]
    assert [c.text for c in split_text(text, chunk_size=45, overlap=10)] == [
        "Alpha one. Alpha two.\n\nBeta one. Beta two.",
        "Beta two.\n\nGamma one is much longer.",  # the last sentence fits in the overlap, the paragraph not
        "longer. Gamma two. Gamma three.",  # no sentence fits: the last word
    ]


def test_chinese_sentences_need_no_space() -> None:
    text = "今天天气很好。我们去公园玩吧！好的；走吧？" * 3
    chunks = split_text(text, chunk_size=12, overlap=0)
    assert [c.text for c in chunks][:4] == [
        "今天天气很好。",
        "我们去公园玩吧！好的；",
        "走吧？今天天气很好。",
        "我们去公园玩吧！好的；",
    ]
    check_chunks(text, split_text(text, 12, 4), 12, 4)
    long_word = "字" * 25  # no punctuation at all: the character level still bounds the size
    assert [len(c.text) for c in split_text(long_word, 10, 3)] == [10, 10, 10, 4]


def test_small_text_is_one_chunk_and_blank_text_none() -> None:
    assert split_text("  short text \n", 100, 10, offset=7) == [Chunk("short text", 9, 19, "")]
    assert split_text(" \n\t ", 10, 2) == []


def test_split_document_markdown_headings(tmp_path: Path) -> None:
    path = tmp_path / "guide.md"
    install = " ".join(f"Step {i} of the install is simple." for i in range(12))
    path.write_text(f"Preface text.\n\n# Guide\n\nWelcome.\n\n## Install\n\n{install}\n\n## Use\n\nRun it.\n")
    doc = load_file(path)
    chunks = split_document(doc, SplitConfig(chunk_size=120, overlap=30))
    check_chunks(doc.text, chunks, 120, 30)
    assert [c.heading for c in chunks][:3] == ["", "Guide", "Guide › Install"]
    assert chunks[0].text == "Preface text." and chunks[1].text == "# Guide\n\nWelcome."
    assert chunks[-1].heading == "Guide › Use" and chunks[-1].text == "## Use\n\nRun it."
    assert sum(c.heading == "Guide › Install" for c in chunks) > 2


def test_split_config_validation() -> None:
    for kwargs in [{"chunk_size": 0}, {"overlap": -1}, {"chunk_size": 10, "overlap": 10}, {"unit": "words"}]:
        with pytest.raises(UserError):
            SplitConfig(**kwargs)
    with pytest.raises(UserError):
        split_text("x", 5, 5)
    cfg = SplitConfig()
    assert (cfg.chunk_size, cfg.overlap, cfg.unit) == (800, 120, "chars")
    doc = LoadedDoc(source="/x", title="x", text="some text", kind="txt", content_hash="0")
    with pytest.raises(UserError, match="needs a tokenizer"):
        split_document(doc, SplitConfig(unit="tokens"))
    cfg.overlap = 900  # set after construction: split_document checks again
    with pytest.raises(UserError):
        split_document(doc, cfg)


class HFStyle:
    """Like transformers' tokenizers: encode() adds specials unless told not to."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text.split()) + 2 * add_special_tokens)


def test_token_length_detects_the_tokenizer(tiny_tokenizer) -> None:
    text = "the quick brown fox jumps over a lazy dog"
    assert token_length(HFStyle())(text) == 9
    assert token_length(tiny_tokenizer)(text) == len(tiny_tokenizer.encode(text))  # tinychat: encode(text)
    backend = tiny_tokenizer.backend  # `tokenizers.Tokenizer`: an Encoding with .ids
    assert token_length(backend)(text) == len(backend.encode(text, add_special_tokens=False).ids)


def test_split_document_in_tokens(tiny_tokenizer) -> None:
    text = "\n\n".join(f"The small model learns to chat, part {i}. 今天天气很好。" * 3 for i in range(8))
    doc = LoadedDoc(source="/x", title="x", text=text, kind="txt", content_hash="0")
    length = token_length(tiny_tokenizer)
    chunks = split_document(doc, SplitConfig(chunk_size=40, overlap=8, unit="tokens"), tokenizer=tiny_tokenizer)
    check_chunks(text, chunks, 40, 8, length=length, exact_overlap=False)
    assert len(chunks) > 3 and all(length(c.text) > 10 for c in chunks)
