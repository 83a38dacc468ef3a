"""The chat format: ChatML with Qwen2.5/Hermes tool calls, as one Jinja template and one Python renderer.

Why ChatML + Hermes: it is what Qwen2.5/Qwen3 speak, so vLLM's `hermes` tool parser, llama.cpp and
transformers' apply_chat_template read our models without a custom template:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n{text}\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n{result}\\n</tool_response><|im_end|>\\n

Why two implementations of one format: the Jinja string (CHAT_TEMPLATE) travels in tokenizer_config.json
for the rest of the ecosystem; the Python renderer is what training uses, because it knows which
characters are structure and which are content. That buys two things the template cannot give:
  * special tokens come only from the structure; a user who types "<|im_end|>" gets plain bytes;
  * a loss mask that is True exactly on what the assistant must learn to produce: its content
    (including <think> and <tool_call> markup) and the closing <|im_end|>; never the
    "<|im_start|>assistant\\n" header (the generation prompt supplies it), never the "\\n" after
    <|im_end|>, never system, user or tool text.
Tests check that both produce the same string and, without look-alikes in the text, the same ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinychat.errors import UserError

if TYPE_CHECKING:
    from tinychat.tokenizer.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")

# The tool preamble Qwen2.5 writes into the system turn, word for word, so Qwen-trained habits carry over.
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
# The footer names <tool_call></tool_call> in prose; Qwen's tokenizer turns those into the special tokens,
# so ours does too (they are template text, not user text).
TOOLS_FOOTER = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
TOOLS_FOOTER_END = " XML tags:\n"
TOOLS_EXAMPLE = '\n{"name": <function-name>, "arguments": <args-json-object>}\n'

# The same format for transformers / vLLM / llama.cpp. Renders the identical string as render_parts().
# Differences from Qwen2.5's template, deliberately: no default system prompt (a tiny model cannot spare
# the tokens), function names go through tojson (a quote in a name cannot break the JSON), string
# arguments are inserted verbatim as Qwen3 does (OpenAI clients send them as JSON strings), and an
# assistant's optional reasoning_content is rendered as <think>\n...\n</think>\n\n before its content.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments " }}
    {{- "within <tool_call></tool_call> XML tags:\n" }}
    {{- "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\n' }}
        {%- if message.reasoning_content %}
            {{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}
        {%- endif %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if message.content or not loop.first %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": ' + (tool_call.name | tojson) + ', "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# One piece of a rendered conversation: (text, is_special_token, is_trained).
Part = tuple[str, bool, bool]


@dataclass
class ChatEncoding:
    """Token ids of a conversation and, per token, whether the model is trained to predict it."""

    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------------------------
# validation


def _dumps(obj: Any) -> str:
    """JSON exactly as transformers' `tojson` filter writes it (non-ASCII kept, Python's separators)."""
    return json.dumps(obj, ensure_ascii=False)


def _check_tool_call(i: int, j: int, call: Any) -> tuple[str, str]:
    """(name, rendered arguments) of one OpenAI tool call, or a UserError naming the field."""
    where = f"messages[{i}].tool_calls[{j}]"
    if not isinstance(call, dict):
        raise UserError(f"{where} must be an object with a 'function' field, got {type(call).__name__}.")
    fn = call.get("function", call)  # OpenAI nests under "function"; Qwen's template also takes it flat
    if "function" in call:
        where += ".function"
    if not isinstance(fn, dict):
        raise UserError(f"{where} must be an object with 'name' and 'arguments', got {type(fn).__name__}.")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}.name must be a non-empty string, got {name!r}.")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UserError(f"{where}.arguments must be a JSON object or a string holding one, got {args!r}.")
        return name, args  # verbatim, as the template does for strings
    if not isinstance(args, dict):
        raise UserError(f"{where}.arguments must be a JSON object or a string holding one, got {args!r}.")
    return name, _dumps(args)


def validate_messages(messages: Any, tools: Any = None) -> None:
    """Raise UserError (naming the message index and field) unless `messages` is a well-formed chat.

    Why strict: a malformed row would silently render as a different conversation than the one meant,
    and train the model on it.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise UserError("messages must be a non-empty list of {'role', 'content'} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}.")
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}.")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise UserError(f"messages[{i}].tool_calls is only allowed on assistant messages (role is {role!r}).")
        if calls is not None and not isinstance(calls, list):
            raise UserError(f"messages[{i}].tool_calls must be a list, got {type(calls).__name__}.")
        for j, call in enumerate(calls or []):
            _check_tool_call(i, j, call)
        content = m.get("content")
        if role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise UserError(f"messages[{i}].reasoning_content must be a string, got {type(reasoning).__name__}.")
            if content is None and (calls or reasoning):
                continue  # an assistant turn may be only tool calls (OpenAI sends content: null)
        if "content" not in m or content is None:
            raise UserError(f"messages[{i}].content is missing; a {role} message needs a string.")
        if not isinstance(content, str):
            raise UserError(
                f"messages[{i}].content must be a string, got {type(content).__name__} "
                "(lists of content parts are not supported)."
            )
    if tools is not None:
        if not isinstance(tools, list):
            raise UserError(f"tools must be a list of function schemas, got {type(tools).__name__}.")
        for k, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise UserError(f"tools[{k}] must be an object (an OpenAI function schema), got {tool!r}.")


# ----------------------------------------------------------------------------------------------------------
# rendering


def render_parts(
    messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False
) -> list[Part]:
    """The conversation as (text, special, trained) pieces; "".join(texts) == the Jinja template's output."""
    validate_messages(messages, tools)
    parts: list[Part] = []

    def sp(token: str, train: bool = False) -> None:
        parts.append((token, True, train))

    def tx(text: str, train: bool = False) -> None:
        if text:
            parts.append((text, False, train))

    first_is_system = messages[0]["role"] == "system"
    if tools:
        sp("<|im_start|>")
        tx("system\n" + (messages[0]["content"] + "\n\n" if first_is_system else "") + TOOLS_HEADER)
        tx("".join("\n" + _dumps(tool) for tool in tools) + TOOLS_FOOTER)
        sp("<tool_call>")
        sp("</tool_call>")
        tx(TOOLS_FOOTER_END)
        sp("<tool_call>")
        tx(TOOLS_EXAMPLE)
        sp("</tool_call>")
        sp("<|im_end|>")
        tx("\n")
    elif first_is_system:
        sp("<|im_start|>")
        tx("system\n" + messages[0]["content"])
        sp("<|im_end|>")
        tx("\n")

    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role in ("user", "system"):
            sp("<|im_start|>")
            tx(f"{role}\n" + m["content"])
            sp("<|im_end|>")
            tx("\n")
        elif role == "assistant":
            sp("<|im_start|>")
            tx("assistant\n")
            if m.get("reasoning_content"):
                sp("<think>", True)
                tx("\n" + m["reasoning_content"] + "\n", True)
                sp("</think>", True)
                tx("\n\n", True)
            content = m.get("content") or ""
            tx(content, True)
            for j, call in enumerate(m.get("tool_calls") or []):
                name, args = _check_tool_call(i, j, call)
                if content or j > 0:
                    tx("\n", True)
                sp("<tool_call>", True)
                tx('\n{"name": ' + _dumps(name) + ', "arguments": ' + args + "}\n", True)
                sp("</tool_call>", True)
            sp("<|im_end|>", True)
            tx("\n")
        else:  # tool results: consecutive ones share one user turn, as in Qwen2.5
            if i == 0 or messages[i - 1]["role"] != "tool":
                sp("<|im_start|>")
                tx("user")
            tx("\n")
            sp("<tool_response>")
            tx("\n" + m["content"] + "\n")
            sp("</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                sp("<|im_end|>")
                tx("\n")
    if add_generation_prompt:
        sp("<|im_start|>")
        tx("assistant\n")
    return parts


def render_text(
    messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False
) -> str:
    """The conversation as one string (what apply_chat_template(tokenize=False) returns)."""
    return "".join(p[0] for p in render_parts(messages, tools, add_generation_prompt))


def render_chat(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Token ids and loss mask of a conversation.

    Plain text between two special tokens is encoded as one string (special look-alikes stay plain
    text), exactly as transformers splits the rendered template at special tokens, so ids match.
    A token is trained when any of its characters belongs to trained text: only a reply that starts
    with a newline can make one token ("\\n\\n") straddle the header and the reply, and that token
    carries the reply's first character, so the model must learn it.
    """
    parts = render_parts(messages, tools, add_generation_prompt)
    # Group parts into runs of plain text separated by special tokens.
    items: list[int | tuple[str, list[tuple[int, int]]]] = []  # special id | (text, trained char spans)
    special_train: list[bool] = []
    run: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def flush() -> None:
        nonlocal run, spans, pos
        if run:
            items.append(("".join(run), spans))
        run, spans, pos = [], [], 0

    for text, special, train in parts:
        if special:
            flush()
            tid = tokenizer.token_to_id(text)
            if tid is None:
                raise UserError(f"this tokenizer has no {text} token, so it cannot encode tinychat's chat format.")
            items.append(tid)
            special_train.append(train)
        else:
            if train:
                spans.append((pos, pos + len(text)))
            run.append(text)
            pos += len(text)
    flush()

    texts = [it[0] for it in items if isinstance(it, tuple)]
    encodings = tokenizer.encode_with_offsets(texts)
    ids: list[int] = []
    mask: list[bool] = []
    enc_iter, sp_iter = iter(encodings), iter(special_train)
    for it in items:
        if isinstance(it, int):
            ids.append(it)
            mask.append(next(sp_iter))
            continue
        run_ids, offsets = next(enc_iter)
        trained = it[1]
        ids.extend(run_ids)
        mask.extend(any(s < e2 and s2 < e for s2, e2 in trained) for s, e in offsets)
    return ChatEncoding(ids, mask)


# ----------------------------------------------------------------------------------------------------------
# Jinja, for templates that are not ours (a Qwen or Llama directory) and for checking ours


def render_jinja(
    template: str,
    messages: Sequence[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **special_tokens: Any,
) -> str:
    """Render a chat template the way transformers does (sandboxed Jinja, same filters and globals)."""
    import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template refused the conversation: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template failed to render: {e}.") from None
