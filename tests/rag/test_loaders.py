"""Loaders: every format from files written here, the readable text they give, and clear errors for bad files."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import docx
import pytest
from fpdf import FPDF

from tinychat.errors import UserError
from tinychat.rag.loaders import SUPPORTED, LoadError, file_hash, iter_files, load_file, load_paths
from tinychat.rag.types import LoadedDoc


def check_doc(doc: LoadedDoc) -> None:
    """Invariants of every loaded document: normalised text, sections in order and trimmed."""
    assert doc.text and doc.text == doc.text.strip()
    assert "\r" not in doc.text and not any(line != line.rstrip() for line in doc.text.split("\n"))
    pos = 0
    for s in doc.sections:
        assert pos <= s.start < s.end <= len(doc.text), s
        assert doc.text[s.start : s.end] == doc.text[s.start : s.end].strip()
        pos = s.end


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def pdf_bytes(pages: list[str], title: str | None = None) -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, text)
    return bytes(pdf.output())


def load(path: Path) -> LoadedDoc:
    doc = load_file(path)
    check_doc(doc)
    return doc


# ----------------------------------------------------------------------------------------------------------
# text formats


def test_txt_normalises_and_hashes(tmp_path: Path) -> None:
    raw = "\ufeffRelease notes  \r\n\r\nThe build is faster.\t\r\nIt uses less memory.\r\n\r\n"
    path = write(tmp_path / "notes.txt", raw.encode("utf-8"))
    doc = load(path)
    assert doc.text == "Release notes\n\nThe build is faster.\nIt uses less memory."
    assert (doc.title, doc.kind, doc.lang, doc.sections) == ("Release notes", "txt", "en", [])
    assert doc.source == path.resolve().as_posix()
    assert doc.content_hash == file_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_txt_title_and_setext_headings(tmp_path: Path) -> None:
    long_line = "word " * 40
    assert load(write(tmp_path / "essay.txt", long_line + "\n\nmore")).title == "essay"
    text = "Manual\n======\n\nIntro text.\n\nSetup\n-----\n\nRun it.\n\nA paragraph\nof two lines\n---\n"
    doc = load(write(tmp_path / "manual.txt", text))
    assert doc.title == "Manual"
    assert [s.heading for s in doc.sections] == ["Manual", "Manual › Setup"]
    setup = doc.sections[1]
    assert doc.text[setup.start : setup.end].startswith("Setup\n-----\n\nRun it.")
    assert "# " not in doc.sections[0].heading


def test_txt_chinese_and_utf16(tmp_path: Path) -> None:
    zh = "知识库说明\n\n今天天气很好。我们去公园玩吧！好的；走吧？“引号”保持不变。\n"
    doc = load(write(tmp_path / "zh.txt", zh))
    assert doc.lang == "zh" and doc.title == "知识库说明"
    assert "今天天气很好。我们去公园玩吧！好的；走吧？“引号”保持不变。" in doc.text
    doc16 = load(write(tmp_path / "win.txt", "\ufeffHello from Notepad\r\n".encode("utf-16-le")))
    assert doc16.text == "Hello from Notepad"


MARKDOWN = """\
# Guide

Intro paragraph.

## Install

```bash
# not a heading: a shell comment
pip install tinychat
```

~~~
## also not a heading
~~~

### From source ###

Clone it.

Configure
---------

Set the options.

# Appendix
The end.
"""


def test_markdown_sections_follow_heading_paths(tmp_path: Path) -> None:
    doc = load(write(tmp_path / "guide.md", MARKDOWN))
    assert doc.kind == "md" and doc.title == "Guide"
    assert doc.text == MARKDOWN.strip()  # Markdown is kept as written
    assert [s.heading for s in doc.sections] == [
        "Guide",
        "Guide › Install",
        "Guide › Install › From source",
        "Guide › Configure",
        "Appendix",
    ]
    install = doc.text[doc.sections[1].start : doc.sections[1].end]
    assert install.startswith("## Install") and "# not a heading" in install and "## also not" in install
    assert doc.text[doc.sections[3].start :].startswith("Configure\n---")


def test_markdown_title_falls_back_to_stem(tmp_path: Path) -> None:
    text = "---\ntitle: front matter\n---\n\n## Only a subsection\n\nBody.\n"
    doc = load(write(tmp_path / "notes.markdown", text))
    assert doc.title == "notes" and [s.heading for s in doc.sections] == ["Only a subsection"]


HTML = """<!doctype html>
<html><head><title>Tinychat &amp; RAG</title>
<style>body { color: red; }</style>
<script>var secret = "SCRIPT_TEXT";</script></head>
<body>
<header><div>HEADER_TEXT</div></header>
<nav><ul><li>NAV_TEXT</li></ul></nav>
<noscript>NOSCRIPT_TEXT</noscript>
<main>
<h1>Getting   started</h1>
<p>Tinychat    is a <b>small</b>
   model &lt;3 &#20013;&#25991;.</p>
<h2>Install</h2>
<ul><li>first</li><li>second</li></ul>
<table><tr><th>flag</th><th>meaning</th></tr><tr><td>--kb</td><td>knowledge base</td></tr></table>
<pre>line one
    indented</pre>
<form><input value="x"><label>FORM_TEXT</label></form>
<svg><title>SVG_TEXT</title><text>SVG_TEXT</text></svg>
</main>
<aside>ASIDE_TEXT</aside>
<footer>FOOTER_TEXT</footer>
</body></html>
"""


def test_html_main_text_not_markup(tmp_path: Path) -> None:
    doc = load(write(tmp_path / "page.html", HTML))
    assert doc.kind == "html" and doc.title == "Tinychat & RAG"
    assert doc.text == (
        "Getting started\n\n"
        "Tinychat is a small model <3 中文.\n\n"
        "Install\n\n"
        "first\nsecond\n\n"
        "flag | meaning\n--kb | knowledge base\n\n"
        "line one\n    indented"
    )
    for junk in ("SCRIPT", "color", "HEADER", "NAV", "NOSCRIPT", "FORM", "SVG", "ASIDE", "FOOTER", "<", "&amp;"):
        assert junk not in doc.text.replace("<3", ""), junk
    assert [s.heading for s in doc.sections] == ["Getting started", "Getting started › Install"]
    assert doc.text[doc.sections[1].start :].startswith("Install\n\nfirst")


def test_html_title_from_h1_then_stem(tmp_path: Path) -> None:
    assert load(write(tmp_path / "a.htm", "<h2>Sub</h2><h1>Main</h1><p>x y z</p>")).title == "Main"
    assert load(write(tmp_path / "b.html", "<p>just text</p>")).title == "b"


# ----------------------------------------------------------------------------------------------------------
# PDF


def test_pdf_pages_are_sections(tmp_path: Path) -> None:
    pages = ["First page about retrieval.", "Second page about chunking.", "Third page about citations."]
    doc = load(write(tmp_path / "paper.pdf", pdf_bytes(pages, title="A Paper")))
    assert doc.kind == "pdf" and doc.title == "A Paper" and doc.lang == "en"
    assert [s.heading for s in doc.sections] == ["page 1", "page 2", "page 3"]
    for section, text in zip(doc.sections, pages):
        assert doc.text[section.start : section.end] == text
    untitled = load(write(tmp_path / "untitled.pdf", pdf_bytes(["Heading line\nbody text"])))
    assert untitled.title == "Heading line"


def test_pdf_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = pdf_bytes(["Some text. " * 50, "More text."])
    with caplog.at_level(logging.WARNING), pytest.raises(LoadError, match="truncated.pdf is not a readable PDF"):
        load_file(write(tmp_path / "truncated.pdf", good[: len(good) // 2]))
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]  # pypdf's warnings are silenced

    scanned = FPDF()
    scanned.add_page()
    scanned.rect(10, 10, 50, 50, style="F")
    with pytest.raises(LoadError, match="scan.pdf has no text layer .*OCR"):
        load_file(write(tmp_path / "scan.pdf", bytes(scanned.output())))

    locked = FPDF()
    locked.add_page()
    locked.set_font("helvetica", size=12)
    locked.cell(0, 10, "secret")
    locked.set_encryption(owner_password="owner", user_password="user")
    with pytest.raises(LoadError, match="locked.pdf is encrypted"):
        load_file(write(tmp_path / "locked.pdf", bytes(locked.output())))

    with pytest.raises(LoadError, match="fake.pdf is not a PDF"):
        load_file(write(tmp_path / "fake.pdf", "This is plain text with a .pdf name.\n"))


# ----------------------------------------------------------------------------------------------------------
# DOCX


def make_docx(path: Path, core_title: str = "") -> Path:
    d = docx.Document()
    d.core_properties.title = core_title
    d.add_paragraph("Quarterly Report", style="Title")
    d.add_paragraph("Opening remarks.")
    d.add_heading("Results", level=1)
    d.add_paragraph("Revenue grew.")
    d.add_heading("By region", level=2)
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("Region", "Growth"), ("North", "12%")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.add_heading("Outlook", level=1)
    d.add_paragraph("Steady.")
    d.save(str(path))
    return path


def test_docx_paragraphs_headings_tables(tmp_path: Path) -> None:
    doc = load(make_docx(tmp_path / "report.docx"))
    assert doc.kind == "docx" and doc.title == "Quarterly Report"
    assert doc.text == (
        "Quarterly Report\n\nOpening remarks.\n\nResults\n\nRevenue grew.\n\nBy region\n\n"
        "Region | Growth\nNorth | 12%\n\nOutlook\n\nSteady."
    )
    assert [s.heading for s in doc.sections] == [
        "Quarterly Report",
        "Quarterly Report › Results",
        "Quarterly Report › Results › By region",
        "Quarterly Report › Outlook",
    ]
    by_region = doc.sections[2]
    assert doc.text[by_region.start : by_region.end] == "By region\n\nRegion | Growth\nNorth | 12%"
    assert load(make_docx(tmp_path / "meta.docx", core_title="From Properties")).title == "From Properties"


def test_docx_invalid(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="notes.docx is not a .docx file"):
        load_file(write(tmp_path / "notes.docx", "plain text"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.docx", "w") as z:
        z.writestr("hello.txt", "a zip, but not a Word document")
    with pytest.raises(LoadError, match="other.docx is not a valid .docx file"):
        load_file(tmp_path / "other.docx")


# ----------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_records_are_sections(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "First record.", "title": "Intro"}),
        "",
        json.dumps({"text": "Second\r\nrecord.", "id": 42}),
        json.dumps({"text": "第三条记录。"}, ensure_ascii=False),
    ]
    doc = load(write(tmp_path / "faq.jsonl", "\n".join(lines) + "\n"))
    assert doc.text == "First record.\n\nSecond\nrecord.\n\n第三条记录。"
    assert [s.heading for s in doc.sections] == ["Intro", "42", "line 4"]
    assert doc.title == "faq"


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    good = json.dumps({"text": "ok"})
    with pytest.raises(LoadError, match="bad.jsonl line 3 is not valid JSON"):
        load_file(write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{not json\n"))
    with pytest.raises(LoadError, match='notext.jsonl line 1 is not a JSON object with a "text" string'):
        load_file(write(tmp_path / "notext.jsonl", json.dumps({"body": "x"})))


# ----------------------------------------------------------------------------------------------------------
# bad files and limits


@pytest.mark.parametrize("name", ["data.txt", "data.md", "data.html", "data.jsonl"])
def test_binary_disguised_as_text(tmp_path: Path, name: str) -> None:
    blob = bytes(random.Random(0).randrange(256) for _ in range(2000)) + b"\x00"
    with pytest.raises(LoadError, match=f"{name} looks like a binary file, not text"):
        load_file(write(tmp_path / name, blob))
    with pytest.raises(LoadError, match="not valid UTF-8"):
        load_file(write(tmp_path / name, "caf\xe9 latin-1".encode("latin-1")))


def test_limits_and_empty_files(tmp_path: Path) -> None:
    path = write(tmp_path / "big.txt", "x" * 100)
    with pytest.raises(LoadError, match="big.txt is 100 bytes, over the 99-byte limit"):
        load_file(path, max_bytes=99)
    with pytest.raises(LoadError, match="over the 10-byte limit"):
        load_file(path, data=b"y" * 11, max_bytes=10)
    assert load_file(path, data=b"given bytes").text == "given bytes"  # data wins over the file
    for name, content in [("empty.txt", ""), ("blank.md", "  \n\n\t\n"), ("bare.html", "<script>x</script>")]:
        with pytest.raises(LoadError, match=f"{name} has no text"):
            load_file(write(tmp_path / name, content))
    with pytest.raises(LoadError, match="image.png is not a supported file type"):
        load_file(write(tmp_path / "image.png", b"\x89PNG"))
    with pytest.raises(LoadError, match="missing.txt cannot be read"):
        load_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------------------
# directories and batches


def test_iter_files_walks_sorted_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "kb"
    for rel in ["b.md", "a.txt", "sub/z.html", "sub/deeper/c.jsonl", "A.PDF", ".hidden.txt", ".git/config.txt"]:
        write(root / rel, "x")
    write(root / "sub/picture.png", b"\x89PNG")
    files, skipped = iter_files([root, root / "a.txt"])  # a file named twice is listed once
    assert [p.relative_to(root).as_posix() for p in files] == [
        "A.PDF",
        "a.txt",
        "b.md",
        "sub/deeper/c.jsonl",
        "sub/z.html",
    ]
    assert [p.name for p in skipped] == ["picture.png"]
    assert {".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl"} == SUPPORTED
    with pytest.raises(UserError, match="nope does not exist"):
        iter_files([root / "nope"])


def test_load_paths_continues_past_errors(tmp_path: Path) -> None:
    root = tmp_path / "kb"
    write(root / "1-good.md", "# One\n\ntext")
    write(root / "2-broken.pdf", pdf_bytes(["text " * 100])[:300])
    write(root / "3-binary.txt", b"\x00\x01\x02")
    write(root / "4-bad.jsonl", "{oops\n")
    write(root / "5-good.txt", "two")
    write(root / "6-photo.png", b"\x89PNG")
    report = load_paths([root])
    assert [d.title for d in report.docs] == ["One", "two"]
    assert [Path(p).name for p, _ in report.errors] == ["2-broken.pdf", "3-binary.txt", "4-bad.jsonl"]
    assert all(Path(p).name in msg for p, msg in report.errors)
    assert [Path(p).name for p in report.skipped] == ["6-photo.png"]
