"""`tinychat data prepare`: raw files in, a clean, filtered, de-duplicated, PII-scrubbed corpus out.

Pipeline per document (each step switchable in the config, each drop counted under its own name):

    read -> clean (NFC, controls, whitespace) -> empty? -> language filter -> quality filters
         -> PII scrub -> exact dedup -> near dedup (MinHash + LSH) -> shard writer

The parent process streams documents from the readers in chunks to 2 worker processes (clean, langid,
quality, PII, and the dedup hashes and MinHash signatures) and receives results back in input order;
it then makes the dedup decisions against global indexes and writes shards. So memory holds a few
chunks plus the dedup index, never the corpus, and the output is identical for any worker count.

Accounting: every unit of input is either kept or dropped for exactly one reason, so
docs_in == kept + sum(dropped) and likewise for bytes, and run() asserts it. "Bytes" are UTF-8 bytes
of the document text as read (for a skipped file or line, its raw size when known): the output text is
smaller after cleaning and scrubbing and is reported separately as out_bytes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tinychat.config import field, to_dict
from tinychat.data.clean import CleanConfig, clean_text
from tinychat.data.dedup import DedupConfig, MinHasher, NearDupIndex, exact_key, shingles
from tinychat.data.langid import LangIdConfig, detect_language
from tinychat.data.parallel import map_ordered
from tinychat.data.pii import PIIConfig, scrub_pii
from tinychat.data.quality import QUALITY_CHECKS, QualityConfig, quality_check
from tinychat.data.readers import Document, ReadError, iter_documents
from tinychat.data.shards import PREPARED_KIND, TextShardWriter, atomic_output_dir, write_json_atomic
from tinychat.data.units import text_arrays, unit_arrays
from tinychat.errors import UserError


@dataclass
class PrepareConfig:
    input: list[Path] = field(
        [], positional=True, help="files or directories to read (.txt .md .jsonl[.gz] .parquet, HF datasets)"
    )
    out: Path | None = field(None, help="output directory (written atomically)")
    text_field: str = field("text", help="JSONL / Parquet / dataset field holding the text")
    format: Literal["parquet", "jsonl"] = field("parquet", help="output shard format")
    shard_mb: float = field(128.0, help="approximate MB of text per output shard")
    provenance: bool = field(True, help="also write source file, index and language columns")
    workers: int = field(2, help="worker processes (1 = all in this process)")
    chunk_docs: int = field(64, help="documents per work unit sent to a worker (at most ~512 KB)")
    force: bool = field(False, help="replace a non-empty output directory")
    progress: bool = field(True, help="show a progress bar on a terminal")
    max_errors_listed: int = field(1000, help="read errors listed one by one in stats.json (all are counted)")
    clean: CleanConfig = dataclasses.field(default_factory=CleanConfig)
    langid: LangIdConfig = dataclasses.field(default_factory=LangIdConfig)
    quality: QualityConfig = dataclasses.field(default_factory=QualityConfig)
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)
    pii: PIIConfig = dataclasses.field(default_factory=PIIConfig)


# ---------------------------------------------------------------- worker side (top-level, spawn-safe)

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["hasher"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.seed) if cfg.dedup.near else None


def process_text(text: str, cfg: PrepareConfig, hasher: MinHasher | None) -> tuple:
    """Everything per document that needs no global state.

    Returns (drop_reason or None, bytes_in, output text (None when dropped or unchanged), lang,
    exact key, MinHash signature, PII counts, changed_by_cleaning).
    """
    n_in = len(text.encode("utf-8"))
    cleaned = clean_text(text, cfg.clean)
    changed = cleaned != text
    if not cleaned.strip():
        return ("empty", n_in, None, "", None, None, None, changed)
    lang = ""
    if cfg.langid.enabled:
        lang, score = detect_language(cleaned, cfg.langid.sample_chars)
        if cfg.langid.keep and (lang not in cfg.langid.keep or score < cfg.langid.min_score):
            return ("lang", n_in, None, lang, None, None, None, changed)
    arrays = text_arrays(cleaned)
    failed = quality_check(cleaned, cfg.quality, arrays)
    if failed:
        return (f"quality.{failed}", n_in, None, lang, None, None, None, changed)
    scrubbed, pii = scrub_pii(cleaned, cfg.pii)
    key = exact_key(scrubbed) if cfg.dedup.exact else None
    sig = None
    if hasher is not None:
        ids = unit_arrays(scrubbed)[0] if pii else arrays.ids
        sh = shingles(ids, cfg.dedup.shingle_size)
        sig = hasher.signature(sh) if len(sh) else None
    # An unchanged text is not sent back (None): the parent still holds it, and pickling it twice
    # would make the parent, which also reads, dedups and writes, the bottleneck.
    out_text = None if scrubbed == text else scrubbed
    return (None, n_in, out_text, lang, key, sig, dict(pii) if pii else None, changed)


def process_chunk(texts: list[str]) -> list[tuple]:
    cfg, hasher = _WORKER["cfg"], _WORKER["hasher"]
    return [process_text(t, cfg, hasher) for t in texts]


# ---------------------------------------------------------------- parent side


class PrepareStats:
    """Counters for stats.json; every input unit lands in `kept` or in exactly one `dropped` reason."""

    def __init__(self, reasons: list[str], max_errors: int):
        self.docs_in = self.bytes_in = self.kept_docs = self.kept_bytes = self.out_bytes = 0
        self.dropped: dict[str, list[int]] = {r: [0, 0] for r in reasons}
        self.errors: list[dict[str, Any]] = []
        self.errors_by_reason: Counter[str] = Counter()
        self.errors_by_file: Counter[str] = Counter()
        self.max_errors = max_errors
        self.pii: Counter[str] = Counter()
        self.pii_docs = self.cleaned_docs = 0
        self.langs: Counter[str] = Counter()
        self.ignored: list[str] = []  # files in input directories with an unsupported suffix

    def drop(self, reason: str, n_bytes: int) -> None:
        d = self.dropped.setdefault(reason, [0, 0])
        d[0] += 1
        d[1] += n_bytes

    def read_error(self, err: ReadError) -> None:
        self.docs_in += 1
        self.bytes_in += err.n_bytes
        self.drop("read_error", err.n_bytes)
        self.errors_by_reason[err.reason.split(" (")[0].split(" at byte")[0]] += 1
        self.errors_by_file[err.source] += 1
        if len(self.errors) < self.max_errors:
            self.errors.append({"source": err.source, "index": err.index, "reason": err.reason})

    def check(self) -> None:
        docs = self.kept_docs + sum(d for d, _ in self.dropped.values())
        nbytes = self.kept_bytes + sum(b for _, b in self.dropped.values())
        assert (docs, nbytes) == (self.docs_in, self.bytes_in), "prepare lost count of some input (a bug)"


def _drop_reasons(cfg: PrepareConfig) -> list[str]:
    reasons = ["read_error", "empty"]
    if cfg.langid.enabled and cfg.langid.keep:
        reasons.append("lang")
    if cfg.quality.enabled:
        reasons += [f"quality.{c}" for c in QUALITY_CHECKS]
    if cfg.dedup.exact:
        reasons.append("exact_dup")
    if cfg.dedup.near:
        reasons.append("near_dup")
    return reasons


def _chunks(docs: Iterator[Document], n: int, max_bytes: int = 1 << 19) -> Iterator[tuple[list, list[str]]]:
    """(metadata, texts) chunks of at most n documents or ~max_bytes characters."""
    meta: list[tuple[str, int]] = []
    texts: list[str] = []
    size = 0
    for d in docs:
        meta.append((d.source, d.index))
        texts.append(d.text)
        size += len(d.text)
        if len(texts) >= n or size >= max_bytes:
            yield meta, texts
            meta, texts, size = [], [], 0
    if texts:
        yield meta, texts


def _validate(cfg: PrepareConfig) -> None:
    if not cfg.input:
        raise UserError("give at least one input file or directory (--input PATH ...).")
    if cfg.out is None:
        raise UserError("give an output directory with --out DIR.")
    if cfg.workers < 1 or cfg.chunk_docs < 1:
        raise UserError("--workers and --chunk_docs must be at least 1.")
    if cfg.dedup.near and not 0.0 < cfg.dedup.threshold < 1.0:
        raise UserError(f"--dedup.threshold must be between 0 and 1, got {cfg.dedup.threshold}.")
    if cfg.dedup.near and (cfg.dedup.num_perm < 2 or cfg.dedup.shingle_size < 1):
        raise UserError("--dedup.num_perm must be at least 2 and --dedup.shingle_size at least 1.")
    out = Path(cfg.out).resolve()
    for p in cfg.input:
        if not Path(p).exists():
            continue  # the reader names it
        inp = Path(p).resolve()
        if inp in (out, *out.parents) or out in inp.parents:  # would read its own output / replace its input
            raise UserError(f"output directory {cfg.out} overlaps input {p}; choose an output outside the inputs.")


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the pipeline; returns the stats dict also written to OUT/stats.json."""
    _validate(cfg)
    t0 = time.perf_counter()
    stats = PrepareStats(_drop_reasons(cfg), cfg.max_errors_listed)
    docs = iter_documents(  # raises for missing paths
        cfg.input,
        cfg.text_field,
        on_error=stats.read_error,
        on_ignored=lambda p: stats.ignored.append(str(p)),
    )
    exact_seen: set[bytes] = set()
    near = NearDupIndex(cfg.dedup.threshold, cfg.dedup.num_perm) if cfg.dedup.near else None
    bar = _progress(cfg.progress)
    with atomic_output_dir(cfg.out, cfg.force) as tmp:
        writer = TextShardWriter(tmp, cfg.format, int(cfg.shard_mb * 2**20), cfg.provenance)
        chunks = ((c, c[1]) for c in _chunks(docs, cfg.chunk_docs))  # key (meta, texts), payload texts
        results = map_ordered(process_chunk, chunks, cfg.workers, _init_worker, (cfg,))
        for (meta, texts), outcomes in results:
            for (source, index), original, outcome in zip(meta, texts, outcomes):
                reason, n_in, text, lang, key, sig, pii, changed = outcome
                stats.docs_in += 1
                stats.bytes_in += n_in
                stats.cleaned_docs += changed
                if lang:
                    stats.langs[lang] += 1
                if reason is None and key is not None:
                    if key in exact_seen:
                        reason = "exact_dup"
                    exact_seen.add(key)
                if reason is None and near is not None and sig is not None and near.check_and_add(sig) is not None:
                    reason = "near_dup"
                if reason is not None:
                    stats.drop(reason, n_in)
                    continue
                if pii:
                    stats.pii.update(pii)
                    stats.pii_docs += 1
                text = original if text is None else text
                out_bytes = len(text.encode("utf-8"))
                writer.write(text, source, index, lang, out_bytes)
                stats.kept_docs += 1
                stats.kept_bytes += n_in
                stats.out_bytes += out_bytes
            if bar is not None:
                bar.update(sum(o[1] for o in outcomes))
        shards = writer.close()
        if bar is not None:
            bar.close()
        stats.check()
        elapsed = time.perf_counter() - t0
        result = _stats_dict(cfg, stats, shards, elapsed)
        write_json_atomic(tmp / "stats.json", result)
        (tmp / "summary.md").write_text(summary(result), encoding="utf-8")
    return result


def _progress(enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, desc="prepare", disable=None, leave=False)


def _stats_dict(cfg: PrepareConfig, s: PrepareStats, shards: list[dict], elapsed: float) -> dict[str, Any]:
    return {
        "kind": PREPARED_KIND,
        "format": cfg.format,
        "in": {"docs": s.docs_in, "bytes": s.bytes_in},
        "kept": {"docs": s.kept_docs, "bytes": s.kept_bytes},
        "dropped": {r: {"docs": d, "bytes": b} for r, (d, b) in s.dropped.items()},
        "out_bytes": s.out_bytes,
        "cleaned_docs": s.cleaned_docs,
        "pii": {"replaced": dict(sorted(s.pii.items())), "docs": s.pii_docs},
        "languages": dict(s.langs.most_common()),
        "read_errors": {
            "total": sum(s.errors_by_reason.values()),
            "by_reason": dict(s.errors_by_reason.most_common()),
            "by_file": dict(s.errors_by_file.most_common()),
            "listed": s.errors,
        },
        "ignored_files": {"total": len(s.ignored), "listed": s.ignored[: s.max_errors]},
        "shards": shards,
        "elapsed_s": round(elapsed, 3),
        "mb_per_s": round(s.bytes_in / 2**20 / max(elapsed, 1e-9), 3),
        "config": to_dict(cfg),
    }


def summary(st: dict[str, Any]) -> str:
    """A human-readable report of a stats dict (also saved as summary.md)."""
    din, bin_ = st["in"]["docs"], st["in"]["bytes"]

    def row(name: str, docs: int, nbytes: int) -> str:
        pct = 100.0 * docs / din if din else 0.0
        return f"| {name:<32} | {docs:>10,} | {nbytes / 2**20:>10.2f} | {pct:>7.2f}% |"

    n_dropped = din - st["kept"]["docs"]
    lines = [
        "# tinychat data prepare",
        "",
        f"{din:,} documents ({bin_ / 2**20:.2f} MB) in, {st['kept']['docs']:,} kept, {n_dropped:,} dropped; "
        f"{st['elapsed_s']:.1f} s, {st['mb_per_s']:.2f} MB/s.",
        "",
        "| step                             |  documents |         MB |   % docs |",
        "|----------------------------------|-----------:|-----------:|---------:|",
        row("in", din, bin_),
        row("kept", st["kept"]["docs"], st["kept"]["bytes"]),
    ]
    lines += [row(f"dropped: {r}", d["docs"], d["bytes"]) for r, d in st["dropped"].items()]
    lines += [
        "",
        f"Output: {len(st['shards'])} {st['format']} shard(s), {st['out_bytes'] / 2**20:.2f} MB of text.",
    ]
    if st["pii"]["replaced"]:
        items = ", ".join(f"{k} {v:,}" for k, v in st["pii"]["replaced"].items())
        lines.append(f"PII replaced: {items} (in {st['pii']['docs']:,} kept documents).")
    else:
        lines.append("PII replaced: none.")
    if st["languages"]:
        lines.append("Languages seen: " + ", ".join(f"{k} {v:,}" for k, v in list(st["languages"].items())[:12]) + ".")
    errs = st["read_errors"]
    if errs["total"]:
        lines += ["", f"Read errors: {errs['total']:,} skipped ("]
        lines[-1] += ", ".join(f"{k} {v:,}" for k, v in errs["by_reason"].items()) + "):"
        lines += [
            f"- {e['source']}{'' if e['index'] < 0 else ':' + str(e['index'])}: {e['reason']}"
            for e in errs["listed"][:20]
        ]
        if errs["total"] > 20:
            lines.append(f"- ... and {errs['total'] - 20:,} more (stats.json lists up to {len(errs['listed']):,}).")
    ign = st["ignored_files"]
    if ign["total"]:
        shown = ", ".join(ign["listed"][:5]) + (", ..." if ign["total"] > 5 else "")
        lines += ["", f"Ignored {ign['total']:,} file(s) of unsupported type in input directories: {shown}"]
    return "\n".join(lines) + "\n"


def run(cfg: PrepareConfig) -> int:
    st = prepare(cfg)
    print(summary(st), end="")
    print(f"wrote {cfg.out}")
    return 0
