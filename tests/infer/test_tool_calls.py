"""The streaming <tool_call> parser: same result however the text is split, invalid blocks kept as content."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.infer.text import TextTracker
from tinychat.infer.tool_calls import ToolCallParser, parse_call

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def feed(pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    p = ToolCallParser()
    text, calls = "", []
    for piece in pieces:
        t, c = p.push(piece)
        text, calls = text + t, calls + c
    t, c = p.finish()
    text, calls = text + t, calls + c
    return text, [(c.name, json.loads(c.arguments)) for c in calls]


def test_a_call_cut_by_the_token_limit_is_a_partial_call_not_markup():
    def cut(text: str) -> tuple[str, list[tuple[str, str]]]:
        p = ToolCallParser()
        t, c = p.push(text)
        t2, c2 = p.finish(truncated=True)
        return t + t2, [(x.name, x.arguments) for x in c + c2]

    assert cut('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa') == (
        "Sure.",
        [("get_weather", '{"city": "Pa')],
    )
    assert cut('<tool_call>\n{"name": "get_weather", "argu') == ("", [("get_weather", "")])
    assert cut('<tool_call>\n{"name": "get_wea') == ("", [])  # no name yet: nothing to call, nothing leaked
    assert cut('<tool_call>\n{"name": "a\\"b", "arguments": {') == ("", [('a"b', "{")])
    assert cut('<tool_call>\n{"name": "f", "arguments": {}}') == ("", [("f", "{}")])  # complete: parsed
    # without truncation (the model ended its turn) a broken block stays content
    assert feed(['<tool_call>\n{"name": "f", "argu']) == ('<tool_call>\n{"name": "f", "argu', [])


def test_content_calls_and_whitespace():
    assert feed(["Hello there.\n"]) == ("Hello there.\n", [])
    assert feed([CALL]) == ("", [("get_weather", {"city": "Paris"})])
    assert feed(["Let me check.\n" + CALL + "\n" + CALL2]) == (
        "Let me check.",
        [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})],
    )


def test_invalid_or_unclosed_blocks():
    assert feed(["a <tool_call>not json</tool_call> b"]) == ("a <tool_call>not json</tool_call> b", [])
    assert feed(['<tool_call>\n{"name": "f", "arguments": {}}']) == ("", [("f", {})])  # ended before the tag
    assert feed(['<tool_call>\n{"name": "f", "argu']) == ('<tool_call>\n{"name": "f", "argu', [])
    assert feed(["1 < 2 and <tool_ca"]) == ("1 < 2 and <tool_ca", [])  # a held-back prefix comes out at the end
    assert parse_call('{"name": "f", "arguments": "{\\"x\\": 1}"}').arguments == '{"x": 1}'
    assert parse_call('{"arguments": {}}') is None and parse_call("[1]") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_gives_the_same_result(cuts):
    text = "Sure.\n" + CALL + "\n" + CALL2 + "\nDone <tool after"
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    assert feed(pieces) == feed([text])


def test_a_chat_templates_tool_call_tokens_stream_back_into_the_call(tok):
    """The exact ids the chat format gives an assistant tool call, fed one by one through the text tracker and
    the parser (the engine's path), come back as that call."""
    msgs = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
    ]
    prefix = tok.render_chat(msgs[:1], add_generation_prompt=True).ids
    ids = tok.render_chat(msgs).ids[len(prefix) :]
    assert ids[-2] == tok.im_end_id  # ...</tool_call><|im_end|>\n
    tracker, parser = TextTracker(tok, []), ToolCallParser()
    text, calls = "", []
    for t in ids[:-2]:  # the engine stops at <|im_end|>
        piece, new = parser.push(tracker.push(t))
        text, calls = text + piece, calls + new
    piece, new = parser.push(tracker.finish())
    tail, last = parser.finish()
    text, calls = text + piece + tail, calls + new + last
    assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
