"""`tinychat rag ingest|ask|query|list|remove`: a knowledge base from the command line.

Every command takes --kb DIR. `ingest` creates the knowledge base on first use (its settings are then
fixed in KB_DIR/kb.json) and syncs incrementally afterwards; `ask` answers with sources through a local
model (--model DIR, default the speedrun's newest) or any OpenAI-compatible server (--base-url URL);
`query` shows the retrieved chunks and their scores without asking a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.rag.kb import KbSettings, KnowledgeBase, open_kb


@dataclass
class IngestConfig:
    paths: list[str] = field([], positional=True, help="files and folders to ingest (.txt .md .html .pdf .docx .jsonl)")
    kb: str = field("kb", help="knowledge-base directory (created on first ingest)")
    embedder: str = field("minilm", help="minilm (all-MiniLM-L6-v2, offline) or tinychat:MODEL_DIR (mean-pooled)")
    store: str = field("lance", help="lance (embedded, on disk) or pgvector (PostgreSQL, needs --dsn)")
    dsn: str = field("", help="PostgreSQL DSN for --store pgvector")
    chunk_size: int = field(800, help="chunk size, in --unit")
    overlap: int = field(120, help="overlap between consecutive chunks, in --unit")
    unit: str = field("chars", help="chars or tokens (tokens: the embedder's tokenizer)")
    prune: bool = field(True, help="delete chunks of files that disappeared from the given folders")
    device: str = field("cpu")


def ingest(cfg: IngestConfig) -> int:
    if not cfg.paths:
        raise UserError("give files or folders to ingest: tinychat rag ingest DOCS --kb DIR.")
    settings = KbSettings(
        embedder=cfg.embedder,
        store=cfg.store,
        dsn=cfg.dsn,
        chunk_size=cfg.chunk_size,
        overlap=cfg.overlap,
        unit=cfg.unit,
    )
    kb = KnowledgeBase(cfg.kb, settings, device=cfg.device)
    try:
        rep = kb.sync(cfg.paths, prune=cfg.prune)
    finally:
        kb.close()
    for path, err in rep.errors:
        print(f"  failed: {path}: {err}" if path not in err else f"  failed: {err}")
    print(f"{cfg.kb}: {rep.summary()}")
    return 1 if rep.errors and not (rep.added or rep.updated or rep.unchanged) else 0


@dataclass
class AskConfig:
    question: str = field("", positional=True, help="the question")
    kb: str = field("kb", help="knowledge-base directory")
    model: str = field("", help="model directory (default: the newest runs/*/checkpoints/*/)")
    base_url: str = field("", help="an OpenAI-compatible server instead of a local model")
    served_model: str = field("", help="model name at --base-url (default: its first)")
    api_key: str = field("")
    mode: str = field("hybrid", help="dense, bm25 or hybrid (reciprocal rank fusion)")
    k: int = field(4, help="sources put in the prompt")
    mmr: bool = field(False, help="diversify sources with maximal marginal relevance")
    min_similarity: float = field(0.3, help="cosine similarity below which a chunk counts as irrelevant")
    guard: bool = field(True, help="refuse prompt-injection patterns and requests for personal data")
    max_tokens: int = field(128)
    json: bool = field(False, help="print the answer, citations and sources as JSON")
    runs_dir: str = field("runs")


def _retrieve_cfg(cfg) -> object:  # noqa: ANN001 - AskConfig or QueryConfig
    from tinychat.rag.retrieve import RetrieveConfig

    return RetrieveConfig(mode=cfg.mode, k=cfg.k, mmr=cfg.mmr, min_similarity=cfg.min_similarity).check()


def ask(cfg: AskConfig) -> int:
    from tinychat.infer.chat_backend import make_backend
    from tinychat.rag.answer import AnswerConfig, GuardConfig, answer

    if not cfg.question.strip():
        raise UserError('give a question: tinychat rag ask "..." --kb DIR.')
    retrieve = _retrieve_cfg(cfg)
    kb = open_kb(cfg.kb)
    backend = make_backend(cfg.model, cfg.base_url, cfg.served_model, cfg.api_key, cfg.runs_dir)
    acfg = AnswerConfig(retrieve, GuardConfig(injection=cfg.guard, pii=cfg.guard), cfg.max_tokens)
    res = answer(
        cfg.question,
        kb.retriever,
        lambda m: backend.chat(m, max_tokens=cfg.max_tokens)["content"],
        kb.display_name,
        acfg,
    )
    kb.close()
    if cfg.json:
        print(json.dumps(res.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(res.text)
    if res.citations:
        print("\nsources:")
        for c in res.citations:
            where = f" › {c.heading}" if c.heading else ""
            print(f"  [{c.n}] {c.name}{where}  (chunk {c.position}, chars {c.start}-{c.end})")
    elif res.sources:
        print("\nretrieved (not cited): " + ", ".join(f"[{c.n}] {c.name}" for c in res.sources))
    return 0


@dataclass
class QueryConfig:
    question: str = field("", positional=True, help="what to search for")
    kb: str = field("kb", help="knowledge-base directory")
    mode: str = field("hybrid", help="dense, bm25 or hybrid")
    k: int = field(5)
    mmr: bool = field(False)
    min_similarity: float = field(0.0)
    json: bool = field(False)


def query(cfg: QueryConfig) -> int:
    kb = open_kb(cfg.kb)
    hits = kb.retriever.search(cfg.question, _retrieve_cfg(cfg))
    rows = [
        {"rank": h.rank, "score": round(h.score, 5), "scores": h.scores, "source": kb.display_name(h.record.source)}
        | {"heading": h.record.heading, "position": h.record.position, "text": h.record.text}
        for h in hits
    ]
    kb.close()
    if cfg.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for r in rows:
        text = " ".join(r["text"].split())
        print(f"{r['rank']}. {r['source']}  score {r['score']:.4f}  {text[:100]}")
    if not rows:
        print("no matching chunks.")
    return 0


@dataclass
class ListConfig:
    kb: str = field("kb", help="knowledge-base directory")
    json: bool = field(False)


def list_docs(cfg: ListConfig) -> int:
    kb = open_kb(cfg.kb)
    docs = kb.documents()
    s = kb.settings
    kb.close()
    if cfg.json:
        print(json.dumps([d.__dict__ for d in docs], ensure_ascii=False, indent=2))
        return 0
    for d in docs:
        print(f"{d.name}  ({d.kind}, {d.chunks} chunks)  {d.title}")
    print(f"{len(docs)} documents, {sum(d.chunks for d in docs)} chunks; embedder {s.embedder}, store {s.store}")
    return 0


@dataclass
class RemoveConfig:
    names: list[str] = field([], positional=True, help="documents to remove: a shown name, a path or a folder")
    kb: str = field("kb", help="knowledge-base directory")


def remove(cfg: RemoveConfig) -> int:
    if not cfg.names:
        raise UserError("name the documents to remove (see `tinychat rag list`).")
    kb = open_kb(cfg.kb)
    try:
        gone = kb.remove(cfg.names)
    finally:
        kb.close()
    for s in gone:
        print(f"removed {s}")
    return 0
