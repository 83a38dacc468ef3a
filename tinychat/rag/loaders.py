"""Turn the files of a knowledge base into `LoadedDoc`s: the text a reader would read, plus its sections.

Design choices:
* Text, not markup. Retrieval and the model see what a person would read: HTML loses its tags, navigation
  and scripts; PDFs give their text layer; DOCX its paragraphs and tables. Markdown is kept as written
  because it already reads well and its markup (headings, lists, code fences) helps the model.
* Sections carry the heading path ("Guide › Install"), so the splitter never lets a chunk straddle two
  headings and a citation can say where in a document an answer came from. PDF pages are sections too.
* Offsets are into the final, normalised text (\\r\\n -> \\n, no trailing spaces), never into the raw bytes,
  so `doc.text[s.start:s.end]` is exactly the section.
* Bad files are the normal case in a real folder (a truncated download, a scanned PDF, a .txt that is
  really a zip). Each raises `LoadError` with one sentence naming the file and the problem, and
  `load_paths` collects these instead of aborting the batch. A PDF without text is an error rather than
  an empty document, because silently indexing nothing hides the problem from the user.
* Pure stdlib for HTML (html.parser) so that no heavy or network-fetching dependency is needed; pypdf and
  python-docx are pure Python too.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tinychat.data.langid import detect_language
from tinychat.errors import UserError
from tinychat.rag.types import LoadedDoc, Section

KINDS: dict[str, str] = {
    ".txt": "txt",
    ".md": "md",
    ".markdown": "md",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
    ".jsonl": "jsonl",
}
SUPPORTED: frozenset[str] = frozenset(KINDS)
HEADING_SEP = " › "
MAX_TITLE_CHARS = 120  # a longer first line of a .txt is prose, not a title

# (start offset in the text, heading level, heading text): where a headed part begins
Mark = tuple[int, int, str]


class LoadError(ValueError):
    """A file that cannot be loaded; the message is one sentence naming the file and the problem."""


@dataclass
class LoadReport:
    """What a batch load produced: documents, per-file errors (path, message), and unsupported files."""

    docs: list[LoadedDoc] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# files


def file_hash(path: Path) -> str:
    """sha256 hex digest of the file's bytes (equal to LoadedDoc.content_hash), read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def iter_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(supported files, skipped unsupported files); directories are walked recursively in sorted order.

    Hidden files and directories (".git", ".DS_Store") inside directories are ignored, not reported.
    A file given twice is listed once. A path that does not exist raises UserError.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path} does not exist")
        for f in _walk(path) if path.is_dir() else [path]:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                (files if f.suffix.lower() in SUPPORTED else skipped).append(f)
    return files, skipped


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune: never descend into .git
        found.extend(Path(dirpath, name) for name in filenames if not name.startswith("."))
    return sorted(found)


def load_paths(paths: Iterable[str | Path], max_bytes: int = 50 * 2**20) -> LoadReport:
    """Load every supported file under `paths`; a file that fails is recorded in `errors`, the rest go on."""
    files, skipped = iter_files(paths)
    report = LoadReport(skipped=[str(p) for p in skipped])
    for path in files:
        try:
            report.docs.append(load_file(path, max_bytes=max_bytes))
        except LoadError as e:
            report.errors.append((str(path), str(e)))
    return report


def load_file(path: Path, data: bytes | None = None, max_bytes: int = 50 * 2**20) -> LoadedDoc:
    """Extract one file's text, title, sections and language; `data` are its bytes when already read."""
    path = Path(path)
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise LoadError(f"{path} is not a supported file type (supported: {', '.join(sorted(SUPPORTED))})")
    if data is None:
        data = _read(path, max_bytes)
    if len(data) > max_bytes:
        raise LoadError(f"{path} is {len(data)} bytes, over the {max_bytes}-byte limit")
    text, marks, title = _EXTRACTORS[kind](path, data)
    if not text:
        raise LoadError(f"{path} has no text")
    lang = detect_language(text)[0]
    return LoadedDoc(
        source=path.resolve().as_posix(),
        title=title or path.stem,
        text=text,
        kind=kind,
        content_hash=hashlib.sha256(data).hexdigest(),
        sections=_sections(text, marks),
        lang=lang if lang in ("en", "zh") else "",
    )


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:  # checked before reading: a 10 GB file is refused without loading it
            raise LoadError(f"{path} is {size} bytes, over the {max_bytes}-byte limit")
        return path.read_bytes()
    except OSError as e:
        raise LoadError(f"{path} cannot be read ({e.strerror or e})") from e


# ----------------------------------------------------------------------------------------------------------
# text helpers shared by the formats

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _normalize(text: str) -> str:
    """\\r\\n and \\r -> \\n, no trailing spaces on lines, no blank lines at either end (indentation kept)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _LEADING_BLANK_LINES.sub("", _TRAILING_SPACE.sub("", text)).rstrip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a BOM is fine; UTF-16 with a BOM too, as Windows Notepad writes it), else LoadError."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-16")
    if b"\x00" in data:
        raise LoadError(f"{path} looks like a binary file, not text (it contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(
            f"{path} looks like a binary file, not text (byte {e.start} is not valid UTF-8; text must be UTF-8)"
        ) from e


def _sections(text: str, marks: list[Mark]) -> list[Section]:
    """One section per mark, from it to the next mark (trailing whitespace excluded), headed by its path."""
    sections = []
    path: list[tuple[int, str]] = []  # (level, heading) of the enclosing headings
    for i, (start, level, heading) in enumerate(marks):
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, heading))
        end = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        while end > start and text[end - 1].isspace():
            end -= 1
        sections.append(Section(HEADING_SEP.join(h for _, h in path), start, end))
    return sections


class _Builder:
    """Joins extracted blocks (paragraphs, table rows, pages, records) into one text, marking headed blocks."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.marks: list[Mark] = []

    def add(self, block: str, sep: str = "\n\n", level: int | None = None, heading: str = "") -> None:
        block = _normalize(block)
        if not block:
            return
        if self.size:
            self.parts.append(sep)
            self.size += len(sep)
        if level is not None:
            self.marks.append((self.size, level, heading or _one_line(block)))
        self.parts.append(block)
        self.size += len(block)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def first_heading(self, max_level: int = 99) -> str:
        return next((h for _, level, h in self.marks if level <= max_level), "")


# ----------------------------------------------------------------------------------------------------------
# the formats: each returns (text, marks, title); an empty title means "use the file name"

Extracted = tuple[str, list[Mark], str]

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*")
_SETEXT = re.compile(r" {0,3}(={3,}|-{3,})[ \t]*")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def _heading_marks(text: str, atx: bool) -> list[Mark]:
    """Markdown headings: ATX (# ..) when `atx`, and setext (a one-line paragraph underlined by === or ---).

    Lines inside fenced code blocks and YAML front matter are never headings ("# comment" in a shell
    snippet is not a title). Setext underlines need 3+ characters and a one-line paragraph above them, so a
    "---" rule under a paragraph of prose in a .txt file does not turn its last line into a heading.
    """
    lines = text.split("\n")
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line) + 1)
    first = 0
    if lines[0] == "---":  # front matter: skip to its closing line
        first = next((i + 1 for i in range(1, len(lines)) if lines[i] in ("---", "...")), 0)
    marks: list[Mark] = []
    fence = ""  # the opening fence while inside a code block
    candidate: int | None = None  # index of a one-line paragraph that a setext underline would head
    paragraph_may_start = True
    for i in range(first, len(lines)):
        line = lines[i]
        m = _FENCE.match(line)
        block_ends = True  # the line ends a block (blank, fence, heading): a paragraph may start after it
        if fence:
            if m and m[1][0] == fence[0] and len(m[1]) >= len(fence) and not line[m.end() :].strip():
                fence = ""
            candidate = None
        elif m:
            fence, candidate = m[1], None
        elif atx and (m := _ATX.fullmatch(line)):
            if m[2]:
                marks.append((starts[i], len(m[1]), m[2].strip()))
            candidate = None
        elif candidate is not None and (m := _SETEXT.fullmatch(line)):
            marks.append((starts[candidate], 1 if m[1][0] == "=" else 2, lines[candidate].strip()))
            candidate = None
        else:
            is_text = bool(line.strip()) and not line.startswith("    ")
            candidate = i if is_text and paragraph_may_start else None
            block_ends = not is_text
        paragraph_may_start = block_ends
    return marks


def _txt(path: Path, data: bytes) -> Extracted:
    text = _normalize(_decode(path, data))
    first_line = text.split("\n", 1)[0].strip()
    return text, _heading_marks(text, atx=False), first_line if len(first_line) <= MAX_TITLE_CHARS else ""


def _markdown(path: Path, data: bytes) -> Extracted:
    text = _normalize(_decode(path, data))
    marks = _heading_marks(text, atx=True)
    return text, marks, next((h for _, level, h in marks if level == 1), "")


_HTML_DROP = frozenset("script style noscript template svg nav header footer aside form".split())
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}
_HTML_LINES = frozenset("br li tr dt dd".split())  # a line break
_HTML_BLOCKS = frozenset(  # a paragraph break
    "address article blockquote body caption details dialog div dl fieldset figcaption figure hr html main "
    "ol p pre section summary table tbody tfoot thead ul".split()
)


class _HtmlText(HTMLParser):
    """Collects the readable lines of an HTML page: (text, newlines before it, heading level or 0)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive unescaped in handle_data
        self.lines: list[tuple[str, int, int]] = []
        self.title = ""
        self._buf: list[str] = []
        self._newlines = 0  # the break wanted before the next line: 1 line break, 2 paragraph break
        self._dropped = 0  # depth inside script/nav/...: their text is skipped
        self._pre = 0
        self._heading = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HTML_DROP:
            self._dropped += 1
        elif self._dropped:
            return
        elif tag == "title":
            self._in_title = True
        elif tag in ("td", "th") and "".join(self._buf).strip():
            self._buf.append(" | ")
        else:
            self._tag_break(tag)
            self._heading = _HTML_HEADINGS.get(tag, self._heading)
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in _HTML_DROP:
            self._dropped = max(0, self._dropped - 1)
        elif self._dropped:
            return
        elif tag == "title":
            self._in_title = False
        else:
            self._tag_break(tag)
            if tag in _HTML_HEADINGS:
                self._heading = 0
            self._pre = max(0, self._pre - (tag == "pre"))

    def handle_data(self, data: str) -> None:
        if self._dropped:
            return
        if self._in_title:
            self.title = _one_line(self.title + " " + data)
        elif self._pre:
            for i, part in enumerate(data.split("\n")):
                if i:
                    self._break(1)
                self._buf.append(part)
        else:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._break(0)

    def _tag_break(self, tag: str) -> None:
        if tag in _HTML_HEADINGS or tag in _HTML_BLOCKS:
            self._break(2)
        elif tag in _HTML_LINES:
            self._break(1)

    def _break(self, newlines: int) -> None:
        raw = "".join(self._buf)
        self._buf.clear()
        line = raw.rstrip() if self._pre else _one_line(raw)
        if line.strip():
            self.lines.append((line, self._newlines, self._heading))
            self._newlines = 0
        self._newlines = max(self._newlines, newlines)


def _html(path: Path, data: bytes) -> Extracted:
    parser = _HtmlText()
    parser.feed(_decode(path, data))
    parser.close()
    b = _Builder()
    for line, newlines, level in parser.lines:
        b.add(line, sep="\n" * max(newlines, 1), level=level or None)
    return b.text, b.marks, parser.title or b.first_heading(max_level=1)


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """pypdf logs a warning for every small defect it repairs; the user only needs our one-line error."""
    logger = logging.getLogger("pypdf")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _pdf(path: Path, data: bytes) -> Extracted:
    import pypdf

    if b"%PDF-" not in data[:1024]:
        raise LoadError(f"{path} is not a PDF (it has no %PDF header)")
    broken = f"{path} is not a readable PDF (it may be truncated or corrupt)"
    with _quiet_pypdf():
        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            encrypted = reader.is_encrypted
        except Exception as e:  # pypdf raises many types for damaged files
            raise LoadError(f"{broken}: {_short(e)}") from e
        if encrypted and not _opens_without_password(reader):
            raise LoadError(f"{path} is encrypted; tinychat cannot read password-protected PDFs")
        try:
            pages = [page.extract_text() or "" for page in reader.pages]
            meta_title = str(getattr(reader.metadata, "title", None) or "")
        except Exception as e:
            raise LoadError(f"{broken}: {_short(e)}") from e
    b = _Builder()
    for n, page in enumerate(pages, 1):
        b.add(page, level=1, heading=f"page {n}")
    if not b.text:
        raise LoadError(f"{path} has no text layer (a scanned PDF needs OCR, which tinychat does not do)")
    first_line = b.text.split("\n", 1)[0].strip()
    return b.text, b.marks, _one_line(meta_title) or (first_line if len(first_line) <= MAX_TITLE_CHARS else "")


def _opens_without_password(reader: object) -> bool:
    """True for PDFs that are 'encrypted' only with an owner password (readable by anyone)."""
    try:
        return bool(reader.decrypt(""))  # type: ignore[attr-defined]
    except Exception:  # e.g. AES without the cryptography package
        return False


_DOCX_HEADING = re.compile(r"heading ([1-9])", re.IGNORECASE)


def _docx(path: Path, data: bytes) -> Extracted:
    import docx
    from docx.table import Table

    if not data.startswith(b"PK\x03\x04"):
        raise LoadError(f"{path} is not a .docx file (it is not a zip archive)")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as e:  # BadZipFile, KeyError, PackageNotFoundError, XML errors...
        raise LoadError(f"{path} is not a valid .docx file: {_short(e)}") from e
    b = _Builder()
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            b.add("\n".join(_row_text(row) for row in block.rows))
        else:
            b.add(block.text, level=_docx_level(block.style.name if block.style is not None else ""))
    return b.text, b.marks, _one_line(document.core_properties.title or "") or b.first_heading()


def _docx_level(style: str) -> int | None:
    """0 for the Title style (above Heading 1), N for "Heading N", None for body text."""
    if style.lower() == "title":
        return 0
    m = _DOCX_HEADING.fullmatch(style)
    return int(m[1]) if m else None


def _row_text(row: object) -> str:
    """A table row as "cell | cell"; a merged cell appears once, not once per grid column it spans."""
    cells = []
    last = None
    for cell in row.cells:  # type: ignore[attr-defined]
        if cell._tc is not last:
            cells.append(_one_line(cell.text))
            last = cell._tc
    return " | ".join(c for c in cells if c)


def _jsonl(path: Path, data: bytes) -> Extracted:
    b = _Builder()
    for n, line in enumerate(_decode(path, data).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoadError(f"{path} line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LoadError(f'{path} line {n} is not a JSON object with a "text" string')
        heading = record.get("title") or record.get("id") or f"line {n}"
        b.add(record["text"], level=1, heading=_one_line(str(heading)))
    return b.text, b.marks, ""


def _short(e: BaseException, limit: int = 120) -> str:
    msg = _one_line(str(e)) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


_EXTRACTORS: dict[str, Callable[[Path, bytes], Extracted]] = {
    "txt": _txt,
    "md": _markdown,
    "html": _html,
    "pdf": _pdf,
    "docx": _docx,
    "jsonl": _jsonl,
}
