"""`tinychat rag eval`: what retrieval finds and what the chat model answers, on tinyworld's knowledge base.

Why tinyworld: its "kb" entities appear in no training data, only in WORLD/kb/docs, and every kb_qa row
names the documents that state its answer (tinychat.world.evalsets). So retrieval quality has exact
labels (recall@1, recall@5, MRR of the first chunk from a stating document), and the answer accuracy
without the knowledge base is a true floor: the model cannot know these facts.

Measured per retrieval mode (dense, bm25, hybrid) and per language, then answer exact-match of a chat
model asked the question alone versus with the top-k hybrid sources in the prompt. Grading is
tinychat.world.answers.check, the function every tinyworld suite uses; citation markers are stripped
before grading. Answers are generated in one batched greedy call per condition.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.rag.answer import cite, context_message, numbered_sources
from tinychat.rag.kb import KbSettings, KnowledgeBase
from tinychat.rag.retrieve import RetrieveConfig


@dataclass
class RagEvalConfig:
    world: str = field("", help="tinyworld directory (default: the world of the newest runs/*/)")
    kb: str = field("", help="knowledge-base directory (default: WORLD/kb/index, built from WORLD/kb/docs)")
    model: str = field("", help="chat model for the answer comparison (default: the newest runs/*/checkpoints/*/)")
    embedder: str = field("minilm", help="embedder when the knowledge base is built here")
    modes: list[str] = field(["dense", "bm25", "hybrid"], help="retrieval modes to measure")
    k: int = field(3, help="sources in the answer prompt (the tiny model's context is short)")
    depth: int = field(10, help="ranks searched for MRR")
    limit: int = field(0, help="questions (0 = all)")
    answers: bool = field(True, help="also measure answer accuracy with and without the knowledge base")
    out: str = field("", help="write the results as JSON here")
    runs_dir: str = field("runs")


def world_rows(world: Path, name: str, limit: int = 0) -> list[dict[str, Any]]:
    """The first `limit` rows (0 = all) of tinyworld's eval set WORLD/eval/NAME.jsonl."""
    path = world / "eval" / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; is {world} a tinyworld directory?")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def default_world(runs: str) -> Path:
    found = sorted(Path(runs).glob("*/world/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no tinyworld under {runs}/*/world; pass --world DIR (tinychat world generate --out DIR).")
    return found[-1].parent


def build_kb(world: Path, kb_dir: Path, embedder: str = "minilm") -> KnowledgeBase:
    """The world's knowledge base, synced from WORLD/kb/docs (a no-op when it is up to date)."""
    docs = world / "kb" / "docs"
    if not docs.is_dir():
        raise UserError(f"{world} has no kb/docs folder; is it a tinyworld directory?")
    kb = KnowledgeBase(kb_dir, KbSettings(embedder=embedder))
    kb.sync([docs])
    return kb


def retrieval_metrics(kb: KnowledgeBase, rows: list[dict[str, Any]], mode: str, depth: int) -> dict[str, Any]:
    """recall@1, recall@5 and MRR@depth of the first chunk from a document that states the answer."""
    per: dict[str, list[float]] = {"all": [], "en": [], "zh": []}
    hits1: dict[str, list[float]] = {"all": [], "en": [], "zh": []}
    hits5: dict[str, list[float]] = {"all": [], "en": [], "zh": []}
    t0 = time.perf_counter()
    cfg = RetrieveConfig(mode=mode, k=depth, candidates=max(20, depth), min_similarity=-1.0)
    for r in rows:
        names = [kb.display_name(h.record.source) for h in kb.retriever.search(r["question"], cfg)]
        rank = next((i for i, n in enumerate(names, start=1) if n in r["sources"]), 0)
        for key in ("all", r["lang"]):
            per[key].append(1.0 / rank if rank else 0.0)
            hits1[key].append(float(rank == 1))
            hits5[key].append(float(0 < rank <= 5))
    secs = time.perf_counter() - t0

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 4) if xs else None

    out: dict[str, Any] = {"mode": mode, "n": len(rows), "ms_per_query": round(1000 * secs / max(1, len(rows)), 2)}
    for key in ("all", "en", "zh"):
        sfx = "" if key == "all" else f"_{key}"
        out[f"recall@1{sfx}"] = mean(hits1[key])
        out[f"recall@5{sfx}"] = mean(hits5[key])
        out[f"mrr{sfx}"] = mean(per[key])
    return out


def answer_accuracy(kb: KnowledgeBase, rows: list[dict[str, Any]], chat: Any, k: int) -> dict[str, Any]:
    """Exact-match accuracy of a local chat model (tinychat.infer.chat_backend.LocalChat) without and with the
    top-k hybrid sources in the prompt."""
    from tinychat.world.answers import check

    tok, completer = chat.tokenizer, chat.completer
    cfg = RetrieveConfig(mode="hybrid", k=k)
    bare = [tok.render_chat(r["messages"], add_generation_prompt=True).ids for r in rows]
    t0 = time.perf_counter()
    replies_bare = completer.complete(bare, 32)
    with_rag, sources = [], []
    for r in rows:
        src = numbered_sources(kb.retriever.search(r["question"], cfg), kb.display_name)
        sources.append(src)
        msgs = [context_message(src, r["lang"]), {"role": "user", "content": r["question"]}]
        with_rag.append(tok.render_chat(msgs, add_generation_prompt=True).ids)
    truncated_before = completer.truncated
    replies_rag = completer.complete(with_rag, 32)
    secs = time.perf_counter() - t0
    ok_bare = [check(a, r) for a, r in zip(replies_bare, rows)]
    ok_rag = [check(re.sub(r"\[\d+\]", "", a), r) for a, r in zip(replies_rag, rows)]
    cited_right = 0
    cited = 0
    for a, r, src in zip(replies_rag, rows, sources):
        _, cs = cite(a, src)
        if cs:
            cited += 1
            cited_right += any(c.name in r["sources"] for c in cs)
    samples = [
        {"question": r["question"], "expected": r["answer"], "without": b, "with": g}
        for r, b, g in list(zip(rows, replies_bare, replies_rag))[:5]
    ]
    n = len(rows)
    return {
        "model": str(chat.path),
        "k": k,
        "n": n,
        "accuracy_without_kb": round(sum(ok_bare) / n, 4) if n else None,
        "accuracy_with_kb": round(sum(ok_rag) / n, 4) if n else None,
        "answers_with_citation": round(cited / n, 4) if n else None,
        "citations_correct": round(cited_right / cited, 4) if cited else None,
        "prompts_truncated": completer.truncated - truncated_before,
        "mean_prompt_tokens": round(sum(map(len, with_rag)) / n, 1) if n else None,
        "seconds": round(secs, 2),
        "samples": samples,
    }


def run(cfg: RagEvalConfig) -> int:
    world = Path(cfg.world) if cfg.world else default_world(cfg.runs_dir)
    rows = world_rows(world, "kb_qa", cfg.limit)
    t0 = time.perf_counter()
    kb = build_kb(world, Path(cfg.kb) if cfg.kb else world / "kb" / "index", cfg.embedder)
    result: dict[str, Any] = {"world": str(world), "kb_chunks": kb.store.count(), "ingest_seconds": None}
    result["ingest_seconds"] = round(time.perf_counter() - t0, 2)
    result["retrieval"] = [retrieval_metrics(kb, rows, m, cfg.depth) for m in cfg.modes]
    for m in result["retrieval"]:
        print(
            f"{m['mode']:>7}: recall@1 {m['recall@1']:.3f}  recall@5 {m['recall@5']:.3f}  MRR {m['mrr']:.3f}  "
            f"(en {m['recall@1_en']}/{m['mrr_en']}, zh {m['recall@1_zh']}/{m['mrr_zh']}; {m['ms_per_query']} ms/query)"
        )
    if cfg.answers:
        from tinychat.infer.chat_backend import LocalChat
        from tinychat.infer.locate import resolve_model

        model_dir = str(resolve_model(cfg.model, cfg.runs_dir))
        a = answer_accuracy(kb, rows, LocalChat(model_dir), cfg.k)
        result["answers"] = a
        print(
            f"answers ({a['n']} questions, {Path(model_dir).name}): without the knowledge base "
            f"{a['accuracy_without_kb']:.3f}, with it {a['accuracy_with_kb']:.3f}; "
            f"cited {a['answers_with_citation']}, citations correct {a['citations_correct']}"
        )
    kb.close()
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return 0
