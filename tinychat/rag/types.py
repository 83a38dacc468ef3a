"""The records every RAG stage passes along: a loaded document, its chunks, and a stored chunk.

Why plain dataclasses shared by all stages: loaders, splitters, stores and the retriever are swappable
(LanceDB or pgvector, MiniLM or tinychat's own embeddings), and each only has to agree on these shapes.
Offsets are character offsets into `LoadedDoc.text`, so a chunk can always be traced back to where it
came from, and tests can check that chunks cover the document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Section:
    """A headed part of a document (Markdown/HTML heading, PDF page, DOCX heading): [start, end) in its text."""

    heading: str
    start: int
    end: int


@dataclass
class LoadedDoc:
    """A file's extracted text: what a reader would read, without markup."""

    source: str  # the file's resolved path (posix); the key incremental sync uses
    title: str  # <title>, the first heading, a PDF's title, or the file name
    text: str
    kind: str  # txt, md, html, pdf, docx, jsonl
    content_hash: str  # sha256 of the file's bytes: unchanged files are skipped on re-ingest
    sections: list[Section] = field(default_factory=list)
    lang: str = ""  # "en" / "zh" when it can be told, else ""


@dataclass
class Chunk:
    """A piece of a document, as a splitter returns it."""

    text: str
    start: int  # character offsets into LoadedDoc.text: text == doc.text[start:end]
    end: int
    heading: str = ""  # the innermost heading above the chunk ("" when none)


@dataclass
class ChunkRecord:
    """A chunk as stored: enough to cite it ([n] title › heading, source path, position)."""

    id: str  # f"{sha256(source)[:8]}-{content_hash[:16]}:{position}": stable while the file is unchanged
    source: str
    title: str
    heading: str
    position: int  # the chunk's index within its document
    start: int
    end: int
    text: str
    content_hash: str
    kind: str = ""
    lang: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Hit:
    """A retrieved chunk and its score (cosine similarity, BM25 score or fused score; higher is better)."""

    record: ChunkRecord
    score: float
    rank: int = 0
    scores: dict[str, float] = field(default_factory=dict)  # per-retriever scores when fused
