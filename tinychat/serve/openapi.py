"""The OpenAPI document (GET /openapi.json, the /docs page) made to say what the server really answers.

FastAPI derives a document from the routes for free, but its guesses are wrong for this server: it lists
422 for bad input (the server answers 400 in OpenAI's error shape), JSON for /metrics (Prometheus text),
no text/event-stream for streams, untyped bodies, and `model` as any string, so a client generated from
the document, or a fuzzer, never learns which model id reaches generation.

The response models below are documentation only: the handlers still build their bodies as dicts
(tinychat.serve.responses), so the document costs nothing per request. They are closed
(additionalProperties false) so that a key the server starts sending without documenting it is caught:
tests/serve/test_serve_schemathesis.py fuzzes the app against this document, so the two cannot drift
apart unnoticed. What only the app knows when it is created (its model id, whether an API key or the
write switch is on) is filled in by `install`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- errors
class ErrorDetail(Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Out):
    """OpenAI's error shape, for every status of 400 and above."""

    error: ErrorDetail


WHY = {
    400: "The request is invalid (a field, the JSON, the context length); `param` names the field.",
    401: "The API key is missing or wrong (send `Authorization: Bearer KEY`).",
    403: "The server refuses to change the knowledge base (it listens beyond loopback without an API key).",
    404: "No such model, adapter or document.",
    409: "A conflict: the name matches several documents (delete one by its id), or an adapter's name or slot is "
    "taken or it is still in use.",
    413: "The request body is larger than the server's limit (serve --max-body-mb).",
    429: "The server is overloaded (its request queue is full); retry after the time in Retry-After.",
    500: "An unexpected error; the server logged the details and keeps running.",
    503: "The engine has stopped.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for the error statuses a route answers itself (the gate's are added by `install`)."""
    out: dict[int | str, dict[str, Any]] = {}
    for c in codes:
        out[c] = {"model": ErrorResponse, "description": WHY[c]}
        if c == 429:
            out[c]["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    return out


def ok(model: type[BaseModel], description: str, stream: type[BaseModel] | None = None) -> dict[int | str, Any]:
    """The 200 entry: a JSON body, and for a route that streams when asked, server-sent events whose `data` is
    one JSON chunk (or an error object, when generation fails mid-stream) and finally the literal [DONE]."""
    entry: dict[str, Any] = {"model": model, "description": description}
    if stream is not None:
        payload = {"anyOf": [{"$ref": REF.format(model=stream.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": {"contentMediaType": "application/json"}}
        data["else"]["contentSchema"] = payload
        event = {"type": "object", "required": ["data"], "properties": {"data": data}}
        # itemSchema: one event's schema, as OpenAPI 3.2 names it and as FastAPI writes it for its own SSE routes
        entry["content"] = {"text/event-stream": {"itemSchema": event}}
    return {200: entry}


def ok_events(model: type[BaseModel], description: str, events: tuple[type[BaseModel], ...]) -> dict[int | str, Any]:
    """The 200 entry of a route that streams typed events as OpenAI's Responses API does: each event has an
    `event:` line naming its type and `data` holding one JSON object of the same type; no [DONE]."""
    payload = {"anyOf": [{"$ref": REF.format(model=e.__name__)} for e in events]}
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
    event = {"type": "object", "required": ["event", "data"], "properties": {"event": {"type": "string"}, "data": data}}
    return {200: {"model": model, "description": description, "content": {"text/event-stream": {"itemSchema": event}}}}


# ---------------------------------------------------------------------------------------------- bodies
class Health(Out):
    status: Literal["ok", "engine stopped"]


class ModelCard(Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    parent: str | None = Field(None, description="A LoRA adapter's base model (absent for the base itself).")
    root: str | None = Field(None, description="A LoRA adapter's directory.")


class ModelList(Out):
    object: Literal["list"]
    data: list[ModelCard]


class AdapterStatus(Out):
    id: str = Field(description="The adapter's name: the `model` a request gives to use it.")
    object: Literal["adapter"]
    status: Literal["loaded", "unloaded"]
    root: str | None = Field(None, description="The adapter's directory (when loaded).")


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(Out):
    name: str
    arguments: str


class ToolCallOut(Out):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Out):
    content: list[TokenLogprobOut]


FinishReason = Literal["stop", "length", "tool_calls"] | None
RagStatus = Literal["answered", "refused", "no_context"]


class Passage(Out):
    """A chunk of a knowledge-base document (serve --kb): where it sits in its document, its score, its text."""

    name: str
    title: str
    heading: str
    position: int
    start: int
    end: int
    score: float
    text: str


class Source(Passage):
    """A passage retrieved for an answer, numbered as the answer cites it: [n]."""

    n: int


class AssistantMessage(Out):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # the reply's leading <think> block (serve --reasoning)
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    citations: list[int] | None = None  # with rag: the source numbers the answer cites


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | None = None  # with rag
    rag_status: RagStatus | None = None  # with rag, when the answer came without the model


class FunctionDelta(Out):
    name: str | None = None
    arguments: str


class ToolCallDelta(Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatDelta(Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionChunk(Out):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # the last chunk, with stream_options.include_usage
    sources: list[Source] | None = None  # with rag, the first chunk
    rag_status: RagStatus | None = None


class CompletionLogprobs(Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class Completion(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------- /v1/responses
ItemStatus = Literal["in_progress", "completed", "incomplete"]
Nothing = Annotated[list[Any], Field(max_length=0)]  # annotations and logprobs: always empty here


class OutputText(Out):
    type: Literal["output_text"]
    text: str
    annotations: Nothing


class OutputMessage(Out):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: ItemStatus
    content: list[OutputText]  # empty in the output_item.added event, before its part is added


class OutputFunctionCall(Out):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(Out):
    type: Literal["reasoning_text"]
    text: str


class OutputReasoning(Out):
    """The reply's leading <think> block (serve --reasoning), as OpenAI returns an open model's reasoning."""

    type: Literal["reasoning"]
    id: str
    summary: Nothing
    content: list[ReasoningText]  # empty in the output_item.added event, before its part is added
    status: ItemStatus


OutputItem = Annotated[OutputReasoning | OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class FunctionToolOut(Out):
    type: Literal["function"]
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool | None


class FunctionChoiceOut(Out):
    type: Literal["function"]
    name: str


class TextFormatOut(Out):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextOut(Out):
    format: TextFormatOut


class InputTokensDetails(Out):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(Out):
    reasoning_tokens: int


class ResponseUsage(Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Out):
    reason: Literal["max_output_tokens"]


class ResponseObject(Out):
    """OpenAI's `response` object; the request's settings are echoed back as OpenAI does."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None
    store: Literal[False]
    temperature: float
    text: TextOut
    tool_choice: Literal["none", "auto", "required"] | FunctionChoiceOut
    tools: list[FunctionToolOut]
    top_p: float
    truncation: Literal["disabled"]
    usage: ResponseUsage | None  # None until the response is finished
    user: str | None
    metadata: dict[str, str]


class ResponseEvent(Out):
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    response: ResponseObject


class OutputItemEvent(ResponseEvent):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ItemEvent(ResponseEvent):
    item_id: str
    output_index: int


class ContentPartEvent(ItemEvent):
    type: Literal["response.content_part.added", "response.content_part.done"]
    content_index: int
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class TextDeltaEvent(ItemEvent):
    type: Literal["response.output_text.delta"]
    content_index: int
    delta: str
    logprobs: Nothing


class TextDoneEvent(ItemEvent):
    type: Literal["response.output_text.done"]
    content_index: int
    text: str
    logprobs: Nothing


class ReasoningDeltaEvent(ItemEvent):
    type: Literal["response.reasoning_text.delta"]
    content_index: int
    delta: str


class ReasoningDoneEvent(ItemEvent):
    type: Literal["response.reasoning_text.done"]
    content_index: int
    text: str


class ArgumentsDeltaEvent(ItemEvent):
    type: Literal["response.function_call_arguments.delta"]
    delta: str


class ArgumentsDoneEvent(ItemEvent):
    type: Literal["response.function_call_arguments.done"]
    arguments: str


class ErrorEvent(ResponseEvent):
    """Generation failed mid-stream."""

    type: Literal["error"]
    code: str | None
    message: str
    param: str | None


RESPONSE_EVENTS = (
    ResponseLifecycleEvent,
    OutputItemEvent,
    ContentPartEvent,
    TextDeltaEvent,
    TextDoneEvent,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ErrorEvent,
)


class EmbeddingOut(Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, with encoding_format "base64"


class EmbeddingUsage(Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Out):
    object: Literal["list"]
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage


class Document(Out):
    id: str
    name: str
    title: str
    kind: str
    chunks: int
    content_hash: str


class DocumentList(Out):
    object: Literal["list"]
    data: list[Document]
    embedder: str


class SyncError(Out):
    path: str
    error: str


class SyncSummary(BaseModel):
    """tinychat.rag.kb.SyncReport; left open to keys the knowledge base may add."""

    added: list[str]
    updated: list[str]
    unchanged: list[str]
    removed: list[str]
    errors: list[SyncError]
    skipped: list[str]
    chunks_added: int
    chunks_removed: int
    seconds: float


class Uploaded(Out):
    object: Literal["rag.document"]
    document: Document | None  # None when the file held no text to index
    sync: SyncSummary
    seconds: float


class Deleted(Out):
    object: Literal["rag.document.deleted"]
    deleted: list[str]


class QueryHit(Passage):
    rank: int
    scores: dict[str, float]


class QueryResult(Out):
    object: Literal["list"]
    data: list[QueryHit]


# ---------------------------------------------------------------------------------------------- the document
DESCRIPTION = (
    "tinychat's OpenAI-compatible API: chat and text completions and the Responses API (streamed as server-sent "
    "events when asked), "
    "embeddings, the model list, and with `serve --kb` the knowledge-base routes under /v1/rag. Errors come in "
    'OpenAI\'s shape, `{"error": {"message", "type", "param", "code"}}`.'
)
MODEL_FIELDS = ("ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "ResponsesRequest")
REGISTERED = (
    ChatCompletionChunk,
    CompletionChunk,
    ErrorResponse,
    *RESPONSE_EVENTS,
)  # referenced from `install`'s own entries


def install(app: FastAPI, model_name: str, api_key: str | None, write_routes: tuple[str, ...] | None) -> None:
    """Replace app.openapi with the corrected document, built once on first use.

    What the gate middleware answers before any route runs is added to every operation it applies to: 413
    (body limit) everywhere, 401 on /v1/* with an API key, 403 on `write_routes`' POST and DELETE (None: writes
    allowed). 422 is dropped: the server turns validation errors into 400. `model` is the one id this server
    serves; another is answered 404.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes, description=DESCRIPTION)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        _, defs = models_json_schema([(m, "serialization") for m in REGISTERED], ref_template=REF)
        schemas.update(defs["$defs"])
        for name in MODEL_FIELDS:
            if name in schemas:
                schemas[name]["properties"]["model"] = {
                    "type": "string",
                    "enum": [model_name],
                    "title": "Model",
                    "description": f"This server serves '{model_name}' (GET /v1/models); another id is a 404.",
                }
        if api_key:
            doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        error = {"content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}}
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                codes = [413, 500]
                if api_key and path.startswith("/v1/"):
                    codes.append(401)
                    op["security"] = [{"bearer": []}]
                if write_routes is not None and path.startswith(write_routes) and method in ("post", "delete"):
                    codes.append(403)
                responses = op["responses"]
                responses.pop("422", None)
                for c in codes:
                    responses.setdefault(str(c), {"description": WHY[c], **error})
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
