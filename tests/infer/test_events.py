"""Coalescing a consumer's backlog of engine events (request.coalesce, Delta.then): fewer chunks, same stream."""

from __future__ import annotations

from tinychat.infer.engine import Delta, Done, TokenLogprob, coalesce
from tinychat.infer.tool_calls import ToolCall


def lp(t: int) -> TokenLogprob:
    return TokenLogprob(t, -0.5, [(t, -0.5)])


def test_a_choices_deltas_merge_in_order_and_done_stays_last():
    evs = [
        ("a", Delta(0, "He", [1], [lp(1)])),
        ("a", Delta(1, "Yo", [7])),  # another choice of the same request
        ("b", Delta(0, "x", [3])),  # another request
        ("a", Delta(0, "llo", [2], [lp(2)])),
        ("a", Delta(1, "!", [8], finish_reason="stop")),
        ("a", Delta(0, "", [], finish_reason="length")),
        ("a", Done(5, 5)),
        ("b", Delta(0, "y", [4])),
    ]
    out = coalesce(evs)
    assert [(k, type(e).__name__) for k, e in out] == [("a", "Delta"), ("a", "Delta"), ("b", "Delta"), ("a", "Done")]
    first, other, b = out[0][1], out[1][1], out[2][1]
    assert (first.index, first.text, first.token_ids, first.finish_reason) == (0, "Hello", [1, 2], "length")
    assert [x.token_id for x in first.logprobs] == [1, 2]
    assert (other.text, other.token_ids, other.finish_reason) == ("Yo!", [7, 8], "stop")
    assert (b.text, b.token_ids) == ("xy", [3, 4])
    # what each (request, choice) receives, read in order, is unchanged
    for key, index in [("a", 0), ("a", 1), ("b", 0)]:

        def stream(events):
            ds = [e for k, e in events if k == key and isinstance(e, Delta) and e.index == index]
            return "".join(d.text for d in ds), sum((d.token_ids for d in ds), []), ds[-1].finish_reason

        assert stream(out) == stream(evs)
    assert evs[0][1].text == "He"  # the engine's own deltas are not modified


def test_nothing_merges_after_a_finish_or_tool_calls():
    call = ToolCall("add", '{"a": 1}', "c1")
    evs = [
        (0, Delta(0, "a", [1], tool_calls=[call])),  # tool-call chunks go before any later text
        (0, Delta(0, "b", [2])),
        (0, Delta(0, "c", [3])),
        (1, Delta(0, "x", [4], finish_reason="stop")),  # a finished choice takes nothing after it
        (1, Delta(0, "late", [5])),
    ]
    out = coalesce(evs)
    assert [(k, e.text) for k, e in out] == [(0, "a"), (0, "bc"), (1, "x"), (1, "late")]
    assert out[0][1].tool_calls == [call] and out[1][1].tool_calls == []
    assert Delta(0, "a").then(Delta(1, "b")) is None  # different choices never merge


def test_non_delta_items_pass_through_in_place():
    reply = ("reply", 3, None, None)  # the engine process's pipe carries replies among the events
    evs = [(None, reply), (3, Delta(0, "a", [1])), (None, reply), (3, Delta(0, "b", [2]))]
    out = coalesce(evs)
    assert out == [(None, reply), (3, Delta(0, "ab", [1, 2])), (None, reply)]
