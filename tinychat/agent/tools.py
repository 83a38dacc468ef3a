"""The agent's tool registry: Python functions in, OpenAI tool specs out, and calls that never raise.

Why schemas come from signatures: a tool is written once, as a typed function with a Google-style
docstring, and its JSON Schema (what the model sees in `tools`) cannot drift from the code that runs.
Annotations the schema cannot express are a TypeError when the tool is defined, not a surprise mid-chat.

Why `Registry.call` never raises: its answer goes back to the model as the tool message. A small model
calls tools with missing, misspelt or mistyped arguments, or names a tool that does not exist; each of
those, and any exception inside a tool, becomes a one-line "error: ..." result the model can read and
correct itself from, while the agent loop keeps running.

Coercion (documented here because it is a choice): a *top-level* argument given as a string where the
schema wants only an integer, number or boolean is converted when the string is exactly one ("3" -> 3,
"2.5" -> 2.5, "true" -> True), and an integral float for an integer (3.0 -> 3). Small models quote
numbers often and the meaning is unambiguous; anything else ("three", "3.5" for an integer) is left
alone, so schema validation reports it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, get_args, get_origin, overload

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from tinychat.errors import UserError

log = logging.getLogger(__name__)

MAX_CHARS = 8000  # a tool result longer than this is cut: it would crowd the model's context out
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the OpenAI API accepts as a function name
_SCALARS: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?):\s*$")
_ARGS_SECTION = ("Args:", "Arguments:", "Parameters:")
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class ToolError(Exception):
    """Raised inside a tool for a failure the model should read as is: the result is "error: <message>"."""


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome: the text for the tool message, whether it worked, and how long it took."""

    ok: bool
    content: str
    seconds: float


@dataclass
class Tool:
    """A callable the model may use: its name, description and JSON Schema, and the function to run.

    `on_close` releases what the tool holds (a sandbox process, say); `Registry.close` calls it.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    on_close: Callable[[], None] | None = None
    _validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1 to 64 letters, digits, '_' or '-'")
        cls = jsonschema.validators.validator_for(self.parameters, default=jsonschema.Draft202012Validator)
        cls.check_schema(self.parameters)  # a bad schema is a programming error: jsonschema.SchemaError
        self._validator = cls(self.parameters)

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool spec: what goes into a chat request's `tools` list."""
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- schemas
def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph as one line, {parameter: description} from a Google-style "Args:" section)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        summary.append(line.strip())
    params: dict[str, str] = {}
    args_indent: int | None = None
    item_indent: int | None = None
    current = ""
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped in _ARGS_SECTION:
            args_indent, item_indent, current = indent, None, ""
            continue
        if args_indent is None or not stripped:
            continue
        if indent <= args_indent:  # the next section (or plain text) ends "Args:"
            args_indent = None
            continue
        m = _ARG_LINE.match(stripped)
        if m and (item_indent is None or indent == item_indent):
            item_indent, current = indent, m[1]
            params[current] = m[2].strip()
        elif current:
            params[current] = f"{params[current]} {stripped}".strip()
    return " ".join(summary), params


def _json_type(value: Any) -> str:
    for tp, name in _SCALARS.items():
        if isinstance(value, tp):
            return name
    raise TypeError(f"enum value {value!r} is not a string, number or boolean")


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    kinds = {_json_type(v) for v in values if v is not None}
    schema: dict[str, Any] = {"enum": list(values)}
    if len(kinds) == 1:
        (kind,) = kinds
        schema["type"] = [kind, "null"] if None in values else kind
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("type"), str):
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in schema:
            out["enum"] = [*schema["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


def _schema(tp: Any, where: str) -> dict[str, Any]:
    """The JSON Schema of one annotation; TypeError for anything a model cannot send as JSON."""
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    origin, args = get_origin(tp), get_args(tp)
    if tp is list or origin is list:
        return {"type": "array", "items": _schema(args[0], where)} if args else {"type": "array"}
    if tp is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"{where}: JSON object keys are strings, so use dict[str, ...], not {tp!r}")
        return {"type": "object", "additionalProperties": _schema(args[1], where)} if args else {"type": "object"}
    if origin is Literal:
        return _enum_schema(list(args))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return _enum_schema([m.value for m in tp])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        inner = _schema(members[0], where) if len(members) == 1 else {"anyOf": [_schema(m, where) for m in members]}
        return _nullable(inner) if len(members) < len(args) else inner
    raise TypeError(
        f"{where}: unsupported annotation {tp!r}; use str, int, float, bool, list[...], dict, Literal[...], "
        "an Enum, or X | None"
    )


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _enum_class(tp: Any) -> type[Enum] | None:
    """The Enum an argument must be turned back into before the call (for `E` and `E | None`), else None."""
    for t in (tp, *get_args(tp)):
        if isinstance(t, type) and issubclass(t, Enum):
            return t
    return None


def _build(fn: Callable[..., Any], arg_docs: dict[str, str]) -> tuple[dict[str, Any], Callable[..., Any]]:
    """(parameters schema, the function to call): a wrapper only when arguments need filling or converting."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # NameError for a hint that names something undefined
        raise TypeError(f"cannot read the type hints of {fn.__name__}: {e}") from None
    props: dict[str, Any] = {}
    required: list[str] = []
    fill_none: list[str] = []  # `x: int | None` with no default: an omitted x is passed as None
    enums: dict[str, type[Enum]] = {}
    for p in inspect.signature(fn).parameters.values():
        where = f"parameter {p.name!r} of {fn.__name__}"
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise TypeError(f"{where}: tools take named arguments only (no *args, **kwargs or positional-only)")
        if p.name not in hints:
            raise TypeError(f"{where} has no type annotation")
        prop = _schema(hints[p.name], where)
        if arg_docs.get(p.name):
            prop["description"] = arg_docs[p.name]
        if p.default is not p.empty:
            default = p.default.value if isinstance(p.default, Enum) else p.default
            try:
                json.dumps(default)
            except TypeError:
                raise TypeError(f"{where}: default {p.default!r} is not JSON") from None
            prop["default"] = default
        elif _is_optional(hints[p.name]):
            fill_none.append(p.name)
        else:
            required.append(p.name)
        if enum := _enum_class(hints[p.name]):
            enums[p.name] = enum
        props[p.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required}
    schema["additionalProperties"] = False
    if not fill_none and not enums:
        return schema, fn

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind_partial(*args, **kwargs)
        for name in fill_none:
            bound.arguments.setdefault(name, None)
        for name, enum in enums.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = enum(bound.arguments[name])
        return fn(*bound.args, **bound.kwargs)

    return schema, call


@overload
def tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool: ...
@overload
def tool(
    fn: None = None, *, name: str | None = None, description: str | None = None
) -> Callable[[Callable[..., Any]], Tool]: ...
def tool(
    fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a Tool of a typed function: `@tool`, or `@tool(name="...", description="...")`.

    The description is the docstring's first paragraph, parameter descriptions come from its "Args:"
    section, and the schema from the annotations (see `_schema`). A parameter with a default, or typed
    `X | None`, is optional. The Tool stays callable like the function.
    """

    def make(f: Callable[..., Any]) -> Tool:
        summary, arg_docs = parse_docstring(f.__doc__)
        parameters, call = _build(f, arg_docs)
        return Tool(name or f.__name__, summary if description is None else description, parameters, call)

    return make if fn is None else make(fn)


# ---------------------------------------------------------------------------------------------- calls
def _types(schema: dict[str, Any] | None) -> set[str]:
    """The JSON types a (sub)schema allows, looking through anyOf/oneOf."""
    if not isinstance(schema, dict):
        return set()
    tp = schema.get("type")
    found = {tp} if isinstance(tp, str) else set(tp or ())
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, ()):
            found |= _types(sub)
    return found


def _coerce(value: Any, allowed: set[str]) -> Any:
    """The unambiguous reading of a quoted number/boolean or an integral float (see the module docstring)."""
    if isinstance(value, float) and value.is_integer() and "integer" in allowed and "number" not in allowed:
        return int(value)
    if not isinstance(value, str) or not allowed or "string" in allowed:
        return value
    s = value.strip()
    if "integer" in allowed and re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    if "number" in allowed:
        try:
            x = float(s)
            if math.isfinite(x):
                return x
        except ValueError:
            pass
    if "boolean" in allowed and s.lower() in ("true", "false"):
        return s.lower() == "true"
    return value


def _where(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: ValidationError) -> str:
    """One line naming the offending argument and what was expected."""
    where = _where(err.absolute_path)
    inside = f"{where}." if where else ""
    if err.validator == "required":
        missing = next((r for r in err.validator_value if r not in err.instance), "?")
        return f"argument '{inside}{missing}' is required"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = list(err.schema.get("properties", {}))
        extra = sorted(k for k in err.instance if k not in known)
        takes = f"; expected: {', '.join(known)}" if known else "; this takes no arguments"
        return f"unknown argument '{inside}{extra[0] if extra else '?'}'{takes}"
    if not where:
        return "arguments must be a JSON object" if err.validator == "type" else f"invalid arguments: {err.message}"
    if err.validator == "type":
        expected = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        return f"argument '{where}' must be {' or '.join(expected)}"
    if err.validator == "enum":
        return f"argument '{where}' must be one of: {', '.join(json.dumps(v) for v in err.validator_value)}"
    return f"argument '{where}': {err.message}"[:300]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "(no output)"
    if isinstance(value, dict | list | tuple | int | float | bool):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def cap(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars` characters plus a marker saying how much was left out."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}\n[... truncated: {len(text) - max_chars} more characters]"


class Registry:
    """The tools an agent may call, by name: their specs for the model, and `call` for its tool calls."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), *, max_chars: int = MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool_or_fn: Tool | Callable[..., Any]) -> Tool:
        """Register a Tool (or a typed function, made one with `tool`); a second tool of the same name is an error."""
        t = tool_or_fn if isinstance(tool_or_fn, Tool) else tool(tool_or_fn)
        if t.name in self._tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self._tools[t.name] = t
        return t

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self._tools.values()]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def call(self, name: str, arguments: str | dict[str, Any] | None) -> ToolResult:
        """Run one tool call; every failure is an ok=False result whose content starts with "error: "."""
        start = time.perf_counter()
        ok, content = self._call(name, arguments)
        return ToolResult(ok, cap(content, self.max_chars), time.perf_counter() - start)

    def _call(self, name: str, arguments: str | dict[str, Any] | None) -> tuple[bool, str]:
        t = self._tools.get(name)
        if t is None:
            return False, f"error: unknown tool {name!r}; available tools: {', '.join(self._tools) or 'none'}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else None
            except json.JSONDecodeError as e:
                return False, f"error: arguments are not valid JSON ({e.msg} at character {e.pos})"
        args = {} if arguments is None else arguments  # "", "null" and None all mean "no arguments"
        if isinstance(args, dict):
            props = t.parameters.get("properties", {})
            args = {k: _coerce(v, _types(props.get(k))) for k, v in args.items()}
        err = best_match(t._validator.iter_errors(args))
        if err is not None:
            return False, f"error: {_message(err)}"
        try:
            return True, _text(t.fn(**args))
        except (ToolError, ValueError, UserError) as e:  # the tool's own message, meant to be read
            return False, f"error: {e}"
        except Exception as e:
            log.debug("tool %s failed", name, exc_info=True)
            return False, f"error: {type(e).__name__}: {e}"

    def close(self) -> None:
        """Release what the tools hold (sandboxes); errors are logged, not raised."""
        for t in self._tools.values():
            if t.on_close is not None:
                try:
                    t.on_close()
                except Exception:
                    log.warning("closing tool %s failed", t.name, exc_info=True)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
