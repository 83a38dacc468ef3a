"""Retrieval-augmented generation: answer from private documents, with sources (docs/rag.md).

The pipeline, one module per stage, all swappable behind small interfaces:
    loaders.py    files -> LoadedDoc (.txt .md .html .pdf .docx .jsonl; errors counted, never fatal)
    splitters.py  LoadedDoc -> Chunks (recursive, heading-aware, by characters or tokens)
    embed.py      texts -> unit vectors (all-MiniLM-L6-v2 offline, or tinychat's own model), sqlite cache
    store.py      the VectorStore interface: lance_store.py (default, on disk) and pg_store.py (pgvector)
    bm25.py       keyword search for English and Chinese
    retrieve.py   dense / bm25 / hybrid (reciprocal rank fusion), MMR, filters, a similarity gate
    answer.py     input guard, numbered-source prompt, checked citations, "I don't know"
    kb.py         a knowledge-base directory: settings, incremental sync, listing, uploads
    cli.py        tinychat rag ingest|ask|query|list|remove;  evaluate.py: tinychat rag eval
"""
