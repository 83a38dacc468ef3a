"""Chat data for post-training: loss masks after packing, the packer, the batch schedule, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from post_helpers import assistant, user, write_jsonl

from tinychat.errors import UserError
from tinychat.train.chat_data import Schedule, encode_pairs, encode_sft, pack, read_rows, sft_batch, sft_rows

CALL = {"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def conversations() -> list[dict]:
    return [
        {"messages": [user("hi"), assistant("hello there")]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user("2 + 3?"),
                assistant("5"),
                user("and 4?"),
                assistant("9"),
            ]
        },
        {
            "messages": [
                user("add 2 and 3"),
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c0", "content": "5"},
                assistant("It is 5."),
            ],
            "tools": TOOLS,
        },
        {"messages": [user("why?"), {"role": "assistant", "content": "because", "reasoning_content": "think"}]},
        {"messages": [user("short"), assistant("ok")]},
    ] * 3


def test_mask_covers_exactly_the_assistant_tokens_after_packing(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [(f"row {i}", r) for i, r in enumerate(conversations())]
    convs, stats = encode_sft(tok, rows, 10_000)
    assert stats["conversations"] == len(rows) and not stats["truncated"]
    seq_len = max(len(c.ids) for c in convs) * 2
    packed = sft_rows(convs, seq_len, packed=True)
    assert len(packed) < len(convs)  # several conversations share a row
    x, y = sft_batch(convs, packed, tok.pad_id, seq_len)
    assert x.shape == y.shape == (len(packed), seq_len)
    for b, row in enumerate(packed):
        off, expected_x, expected_y = 0, [], []
        for i in row:
            c = convs[i]
            expected_x += c.ids
            expected_y += [t if m else -100 for t, m in zip(c.ids, c.mask)]
            off += len(c.ids)
        assert x[b, : off - 1].tolist() == expected_x[:-1]
        assert y[b, : off - 1].tolist() == expected_y[1:]  # position t predicts token t+1, iff it is the assistant's
        assert set(y[b, off - 1 :].tolist()) == {-100} and set(x[b, off:].tolist()) <= {tok.pad_id}
    # what is trained, decoded: every assistant reply with its <|im_end|>, and nothing any other role said
    for c in convs:
        trained = tok.decode([t for t, m in zip(c.ids, c.mask) if m])
        untrained = tok.decode([t for t, m in zip(c.ids, c.mask) if not m])
        assert "user" not in trained and "system" not in trained and "<tool_response>" not in trained
        assert trained.endswith("<|im_end|>") and "<|im_start|>" not in trained
        assert "assistant\n" in untrained  # the header comes from the generation prompt, never trained
    tool_conv = tok.decode([t for t, m in zip(convs[2].ids, convs[2].mask) if m])
    assert "<tool_call>" in tool_conv and '"name": "add"' in tool_conv and "It is 5." in tool_conv


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=80), st.integers(50, 120))
def test_packing_places_every_item_once_within_capacity(lengths: list[int], capacity: int):
    bins = pack(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) <= -(-2 * sum(lengths) // capacity) + 1  # best fit never wastes more than half a bin


def test_schedule_global_batch_is_the_same_whatever_the_split():
    def global_items(per_micro: int, accum: int, world: int, step: int) -> list[int]:
        out = []
        for rank in range(world):
            s = Schedule(37, per_micro, accum, world, rank, seed=3)
            out += [i for m in range(accum) for i in s.items(step, m)]
        return sorted(out)

    for step in range(5):  # crosses epoch boundaries (37 items, 12 per step)
        assert global_items(12, 1, 1, step) == global_items(3, 2, 2, step) == global_items(6, 1, 2, step)
    s = Schedule(37, 12, 1, 1, 0, seed=3)
    first_epoch = [i for step in range(3) for i in s.items(step, 0)] + s.items(3, 0)[:1]
    assert sorted(first_epoch) == list(range(37))


def test_bad_rows_name_the_file_and_line(tmp_path: Path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("a")], "answer": "1"}, {"messages": [user("b")]}])
    with pytest.raises(UserError, match=r"d\.jsonl line 2: field 'answer' is missing \(grpo rows need"):
        read_rows(f, ("messages", "answer"), "grpo")
    f.write_text('{"messages": []}\n\n{"messages": [\n')
    with pytest.raises(UserError, match=r"d\.jsonl line 3 is not valid JSON"):
        read_rows(f, ("messages",), "sft")
    f.write_text(json.dumps(["not", "an", "object"]) + "\n")
    with pytest.raises(UserError, match=r"line 1 must be a JSON object"):
        read_rows(f, ("messages",), "sft")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "c", "rejected": None}]), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p\.parquet row 1: field 'rejected' is missing"):
        read_rows(tmp_path / "p.parquet", ("prompt", "chosen", "rejected"), "dpo")
    with pytest.raises(UserError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl", ("messages",), "sft")


def test_malformed_messages_and_string_pairs(tiny_tokenizer, tmp_path: Path):
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [{"messages": [user("a"), assistant("b")]}, {"messages": [{"role": "robot", "content": "x"}]}],
    )
    with pytest.raises(UserError, match=r"s\.jsonl line 2: messages\[0\]\.role must be one of"):
        encode_sft(tiny_tokenizer, read_rows(f, ("messages",), "sft"), 100)
    # preference rows may hold plain strings (TRL's format): a user prompt and assistant replies
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2 =", "chosen": "4", "rejected": "5"}])
    (pair,), skipped = encode_pairs(tiny_tokenizer, read_rows(f, ("prompt", "chosen", "rejected"), "dpo"), 100)
    assert skipped == 0 and pair.chosen[-1] == tiny_tokenizer.im_end_id
    assert tiny_tokenizer.decode([t for t, m in zip(pair.chosen, pair.chosen_mask) if m]) == "4<|im_end|>"
