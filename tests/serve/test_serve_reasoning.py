"""A reply's leading <think> block comes back as reasoning_content (chat) or a reasoning item (Responses), whole
and streamed in any cut; sent back, it is the assistant turn's reasoning again."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tinychat.infer.engine import Done
from tinychat.infer.engine.request import Delta
from tinychat.serve import openapi, responses_api
from tinychat.serve.app import _chat_stream
from tinychat.serve.prepare import APIError
from tinychat.serve.reasoning import ReasoningSplitter, split_reasoning
from tinychat.serve.responses import Formatter
from tinychat.tokenizer.chat import render_parts

REPLY = '<think>\nIt is headquartered in Dalzan.\n</think>\n\n{"answer": "Dalzan"}'


def test_whole_replies():
    assert split_reasoning(REPLY) == ("It is headquartered in Dalzan.", '{"answer": "Dalzan"}')
    assert split_reasoning("Dalzan.") == (None, "Dalzan.")
    assert split_reasoning("It is <think>x</think> y") == (None, "It is <think>x</think> y")  # only a leading block
    assert split_reasoning("<think>\nstill thinking when the limit fell") == ("still thinking when the limit fell", "")
    assert split_reasoning("<think>\n\n</think>\n\nDalzan") == ("", "Dalzan")
    assert split_reasoning("<thi") == (None, "<thi")  # a reply that merely starts like the tag
    # "\n</think>" inside reasoning that ends with newlines keeps all but the template's one
    assert split_reasoning("<think>\na\n\n</think>\n\nb") == ("a\n", "b")


def test_the_split_inverts_the_chat_template():
    """Rendered by the template and split again, a turn gives back its fields."""
    msg = {"role": "assistant", "reasoning_content": "It is headquartered in Dalzan.", "content": "Dalzan"}
    parts = render_parts([{"role": "user", "content": "q"}, msg])
    reply = "".join(p[0] for p in parts).split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert split_reasoning(reply) == (msg["reasoning_content"], msg["content"])


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8, 13])
def test_streamed_in_any_cut_equals_the_whole(cut: int):
    for reply in (REPLY, "Dalzan.", "<think>\nno end", "<think>\na\n<b</think>c", "<", "<think>"):
        sp = ReasoningSplitter()
        pieces = [reply[i : i + cut] for i in range(0, len(reply), cut)] or [""]
        r = c = ""
        for k, piece in enumerate(pieces):
            dr, dc = sp.feed(piece, final=k == len(pieces) - 1)
            r, c = r + dr, c + dc
        whole = split_reasoning(reply)
        assert (r, c) == (whole[0] or "", whole[1]), (reply, cut)


def test_the_reasoning_never_streams_a_partial_closing_tag():
    sp = ReasoningSplitter()
    assert sp.feed("<think>\nIt is X.\n</thi") == ("It is X.", "")
    assert sp.feed("nk>\n\nX") == ("", "X")


def _chunks(deltas: list[Delta], reasoning: bool) -> list[dict]:
    async def events():
        for d in deltas:
            yield 0, d
        yield 0, Done(3, 5)

    async def run() -> list[str]:
        fmt = Formatter(None, "m", "chat")  # no logprobs asked: the grammars are not consulted
        return [c async for c in _chat_stream(fmt, 1, events(), False, reasoning)]

    out = []
    for event in asyncio.run(run()):
        data = event.removeprefix("data: ").strip()
        if data != "[DONE]":
            out.append(json.loads(data)["choices"][0]["delta"])
    return out


def test_the_chat_stream_sends_reasoning_content_apart():
    cuts = [REPLY[:9], REPLY[9:30], REPLY[30:50], REPLY[50:]]
    deltas = [Delta(0, t) for t in cuts[:-1]] + [Delta(0, cuts[-1], finish_reason="stop")]
    got = _chunks(deltas, reasoning=True)
    assert "".join(d.get("reasoning_content", "") for d in got) == "It is headquartered in Dalzan."
    assert "".join(d.get("content") or "" for d in got) == '{"answer": "Dalzan"}'
    assert not any("<think>" in (d.get("content") or "") for d in got)
    inline = _chunks(deltas, reasoning=False)  # serve --reasoning false: the reply as the model wrote it
    assert "".join(d.get("content") or "" for d in inline) == REPLY
    assert not any("reasoning_content" in d for d in inline)


# ---------------------------------------------------------------------------------------------- the Responses API
def _builder(reasoning: bool = True, **body: object) -> responses_api.ResponseBuilder:
    req = responses_api.ResponsesRequest.model_validate({"model": "m", "input": "q", **body})
    return responses_api.ResponseBuilder(req, "m", reasoning, _chars)


def _chars(ids: list[int]) -> str:  # a "tokenizer" of one token per character
    return "".join(map(chr, ids))


def _ids(text: str) -> list[int]:
    return [ord(ch) for ch in text]


def test_a_response_returns_the_reasoning_as_its_first_item():
    choice = {"text": REPLY, "token_ids": _ids(REPLY), "tool_calls": [], "finish_reason": "stop"}
    resp = _builder().response(choice, Done(3, len(REPLY)))
    openapi.ResponseObject.model_validate(resp)
    sdk = Response.model_validate(resp)
    assert [item.type for item in sdk.output] == ["reasoning", "message"]
    assert sdk.output[0].content[0].text == "It is headquartered in Dalzan." and sdk.output[0].summary == []
    assert sdk.output_text == '{"answer": "Dalzan"}'
    assert sdk.usage.output_tokens_details.reasoning_tokens == REPLY.index("</think>") + len("</think>")
    plain = _builder(reasoning=False).response(choice, Done(3, len(REPLY)))  # serve --reasoning false
    assert Response.model_validate(plain).output_text == REPLY
    assert plain["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    cut = {"text": "<think>\nIt is", "token_ids": _ids("<think>\nIt is"), "tool_calls": [], "finish_reason": "length"}
    resp = Response.model_validate(_builder().response(cut, Done(3, 13)))
    assert resp.status == "incomplete" and [(i.type, i.status) for i in resp.output] == [("reasoning", "incomplete")]
    assert resp.output[0].content[0].text == "It is" and resp.usage.output_tokens_details.reasoning_tokens == 13


def _events(builder: responses_api.ResponseBuilder, deltas: list[Delta]) -> list:
    async def events():
        for d in deltas:
            yield 0, d
        yield 0, Done(3, sum(len(d.token_ids) for d in deltas))

    async def run() -> list[str]:
        return [e async for e in responses_api.stream(builder, events())]

    parse = TypeAdapter(ResponseStreamEvent)
    return [parse.validate_python(json.loads(e.split("\ndata: ", 1)[1])) for e in asyncio.run(run())]


@pytest.mark.parametrize("cut", [1, 4, 9, 30])
def test_a_streamed_response_sends_the_reasoning_item_first(cut: int):
    pieces = [REPLY[i : i + cut] for i in range(0, len(REPLY), cut)]
    deltas = [Delta(0, p, _ids(p)) for p in pieces[:-1]] + [
        Delta(0, pieces[-1], _ids(pieces[-1]), finish_reason="stop")
    ]
    events = _events(_builder(), deltas)
    kinds = [e.type for e in events]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    assert kinds[first_text - 5 : first_text] == [
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (thought, text) == ("It is headquartered in Dalzan.", '{"answer": "Dalzan"}')
    final = events[-1].response
    assert final.status == "completed" and [i.type for i in final.output] == ["reasoning", "message"]
    assert final.output[0].content[0].text == thought and final.output_text == text
    assert events[2].item.id == final.output[0].id != final.output[1].id
    whole = _builder().response(
        {"text": REPLY, "token_ids": _ids(REPLY), "tool_calls": [], "finish_reason": "stop"}, Done(3, len(REPLY))
    )
    assert final.usage.model_dump() == Response.model_validate(whole).usage.model_dump()
    inline = _events(_builder(reasoning=False), deltas)[-1].response
    assert [i.type for i in inline.output] == ["message"] and inline.output_text == REPLY


def test_reasoning_sent_back_is_the_assistant_turns_reasoning_content():
    """A response's output items echoed in `input` render the tokens the chat messages with reasoning_content do."""
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "T."}]}
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A."}]}
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    req = responses_api.ResponsesRequest.model_validate(
        {"model": "m", "input": [{"role": "user", "content": "q"}, thought, answer, call]}
    )
    msgs = [m.model_dump(exclude_none=True) for m in responses_api.to_chat(req).messages]
    assert msgs[1]["reasoning_content"] == "T." and msgs[1]["content"] == "A." and len(msgs[1]["tool_calls"]) == 1
    alone = responses_api.ResponsesRequest.model_validate(
        {"model": "m", "input": [{"role": "user", "content": "q"}, thought, call]}
    )
    msgs = [m.model_dump(exclude_none=True) for m in responses_api.to_chat(alone).messages]
    assert msgs[1]["reasoning_content"] == "T." and msgs[1]["tool_calls"][0]["id"] == "c1"
    for bad in ([{"role": "user", "content": "q"}, thought], [thought, {"role": "user", "content": "q"}]):
        req = responses_api.ResponsesRequest.model_validate({"model": "m", "input": bad})
        with pytest.raises(APIError, match="must come right before the assistant message") as e:
            responses_api.to_chat(req)
        assert e.value.status == 400 and e.value.param == "input"
