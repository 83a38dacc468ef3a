"""A reply's leading <think> block comes back as reasoning_content, whole and streamed in any cut."""

from __future__ import annotations

import asyncio
import json

import pytest

from tinychat.infer.engine import Done
from tinychat.infer.engine.request import Delta
from tinychat.serve.app import _chat_stream
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
