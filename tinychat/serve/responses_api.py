"""OpenAI's Responses API (POST /v1/responses) on top of the chat machinery: request model, conversion, output.

A Responses request is the chat request in another dress: `instructions` is a system message, `input` a
string or a list of items (messages, the function calls the model made, their outputs), `tools` are flat
({type, name, parameters} instead of {type, function: {...}}), `max_output_tokens` is max_tokens and
`text.format` is response_format. So `to_chat` turns it into a ChatCompletionRequest and the chat path
(template, limits, tool grammars, structured output, cancellation) runs unchanged; only the answer is
shaped differently: a `response` object whose `output` lists a message item and function_call items, and,
streamed, the typed events OpenAI sends (`event:` and `data:` lines, each with a sequence_number, no [DONE]).

The server keeps no state: `previous_response_id` and `store: true` are refused with a 400 rather than
ignored, since a client relying on them would silently lose its conversation.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from tinychat.infer.engine import Done
from tinychat.infer.tool_calls import ToolCall
from tinychat.serve.prepare import APIError
from tinychat.serve.protocol import ChatCompletionRequest, Lenient, OptionalInt, Strict, Temperature, TopP


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


def _item_type(v: Any) -> str | None:
    """A message may leave out its type (OpenAI's "easy input message"); the tags' parentheses keep them out of
    the error's parameter name (app._param drops such location parts)."""
    return f"({v.get('type', 'message')})" if isinstance(v, dict) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("(message)")]
    | Annotated[FunctionCallItem, Tag("(function_call)")]
    | Annotated[FunctionCallOutputItem, Tag("(function_call_output)")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item",
        custom_error_message="an input item is an object of type message, function_call or function_call_output",
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
    with tool_calls; a function_call_output is a tool message."""
    out: list[dict[str, Any]] = []
    if body.instructions is not None:
        out.append({"role": "system", "content": body.instructions})
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1].setdefault("tool_calls", []).append(call)
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


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
    """The response object of one request: its id and creation time fixed once, the request's settings echoed."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body, self.model = body, model
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

    def final(
        self, output: list[dict[str, Any]], finish: str | None, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        cut = finish == "length"
        resp = self.head("incomplete" if cut else "completed")
        resp["incomplete_details"] = {"reason": "max_output_tokens"} if cut else None
        resp["output"] = output
        resp["usage"] = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return resp

    def response(self, choice: dict[str, Any], done: Done) -> dict[str, Any]:
        """The whole answer (a choice as app._collect gathers it): the text as one message, then the calls."""
        status = _status(choice["finish_reason"])
        out = []
        if choice["text"] or not choice["tool_calls"]:
            out.append(message_item(_id("msg"), choice["text"], status))
        out += [call_item(_id("fc"), tc, tc.arguments, status) for tc in choice["tool_calls"]]
        return self.final(out, choice["finish_reason"], done.prompt_tokens, done.completion_tokens)


def _status(finish: str | None) -> str:
    return "incomplete" if finish in ("length", "cancelled") else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """text None: the item as it opens, before its text part is added."""
    content = [] if text is None else [_text_part(text)]
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": content}


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


async def stream(b: ResponseBuilder, evs: AsyncIterator[tuple[int, Any]]) -> AsyncIterator[str]:
    """created, in_progress, then per output item added → deltas → done, and finally completed (or incomplete
    when cut by max_output_tokens) with the whole response. Text opens a message item that a tool call closes;
    a call is sent whole (the engine parses it once its block is complete), as added, one arguments delta,
    arguments done, item done. A failure mid-stream is an `error` event."""
    event = _Events()
    yield event("response.created", response=b.head("in_progress"))
    yield event("response.in_progress", response=b.head("in_progress"))
    output: list[dict[str, Any]] = []
    msg: dict[str, Any] | None = None  # the open message item
    finish, done = None, Done(0, 0)

    def close(status: str) -> list[str]:
        nonlocal msg
        assert msg is not None
        where = {"item_id": msg["id"], "output_index": len(output)}
        text = msg["content"][0]["text"]
        msg["status"] = status
        out = [
            event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
            event("response.content_part.done", **where, content_index=0, part=_text_part(text)),
            event("response.output_item.done", output_index=len(output), item=msg),
        ]
        output.append(msg)
        msg = None
        return out

    def open_message() -> list[str]:
        nonlocal msg
        msg = message_item(_id("msg"), None, "in_progress")
        where = {"item_id": msg["id"], "output_index": len(output)}
        added = event("response.output_item.added", output_index=len(output), item=msg)
        msg = {**msg, "content": [_text_part("")]}
        return [added, event("response.content_part.added", **where, content_index=0, part=_text_part(""))]

    try:
        async for _, ev in evs:
            if isinstance(ev, Done):
                done = ev
                continue
            if ev.text:
                for line in open_message() if msg is None else []:
                    yield line
                assert msg is not None
                msg["content"][0]["text"] += ev.text
                where = {"item_id": msg["id"], "output_index": len(output)}
                yield event("response.output_text.delta", **where, content_index=0, delta=ev.text, logprobs=[])
            if ev.tool_calls and msg is not None:
                for line in close("completed"):
                    yield line
            for tc in ev.tool_calls:
                item_id, k = _id("fc"), len(output)
                yield event(
                    "response.output_item.added", output_index=k, item=call_item(item_id, tc, "", "in_progress")
                )
                where = {"item_id": item_id, "output_index": k}
                yield event("response.function_call_arguments.delta", **where, delta=tc.arguments)
                yield event("response.function_call_arguments.done", **where, arguments=tc.arguments)
                output.append(call_item(item_id, tc, tc.arguments, _status(ev.finish_reason)))
                yield event("response.output_item.done", output_index=k, item=output[-1])
            finish = ev.finish_reason or finish
        if msg is None and not output:
            for line in open_message():
                yield line
        if msg is not None:
            for line in close(_status(finish)):
                yield line
        final = b.final(output, finish, done.prompt_tokens, done.completion_tokens)
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
    except APIError as e:
        yield event("error", code=e.code, message=e.message, param=e.param)
