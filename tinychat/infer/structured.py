"""Structured output: grammars enforced token by token while decoding, with llguidance.

Why llguidance: it compiles JSON Schema (and Lark grammars) against the tokenizer's real vocabulary and
computes the set of allowed next tokens in microseconds, in Rust, without torch; it reads a
tokenizer.json directly, so any tinychat or Hugging Face tokenizer works. The engine asks a
`Constraint` for its mask before sampling each token and tells it the token afterwards, so the output
always belongs to the grammar: JSON that parses and validates when the sequence ends by itself.

Three uses, one mechanism:
  * response_format {"type": "json_object"}  -> the schema {"type": "object"};
  * response_format {"type": "json_schema"}  -> the user's schema;
  * tool_choice "required" or a named function -> <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    in exactly the format the chat template teaches (tinychat.tokenizer.chat).
JSON is written compactly with Python's separators (", " and ": "), as the training data writes it.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance as llg
import torch

from tinychat.errors import UserError

# How JSON is laid out inside a grammar: one fixed layout, the one json.dumps (and our chat template) writes.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Compiles and checks grammars for one tokenizer; builds the llguidance view of it once."""

    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:  # noqa: ANN001 - tinychat Tokenizer
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.vocab_size  # the model's (may exceed the tokenizer's)
        eos = sorted(tokenizer.stop_ids)
        self.lltok = llg.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=max(self.vocab_size, tokenizer.vocab_size), eos_token=eos
        )
        self._lock = threading.Lock()

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a byte-level token may be part of a UTF-8 character)."""
        return self.lltok.decode_bytes([token_id])

    # ------------------------------------------------------------------ grammar texts
    def json_schema(self, schema: dict[str, Any] | bool, where: str = "response_format.json_schema.schema") -> str:
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise UserError(f"{where} must be a JSON Schema object.")
        schema = {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}
        return self.check(llg.LLMatcher.grammar_from_json_schema(json.dumps(schema)), where)

    def json_object(self) -> str:
        return self.json_schema({"type": "object"}, "response_format")

    def tool_call(self, tools: list[dict[str, Any]], name: str | None = None, many: bool = True) -> str:
        """A grammar for one or more <tool_call> blocks calling `tools` (only `name` when given)."""
        options = []
        for tool in tools:
            fn = tool.get("function", tool)
            if name is not None and fn.get("name") != name:
                continue
            params = fn.get("parameters") or {"type": "object"}
            options.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": fn["name"]}, "arguments": params},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        if not options:
            raise UserError(f"tool_choice names the function {name!r}, which is not among the request's tools.")
        schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
        schema["x-guidance"] = JSON_LAYOUT
        open_, close = self._marker("<tool_call>"), self._marker("</tool_call>")
        body = f'call: {open_} "\\n" obj "\\n" {close}\nobj: %json {json.dumps(schema)}'
        start = 'start: call ("\\n" call)*' if many else "start: call"
        return self.check(llg.LLMatcher.grammar_from_lark(start + "\n" + body), "tools[].function.parameters")

    def _marker(self, text: str) -> str:
        """A special token by id when the vocabulary has it (tinychat's does), else the literal text."""
        tid = self.tokenizer.token_to_id(text)
        return f"<[{tid}]>" if tid is not None else json.dumps(text)

    def check(self, grammar: str, where: str) -> str:
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise UserError(f"{where} cannot be enforced while decoding: {messages[0] if messages else 'invalid'}.")
        return grammar

    def constraint(self, grammar: str) -> Constraint:
        with self._lock:  # the matcher builds against the shared tokenizer
            return Constraint(llg.LLMatcher(self.lltok, grammar, log_level=0), self.vocab_size, grammar)


class Constraint:
    """The grammar state of one sequence: which tokens may come next, and what came."""

    _SHIFTS = torch.arange(32, dtype=torch.int32)

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, grammar: str = "") -> None:
        self.matcher, self.vocab_size = matcher, vocab_size
        self.grammar = grammar  # its source: an engine in another process compiles it again (serve/engine_process.py)
        if matcher.is_error():
            raise UserError(f"the grammar cannot be used: {matcher.get_error()}.")

    def copy(self) -> Constraint:
        return Constraint(self.matcher.deep_copy(), self.vocab_size, self.grammar)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar (end-of-turn when it is complete)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words[:, None] >> self._SHIFTS) & 1  # (V/32, 32), little-endian bit order
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token_id: int) -> bool:
        """Take the sampled token; False if the grammar rejects it (it never should: we mask first)."""
        return self.matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more."""
        return self.matcher.is_stopped()
