"""On-disk outputs: atomic output directories, text shards (Parquet / JSONL), token shards (memmaps).

Why atomic directories: a run that dies halfway (Ctrl-C, full disk, a bug) must not leave a directory
that looks finished, and must never damage the previous good output. Everything is written into a
hidden temporary sibling and renamed into place only when complete; an existing non-empty output is
replaced only with --force, and only after the new one is complete.

Token shards are flat binary arrays of uint16 (vocabularies up to 65,536) or uint32, readable with
np.memmap without any parsing, plus index.json naming the files, their token and document counts,
the dtype, vocab size and end-of-text id. The loader trusts index.json and nothing else.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinychat.errors import UserError

TOKENS_INDEX = "index.json"
TOKENS_KIND = "tinychat.tokens"
PREPARED_KIND = "tinychat.prepared"


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block finishes without an exception."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output directory {out} is not empty; pass --force to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "x")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class TextShardWriter:
    """Writes documents into numbered shards of about `shard_bytes` of text each, in arrival order.

    Parquet shards are written one row group at a time (bounded memory), zstd-compressed, with columns
    text (and source, index, lang when provenance is on). JSONL shards hold one {"text", ...} per line.
    """

    def __init__(self, out: Path, fmt: str, shard_bytes: int, provenance: bool = True, rows_per_group: int = 2048):
        assert fmt in ("parquet", "jsonl"), fmt
        if fmt == "parquet":  # the [data] extra: fail before any input is read, not at the first shard
            importlib.import_module("pyarrow.parquet")
        self.out, self.fmt, self.shard_bytes, self.provenance = out, fmt, shard_bytes, provenance
        self.rows_per_group = rows_per_group
        self.shards: list[dict[str, Any]] = []
        self._rows: list[tuple[str, str, int, str]] = []
        self._file: Any = None
        self._cur_bytes = 0

    def _open(self) -> None:
        name = f"part-{len(self.shards):05d}.{self.fmt}"
        self.shards.append({"file": name, "docs": 0, "bytes": 0})
        if self.fmt == "jsonl":
            self._file = open(self.out / name, "w", encoding="utf-8")  # noqa: SIM115 - open across write() calls
        else:
            import pyarrow.parquet as pq

            self._file = pq.ParquetWriter(self.out / name, self._schema(), compression="zstd")
        self._cur_bytes = 0

    def _schema(self):  # noqa: ANN202 - pyarrow type
        import pyarrow as pa

        cols = [pa.field("text", pa.string())]
        if self.provenance:
            cols += [
                pa.field("source", pa.string()),
                pa.field("index", pa.int64()),
                pa.field("lang", pa.string()),
            ]
        return pa.schema(cols)

    def write(self, text: str, source: str, index: int, lang: str, n_bytes: int) -> None:
        if self._file is None:
            self._open()
        shard = self.shards[-1]
        shard["docs"] += 1
        shard["bytes"] += n_bytes
        self._cur_bytes += n_bytes
        if self.fmt == "jsonl":
            row: dict[str, Any] = {"text": text}
            if self.provenance:
                row.update(source=source, index=index, lang=lang)
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            self._rows.append((text, source, index, lang))
            if len(self._rows) >= self.rows_per_group:
                self._flush()
        if self._cur_bytes >= self.shard_bytes:
            self._close_current()

    def _flush(self) -> None:
        if not self._rows or self.fmt != "parquet":
            return
        import pyarrow as pa

        cols = list(zip(*self._rows))
        arrays = {"text": list(cols[0])}
        if self.provenance:
            arrays.update(source=list(cols[1]), index=list(cols[2]), lang=list(cols[3]))
        self._file.write_table(pa.table(arrays, schema=self._schema()))
        self._rows = []

    def _close_current(self) -> None:
        if self._file is not None:
            self._flush()
            self._file.close()
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32: half the disk and memory bandwidth."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenShardWriter:
    """Appends token arrays of one split to numbered flat binary files of at most ~shard_tokens each.

    A shard is cut only between documents, so no document is split across files (unless a single
    document is longer than shard_tokens, which then gets a shard to itself).
    """

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None

    def write_doc(self, ids: np.ndarray) -> None:
        if self._f is None or (self.shards[-1]["tokens"] and self.shards[-1]["tokens"] + len(ids) > self.shard_tokens):
            self._next()
        self._f.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.shards[-1]["docs"] += 1

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0, "docs": 0})
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - open across write_doc() calls

    def close(self) -> dict[str, Any]:
        if self._f is not None:
            self._f.close()
            self._f = None
        return {
            "shards": self.shards,
            "tokens": sum(s["tokens"] for s in self.shards),
            "docs": sum(s["docs"] for s in self.shards),
        }


@dataclass
class TokenIndex:
    """The parsed index.json of a tokenized directory."""

    root: Path
    dtype: np.dtype
    vocab_size: int
    eot_id: int
    splits: dict[str, dict[str, Any]]
    chat: bool = False  # conversations rendered with the chat template are mixed into the train split (--chat)

    @classmethod
    def load(cls, root: str | os.PathLike) -> TokenIndex:
        root = Path(root)
        path = root / TOKENS_INDEX
        if not path.is_file():
            raise UserError(
                f"{root} is not a tokenized data directory (no {TOKENS_INDEX}); run tinychat data tokenize."
            )
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            assert meta.get("kind") == TOKENS_KIND
            dtype, vocab, eot = np.dtype(meta["dtype"]), int(meta["vocab_size"]), int(meta["eot_id"])
            return cls(root, dtype, vocab, eot, meta["splits"], bool(meta.get("chat")))
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"{path} is not a valid tinychat token index.") from None

    def memmaps(self, split: str) -> list[np.memmap]:
        """Read-only memmaps of the split's shards, in order (empty shards are left out)."""
        if split not in self.splits:
            raise UserError(f"{self.root} has no '{split}' split; it has {', '.join(self.splits)}.")
        maps = []
        for s in self.splits[split]["shards"]:
            path = self.root / s["file"]
            expected = s["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise UserError(f"token shard {path} is missing or has the wrong size (expected {expected} bytes).")
            if s["tokens"]:
                maps.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(s["tokens"],)))
        return maps
