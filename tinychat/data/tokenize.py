"""`tinychat data tokenize`: a corpus in, flat token shards (numpy memmaps) with an index out.

Layout of OUT:
    index.json          kind, dtype, vocab_size, eot_id, per split: shards [{file, tokens, docs}], totals
    train_00000.bin     uint16 (vocab <= 65,536) or uint32 ids, each document followed by the end token
    val_00000.bin       the held-out split, same format

Why this layout: training reads random windows, and a flat binary file opened with np.memmap gives
that at the speed of the page cache with no parsing; the end-of-text token between documents tells
the model where one text stops and the next starts.

The validation split is chosen by document position, not at random: document i goes to val when
ceil((i+1) * val_fraction) > ceil(i * val_fraction). That puts exactly ceil(n * val_fraction) documents
in val, spread evenly through the corpus, always at least one (document 0), and the same for the same
input on every run and every worker count.

The tokenizer sits to the right of data in the import order, so this module never imports it at
module level: run() loads it lazily from --tokenizer, and tokenize() accepts any object with
encode_batch(list[str]) -> list[list[int]], eot_id and vocab_size.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tinychat.config import field, to_dict
from tinychat.data.parallel import map_ordered
from tinychat.data.readers import ReadError, iter_documents, strict_jsonl_rows
from tinychat.data.shards import (
    TOKENS_INDEX,
    TOKENS_KIND,
    TokenShardWriter,
    atomic_output_dir,
    token_dtype,
    write_json_atomic,
)
from tinychat.errors import UserError


class TokenizerLike(Protocol):
    """What tokenize needs from a tokenizer (tinychat.tokenizer.Tokenizer has it)."""

    @property
    def eot_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass
class TokenizeConfig:
    input: list[Path] = field(
        [], positional=True, help="prepared corpus directory (or any files/dirs that prepare reads)"
    )
    tokenizer: Path | None = field(None, help="tokenizer directory (tokenizer.json + tokenizer_config.json)")
    out: Path | None = field(None, help="output directory for the token shards (written atomically)")
    text_field: str = field("text", help="JSONL / Parquet field holding the text")
    val_fraction: float = field(0.005, help="share of documents held out for validation (at least one)")
    shard_tokens: int = field(2**27, help="tokens per shard file (cut only between documents)")
    workers: int = field(2, help="worker processes encoding in parallel (1 = in this process)")
    batch_docs: int = field(512, help="documents per encode_batch call")
    force: bool = field(False, help="replace a non-empty output directory")
    progress: bool = field(True, help="show a progress bar on a terminal")
    chat: list[Path] = field(
        [],
        help="chat rows (JSONL {messages, tools?}) rendered with the tokenizer's chat template and added to the "
        "train split: the chat format, questions with their answers and tool calls, mixed into pretraining",
    )
    chat_weights: dict[str, float] = field(
        {},
        help="copies of a --chat row by its 'skill' field (a TOML table; '*' for the rest, default 1): 0.25 keeps "
        "a quarter of those rows, 2 adds each twice, 0 drops them",
    )


def is_val(i: int, val_fraction: float) -> bool:
    """Whether document number i (0-based, input order) belongs to the validation split."""
    return val_fraction > 0 and math.ceil((i + 1) * val_fraction) > math.ceil(i * val_fraction)


# ---------------------------------------------------------------- worker side (top-level, spawn-safe)

_WORKER: dict[str, Any] = {}


def load_tokenizer(path: str | os.PathLike) -> TokenizerLike:
    from tinychat.tokenizer import Tokenizer  # lazy: tokenizer is to the right of data

    return Tokenizer.from_pretrained(path)


def _init_worker(tokenizer: TokenizerLike | str | os.PathLike, in_pool: bool) -> None:
    if in_pool:
        # Each worker encodes single-threaded: the processes are the parallelism (no oversubscription).
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    _WORKER["tok"] = tok
    _WORKER["dtype"] = token_dtype(tok.vocab_size)


def encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids with an end token after each document, per-document lengths including that token)."""
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    eot = tok.eot_id
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(chain(x, (eot,)) for x in ids), dtype=np.int64, count=int(lengths.sum()))
    if len(flat) and (flat.min() < 0 or flat.max() >= np.iinfo(dtype).max + 1):
        raise ValueError(f"token id out of range for {dtype} (vocab_size {tok.vocab_size})")
    return flat.astype(dtype), lengths


# ---------------------------------------------------------------- parent side


def _batches(docs: Iterator, n: int, counter: list[int]) -> Iterator[tuple[int, list[str]]]:
    texts: list[str] = []
    for d in docs:
        texts.append(d.text)
        counter[0] += len(d.text.encode("utf-8"))
        if len(texts) >= n:
            yield len(texts), texts
            texts = []
    if texts:
        yield len(texts), texts


def tokenize(cfg: TokenizeConfig, tokenizer: TokenizerLike | None = None) -> dict[str, Any]:
    """Tokenize cfg.input into cfg.out; `tokenizer` overrides cfg.tokenizer. Returns the index dict."""
    if not cfg.input:
        raise UserError("give the corpus to tokenize (--input DIR).")
    if cfg.out is None:
        raise UserError("give an output directory with --out DIR.")
    if tokenizer is None and cfg.tokenizer is None:
        raise UserError("give a tokenizer directory with --tokenizer DIR.")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1), got {cfg.val_fraction}.")
    if cfg.workers < 1 or cfg.batch_docs < 1 or cfg.shard_tokens < 1:
        raise UserError("--workers, --batch_docs and --shard_tokens must be at least 1.")
    check_weights(cfg.chat_weights, "chat_weights")
    missing = [p for p in cfg.chat if not Path(p).is_file()]
    if missing:  # before the text is tokenized, not after
        raise UserError(f"--chat file {missing[0]} does not exist.")
    tok: TokenizerLike = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)  # type: ignore[arg-type]
    dtype = token_dtype(tok.vocab_size)
    errors: list[ReadError] = []
    docs = iter_documents(cfg.input, cfg.text_field, on_error=errors.append)
    t0 = time.perf_counter()
    bytes_in = [0]
    # workers load the tokenizer from its directory when we have one (cheap to send); else get the object
    source: Any = cfg.tokenizer if tokenizer is None else tokenizer
    with atomic_output_dir(cfg.out, cfg.force) as tmp:
        writers = {s: TokenShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        bar = _progress(cfg.progress)
        n_docs = 0
        chunks = _batches(docs, cfg.batch_docs, bytes_in)
        for _, (flat, lengths) in map_ordered(
            encode_chunk, chunks, cfg.workers, _init_worker, (source, cfg.workers > 1)
        ):
            ends = np.cumsum(lengths)
            for j, end in enumerate(ends):
                split = "val" if is_val(n_docs, cfg.val_fraction) else "train"
                writers[split].write_doc(flat[end - lengths[j] : end])
                n_docs += 1
            if bar is not None:
                bar.update(len(lengths))
        if bar is not None:
            bar.close()
        chat = _write_chat(cfg.chat, tok, writers["train"], cfg.chat_weights) if cfg.chat else None
        splits = {s: w.close() for s, w in writers.items()}
        if n_docs == 0:
            raise UserError(f"no documents to tokenize in {', '.join(map(str, cfg.input))}.")
        elapsed = time.perf_counter() - t0
        tokens = sum(s["tokens"] for s in splits.values())
        reasons = Counter(e.reason.split(" (")[0].split(" at byte")[0] for e in errors)
        index = {
            "kind": TOKENS_KIND,
            "dtype": dtype.name,
            "vocab_size": int(tok.vocab_size),
            "eot_id": int(tok.eot_id),
            "tokenizer": str(cfg.tokenizer) if cfg.tokenizer is not None else None,
            "splits": splits,
            "docs": n_docs,
            "tokens": tokens,
            "bytes_in": bytes_in[0],
            "bytes_per_token": round(bytes_in[0] / max(1, tokens - (chat["tokens"] if chat else 0)), 4),  # text only
            "read_errors": {
                "total": len(errors),
                "by_reason": dict(reasons.most_common()),
                "listed": [{"source": e.source, "index": e.index, "reason": e.reason} for e in errors[:1000]],
            },
            "elapsed_s": round(elapsed, 3),
            "mb_per_s": round(bytes_in[0] / 2**20 / max(elapsed, 1e-9), 3),
            "config": to_dict(cfg),
        }
        if chat is not None:
            index["chat"] = chat
        write_json_atomic(tmp / TOKENS_INDEX, index)
    return index


def read_chat_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a chat JSONL file; a row without a non-empty 'messages' list is a UserError naming its line."""
    rows = []
    for i, row in strict_jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
            raise UserError(f"{path} line {i}: a chat row needs a non-empty 'messages' list.")
        rows.append(row)
    return rows


def check_weights(weights: dict[str, Any], name: str) -> None:
    """Per-skill copy weights (chat_weights, SFT's skill_weights) must be numbers >= 0: else a UserError."""
    bad = {k: w for k, w in weights.items() if not isinstance(w, int | float) or isinstance(w, bool) or w < 0}
    if bad:
        raise UserError(f"{name} must be numbers >= 0, got {bad}.")


def copies(weight: float, rng: random.Random) -> int:
    """How many times a row of this weight is added: the integer part, plus one with the fractional part's odds."""
    whole = int(weight)
    return whole + (rng.random() < weight - whole)


def skill_copies(weights: dict[str, float], skill: str, rng: random.Random) -> int:
    """`copies` of a row of `skill` under per-skill weights: its own weight, else "*"'s, else 1."""
    return copies(float(weights.get(skill, weights.get("*", 1.0))), rng)


def _write_chat(files: list[Path], tok: Any, writer: TokenShardWriter, weights: dict[str, float]) -> dict[str, Any]:
    """Render every chat row to ids (specials from the template only) and append it to the train split.

    Why in the pretraining stream: a model that meets questions with their answers, documents followed by
    questions about them, and tool calls with their results while it stores the facts learns to extract
    knowledge for entities it never saw a question about (Allen-Zhu & Li, Physics of LMs 3.1); met only
    in a short SFT afterwards, the chat format has to be learned from scratch and overwrites the facts.
    """
    dtype = token_dtype(tok.vocab_size)
    rng = random.Random(0)  # the same rows for the same input, on every run
    rows: Counter[str] = Counter()
    tokens: Counter[str] = Counter()
    for path in files:
        for line, row in enumerate(read_chat_rows(path), 1):
            skill = str(row.get("skill", ""))
            n = skill_copies(weights, skill, rng)
            if n == 0:
                continue
            try:
                ids = tok.render_chat(row["messages"], row.get("tools")).ids
            except UserError as e:
                raise UserError(f"{path} row {line}: {e}") from None
            doc = np.asarray([*ids, tok.eot_id], dtype=dtype)
            for _ in range(n):
                writer.write_doc(doc)
            rows[skill] += n
            tokens[skill] += n * len(doc)
    return {
        "files": [str(p) for p in files],
        "weights": dict(weights),
        "rows": sum(rows.values()),
        "tokens": sum(tokens.values()),
        "by_skill": {k: {"rows": rows[k], "tokens": tokens[k]} for k in sorted(rows)},
    }


def _progress(enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="tokenize", disable=None, leave=False)


def run(cfg: TokenizeConfig) -> int:
    idx = tokenize(cfg)
    tr, va = idx["splits"]["train"], idx["splits"]["val"]
    print(
        f"tokenized {idx['docs']:,} documents ({idx['bytes_in'] / 2**20:.2f} MB) into {idx['tokens']:,} "
        f"{idx['dtype']} tokens ({idx['bytes_per_token']:.2f} bytes/token) in {idx['elapsed_s']:.1f} s, "
        f"{idx['mb_per_s']:.2f} MB/s"
    )
    print(f"train: {tr['tokens']:,} tokens in {tr['docs']:,} docs; val: {va['tokens']:,} tokens in {va['docs']:,} docs")
    if "chat" in idx:
        c = idx["chat"]
        print(f"chat: {c['rows']:,} conversations, {c['tokens']:,} tokens added to the train split")
    if idx["read_errors"]["total"]:
        print(f"skipped {idx['read_errors']['total']:,} unreadable inputs (listed in index.json).")
    print(f"wrote {cfg.out}")
    return 0
