"""Cut documents into overlapping chunks for retrieval, at the most natural boundaries that fit.

Design choices:
* Recursive, like LangChain's RecursiveCharacterTextSplitter: a piece too long for a chunk is cut at the
  next finer boundary: paragraphs (blank lines) -> lines -> sentences (". " "! " "? " and Chinese
  。！？； which need no space) -> words (spaces) -> single characters. The last level exists because
  Chinese has no spaces, and it is what guarantees that no chunk is ever longer than chunk_size.
* Adjacent pieces are then merged greedily into chunks of at most chunk_size, measured by any length
  function (characters, or tokens of the model's tokenizer when `unit="tokens"`). The length is always
  measured on the chunk's real text, never summed over pieces, because token counts are not additive.
* Overlap: a chunk begins with the whole trailing pieces of the previous chunk that fit in `overlap`
  (the last paragraphs if they fit, else the last lines, sentences, words, characters), so a fact cut at a
  chunk boundary is still whole in one chunk. Pieces are cut to at most chunk_size - overlap so that an
  overlap always leaves room for new text: consecutive chunks share text whenever the whitespace between
  them is shorter than `overlap`.
* Offsets are exact (`text[c.start:c.end] == c.text`, relative to the document), so citations can point
  into the source and tests can prove that no text is lost. Chunks never start or end with whitespace.
* `split_document` splits each section on its own, so a chunk never straddles two headings and carries
  its heading path for citations; for Markdown this makes it the heading-aware splitter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.rag.types import Chunk, LoadedDoc

Length = Callable[[str], int]
Span = tuple[int, int]  # [start, end) in the text being split

UNITS = ("chars", "tokens")

# Separators of each level, coarsest first. A sentence ends after . ! ? (and a closing quote or bracket)
# followed by whitespace, or right after a Chinese 。！？； (and a closing quote), with no space needed.
_SEPARATORS = [
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(
        r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+"
        r"|(?<=[。！？；])(?![”’」』）])\s*|(?<=[。！？；][”’」』）])\s*"
    ),
    re.compile(r"\s+"),
]
CHARS = len(_SEPARATORS)  # the last level: every non-space character is its own piece


@dataclass
class SplitConfig:
    """How documents are cut into chunks."""

    chunk_size: int = field(800, help="the longest chunk, in `unit`s")
    overlap: int = field(120, help="how much of the previous chunk a chunk repeats at its start, in `unit`s")
    unit: str = field("chars", help="what sizes count: chars, or tokens of the model's tokenizer")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise UserError unless 0 <= overlap < chunk_size and unit is chars or tokens."""
        _check_sizes(self.chunk_size, self.overlap)
        if self.unit not in UNITS:
            raise UserError(f"chunk unit must be one of {', '.join(UNITS)}, got {self.unit!r}")


def _check_sizes(chunk_size: int, overlap: int) -> None:
    if chunk_size <= 0:
        raise UserError(f"chunk_size must be positive, got {chunk_size}")
    if not 0 <= overlap < chunk_size:
        raise UserError(f"overlap must be at least 0 and less than chunk_size ({chunk_size}), got {overlap}")


def token_length(tokenizer: Any) -> Length:
    """A length function counting tokens (no special tokens) with tinychat's or a Hugging Face tokenizer.

    tinychat's Tokenizer.encode(text) never adds specials; transformers' tokenizers and `tokenizers`
    need add_special_tokens=False, and the latter return an Encoding whose ids are in `.ids`.
    """
    encode = tokenizer.encode
    try:
        encode("a", add_special_tokens=False)
        call: Callable[[str], Any] = lambda text: encode(text, add_special_tokens=False)
    except TypeError:  # no such keyword: tinychat's Tokenizer, tiktoken, ...
        call = encode

    def length(text: str) -> int:
        ids = call(text)
        return len(getattr(ids, "ids", ids))

    return length


def split_document(doc: LoadedDoc, cfg: SplitConfig, tokenizer: Any = None) -> list[Chunk]:
    """Chunks of each section in turn (heading = the section's heading), and of text outside sections."""
    cfg.validate()
    if cfg.unit == "tokens":
        if tokenizer is None:
            raise UserError('chunk unit "tokens" needs a tokenizer (pass one, or use unit "chars")')
        length = token_length(tokenizer)
    else:
        length = len
    chunks: list[Chunk] = []
    for start, end, heading in _regions(doc):
        chunks += split_text(doc.text[start:end], cfg.chunk_size, cfg.overlap, length, offset=start, heading=heading)
    return chunks


def _regions(doc: LoadedDoc) -> Iterator[tuple[int, int, str]]:
    """(start, end, heading) covering the text in order: sections, and the text before, between, after them."""
    pos = 0
    for section in sorted(doc.sections, key=lambda s: (s.start, s.end)):
        start, end = max(section.start, pos), min(section.end, len(doc.text))
        if start >= end:
            continue
        if pos < start:
            yield pos, start, ""
        yield start, end, section.heading
        pos = end
    if pos < len(doc.text):
        yield pos, len(doc.text), ""


def split_text(
    text: str, chunk_size: int, overlap: int, length: Length = len, offset: int = 0, heading: str = ""
) -> list[Chunk]:
    """Chunks of `text` of at most chunk_size (by `length`), consecutive ones overlapping by <= overlap.

    Offsets are `offset` + positions in `text`. The size bound holds for every length function under
    which a single character fits in a chunk.
    """
    _check_sizes(chunk_size, overlap)
    spans = _Splitter(text, chunk_size, overlap, length).spans()
    return [Chunk(text[s:e], s + offset, e + offset, heading) for s, e in spans]


class _Splitter:
    def __init__(self, text: str, chunk_size: int, overlap: int, length: Length) -> None:
        self.text = text
        self.chunk_size = chunk_size
        self.overlap = overlap
        self.length = length
        self.piece_max = chunk_size - overlap

    def measure(self, start: int, end: int) -> int:
        return self.length(self.text[start:end])

    def spans(self) -> list[Span]:
        whole = _trim(self.text, 0, len(self.text))
        if whole[0] == whole[1]:
            return []
        if self.measure(*whole) <= self.chunk_size:
            return [whole]
        pieces = self.pieces(*whole, level=0)
        chunks: list[Span] = []
        first, start = 0, pieces[0][0]
        while True:
            last = self.last_fitting(pieces, first, start)
            chunks.append((start, pieces[last][1]))
            if last + 1 == len(pieces):
                return chunks
            first = last + 1
            start = self.overlap_start(chunks[-1], pieces[first])

    def pieces(self, start: int, end: int, level: int) -> list[Span]:
        """[start, end) cut at `level`, and pieces longer than piece_max cut again at finer levels."""
        out: list[Span] = []
        for s, e in _cut(self.text, start, end, level):
            if level == CHARS or self.measure(s, e) <= self.piece_max:
                out.append((s, e))
            else:
                out += self.pieces(s, e, level + 1)
        return out

    def last_fitting(self, pieces: Sequence[Span], first: int, start: int) -> int:
        """The last piece i >= first such that text[start:pieces[i] end] fits in a chunk (galloping search)."""
        fits = lambda i: self.measure(start, pieces[i][1]) <= self.chunk_size
        good, step = first, 1
        bad = len(pieces)
        while good + step < len(pieces):
            if not fits(good + step):
                bad = good + step
                break
            good, step = good + step, step * 2
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return good

    def overlap_start(self, previous: Span, following: Span) -> int:
        """Where the chunk after `previous` starts: the earliest boundary of the coarsest level in `previous`
        whose tail fits in `overlap` and leaves room for the `following` piece; else where that piece starts."""
        prev_start, prev_end = previous
        next_end = following[1]
        if self.overlap:
            spans = [previous]
            for level in range(CHARS + 1):
                spans = [p for s in spans for p in _cut(self.text, *s, level)]
                starts = [s for s, _ in spans if s > prev_start]
                i = _first_true(
                    starts,
                    lambda s: (
                        self.measure(s, prev_end) <= self.overlap and self.measure(s, next_end) <= self.chunk_size
                    ),
                )
                if i is not None:
                    return starts[i]
        return following[0]


def _cut(text: str, start: int, end: int, level: int) -> list[Span]:
    """[start, end) cut at the separators of `level`, each piece trimmed of whitespace, empty ones dropped."""
    if level == CHARS:
        return [(i, i + 1) for i in range(start, end) if not text[i].isspace()]
    spans = []
    pos = start
    for m in _SEPARATORS[level].finditer(text, start, end):
        spans.append(_trim(text, pos, m.start()))
        pos = m.end()
    spans.append(_trim(text, pos, end))
    return [(s, e) for s, e in spans if s < e]


def _trim(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _first_true(items: Sequence[int], pred: Callable[[int], bool]) -> int | None:
    """Index of the first item for which `pred` (false, then true along `items`) holds; None if none."""
    lo, hi = 0, len(items)
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(items[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < len(items) and pred(items[lo]) else None
