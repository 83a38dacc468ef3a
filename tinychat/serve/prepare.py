"""From an OpenAI request body to an engine request: chat template, limits, sampling, grammar, tools.

Everything a client can get wrong is found here, before the engine sees the request, and raised as an
APIError naming the field (HTTP 400, or 404 for an unknown model), so bad input never becomes a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tinychat.errors import UserError
from tinychat.infer.engine import Engine, GenerationRequest
from tinychat.infer.sampling import SamplingParams
from tinychat.infer.structured import Grammars
from tinychat.serve.protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat, SamplingFields


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Prepared:
    gen: GenerationRequest
    prompt_text: str  # for echo
    tools: bool  # tool calls are parsed out of the output


class Preparer:
    def __init__(self, engine: Engine, tokenizer, grammars: Grammars, model_name: str) -> None:  # noqa: ANN001
        self.engine, self.tok, self.grammars, self.model_name = engine, tokenizer, grammars, model_name

    def check_model(self, name: str) -> str:
        """The LoRA adapter a request's `model` names ("" for the base model); 404 for a name not served."""
        adapters = self.engine.adapters.served if self.engine.adapters else []
        if name == self.model_name:
            return ""
        if name in adapters:
            return name
        served = ", ".join(f"'{n}'" for n in [self.model_name, *adapters])
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves {served}.",
            param="model",
            code="model_not_found",
        )

    # ------------------------------------------------------------------ chat
    def chat(self, body: ChatCompletionRequest) -> Prepared:
        adapter = self.check_model(body.model)
        self._check_tool_results(body)
        messages = [self._message(i, m) for i, m in enumerate(body.messages)]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            ids = self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        max_new = self._budget(len(ids), body.max_completion_tokens or body.max_tokens, "messages")
        gen = GenerationRequest(ids, self._sampling(body, max_new), n=self._n(body.n), adapter=adapter)
        gen.logprobs = (body.top_logprobs or 0) if body.logprobs else None
        gen.logit_bias = self._bias(body)
        choice, fmt = body.tool_choice or "auto", body.response_format
        if fmt is not None and fmt.type != "text":
            if tools and choice not in ("auto", "none"):
                raise APIError(
                    400,
                    "response_format cannot be combined with a tool_choice that forces a call.",
                    param="response_format",
                )
            grammar = self._grammar(lambda: self._format_grammar(fmt))
            gen.constraint = self._grammar(lambda: self.grammars.constraint(grammar))
        if tools:
            if choice == "none":
                gen.banned_ids = [t for t in (self.tok.token_to_id("<tool_call>"),) if t is not None]
            else:
                gen.parse_tools = True
                if choice != "auto":
                    name = None if choice == "required" else choice.function.name  # type: ignore[union-attr]
                    many = name is None and body.parallel_tool_calls is not False
                    grammar = self._grammar(lambda: self.grammars.tool_call(tools, name, many), "tool_choice")
                    gen.constraint = self._grammar(lambda: self.grammars.constraint(grammar), "tools")
        return Prepared(gen, "", gen.parse_tools)

    def _format_grammar(self, fmt: ResponseFormat) -> str:
        if fmt.type == "json_object" or fmt.json_schema is None:
            return self.grammars.json_object()
        return self.grammars.json_schema(fmt.json_schema.schema_)

    @staticmethod
    def _check_tool_results(body: ChatCompletionRequest) -> None:
        """A tool message answers a call an earlier assistant message made (OpenAI answers 400 otherwise)."""
        asked: set[str] = set()
        for i, m in enumerate(body.messages):
            if m.role == "assistant":
                asked |= {c.id for c in m.tool_calls or [] if c.id is not None}
            elif m.role == "tool" and m.tool_call_id is not None and m.tool_call_id not in asked:
                raise APIError(
                    400,
                    f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no tool call of an earlier assistant "
                    "message.",
                    param=f"messages[{i}].tool_call_id",
                )

    @staticmethod
    def _message(i: int, m: Any) -> dict[str, Any]:
        try:
            content = m.text(f"messages[{i}]")
        except ValueError as e:
            raise APIError(400, str(e), param=f"messages[{i}].content") from None
        out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
                for c in m.tool_calls
            ]
        if m.reasoning_content is not None:
            out["reasoning_content"] = m.reasoning_content
        return out

    # ------------------------------------------------------------------ text completions
    def completion(self, body: CompletionRequest, prompt: str | list[int]) -> Prepared:
        adapter = self.check_model(body.model)
        if isinstance(prompt, str):
            ids, text = self.tok.encode(prompt), prompt
        else:
            self.check_token_ids(prompt, "prompt")
            ids, text = list(prompt), self.tok.decode(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty; give at least one token.", param="prompt")
        max_new = self._budget(len(ids), body.max_tokens, "prompt")
        gen = GenerationRequest(ids, self._sampling(body, max_new), n=self._n(body.n), logprobs=body.logprobs)
        gen.adapter = adapter
        gen.logit_bias = self._bias(body)
        return Prepared(gen, text, False)

    # ------------------------------------------------------------------ shared
    def _budget(self, n_prompt: int, max_tokens: int | None, what: str) -> int:
        ctx = self.engine.context
        if n_prompt >= ctx or (max_tokens is not None and n_prompt + max_tokens > ctx):
            if max_tokens:
                asked = f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the "
                asked += "completion)"
            else:
                asked = f"your {what} resulted in {n_prompt} tokens"
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens. However, {asked}. "
                f"Please reduce the length of the {what} or completion.",
                param=what,
                code="context_length_exceeded",
            )
        return max_tokens if max_tokens is not None else ctx - n_prompt

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Token ids a client sent must name tokens of this model's vocabulary."""
        V = self.engine.model.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise APIError(400, f"{param} holds token id {bad}, outside the vocabulary (0..{V - 1}).", param=param)

    def _n(self, n: int) -> int:
        if n > self.engine.num_slots:
            raise APIError(400, f"n must be at most {self.engine.num_slots} on this server, got {n}.", param="n")
        return n

    @staticmethod
    def _sampling(body: SamplingFields, max_new: int) -> SamplingParams:
        p = SamplingParams(
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            max_new_tokens=max_new,
            stop=body.stop_list(),
            seed=body.seed,
        )
        try:
            p.validate()
        except UserError as e:
            raise APIError(400, str(e)) from None
        return p

    def _bias(self, body: SamplingFields) -> dict[int, float] | None:
        if not body.logit_bias:
            return None
        bias = {int(k): float(v) for k, v in body.logit_bias.items()}
        self.check_token_ids(list(bias), "logit_bias")
        return bias

    @staticmethod
    def _grammar(make: Any, param: str = "response_format") -> Any:
        """Run a grammar compilation step; its failure is the client's schema's fault (400)."""
        try:
            return make()
        except UserError as e:
            raise APIError(400, str(e), param=param) from None
        except (ValueError, TypeError, RuntimeError) as e:
            raise APIError(400, f"the schema cannot be compiled: {e}.", param=param) from None
