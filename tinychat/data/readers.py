"""Streaming readers for the corpus formats tinychat accepts, one document at a time.

Why streaming: a corpus may be far larger than memory, so every reader yields documents as it goes
(text files line-free but whole, JSONL line by line, Parquet one row group at a time, Hugging Face
datasets row by row) and never materialises a file's contents beyond one unit.

Why a callback for bad input: a real corpus always has a few broken files or lines. Stopping the
whole run for one of them is useless, skipping silently loses data without anyone knowing. So each
problem is handed to `on_error(ReadError)` with the file and a reason, the offending unit is skipped,
and the caller (prepare) counts it in its stats. A path that does not exist at all is a user mistake
and raises UserError at once.

Formats (by suffix; directories are walked recursively in sorted order):
  .txt .md           the whole file is one document (must be valid UTF-8)
  .jsonl .jsonl.gz   one JSON object per line; the text is row[text_field]
  .json              (inside a directory) ignored unless it is a Hugging Face dataset directory
  .parquet           the column text_field, read one row group at a time
  HF dataset dir     a directory holding dataset_info.json / state.json (datasets.save_to_disk),
                     or a DatasetDict directory holding dataset_dict.json; read with datasets.load_from_disk
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tinychat.errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True, slots=True)
class Document:
    """One document: its text, the file it came from, and its index within that file (row / line / 0)."""

    text: str
    source: str
    index: int


@dataclass(frozen=True, slots=True)
class ReadError:
    """One skipped unit of input: which file (and line/row, or -1 for the whole file) and why."""

    source: str
    index: int
    reason: str
    n_bytes: int = 0  # bytes of input the skipped unit occupied, when known (for byte accounting)

    def __str__(self) -> str:
        where = self.source if self.index < 0 else f"{self.source}:{self.index}"
        return f"{where}: {self.reason}"


ErrorCallback = Callable[[ReadError], None]

# JSON may carry escaped lone surrogates ("\ud800") that no UTF-8 writer accepts downstream.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _raise(err: ReadError) -> None:
    raise UserError(f"cannot read {err}.")


def is_hf_dataset_dir(p: Path) -> bool:
    """A directory written by datasets' save_to_disk (Dataset or DatasetDict)."""
    return p.is_dir() and (
        (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())
    )


def _has_suffix(p: Path, suffixes: Iterable[str]) -> bool:
    name = p.name.lower()
    return any(name.endswith(s) for s in suffixes)


def expand_paths(paths: Iterable[str | os.PathLike], on_ignored: Callable[[Path], None] | None = None) -> list[Path]:
    """Files and HF dataset dirs to read, in a deterministic order. Missing paths raise UserError.

    A named file is read whatever its suffix (an unknown suffix is a UserError: the user asked for it);
    inside directories only known suffixes are picked up; other files (README, .DS_Store, images) are
    passed to on_ignored so the caller can report them.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input path {p} does not exist.")
        if p.is_dir():
            if is_hf_dataset_dir(p):
                out.append(p)
                continue
            prepared = _prepared_shards(p)
            if prepared is not None:
                out.extend(prepared)
                continue
            for root, dirs, files in os.walk(p):
                rootp = Path(root)
                keep = []
                for d in sorted(dirs):
                    if is_hf_dataset_dir(rootp / d):
                        out.append(rootp / d)  # read as a dataset, do not descend into its arrow files
                    elif not d.startswith("."):
                        keep.append(d)
                dirs[:] = keep
                for f in sorted(files):
                    if _has_suffix(Path(f), ALL_SUFFIXES):
                        out.append(rootp / f)
                    elif on_ignored is not None:
                        on_ignored(rootp / f)
        else:
            if not _has_suffix(p, ALL_SUFFIXES):
                raise UserError(
                    f"input file {p} has an unknown format; expected one of {', '.join(ALL_SUFFIXES)} "
                    "or a Hugging Face dataset directory."
                )
            out.append(p)
    # Directory walks give sorted order within each tree; keep the user's order across arguments.
    return out


def _prepared_shards(p: Path) -> list[Path] | None:
    """The shard files of a `tinychat data prepare` output directory, or None for any other directory.

    Reading only the listed shards keeps summary.md and stats.json out of the corpus.
    """
    stats = p / "stats.json"
    if not stats.is_file():
        return None
    try:
        meta = json.loads(stats.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("kind") != "tinychat.prepared":
        return None
    return [p / s["file"] for s in meta.get("shards", [])]


def read_text_file(path: Path, on_error: ErrorCallback) -> Iterator[Document]:
    """A .txt/.md file is one document. Invalid UTF-8 skips the file (we do not guess encodings)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        on_error(ReadError(str(path), -1, f"unreadable file ({e.strerror or e})"))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        on_error(ReadError(str(path), -1, f"invalid UTF-8 at byte {e.start}", len(data)))
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    yield Document(text, str(path), 0)


def _row_text(row: object, text_field: str) -> tuple[str | None, str]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    if text_field not in row:
        return None, f"missing field '{text_field}'"
    value = row[text_field]
    if not isinstance(value, str):
        return None, _not_a_string(text_field, value)
    return value, ""


def read_jsonl(path: Path, text_field: str, on_error: ErrorCallback) -> Iterator[Document]:
    """One JSON object per line; blank lines are ignored; each bad line is reported and skipped."""
    src = str(path)
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = -1
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    on_error(ReadError(src, lineno, f"invalid UTF-8 at byte {e.start} of the line", len(raw)))
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    on_error(ReadError(src, lineno, f"bad JSON ({e.msg})", len(raw)))
                    continue
                text, why = _row_text(row, text_field)
                if text is not None and _SURROGATE.search(text):
                    text, why = None, "lone surrogate escape in the text (invalid Unicode)"
                if text is None:
                    on_error(ReadError(src, lineno, why, len(raw)))
                    continue
                yield Document(text, src, lineno)
    except (OSError, EOFError, zlib.error) as e:
        # gzip truncation / corruption surfaces mid-iteration; what was yielded before stays valid.
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        on_error(ReadError(src, -1 if lineno < 0 else lineno + 1, f"unreadable file ({reason})"))


def read_parquet(path: Path, text_field: str, on_error: ErrorCallback) -> Iterator[Document]:
    """Read the text column one row group at a time, so memory stays bounded by the largest group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        size = path.stat().st_size if path.exists() else 0
        on_error(ReadError(src, -1, f"corrupt or unreadable Parquet file ({_short(e)})", size))
        return
    if text_field not in pf.schema_arrow.names:
        on_error(
            ReadError(
                src,
                -1,
                f"missing column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})",
                path.stat().st_size,
            )
        )
        return
    row = 0
    for g in range(pf.num_row_groups):
        n_rows = pf.metadata.row_group(g).num_rows
        try:
            col = pf.read_row_group(g, columns=[text_field]).column(0)
        except (OSError, pa.ArrowException) as e:
            on_error(ReadError(src, row, f"corrupt row group {g} ({n_rows} rows skipped: {_short(e)})"))
            row += n_rows
            continue
        for value in col.to_pylist():
            if isinstance(value, str):
                yield Document(value, src, row)
            else:
                on_error(ReadError(src, row, _not_a_string(text_field, value)))
            row += 1


def read_hf_dataset(path: Path, text_field: str, on_error: ErrorCallback) -> Iterator[Document]:
    """A dataset saved with datasets' save_to_disk; a DatasetDict yields its splits in sorted order."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise UserError(
            f"{path} is a Hugging Face dataset directory; reading it needs the 'datasets' package "
            "(pip install datasets)."
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types for a broken directory
        on_error(ReadError(str(path), -1, f"cannot load Hugging Face dataset ({_short(e)})"))
        return
    if isinstance(ds, datasets.DatasetDict):
        splits = [(name, ds[name]) for name in sorted(ds.keys())]
    else:
        splits = [("", ds)]
    for name, split in splits:
        src = f"{path}[{name}]" if name else str(path)
        if text_field not in split.column_names:
            cols = ", ".join(split.column_names)
            on_error(ReadError(src, -1, f"missing column '{text_field}' (columns: {cols})"))
            continue
        col = split.select_columns([text_field])
        row = 0
        for batch in col.iter(batch_size=1000):
            for value in batch[text_field]:
                if isinstance(value, str):
                    yield Document(value, src, row)
                else:
                    on_error(ReadError(src, row, _not_a_string(text_field, value)))
                row += 1


def read_path(path: Path, text_field: str = "text", on_error: ErrorCallback = _raise) -> Iterator[Document]:
    """Documents of one file or HF dataset directory (as returned by expand_paths)."""
    if path.is_dir():
        yield from read_hf_dataset(path, text_field, on_error)
    elif _has_suffix(path, JSONL_SUFFIXES):
        yield from read_jsonl(path, text_field, on_error)
    elif _has_suffix(path, PARQUET_SUFFIXES):
        yield from read_parquet(path, text_field, on_error)
    else:
        yield from read_text_file(path, on_error)


def iter_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    text_field: str = "text",
    on_error: ErrorCallback | None = None,
    on_ignored: Callable[[Path], None] | None = None,
) -> Iterator[Document]:
    """Stream every document under `paths` (files, directories, HF dataset dirs), deterministic order.

    on_error receives a ReadError for each skipped file/line/row; the default raises UserError on the
    first one (strict), so pass a callback to collect and go on. Missing paths raise UserError before
    anything is read. Files inside directories with an unsupported suffix go to on_ignored, if given.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files = expand_paths(paths, on_ignored)  # eagerly, so a missing path fails at the call, not at the first next()
    return _iter_files(files, text_field, on_error or _raise)


def _iter_files(files: list[Path], text_field: str, on_error: ErrorCallback) -> Iterator[Document]:
    for p in files:
        yield from read_path(p, text_field, on_error)


def iter_texts(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    text_field: str = "text",
    on_error: ErrorCallback | None = None,
) -> Iterator[str]:
    """Just the texts (e.g. for train_tokenizer). Skips bad input silently unless on_error is given."""
    cb = on_error or (lambda err: None)
    for doc in iter_documents(paths, text_field, cb):
        yield doc.text


def _short(e: BaseException, limit: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _not_a_string(text_field: str, value: object) -> str:
    return f"field '{text_field}' is {type(value).__name__}, expected a string"


def strict_jsonl_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSONL file; the first bad line is a UserError.

    For data whose every row matters (chat, preference and RL rows): a corpus reader skips and counts a bad
    line instead (read_jsonl), but a training set that silently lost a row would mean something else.
    """
    out = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i} is not valid JSON ({e.msg}).") from None
    return out
