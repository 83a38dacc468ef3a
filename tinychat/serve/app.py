"""The OpenAI-compatible HTTP server: FastAPI routes over one `Engine`, plus the web chat page.

The engine thread owns the model; a handler prepares an engine request (template, limits, grammar:
tinychat.serve.prepare), submits it, and reads the engine's events from an asyncio.Queue that the
engine fills through `loop.call_soon_threadsafe`. When the client goes away (the stream's send task is
cancelled, or a non-streaming caller disconnects) the handler cancels its request and the engine frees
the slots at its next step. Bad input is answered in OpenAI's error shape with a 4xx; an unexpected
exception is a 500 in the same shape, and the server keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from tinychat.errors import UserError
from tinychat.infer.engine import Delta, Done, Engine, EngineOverloaded, GenerationRequest, RequestHandle, coalesce
from tinychat.infer.structured import Grammars
from tinychat.serve import openapi, responses_api
from tinychat.serve.metrics import HttpStats, render_metrics
from tinychat.serve.prepare import APIError, Prepared, Preparer
from tinychat.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from tinychat.serve.reasoning import ReasoningSplitter, split_reasoning
from tinychat.serve.responses import Formatter, sse

log = logging.getLogger("tinychat.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler asks whether its client is still there
STATIC = Path(__file__).parent / "static"


def create_app(  # noqa: ANN001, PLR0913
    engine: Engine,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    kb=None,
    max_body_mb: float = 16.0,
    allow_writes: bool = True,
    adapter_root: Path | None = None,
    reasoning: bool = True,
) -> FastAPI:
    """The app for a started engine. `api_key` protects /v1/* (the page, /health and /metrics stay open);
    `kb` (a tinychat.rag.kb.KnowledgeBase) adds the knowledge-base routes of tinychat.serve.rag_routes;
    `allow_writes=False` answers uploads and deletes of documents with 403 (see serve.cli.write_policy);
    `max_body_mb` bounds every request body, uploads included (413 beyond); `adapter_root` adds
    POST /v1/load_lora_adapter and /v1/unload_lora_adapter for LoRA directories under it (the engine must
    have been started with free adapter slots); `reasoning` returns a chat reply's leading <think> block as
    reasoning_content (tinychat.serve.reasoning) instead of inside content."""
    grammars = Grammars(tokenizer, engine.model.cfg.vocab_size)
    prep = Preparer(engine, tokenizer, grammars, model_name)
    http = HttpStats()
    app = FastAPI(title="tinychat", version="0.1.0", docs_url="/docs", redoc_url=None)
    max_body = int(max_body_mb * 2**20)
    app.add_middleware(_Gate, api_key=api_key, stats=http, writes=allow_writes, max_body=max_body)
    app.state.engine = engine
    _install_error_handlers(app)
    openapi.install(app, model_name, api_key, None if allow_writes else WRITE_ROUTES)

    # ------------------------------------------------------------------ plumbing to the engine
    def submit_all(gens: list[GenerationRequest], sinks: list[Callable[[Any], None]]) -> list[RequestHandle]:
        """Every request queued, or none: a refusal cancels the ones already queued."""
        handles: list[RequestHandle] = []
        try:
            for g, sink in zip(gens, sinks, strict=True):
                handles.append(engine.submit(g, sink))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def cancel_all(fut: asyncio.Future) -> None:
        if not fut.cancelled() and fut.exception() is None:
            for h in fut.result():
                h.cancel()

    async def submit(gens: list[GenerationRequest]) -> tuple[list[RequestHandle], asyncio.Queue]:
        """Queue the requests; their events arrive on the returned queue as (index, event).

        An engine in its own process answers `submit` over a pipe (the refusal must be raised here), which
        takes as long as the engine's current step; on the event loop that wait would stall every other
        stream's tokens, so such an engine is called from a worker thread. The in-process engine answers at
        once and is called directly. A client that leaves during the wait gets its requests cancelled."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        sinks = [lambda ev, k=k: loop.call_soon_threadsafe(q.put_nowait, (k, ev)) for k in range(len(gens))]
        try:
            if getattr(engine, "submit_waits", False):
                fut = loop.run_in_executor(None, submit_all, gens, sinks)
                try:
                    handles = await asyncio.shield(fut)
                except asyncio.CancelledError:
                    fut.add_done_callback(cancel_all)
                    raise
            else:
                handles = submit_all(gens, sinks)
        except EngineOverloaded as e:
            raise APIError(429, f"The server is overloaded: {e}", type="rate_limit_error", code="overloaded") from None
        except UserError as e:
            raise APIError(400, str(e)) from None
        return handles, q

    async def events(handles: list, q: asyncio.Queue, request: Request | None) -> AsyncIterator[tuple[int, Any]]:
        """Engine events of several requests; cancels whatever is unfinished when the consumer stops early."""
        done: set[int] = set()
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        backlog: list[tuple[int, Any]] = []  # events taken from q, not yet handed on
        try:
            while len(done) < len(handles):
                if not backlog:
                    if request is None:
                        first = await q.get()
                    else:  # a non-streaming caller: notice when it hangs up, also while tokens keep coming
                        try:
                            first = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                        except TimeoutError:
                            first = None
                        if loop.time() >= next_check or first is None:
                            if await request.is_disconnected():
                                return
                            next_check = loop.time() + DISCONNECT_POLL_S
                        if first is None:
                            continue
                    backlog.append(first)
                if not q.empty():  # what arrived while this consumer was busy goes on as one delta per choice
                    while not q.empty():
                        backlog.append(q.get_nowait())
                    backlog = coalesce(backlog)
                k, ev = backlog.pop(0)
                if isinstance(ev, Done):
                    done.add(k)
                    if ev.code == "adapter_unloaded":  # the model it named went away before it started
                        raise APIError(404, f"{ev.error}.", param="model", code="model_not_found")
                    if ev.error and ev.error != "cancelled":
                        raise APIError(500, f"generation failed: {ev.error}", type="server_error")
                yield k, ev
        finally:
            for k, h in enumerate(handles):
                if k not in done:
                    h.cancel()

    # ------------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    health_doc = {
        **openapi.ok(openapi.Health, "The engine is running."),
        503: {"model": openapi.Health, "description": openapi.WHY[503]},
    }

    @app.get("/health", response_class=JSONResponse, responses=health_doc)
    async def health() -> JSONResponse:
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    metrics_doc = {200: {"description": "Prometheus' text exposition format (tinychat.serve.metrics)."}}

    @app.get("/metrics", response_class=PlainTextResponse, responses=metrics_doc)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine.snapshot(), http), media_type="text/plain; version=0.0.4")

    adapters = engine.adapters

    def model_card(name: str = model_name, root: Path | None = None) -> dict[str, Any]:
        card = {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "tinychat",
            "max_model_len": engine.context,
        }
        if root is not None:  # a LoRA adapter over the base (vLLM's fields)
            card |= {"parent": model_name, "root": str(root)}
        return card

    @app.get(
        "/v1/models",
        response_model=None,
        responses=openapi.ok(openapi.ModelList, "The base model and the LoRA adapters this server serves."),
    )
    async def list_models() -> dict[str, Any]:
        index = adapters.index if adapters is not None else {}  # one snapshot (adapters may come and go)
        return {"object": "list", "data": [model_card()] + [model_card(n, d) for n, (_, _, d) in index.items()]}

    @app.get(
        "/v1/models/{name:path}",
        response_model=None,
        responses={**openapi.ok(openapi.ModelCard, "The model."), **openapi.errors(404)},
    )
    async def get_model(name: str) -> dict[str, Any]:
        prep.check_model(name)
        entry = adapters.index.get(name) if adapters is not None and name != model_name else None
        return model_card(name, entry[2] if entry else None)

    if adapter_root is not None:
        _adapter_routes(app, engine, model_name, adapter_root)

    if kb is not None:
        from tinychat.serve import rag_routes

        rag_routes.add_routes(app, kb, max_body)
    else:
        rag_routes = None

    chat_doc = openapi.ok(
        openapi.ChatCompletion,
        "A chat.completion, or with stream: true its chunks as events.",
        openapi.ChatCompletionChunk,
    )

    @app.post("/v1/chat/completions", responses={**chat_doc, **openapi.errors(400, 404, 429)})
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        fmt = Formatter(grammars, body.model, "chat", logprobs=body.logprobs)  # an unknown model is refused first
        rag = None
        if body.rag is not None:
            if kb is None or rag_routes is None:
                raise APIError(400, "This server has no knowledge base; start it with --kb DIR.", param="rag")
            prep.check_model(body.model)
            body, rag = await run_in_threadpool(rag_routes.prepare_chat, kb, body)
            if rag.fixed is not None:
                return rag_routes.fixed_reply(fmt, rag, body.stream)
        p: Prepared = await run_in_threadpool(prep.chat, body)
        handles, q = await submit([p.gen])
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            gen = _chat_stream(fmt, p.gen.n, events(handles, q, None), usage, reasoning)
            return _stream(rag_routes.with_sources(gen, fmt, rag) if rag else gen, handles)
        choices, done = await _collect(events(handles, q, request), p.gen.n, [""])
        if done is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        if reasoning:
            for c in choices:
                c["reasoning"], c["text"] = split_reasoning(c["text"])
        resp = fmt.chat_response(choices, done.prompt_tokens, done.completion_tokens)
        return rag_routes.decorate(resp, rag) if rag else resp

    responses_doc = openapi.ok_events(
        openapi.ResponseObject, "A response, or with stream: true its events.", openapi.RESPONSE_EVENTS
    )

    @app.post("/v1/responses", responses={**responses_doc, **openapi.errors(400, 404, 429)})
    async def responses(body: responses_api.ResponsesRequest, request: Request) -> Any:
        prep.check_model(body.model)
        try:
            p: Prepared = await run_in_threadpool(prep.chat, responses_api.to_chat(body))
        except APIError as e:
            raise responses_api.rename_param(e) from None
        handles, q = await submit([p.gen])
        out = responses_api.ResponseBuilder(body, body.model, reasoning, prep.tok.decode)
        if body.stream:
            return _stream(responses_api.stream(out, events(handles, q, None)), handles)
        choices, done = await _collect(events(handles, q, request), 1, [""])
        if done is None:
            return JSONResponse({}, status_code=499)
        return out.response(choices[0], done)

    completion_doc = openapi.ok(
        openapi.Completion, "A text_completion, or with stream: true its chunks as events.", openapi.CompletionChunk
    )

    @app.post("/v1/completions", responses={**completion_doc, **openapi.errors(400, 404, 429)})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        preps = [await run_in_threadpool(prep.completion, body, x) for x in body.prompts()]
        fmt = Formatter(grammars, body.model, "completion", logprobs=body.logprobs is not None)
        handles, q = await submit([p.gen for p in preps])
        prefixes = [p.prompt_text if body.echo else "" for p in preps]
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(_completion_stream(fmt, body.n, prefixes, events(handles, q, None), usage), handles)
        choices, done = await _collect(events(handles, q, request), body.n, prefixes)
        if done is None:
            return JSONResponse({}, status_code=499)
        return fmt.completion_response(choices, done.prompt_tokens, done.completion_tokens)

    embed_doc = {**openapi.ok(openapi.EmbeddingList, "One embedding per input."), **openapi.errors(400, 404)}

    @app.post("/v1/embeddings", response_model=None, responses=embed_doc)
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        if prep.check_model(body.model):
            raise APIError(400, f"embeddings come from the base model; ask for model '{model_name}'.", param="model")
        try:
            inputs = body.inputs()
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None
        ids = [tokenizer.encode(x) if isinstance(x, str) else x for x in inputs]
        ctx, d = engine.model.cfg.max_seq_len, engine.model.cfg.d_model
        for i, x in enumerate(ids):
            if not x:
                raise APIError(400, f"input[{i}] is empty.", param="input")
            if len(x) > ctx:
                raise APIError(
                    400,
                    f"input[{i}] has {len(x)} tokens; this model's maximum context length is {ctx} tokens.",
                    param="input",
                    code="context_length_exceeded",
                )
            prep.check_token_ids(x, "input")
        if body.dimensions is not None and body.dimensions != d:
            raise APIError(
                400, f"dimensions must be {d} for this model (it cannot shorten embeddings).", param="dimensions"
            )
        vectors = await asyncio.wrap_future(engine.embed(ids))
        data = []
        for i, v in enumerate(vectors):
            emb: Any = v
            if body.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": model_name, "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app


# ---------------------------------------------------------------------------------------------- streams
def _adapter_routes(app: FastAPI, engine: Engine, model_name: str, root: Path) -> None:
    """Load and unload LoRA adapters while serving (vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter).

    A request names a directory, so only directories under `root` (the operator's `--adapter_updates DIR`)
    are read: a path that resolves outside it (.., a symbolic link) is refused before any file is opened.
    Reading and checking the adapter runs in a worker thread; the engine puts it into a free slot between
    two steps, so running requests are never disturbed."""
    root = root.resolve()

    def inside(path: str) -> Path:
        """The adapter directory, and the two files read from it, each resolved (links followed) under root."""
        try:
            p = (root / path).resolve()  # an absolute `path` replaces root here, and is then checked like any other
            files = [(p / name).resolve() for name in ("adapter_config.json", "adapter_model.safetensors")]
        except (OSError, ValueError) as e:  # a NUL byte, a name too long, a loop of links
            raise APIError(400, f"lora_path is not a usable path ({e}).", param="lora_path") from None
        if not all(f.is_relative_to(root) for f in [p, *files]):
            raise APIError(400, f"lora_path must be a directory under {root}.", param="lora_path")
        return p

    async def on_engine(fut: Any) -> Any:
        try:
            return await asyncio.wrap_future(fut)
        except UserError as e:  # the engine refused the change: a name or slot taken, or still in use
            raise APIError(409, str(e), param="lora_name") from None

    doc = openapi.ok(openapi.AdapterStatus, "The adapter's new state.")

    @app.post("/v1/load_lora_adapter", response_model=None, responses={**doc, **openapi.errors(400, 409)})
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        if body.lora_name == model_name:
            raise APIError(409, f"{body.lora_name!r} is the base model's name; pick another.", param="lora_name")
        path = inside(body.lora_path)
        try:
            fut = await run_in_threadpool(engine.load_adapter, body.lora_name, str(path))
        except UserError as e:
            raise APIError(400, str(e), param="lora_path") from None
        await on_engine(fut)
        return {"id": body.lora_name, "object": "adapter", "status": "loaded", "root": str(path)}

    @app.post("/v1/unload_lora_adapter", response_model=None, responses={**doc, **openapi.errors(400, 404, 409)})
    async def unload_adapter(body: UnloadAdapterRequest) -> dict[str, Any]:
        served = engine.adapters.served if engine.adapters is not None else []
        if body.lora_name not in served:
            raise APIError(
                404, f"no adapter named {body.lora_name!r} is served; served: {', '.join(served) or 'none'}.",
                param="lora_name",
            )  # fmt: skip
        await on_engine(engine.unload_adapter(body.lora_name))
        return {"id": body.lora_name, "object": "adapter", "status": "unloaded"}


def _stream(gen: AsyncIterator[str], handles: list) -> StreamingResponse:
    """An SSE response; afterwards (also when the client left before the first chunk) its requests are cancelled,
    which is a no-op for the finished ones."""

    def cancel_all() -> None:
        for h in handles:
            h.cancel()

    done = BackgroundTask(cancel_all)
    return StreamingResponse(
        gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, background=done
    )


async def _collect(
    evs: AsyncIterator[tuple[int, Any]], n: int, prefixes: list[str]
) -> tuple[list[dict[str, Any]], Done | None]:
    """All choices of all prompts (choice index = prompt * n + choice), or (…, None) if the client left."""
    choices = [
        {"prefix": prefixes[k], "text": "", "token_ids": [], "logprobs": [], "tool_calls": [], "finish_reason": None}
        for k in range(len(prefixes))
        for _ in range(n)
    ]
    total, finished = Done(0, 0), 0
    async for k, ev in evs:
        if isinstance(ev, Done):
            total.prompt_tokens += ev.prompt_tokens
            total.completion_tokens += ev.completion_tokens
            finished += 1
            continue
        c = choices[k * n + ev.index]
        c["text"] += ev.text
        c["token_ids"] += ev.token_ids
        c["logprobs"] += ev.logprobs
        c["tool_calls"] += ev.tool_calls
        c["finish_reason"] = ev.finish_reason or c["finish_reason"]
    return choices, total if finished == len(prefixes) else None


async def _chat_stream(
    fmt: Formatter, n: int, evs: AsyncIterator[tuple[int, Any]], usage: bool, reasoning: bool = False
) -> AsyncIterator[str]:
    for i in range(n):
        yield fmt.chat_chunk(i, {"role": "assistant", "content": ""})
    calls_seen = [0] * n
    splitters = [ReasoningSplitter() for _ in range(n)] if reasoning else None
    try:
        async for _, ev in evs:
            if isinstance(ev, Done):
                if usage:
                    yield fmt.usage_chunk(ev.prompt_tokens, ev.completion_tokens)
                continue
            text = ev.text
            if splitters is not None:
                thought, text = splitters[ev.index].feed(ev.text, final=bool(ev.finish_reason))
                if thought:
                    yield fmt.chat_chunk(ev.index, {"reasoning_content": thought})
            if text or ev.logprobs:
                yield fmt.chat_chunk(ev.index, {"content": text}, logprobs=fmt.chat_logprobs(ev.logprobs))
            if ev.tool_calls:
                for chunk in fmt.tool_call_chunks(ev.index, ev.tool_calls, calls_seen[ev.index]):
                    yield chunk
                calls_seen[ev.index] += len(ev.tool_calls)
            if ev.finish_reason:
                yield fmt.chat_chunk(ev.index, {}, ev.finish_reason)
    except APIError as e:
        yield sse(e.body())
    yield sse("[DONE]")


async def _completion_stream(
    fmt: Formatter, n: int, prefixes: list[str], evs: AsyncIterator[tuple[int, Any]], usage: bool
) -> AsyncIterator[str]:
    for k, prefix in enumerate(prefixes):
        for i in range(n):
            if prefix:
                yield fmt.completion_chunk(k * n + i, prefix)
    offsets = [len(p) for p in prefixes for _ in range(n)]
    prompt_tokens = completion_tokens = 0
    try:
        async for k, ev in evs:
            if isinstance(ev, Done):
                prompt_tokens += ev.prompt_tokens
                completion_tokens += ev.completion_tokens
                continue
            assert isinstance(ev, Delta)
            idx = k * n + ev.index
            if ev.text or ev.logprobs:
                lp = fmt.completion_logprobs(ev.logprobs, offsets[idx])
                offsets[idx] += len(ev.text)
                yield fmt.completion_chunk(idx, ev.text, logprobs=lp)
            if ev.finish_reason:
                yield fmt.completion_chunk(idx, "", ev.finish_reason)
        if usage:
            yield fmt.usage_chunk(prompt_tokens, completion_tokens)
    except APIError as e:
        yield sse(e.body())
    yield sse("[DONE]")


# ---------------------------------------------------------------------------------------------- errors
def _error(
    status: int, message: str, param: str | None = None, code: str | None = None, type: str = ""
) -> JSONResponse:
    e = APIError(status, message, type or ("invalid_request_error" if status < 500 else "server_error"), param, code)
    return JSONResponse(e.body(), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        param = _param(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "json_invalid":
            return _error(400, f"We could not parse the JSON body of your request: {err.get('msg')}.")
        if kind == "missing" and not param:
            return _error(400, "The request body is missing; send a JSON object.")
        if kind == "extra_forbidden":
            return _error(400, f"Unrecognized request argument supplied: {param}.", param=param)
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        return _error(400, f"Invalid '{param}': {msg}." if param else f"Invalid request: {msg}.", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: "Not found.", 405: "Method not allowed."}.get(e.status_code, str(e.detail))
        resp = _error(e.status_code, msg)
        resp.headers.update(e.headers or {})
        if e.status_code == 405:  # Starlette's Allow names the methods of the first route on the path only
            resp.headers["Allow"] = ", ".join(_methods_at(app, request.scope))
        return resp

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal server error ({type(e).__name__}); the server logged the details.")


def _methods_at(app: FastAPI, scope: dict) -> list[str]:
    """Every method some route serves at the request's path: GET and POST /v1/rag/documents are two routes."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "null", "dict", "list"}


def _param(loc: tuple | list) -> str | None:
    """pydantic's error location as OpenAI names a parameter: messages[0].content (union branch tags dropped)."""
    out = ""
    for x in loc:
        if x == "body" and not out:
            continue
        if isinstance(x, int):
            out += f"[{x}]"
        elif str(x) in _TYPE_TAGS or any(c in str(x) for c in "[]-()"):
            continue  # which branch of a union failed, e.g. 'str' or 'list[ContentPart]'
        else:
            out += ("." if out else "") + str(x)
    return out or None


class BodyTooLarge(StarletteHTTPException):
    """Raised from the body's receive once more bytes arrived than the limit allows (answered as a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the limit of {limit} bytes ({limit / 2**20:g} MB).")


ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/models",
    "/v1/rag/documents",
    "/v1/rag/query",
    "/health",
    "/metrics",
    "/static",
)

WRITE_ROUTES = ("/v1/rag/documents",)  # POST and DELETE change the knowledge base


def _route(path: str) -> str:
    """A fixed label per endpoint, so a client cannot create metric series by inventing paths."""
    if path == "/":
        return "/"
    return next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")


class _Gate:
    """Pure ASGI middleware: body size limit, API key check on /v1/*, the write switch of the knowledge-base
    routes, and request counting for /metrics.

    Pure ASGI rather than @app.middleware("http"), whose wrapper buffers streaming responses and hides a
    client's disconnect from the stream; auth runs before the body is parsed, so a caller without the key
    learns nothing else about the request. The body limit counts the bytes actually received (a chunked body
    has no Content-Length), and a Content-Length over the limit is refused before anything is read.
    """

    def __init__(self, app: Any, api_key: str | None, stats: HttpStats, writes: bool, max_body: int) -> None:
        self.app, self.api_key, self.stats, self.writes, self.max_body = app, api_key, stats, writes, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        route = _route(path)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            return await self._refuse(scope, receive, send, route, 413, BodyTooLarge(self.max_body).detail)
        if self.api_key and path.startswith("/v1/"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not secrets.compare_digest(token.encode(), self.api_key.encode()):
                msg = (
                    "Incorrect API key provided."
                    if token
                    else "You didn't provide an API key; send it as 'Authorization: Bearer KEY'."
                )
                return await self._refuse(scope, receive, send, route, 401, msg, code="invalid_api_key")
        if not self.writes and route in WRITE_ROUTES and scope["method"] not in ("GET", "HEAD"):
            msg = (
                "This server listens beyond loopback without an API key, so it refuses to change the knowledge "
                "base; restart it with --api-key KEY (or --allow-unauthenticated-writes)."
            )
            return await self._refuse(scope, receive, send, route, 403, msg, type="permission_error")
        status, received = [500], [0]

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, send_wrapper)
        except BodyTooLarge as e:  # read outside a route's own error handling
            if status[0] != 500:
                raise
            status[0] = 413
            await _error(413, str(e.detail))(scope, receive, send)
        finally:
            self.stats.count(route, status[0])

    async def _refuse(self, scope: dict, receive: Any, send: Any, route: str, status: int, msg: str, **kw: Any) -> None:
        self.stats.count(route, status)
        await _error(status, msg, **kw)(scope, receive, send)
