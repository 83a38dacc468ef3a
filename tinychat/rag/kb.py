"""A knowledge base on disk: its settings, incremental sync of files into the vector store, and listing.

Layout of a knowledge-base directory (KB_DIR):
    kb.json        settings fixed at creation: embedder, store backend (+ DSN), chunking, the ingested roots
    lance/         the LanceDB table (the default store; with pgvector the chunks live in PostgreSQL)
    cache/         embedding cache (sqlite, keyed by content hash) and the BM25 index
    files/         documents uploaded through the server (names sanitised)

Why content hashes: re-ingesting a folder must cost nothing when nothing changed, and must never
duplicate. Each stored chunk carries its file's sha256; sync hashes every file first (cheap), parses only
new or changed ones, deletes a changed file's old chunks before adding the new ones, and, for every folder
it is given, deletes the chunks of files that are no longer there. Chunk ids are derived from the content
hash (and the path), so they stay stable while a file does not change.

Why kb.json pins the embedder: vectors from two models are not comparable; opening a knowledge base with a
different embedder is an error, not a silent mix.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tinychat.data.parallel import submit_ordered
from tinychat.errors import UserError
from tinychat.rag.loaders import LoadError, file_hash, iter_files, load_file
from tinychat.rag.splitters import SplitConfig, split_document
from tinychat.rag.types import ChunkRecord

CONFIG = "kb.json"
PARSE_WORKERS = 2  # threads that hash, read and split files ahead of the embedder
PARSE_AHEAD = 16  # files parsed ahead of the one being written (bounds memory on large folders)
EMBED_BATCH = 1024  # chunks, from one or more documents, embedded and stored together


@dataclass
class KbSettings:
    embedder: str = "minilm"  # minilm | tinychat:MODEL_DIR
    store: str = "lance"  # lance | pgvector
    dsn: str = ""  # PostgreSQL DSN for the pgvector store
    table: str = ""  # pgvector table (default: derived from the directory name)
    chunk_size: int = 800
    overlap: int = 120
    unit: str = "chars"  # chars | tokens (tokens need embedder tinychat:...)
    index_threshold: int = 20_000  # chunks before the ANN index is built
    roots: list[str] = field(default_factory=list)  # folders ingested so far: sources are shown relative to them

    def check(self) -> KbSettings:
        if self.store not in ("lance", "pgvector"):
            raise UserError(f"store must be 'lance' or 'pgvector', got {self.store!r}.")
        if self.store == "pgvector" and not self.dsn:
            raise UserError("the pgvector store needs a DSN (--dsn postgresql://user@host:port/db).")
        SplitConfig(self.chunk_size, self.overlap, self.unit)  # validates sizes
        return self


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    chunks_added: int = 0
    chunks_removed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed, {len(self.errors)} failed, {len(self.skipped)} skipped "
            f"({self.chunks_added} chunks in, {self.chunks_removed} out, {self.seconds:.1f}s)"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = [{"path": p, "error": e} for p, e in self.errors]
        return d


@dataclass
class DocInfo:
    source: str
    name: str  # the source relative to its ingest root (how it is shown and cited)
    title: str
    kind: str
    chunks: int
    content_hash: str

    @property
    def id(self) -> str:
        """A short stable id from the source path: unique where two roots hold files of the same shown name."""
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._\- \u4e00-\u9fff]")


def sanitize_name(name: str) -> str:
    """An uploaded file's name reduced to one safe path component, or a UserError (never a path).

    A name that had to change (unsafe characters, over 200 characters) gets a short hash of the original
    before its extension, so "🙂.md" and "😀.md" stay two documents and neither overwrites a real "_.md";
    the same name always maps to the same file, so uploading it again replaces it."""
    base = name.replace("\\", "/").split("/")[-1].strip()
    clean = _SAFE_NAME.sub("_", base).strip(" .")
    if not clean or clean in (".", "..") or "/" in name.replace("\\", "/") or name.startswith("."):
        raise UserError(f"invalid document name {name!r}: use a plain file name such as report.pdf.")
    if clean == base and len(clean) <= 200:
        return clean
    tag = hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem, ext = os.path.splitext(clean)
    ext = ext if len(ext) <= 16 else ""
    return f"{stem[: 190 - len(ext)]}-{tag}{ext}"


def _import_backends(settings: KbSettings) -> None:
    """Import the packages this knowledge base's store and embedder run on (raises ModuleNotFoundError).

    Done first so that a missing [rag] extra is reported before anything is written; the CLI turns the
    error into the pip command (tinychat/extras.py).
    """
    importlib.import_module("lancedb" if settings.store == "lance" else "psycopg")
    if settings.embedder == "minilm":
        importlib.import_module("sentence_transformers")


class KnowledgeBase:
    """Opens (or creates) KB_DIR; every method is safe to call from several threads of one server."""

    def __init__(self, path: str | Path, settings: KbSettings | None = None, device: str = "cpu") -> None:
        from tinychat.rag.embed import make_embedder
        from tinychat.rag.store import open_store

        self.path = Path(path)
        cfg_path = self.path / CONFIG
        stored = _read_settings(cfg_path) if cfg_path.is_file() else None
        _import_backends(stored or settings or KbSettings())  # before anything is written
        if stored is not None:
            if settings is not None:
                for name in ("embedder", "store", "dsn"):
                    given, have = getattr(settings, name), getattr(stored, name)
                    if given and given != have and given != getattr(KbSettings, name, None):
                        raise UserError(
                            f"{self.path} was created with {name}={have!r}; it cannot be opened with {given!r} "
                            "(make a new knowledge base instead)."
                        )
            self.settings = stored
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise UserError(f"{self.path} exists and is not a tinychat knowledge base (no {CONFIG}).")
            self.settings = (settings or KbSettings()).check()
            self.path.mkdir(parents=True, exist_ok=True)
            self._save_settings()
        self._lock = threading.RLock()
        s = self.settings
        self.embedder = make_embedder(s.embedder, cache_dir=self.path / "cache", device=device)
        if s.store == "lance":
            location = str(self.path / "lance")
        else:
            location = s.dsn
        self.store = open_store(s.store, location, self.embedder.dim, **self._store_kwargs())
        self._retriever = None

    def _store_kwargs(self) -> dict[str, Any]:
        s = self.settings
        if s.store == "lance":
            return {"index_threshold": s.index_threshold}
        table = s.table or "tinychat_" + re.sub(r"[^a-z0-9_]", "_", self.path.resolve().name.lower())
        return {"table": table[:60]}

    def _save_settings(self) -> None:
        tmp = self.path / (CONFIG + ".tmp")
        tmp.write_text(json.dumps(asdict(self.settings), indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path / CONFIG)

    @contextmanager
    def _writing(self):  # noqa: ANN202 - a context manager
        """One writer at a time: threads of this process (RLock) and other processes (flock on KB_DIR/.lock)."""
        with self._lock, open(self.path / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ reading
    @property
    def retriever(self):  # noqa: ANN201 - tinychat.rag.retrieve.Retriever
        from tinychat.rag.retrieve import Retriever

        if self._retriever is None:
            self._retriever = Retriever(self.store, self.embedder, self.path / "cache")
        return self._retriever

    def display_name(self, source: str) -> str:
        """A source relative to the deepest ingest root containing it (how it is cited), else its file name."""
        best = ""
        for root in self.settings.roots:
            prefix = root.rstrip("/") + "/"
            if source.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return source[len(best) :] if best else Path(source).name

    def redact(self, text: str) -> str:
        """`text` with this knowledge base's folders (its own and its ingest roots) cut from every path in it:
        what a server shows its clients, who need names, not where the files are kept."""
        folders = {*self.settings.roots, self.path.resolve().as_posix(), self.path.as_posix()}
        for folder in sorted(folders, key=len, reverse=True):
            text = text.replace(folder.rstrip("/") + "/", "")
        return text

    def documents(self) -> list[DocInfo]:
        by_source: dict[str, DocInfo] = {}
        for r in self.store.records():
            d = by_source.get(r.source)
            if d is None:
                d = by_source[r.source] = DocInfo(
                    r.source, self.display_name(r.source), r.title, r.kind, 0, r.content_hash
                )
            d.chunks += 1
        return sorted(by_source.values(), key=lambda d: d.name)

    # ------------------------------------------------------------------ writing
    def _chunks(self, path: Path) -> list[ChunkRecord]:
        doc = load_file(path)
        tokenizer = None
        if self.settings.unit == "tokens":
            tokenizer = getattr(self.embedder.inner, "tokenizer", None)
        cfg = SplitConfig(self.settings.chunk_size, self.settings.overlap, self.settings.unit)
        where = hashlib.sha256(doc.source.encode()).hexdigest()[:8]  # two copies of one file are two documents
        return [
            ChunkRecord(
                id=f"{where}-{doc.content_hash[:16]}:{i}",
                source=doc.source,
                title=doc.title,
                heading=c.heading,
                position=i,
                start=c.start,
                end=c.end,
                text=c.text,
                content_hash=doc.content_hash,
                kind=doc.kind,
                lang=doc.lang,
            )
            for i, c in enumerate(split_document(doc, cfg, tokenizer))
        ]

    def _parse(self, f: Path, known: dict[str, str]) -> tuple[str, list[ChunkRecord] | None, str | None]:
        """(source, chunks, error) for one file; chunks is None when its hash is unchanged or it failed."""
        source = f.resolve().as_posix()
        try:
            if known.get(source) == file_hash(f):
                return source, None, None
            return source, self._chunks(f), None
        except (LoadError, OSError) as e:
            return source, None, str(e)

    def _parsed(self, files: list[Path], known: dict[str, str]) -> Iterator[tuple[Path, tuple]]:
        """`_parse` of each file, in order, computed by PARSE_WORKERS threads up to PARSE_AHEAD files ahead.

        Why threads: hashing and reading release the GIL, and parsing the next files overlaps the
        embedding of the current batch (torch's matmuls release it too).
        """
        with ThreadPoolExecutor(PARSE_WORKERS, thread_name_prefix="kb-parse") as pool:
            yield from submit_ordered(pool, lambda f: self._parse(f, known), ((f, f) for f in files), PARSE_AHEAD)

    def _write(self, batch: list[tuple[str, list[ChunkRecord]]], known: dict[str, str], rep: SyncReport) -> None:
        """Embed a batch of documents' chunks in one call (few, full model batches) and store them."""
        records = [r for _, recs in batch for r in recs]
        vectors = self.embedder.embed([r.text for r in records])
        changed = [source for source, _ in batch if source in known]
        if changed:
            rep.chunks_removed += self.store.delete_sources(changed)
        rep.updated += changed
        rep.added += [source for source, _ in batch if source not in known]
        if records:
            self.store.add(records, vectors)
        rep.chunks_added += len(records)

    def sync(self, paths: list[str | Path], prune: bool = True) -> SyncReport:
        """Bring the store in line with `paths` (files and folders); see the module docstring.

        Files are parsed by a few threads ahead of the writer, and chunks are embedded EMBED_BATCH at a
        time across documents: one document's handful of chunks would leave the model's batches mostly
        padding (bench/rag.py: 1.6x the chunks/s of embedding file by file)."""
        t0 = time.perf_counter()
        rep = SyncReport()
        files, skipped = iter_files(paths)
        rep.skipped = [p.as_posix() for p in skipped]
        with self._writing():
            known = self.store.sources()
            seen: set[str] = set()
            batch: list[tuple[str, list[ChunkRecord]]] = []
            pending = 0
            for f, (source, records, error) in self._parsed(files, known):
                seen.add(source)
                if error is not None:
                    rep.errors.append((f.as_posix(), error))
                elif records is None:
                    rep.unchanged.append(source)
                else:
                    batch.append((source, records))
                    pending += len(records)
                    if pending >= EMBED_BATCH:
                        self._write(batch, known, rep)
                        batch, pending = [], 0
            if batch:
                self._write(batch, known, rep)
            if prune:
                folders = [Path(p).resolve().as_posix().rstrip("/") + "/" for p in paths if Path(p).is_dir()]
                gone = [s for s in known if s not in seen and any(s.startswith(d) for d in folders)]
                if gone:
                    rep.chunks_removed += self.store.delete_sources(gone)
                    rep.removed = sorted(gone)
            roots = {Path(p).resolve().as_posix() for p in paths if Path(p).is_dir()}
            new_roots = sorted(roots - set(self.settings.roots))
            if new_roots:
                self.settings.roots = sorted(set(self.settings.roots) | set(new_roots))
                self._save_settings()
            if rep.chunks_added or rep.chunks_removed:
                self.store.optimize()
        rep.seconds = time.perf_counter() - t0
        return rep

    def add_upload(self, name: str, data: bytes, max_bytes: int) -> SyncReport:
        """Store an uploaded document under KB_DIR/files/ (name sanitised, size-limited) and ingest it."""
        if len(data) > max_bytes:
            raise UserError(f"{name!r} is {len(data)} bytes; uploads are limited to {max_bytes} bytes.")
        safe = sanitize_name(name)
        folder = self.path / "files"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / safe
        try:
            load_file(target, data=data)  # parse first: a bad upload never replaces a good file
        except LoadError as e:
            raise UserError(str(e)) from None
        with self._writing():
            tmp = folder / f".{safe}.part"
            tmp.write_bytes(data)
            os.replace(tmp, target)
            root = folder.resolve().as_posix()
            if root not in self.settings.roots:
                self.settings.roots = sorted({*self.settings.roots, root})
                self._save_settings()
        return self.sync([target], prune=False)

    def remove(self, names: list[str]) -> list[str]:
        """Delete documents by source path, shown name or folder prefix; uploaded files are deleted too."""
        with self._writing():
            docs = self.documents()
            hit: list[str] = []
            for n in names:
                absn = Path(n).resolve().as_posix() if not n.startswith("/") else n
                found = [
                    d.source
                    for d in docs
                    if n in (d.source, d.name) or absn == d.source or d.source.startswith(absn.rstrip("/") + "/")
                ]
                if not found:
                    raise UserError(f"no document {n!r} in {self.path} (see `tinychat rag list --kb {self.path}`).")
                hit += found
            hit = sorted(set(hit))
            self._delete(hit)
        return hit

    def find_document(self, key: str) -> list[DocInfo]:
        """The documents whose id or shown name is exactly `key` (never a prefix: a server deletes one at a time)."""
        return [d for d in self.documents() if key in (d.id, d.name)]

    def remove_source(self, source: str) -> None:
        """Delete one document by its exact source path (an uploaded file is deleted from disk too)."""
        with self._writing():
            self._delete([source])

    def _delete(self, sources: list[str]) -> None:
        self.store.delete_sources(sources)
        files = (self.path / "files").resolve().as_posix() + "/"
        for s in sources:
            if s.startswith(files):
                Path(s).unlink(missing_ok=True)

    def close(self) -> None:
        self.store.close()


def _read_settings(path: Path) -> KbSettings:
    try:
        data = json.loads(path.read_text())
        return KbSettings(**data)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path} is not a valid knowledge-base settings file: {e}.") from None


def open_kb(path: str | Path, device: str = "cpu") -> KnowledgeBase:
    """An existing knowledge base (a clear error when KB_DIR is not one)."""
    if not (Path(path) / CONFIG).is_file():
        raise UserError(f"{path} is not a knowledge base; create one with `tinychat rag ingest DOCS --kb {path}`.")
    return KnowledgeBase(path, device=device)
