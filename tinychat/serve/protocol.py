"""The OpenAI request bodies as pydantic models: every field typed and bounded, unknown fields refused.

Why strict: a typo such as `max_token` would otherwise be ignored silently and the client would wonder
why its limit did nothing; OpenAI's own API answers 400 for an unknown argument, and so do we. Types are
strict too (pydantic strict mode): `true` is no token id and no `max_tokens` (but 2.0 is 2, as JSON has it).
Every string, at any depth, must be encodable text: JSON may carry a lone surrogate ("\\ud800") that no
tokenizer or encoder accepts.
Fields that OpenAI accepts but that change nothing here (user, metadata, store, service_tier,
parallel_tool_calls) are accepted and ignored. top_k, min_p and repetition_penalty are the vLLM
extensions most clients know.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator


def _integral(v: Any) -> Any:
    """2.0 is the number 2 in JSON, and an integer to the JSON Schema of the OpenAPI document: accept it as 2
    (true and "2" are still refused)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Int = Annotated[int, BeforeValidator(_integral)]
# Not `Int | None`: pydantic then writes a Field's bounds into the JSON schema as "ge"/"le", which no reader knows.
OptionalInt = Annotated[int | None, BeforeValidator(_integral)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None


def _encodable(v: Any) -> bool:
    """No lone surrogate in any string of v (nested lists and dicts, keys too); models check their own fields."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, dict):
        return all(_encodable(k) and _encodable(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return all(_encodable(x) for x in v)
    return True


class _Checked(BaseModel):
    @field_validator("*")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if not _encodable(v):
            raise ValueError("the text holds a lone surrogate (such as \\ud800), which is not valid Unicode")
        return v


class Strict(_Checked):
    model_config = ConfigDict(extra="forbid", strict=True)


class Lenient(_Checked):
    """Objects a client may echo back from a response (they carry extra keys such as refusal or audio)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class FunctionCallIn(Lenient):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


def _text_parts_only(schema: dict[str, Any]) -> None:
    """Say in the JSON schema what ChatMessage.text enforces with a clearer 400 than pydantic's: text parts only."""
    schema["properties"]["type"] = {"const": "text", "title": "Type"}
    schema["properties"]["text"] = {"type": "string", "title": "Text"}
    schema["required"] = ["type", "text"]


class ContentPart(Lenient):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_text_parts_only)

    type: str
    text: str | None = None


_HAS_CONTENT = {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}
_MESSAGE_RULES = {
    "if": {"properties": {"role": {"const": "assistant"}}},
    "then": {
        "anyOf": [
            _HAS_CONTENT,
            {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
            {
                "required": ["reasoning_content"],
                "properties": {"reasoning_content": {"type": "string", "minLength": 1}},
            },
        ]
    },
    "else": {**_HAS_CONTENT, "properties": {**_HAS_CONTENT["properties"], "tool_calls": {"type": "null"}}},
}


class ChatMessage(Lenient):
    """The rules the chat template enforces (tinychat.tokenizer.chat.validate_messages) are in the JSON schema too,
    so a client, or a fuzzer, reading the document learns them: tool_calls only on assistant messages, and content
    on every message but an assistant's turn that holds tool calls or reasoning only."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_MESSAGE_RULES)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self, where: str) -> str | None:
        """The content as one string; list-of-parts content may hold text parts only."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"{where}.content: only text parts are supported, got a {part.type!r} part")
            return "".join(p.text or "" for p in self.content)
        return self.content


class SamplingFields(Strict):
    """What chat and text completions share."""

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: Int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    n: Int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: OptionalInt = Field(default=None, ge=1)
    seed: OptionalInt = Field(default=None, ge=-(2**63), lt=2**63)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None,
        json_schema_extra={"propertyNames": {"pattern": "^-?[0-9]{1,20}$"}},  # token ids (_bias_keys)
    )
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k in v or {}:
            if not re.fullmatch(r"-?[0-9]{1,20}", k):
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class RagOptions(Strict):
    """tinychat's extension: answer from the server's knowledge base (serve --kb DIR); see serve/rag_routes.py."""

    k: Int = Field(default=4, ge=1, le=20)
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    min_similarity: float = Field(default=0.3, ge=-1.0, le=1.0)
    mmr: bool = False
    guard: bool = True


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: OptionalInt = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: OptionalInt = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    rag: RagOptions | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice requires tools")
        return self


def _nothing_empty(schema: dict[str, Any]) -> None:
    """Say in the JSON schema what the handlers refuse with a 400 of their own words: an empty prompt or input, as
    a string, a list, or any string or token list inside one."""
    for branch in schema["anyOf"]:
        if branch["type"] == "string":
            branch["minLength"] = 1
            continue
        branch["minItems"] = 1
        items = branch["items"]
        items.update(
            {"minLength": 1} if items["type"] == "string" else {"minItems": 1} if items["type"] == "array" else {}
        )


TextsOrIds = str | list[Int] | list[str] | list[list[Int]]


class CompletionRequest(SamplingFields):
    prompt: TextsOrIds = Field(json_schema_extra=_nothing_empty)
    max_tokens: OptionalInt = Field(default=16, ge=1)
    logprobs: OptionalInt = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: None = None
    best_of: OptionalInt = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class EmbeddingRequest(Strict):
    model: str
    input: TextsOrIds = Field(json_schema_extra=_nothing_empty)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: OptionalInt = Field(default=None, ge=1)
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        x = self.input
        if isinstance(x, str):
            return [x]
        if not x:
            raise ValueError("input must not be empty")
        if all(isinstance(v, int) for v in x):
            return [x]  # type: ignore[list-item]
        return list(x)  # type: ignore[arg-type]


class LoadAdapterRequest(Strict):
    """POST /v1/load_lora_adapter (vLLM's fields): serve the PEFT LoRA directory `lora_path` as model `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterRequest(Strict):
    """POST /v1/unload_lora_adapter: stop serving adapter `lora_name`."""

    lora_name: str = Field(min_length=1, max_length=200)
