"""`tinychat serve --kb DIR`: knowledge-base endpoints, and chat completions that answer from it.

Endpoints (all under /v1, behind the API key like the rest):
    POST   /v1/rag/documents         multipart upload (field "file"): stored under KB_DIR/files/, ingested
    GET    /v1/rag/documents         the documents and their chunk counts
    DELETE /v1/rag/documents/{id}    remove one, named by its id or its exact name (uploaded files are deleted
                                     from disk too); never a prefix or a folder, that is `tinychat rag remove`
    POST   /v1/rag/query             {"query", "k", "mode", "min_similarity", "mmr"} -> chunks with scores

Chat completions take a tinychat extension, `"rag": {"k": 4, "mode": "hybrid", ...}` (OpenAI clients send it
through `extra_body`). The last user message is guarded and used as the search query; the numbered sources
go in front of the conversation as one system message (tinychat.rag.answer.context_message), and the
response carries them: a top-level "sources" list, and for non-streamed replies "citations" (the source
numbers the answer cites, checked by tinychat.rag.answer.cite). A refused question or one with nothing
relevant retrieved is answered directly, without the model, so the assistant never guesses.

Why uploads are parsed before they are stored: a file that fails to load (a broken PDF, a binary with a
.txt name) is a 400 and never replaces a good document of the same name. Names are reduced to one safe
path component (tinychat.rag.kb.sanitize_name), so "../../etc/passwd" cannot leave KB_DIR/files/.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import python_multipart  # noqa: F401 - uploads parse multipart forms; imported so a missing [rag] extra says so
from fastapi import FastAPI, File, UploadFile
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from tinychat.errors import UserError
from tinychat.rag.answer import NO_CONTEXT, REFUSED, Citation, cite, context_message, guard, language, numbered_sources
from tinychat.rag.kb import DocInfo, KnowledgeBase, sanitize_name
from tinychat.rag.retrieve import RetrieveConfig
from tinychat.serve import openapi
from tinychat.serve.prepare import APIError
from tinychat.serve.protocol import ChatCompletionRequest, ChatMessage, Int, Strict
from tinychat.serve.responses import Formatter, sse

MAX_QUERY_CHARS = 4000


class QueryRequest(Strict):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: Int = Field(default=5, ge=1, le=50)
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    min_similarity: float = Field(default=0.0, ge=-1.0, le=1.0)
    mmr: bool = False


class RagContext:
    """What a knowledge-base chat request carries from retrieval to the response."""

    def __init__(self, sources: list[Citation], fixed: str | None = None, status: str = "answered") -> None:
        self.sources, self.fixed, self.status = sources, fixed, status

    def public_sources(self) -> list[dict[str, Any]]:
        keys = ("n", "name", "title", "heading", "position", "start", "end", "score", "text")
        return [{k: getattr(c, k) for k in keys} for c in self.sources]


def _last_user_text(body: ChatCompletionRequest) -> str:
    for i in range(len(body.messages) - 1, -1, -1):
        m = body.messages[i]
        if m.role == "user":
            try:
                return m.text(f"messages[{i}]") or ""
            except ValueError as e:
                raise APIError(400, str(e), param=f"messages[{i}].content") from None
    raise APIError(400, "rag needs a user message to search the knowledge base with.", param="messages")


def prepare_chat(kb: KnowledgeBase, body: ChatCompletionRequest) -> tuple[ChatCompletionRequest, RagContext]:
    """Guard and retrieve for the last user message; the request with the sources as its first message."""
    opts = body.rag
    assert opts is not None
    question = _last_user_text(body)
    lang = language(question)
    if opts.guard:
        reason = guard(question)
        if reason:
            return body, RagContext([], REFUSED[reason][lang], "refused")
    cfg = RetrieveConfig(mode=opts.mode, k=opts.k, min_similarity=opts.min_similarity, mmr=opts.mmr)
    sources = numbered_sources(kb.retriever.search(question, cfg), kb.display_name)
    if not sources:
        return body, RagContext([], NO_CONTEXT[lang], "no_context")
    ctx = context_message(sources, lang)
    messages = [ChatMessage(role="system", content=ctx["content"]), *body.messages]
    return body.model_copy(update={"messages": messages}), RagContext(sources)


def decorate(resp: dict[str, Any], ctx: RagContext) -> dict[str, Any]:
    """Add the sources and, per choice, the checked citations to a chat.completion response."""
    resp["sources"] = ctx.public_sources()
    for choice in resp["choices"]:
        msg = choice["message"]
        text, cited = cite(msg.get("content") or "", ctx.sources)
        if msg.get("content") is not None:
            msg["content"] = text
        choice["citations"] = [c.n for c in cited]
    return resp


def fixed_reply(fmt: Formatter, ctx: RagContext, stream: bool) -> Any:
    """A refusal or "I don't know" answered without the model (usage is zero: nothing was generated)."""
    from fastapi.responses import StreamingResponse

    if not stream:
        choice = {"text": ctx.fixed, "tool_calls": [], "logprobs": [], "finish_reason": "stop"}
        resp = fmt.chat_response([choice], 0, 0)
        resp["sources"], resp["rag_status"] = [], ctx.status
        resp["choices"][0]["citations"] = []
        return resp

    async def chunks() -> Any:
        yield sse({**_head(fmt), "choices": [], "sources": [], "rag_status": ctx.status})
        yield fmt.chat_chunk(0, {"role": "assistant", "content": ctx.fixed})
        yield fmt.chat_chunk(0, {}, "stop")
        yield sse("[DONE]")

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _head(fmt: Formatter) -> dict[str, Any]:
    return fmt._head("chat.completion.chunk")  # noqa: SLF001 - same id/created/model as the other chunks


async def with_sources(gen: Any, fmt: Formatter, ctx: RagContext) -> Any:
    """A chat stream that first announces the retrieved sources in a chunk of its own."""
    yield sse({**_head(fmt), "choices": [], "sources": ctx.public_sources(), "rag_status": ctx.status})
    async for chunk in gen:
        yield chunk


def _public(d: DocInfo) -> dict[str, Any]:
    """A document as clients see it: its id and shown name, not its path on the server."""
    return {
        "id": d.id,
        "name": d.name,
        "title": d.title,
        "kind": d.kind,
        "chunks": d.chunks,
        "content_hash": d.content_hash,
    }


def _redacted(kb: KnowledgeBase, v: Any) -> Any:
    if isinstance(v, str):
        return kb.redact(v)
    if isinstance(v, list):
        return [_redacted(kb, x) for x in v]
    if isinstance(v, dict):
        return {k: _redacted(kb, x) for k, x in v.items()}
    return v


def add_routes(app: FastAPI, kb: KnowledgeBase, max_bytes: int) -> None:
    """The /v1/rag/* routes; `max_bytes` is the server's body limit, which bounds an upload too."""

    @app.get("/v1/rag/documents", response_model=None, responses=openapi.ok(openapi.DocumentList, "The documents."))
    async def list_documents() -> dict[str, Any]:
        docs = await run_in_threadpool(kb.documents)
        return {"object": "list", "data": [_public(d) for d in docs], "embedder": kb.settings.embedder}

    upload_doc = {**openapi.ok(openapi.Uploaded, "The file, stored and indexed."), **openapi.errors(400)}

    @app.post("/v1/rag/documents", response_model=None, responses=upload_doc)
    async def upload(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        data = await file.read()  # the body limit (serve --max-body-mb) has bounded it
        name = file.filename or ""
        t0 = time.perf_counter()
        try:
            rep = await run_in_threadpool(kb.add_upload, name, data, max_bytes)
        except UserError as e:
            raise APIError(400, kb.redact(str(e)), param="file") from None
        source = (kb.path / "files" / sanitize_name(name)).resolve().as_posix()
        doc = next((_public(d) for d in await run_in_threadpool(kb.documents) if d.source == source), None)
        return {
            "object": "rag.document",
            "document": doc,
            "sync": _redacted(kb, rep.to_dict()),
            "seconds": time.perf_counter() - t0,
        }

    delete_doc = {**openapi.ok(openapi.Deleted, "The document is gone."), **openapi.errors(404, 409)}

    @app.delete("/v1/rag/documents/{doc_id:path}", response_model=None, responses=delete_doc)
    async def delete(doc_id: str) -> dict[str, Any]:
        found = await run_in_threadpool(kb.find_document, doc_id)
        if not found:
            raise APIError(404, f"No document has the id or name {doc_id!r}; GET /v1/rag/documents lists them.")
        if len(found) > 1:
            ids = ", ".join(d.id for d in found)
            raise APIError(409, f"{len(found)} documents are named {doc_id!r}; delete one by its id ({ids}).")
        await run_in_threadpool(kb.remove_source, found[0].source)
        return {"object": "rag.document.deleted", "deleted": [found[0].name]}

    query_doc = {**openapi.ok(openapi.QueryResult, "The best chunks, best first."), **openapi.errors(400)}

    @app.post("/v1/rag/query", response_model=None, responses=query_doc)
    async def query(body: QueryRequest) -> dict[str, Any]:
        cfg = RetrieveConfig(mode=body.mode, k=body.k, min_similarity=body.min_similarity, mmr=body.mmr)
        hits = await run_in_threadpool(kb.retriever.search, body.query, cfg)
        data = [
            {
                "rank": h.rank,
                "score": h.score,
                "scores": h.scores,
                "name": kb.display_name(h.record.source),
                "title": h.record.title,
                "heading": h.record.heading,
                "position": h.record.position,
                "start": h.record.start,
                "end": h.record.end,
                "text": h.record.text,
            }
            for h in hits
        ]
        return {"object": "list", "data": data}
