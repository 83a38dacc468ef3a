"""OpenAI's Responses API (POST /v1/responses) on top of the chat machinery: request model, conversion, output.

A Responses request is the chat request in another dress: `instructions` is a system message, `input` a
string or a list of items (messages, the function calls the model made, their outputs), `tools` are flat
({type, name, parameters} instead of {type, function: {...}}), `max_output_tokens` is max_tokens and
`text.format` is response_format. So `to_chat` turns it into a ChatCompletionRequest and the chat path
(template, limits, tool grammars, structured output, cancellation) runs unchanged; only the answer is
shaped differently: a `response` object whose `output` lists a reasoning item (the reply's leading <think>
block, tinychat.serve.reasoning), a message item and function_call items, and, streamed, the typed events
OpenAI sends (`event:` and `data:` lines, each with a sequence_number, no [DONE]). A reasoning item sent back
in `input` becomes the next assistant turn's reasoning_content, so the template renders the same tokens again.

The server keeps no state: `previous_response_id` and `store: true` are refused with a 400 rather than
ignored, since a client relying on them would silently lose its conversation.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from tinychat.infer.engine import Done
from tinychat.infer.tool_calls import ToolCall
from tinychat.serve.prepare import APIError
from tinychat.serve.protocol import ChatCompletionRequest, Lenient, OptionalInt, Strict, Temperature, TopP
from tinychat.serve.reasoning import CLOSE, ReasoningSplitter, split_reasoning


# ---------------------------------------------------------------------------------------------- the request
class TextPart(Lenient):
    """Lenient like chat messages: a client echoes output parts back with their annotations."""

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[TextPart] | str


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: list[TextPart] | str


class ReasoningPart(Lenient):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Lenient):
    """A reasoning output item sent back: its reasoning_text parts (else its summary) are the next assistant
    turn's reasoning_content. encrypted_content, which only OpenAI can read, is ignored like any other extra."""

    type: Literal["reasoning"]
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None

    def text(self) -> str:
        return "".join(p.text for p in self.content or self.summary)


def _item_type(v: Any) -> str | None:
    """A message may leave out its type (OpenAI's "easy input message"); the tags' parentheses keep them out of
    the error's parameter name (app._param drops such location parts)."""
    return f"({v.get('type', 'message')})" if isinstance(v, dict) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("(message)")]
    | Annotated[FunctionCallItem, Tag("(function_call)")]
    | Annotated[FunctionCallOutputItem, Tag("(function_call_output)")]
    | Annotated[ReasoningItem, Tag("(reasoning)")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="an input item is an object of type message, function_call, function_call_output or "
        "reasoning",
    ),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class PlainText(Strict):
    type: Literal["text"]


class JsonObject(Strict):
    type: Literal["json_object"]


class JsonSchema(Strict):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict):
    format: Annotated[PlainText | JsonObject | JsonSchema, Field(discriminator="type")] | None = None


class ResponsesRequest(Strict):
    model: str
    input: Annotated[list[InputItem], Field(min_length=1)] | Annotated[str, Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: OptionalInt = Field(default=None, ge=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    store: bool | None = Field(default=None, description="Only false: this server keeps no responses.")
    previous_response_id: str | None = Field(default=None, description="Refused: this server keeps no responses.")
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, v: Any) -> Any:
        if not isinstance(v, str | list):
            raise ValueError("input must be a string or a list of items")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ResponsesRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        return self


# ---------------------------------------------------------------------------------------------- to a chat request
def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def check_state(body: ResponsesRequest) -> None:
    """The two fields that would need a store of past responses."""
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "previous_response_id is not supported: this server keeps no state; send the whole conversation in input.",
            param="previous_response_id",
        )
    if body.store:
        raise APIError(400, "store: true is not supported: this server keeps no responses.", param="store")


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """Items to chat messages: consecutive function calls join the assistant turn before them, as one message
    with tool_calls; a function_call_output is a tool message; a reasoning item is the reasoning_content of the
    assistant turn that follows it."""
    out: list[dict[str, Any]] = []
    if body.instructions is not None:
        out.append({"role": "system", "content": body.instructions})
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    thought: str | None = None  # a reasoning item's text, waiting for its assistant turn
    for item in items:
        if isinstance(item, ReasoningItem):
            thought = (thought or "") + item.text()
            continue
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if thought is not None or not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1].setdefault("tool_calls", []).append(call)
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        if thought is not None:
            if out[-1]["role"] != "assistant":
                raise _orphan()
            if thought:
                out[-1]["reasoning_content"] = thought
            thought = None
    if thought is not None:
        raise _orphan()
    return out


def _orphan() -> APIError:
    return APIError(
        400,
        "Invalid 'input': a reasoning item must come right before the assistant message or function call it led to.",
        param="input",
    )


def to_chat(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that asks the same thing; what the chat model refuses is a 400 naming `input`."""
    check_state(body)
    fmt = body.text.format if body.text else None
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "max_tokens": body.max_output_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
    }
    if body.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"})} for t in body.tools]
    if isinstance(body.tool_choice, FunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": body.tool_choice.name}}
    else:
        chat["tool_choice"] = body.tool_choice
    if isinstance(fmt, JsonSchema):
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as e:
        msg = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        raise APIError(400, f"Invalid 'input': {msg}.", param="input") from None


def rename_param(e: APIError) -> APIError:
    """A chat-path error names the chat field; say the Responses field instead."""
    if e.param is not None and e.param.startswith("messages"):
        e.param = "input"
    elif e.param == "response_format":
        e.param = "text.format"
    return e


# ---------------------------------------------------------------------------------------------- the response
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """The response object of one request: its id and creation time fixed once, the request's settings echoed.
    `reasoning` returns the reply's leading <think> block as a reasoning item (serve --reasoning); `decode` (token
    ids -> text) lets usage count its tokens."""

    def __init__(
        self,
        body: ResponsesRequest,
        model: str,
        reasoning: bool = False,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.body, self.model, self.reasoning, self.decode = body, model, reasoning, decode
        self.id, self.created = _id("resp"), int(time.time())

    def head(self, status: str) -> dict[str, Any]:
        b = self.body
        choice = b.tool_choice.model_dump() if isinstance(b.tool_choice, FunctionChoice) else b.tool_choice or "auto"
        fmt = b.text.format if b.text and b.text.format else PlainText(type="text")
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": [],
            "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": choice,
            "tools": [t.model_dump() for t in b.tools or []],
            "top_p": 1.0 if b.top_p is None else b.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": b.user,
            "metadata": b.metadata or {},
        }

    def reasoning_tokens(self, output: list[dict[str, Any]], ids: list[int]) -> int:
        """Of the reply's token ids, those of its reasoning item (up to the closing tag); 0 without one."""
        if self.decode is None or not any(item["type"] == "reasoning" for item in output):
            return 0
        return reasoning_tokens(ids, self.decode)

    def final(
        self,
        output: list[dict[str, Any]],
        finish: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        ids: list[int] | None = None,
    ) -> dict[str, Any]:
        cut = finish == "length"
        resp = self.head("incomplete" if cut else "completed")
        resp["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
        resp["output"] = output
        resp["usage"] = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},  # both fields OpenAI's SDK requires
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens(output, ids or [])},
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return resp

    def response(self, choice: dict[str, Any], done: Done) -> dict[str, Any]:
        """The whole answer (a choice as app._collect gathers it): the reasoning, the text as one message, then the
        calls."""
        status = _status(choice["finish_reason"])
        thought, text = split_reasoning(choice["text"]) if self.reasoning else (None, choice["text"])
        out = [] if thought is None else [reasoning_item(_id("rs"), thought, status)]
        if text or not (choice["tool_calls"] or out):
            out.append(message_item(_id("msg"), text, status))
        out += [call_item(_id("fc"), tc, tc.arguments, status) for tc in choice["tool_calls"]]
        return self.final(out, choice["finish_reason"], done.prompt_tokens, done.completion_tokens, choice["token_ids"])


def reasoning_tokens(ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """How many of a reply's leading ids hold its <think> block up to the closing tag (all of them when it never
    closes): the shortest prefix whose text contains the tag, found by bisection since containment only grows."""
    lo, hi = 0, len(ids)  # decode(ids[:hi]) contains it, or hi == len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if CLOSE in decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def _status(finish: str | None) -> str:
    return "incomplete" if finish in ("length", "cancelled") else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """text None: the item as it opens, before its text part is added."""
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The reply's reasoning as OpenAI's reasoning item carries an open model's: one reasoning_text part, no
    summary. text None: the item as it opens."""
    content = [] if text is None else [_reasoning_part(text)]
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def call_item(item_id: str, tc: ToolCall, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": tc.id,
        "name": tc.name,
        "arguments": arguments,
        "status": status,
    }


# ---------------------------------------------------------------------------------------------- the stream
class _Events:
    """Server-sent events as OpenAI writes them: the type on the `event:` line and in the data, numbered."""

    def __init__(self) -> None:
        self.seq = itertools.count()

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(self.seq), **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


# the two items a stream fills with text: id prefix, the item as it opens, its content part, the prefix of its
# delta/done events and their extra fields
_STREAMED: dict[str, tuple[str, Callable[..., dict[str, Any]], Callable[[str], dict[str, Any]], str, dict]] = {
    "reasoning": ("rs", reasoning_item, _reasoning_part, "response.reasoning_text", {}),
    "message": ("msg", message_item, _text_part, "response.output_text", {"logprobs": []}),
}


async def stream(b: ResponseBuilder, evs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
    """created, in_progress, then per output item added → deltas → done, and finally completed (or incomplete
    when cut by max_output_tokens) with the whole response. The reasoning opens a reasoning item that the first
    text closes; text opens a message item that a tool call closes; a call is sent whole (the engine parses it
    once its block is complete), as added, one arguments delta, arguments done, item done. A failure mid-stream
    is an `error` event."""
    event = _Events()
    yield event("response.created", response=b.head("in_progress"))
    yield event("response.in_progress", response=b.head("in_progress"))
    output: list[dict[str, Any]] = []
    item: dict[str, Any] | None = None  # the open reasoning or message item
    splitter = ReasoningSplitter() if b.reasoning else None
    finish, done, ids = None, Done(0, 0), []

    def where() -> dict[str, Any]:
        assert item is not None
        return {"item_id": item["id"], "output_index": len(output), "content_index": 0}

    def close(status: str) -> list[str]:
        nonlocal item
        assert item is not None
        _, _, part_of, events, extra = _STREAMED[item["type"]]
        text, at = item["content"][0]["text"], where()
        item["status"] = status
        out = [
            event(f"{events}.done", **at, text=text, **extra),
            event("response.content_part.done", **at, part=part_of(text)),
            event("response.output_item.done", output_index=len(output), item=item),
        ]
        output.append(item)
        item = None
        return out

    def add(kind: str, text: str) -> list[str]:
        """`text` into the open item of `kind`, opening it (and closing the other kind's) first."""
        nonlocal item
        prefix, new_item, part_of, events, extra = _STREAMED[kind]
        out = close("completed") if item is not None and item["type"] != kind else []
        if item is None:
            opening = new_item(_id(prefix), None, "in_progress")
            out.append(event("response.output_item.added", output_index=len(output), item=opening))
            item = {**opening, "content": [part_of("")]}
            out.append(event("response.content_part.added", **where(), part=part_of("")))
        if text:
            item["content"][0]["text"] += text
            out.append(event(f"{events}.delta", **where(), delta=text, **extra))
        return out

    try:
        async for _, ev in evs:
            if isinstance(ev, Done):
                done = ev
                continue
            ids += ev.token_ids
            thought, text = "", ev.text
            if splitter is not None:
                thought, text = splitter.feed(ev.text, final=bool(ev.finish_reason))
            for kind, piece in (("reasoning", thought), ("message", text)):
                for line in add(kind, piece) if piece else []:
                    yield line
            if ev.tool_calls and item is not None:
                for line in close("completed"):
                    yield line
            for tc in ev.tool_calls:
                item_id, k = _id("fc"), len(output)
                yield event(
                    "response.output_item.added", output_index=k, item=call_item(item_id, tc, "", "in_progress")
                )
                at = {"item_id": item_id, "output_index": k}
                yield event("response.function_call_arguments.delta", **at, delta=tc.arguments)
                yield event("response.function_call_arguments.done", **at, arguments=tc.arguments)
                output.append(call_item(item_id, tc, tc.arguments, _status(ev.finish_reason)))
                yield event("response.output_item.done", output_index=k, item=output[-1])
            finish = ev.finish_reason or finish
        if item is None and not output:
            for line in add("message", ""):
                yield line
        if item is not None:
            for line in close(_status(finish)):
                yield line
        final = b.final(output, finish, done.prompt_tokens, done.completion_tokens, ids)
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
    except APIError as e:
        yield event("error", code=e.code, message=e.message, param=e.param)
