"""`tinychat data convert` on small hand-written files in each format (tests/data/instruct/), bad rows included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinychat.cli import main
from tinychat.data import convert as cv
from tinychat.data.convert import ConvertConfig, convert, split_conversation
from tinychat.data.html_md import html_to_markdown
from tinychat.errors import UserError

HERE = Path(__file__).parent / "instruct"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tmp_path: Path, fmt: str, name: str, **kw: object) -> tuple[dict, list[dict]]:
    out = tmp_path / f"{fmt}.jsonl"
    res = convert(ConvertConfig(input=HERE / name, from_=fmt, out=out, **kw))  # type: ignore[arg-type]
    return res, rows(out)


def where(res: dict) -> list[tuple[int, str]]:
    return [(int(p.where.rsplit(" ", 1)[-1]), p.kind) for p in res["problems"]]


def test_alpaca(tmp_path: Path) -> None:
    res, out = run(tmp_path, "alpaca", "alpaca.json")
    assert [r["messages"][-2]["content"] for r in out] == [
        "Give three tips for staying healthy.",
        "Translate the sentence into French.\n\nGood morning, everyone.",
        "把这句话翻译成英文。\n\n今天天气很好。",
        "Name a primary colour.",
    ]
    zh = out[2]["messages"]  # system first, then the history pair, then the row itself
    assert [m["role"] for m in zh] == ["system", "user", "assistant", "user", "assistant"]
    assert zh[1:3] == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    assert out[0]["messages"][1]["content"].startswith("1. Eat a balanced diet.\n2.")
    assert where(res) == [(8, "missing field"), (9, "wrong type"), (17, "not an object")]
    assert res["records"] == 7 and res["rows"] == 4 and res["skipped"] == 3


def test_dolly_puts_the_context_after_the_instruction(tmp_path: Path) -> None:
    res, out = run(tmp_path, "dolly", "dolly.jsonl")
    assert out[0]["messages"] == [
        {
            "role": "user",
            "content": "When did Virgin Australia start operating?\n\nVirgin Australia commenced services on 31 August "
            "2000 as Virgin Blue, with two aircraft on a single route.",
        },
        {"role": "assistant", "content": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue."},
    ]
    assert out[1]["messages"][0]["content"] == "Which is a species of fish? Tope or Rope"  # no context: no blank line
    assert where(res) == [(3, "missing field"), (4, "bad JSON")] and len(out) == 3


def test_sharegpt_cleaned_as_vicuna_did(tmp_path: Path) -> None:
    res, out = run(tmp_path, "sharegpt", "sharegpt.json")
    by_id = {r["id"]: r["messages"] for r in out}
    html = by_id["sharegpt:html1"]
    assert html[0]["content"] == "How do I add one to a number in Python?"  # the "1 / 1" counter is gone
    assert html[1]["content"] == (
        "Use the `+` operator:\n\n```python\ndef add_one(x):\n    return x + 1\n```\n\n"
        "1. **Call** it with a number.\n2. Print the result."
    )
    assert html[3]["content"] == "In Rust: `x + 1` works the same way & is just as fast."
    assert len(html) == 4  # the unanswered last question was dropped
    md = by_id["sharegpt:md2"]
    assert md[0] == {"role": "system", "content": "You are a terse assistant."}
    assert md[1]["content"] == "Is 3 < 5 true?"  # plain text with < is not parsed as HTML
    assert by_id["sharegpt:mid"] == [  # a conversation shared from its middle loses the leading reply
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is **Paris**."},
    ]
    kinds = {k for _, k in where(res)}
    assert kinds == {"roles do not alternate", "unknown role", "missing field", "too short"}
    assert [line for line, _ in where(res)] == [24, 32, 39, 40]


def test_sharegpt_block_words(tmp_path: Path) -> None:
    res, out = run(tmp_path, "sharegpt", "sharegpt.json", block_words=["python"])
    assert "sharegpt:html1" not in {r["id"] for r in out}
    assert res["skipped_by_kind"]["blocked word"] == 1


def test_oasst_flat_messages_take_the_best_ranked_path(tmp_path: Path) -> None:
    res, out = run(tmp_path, "oasst", "oasst1_messages.jsonl")
    assert out[0]["id"] == "oasst:r1"
    assert [m["content"] for m in out[0]["messages"]] == [
        "What is a llama?",
        "A llama is a domesticated South American camelid.",  # rank 0 beats the older rank-1 reply
        "Where do they live?",
        "Mostly in the Andes.",  # the rank-0 sibling is deleted
    ]
    assert out[1]["messages"][1]["content"] == "羊驼是一种南美洲的骆驼科动物。"
    assert where(res) == [(10, "no reply"), (11, "orphan message"), (12, "unknown role"), (13, "bad JSON")]


def test_oasst_lang_filter(tmp_path: Path) -> None:
    res, out = run(tmp_path, "oasst", "oasst1_messages.jsonl", lang=["zh"])
    assert [r["id"] for r in out] == ["oasst:r2"] and res["skipped_by_kind"]["language"] == 2


def test_oasst_tree_export(tmp_path: Path) -> None:
    res, out = run(tmp_path, "oasst", "oasst2_trees.jsonl")
    assert [m["content"] for m in out[0]["messages"]] == [
        "Write a haiku about rain.",
        "Soft rain on the roof / a cat asleep by the fire / the kettle hums low",
        "Now one about snow.",
        "White hush on the hills / footprints fill before morning / the world holds its breath",
    ]
    assert out[1]["messages"][1]["content"] == "The older reply."  # unranked: the oldest wins
    assert where(res) == [(2, "unusable root")]


def test_oasst_parquet_input_and_output(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = [r for r in (json.loads(x) for x in (HERE / "oasst1_messages.jsonl").read_text().splitlines()[:10])]
    src = tmp_path / "oasst.parquet"
    pq.write_table(pa.Table.from_pylist(good), src)
    out = tmp_path / "out.parquet"
    convert(ConvertConfig(input=src, from_="oasst", out=out))
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == ["oasst:r1", "oasst:r2"]
    assert got[0]["messages"][3] == {"role": "assistant", "content": "Mostly in the Andes."}


def test_split_by_characters_repeats_the_system_message() -> None:
    sys = {"role": "system", "content": "S" * 10}
    pairs = [[{"role": "user", "content": "u" * n}, {"role": "assistant", "content": "a" * n}] for n in (10, 10, 50, 5)]
    msgs = [sys] + [m for p in pairs for m in p]
    pieces, over = split_conversation(msgs, lambda m: len(m["content"]), 60)
    assert [len(p) for p in pieces] == [5, 3, 3]  # 10+20+20 | 10+100 (over, alone) | 10+10
    assert all(p[0] == sys for p in pieces) and over == 1
    assert [m for p in pieces for m in p[1:]] == msgs[1:]  # nothing lost, order kept


def test_split_by_tokens_fits_the_context(tmp_path: Path, tok_dir: Path) -> None:
    from tinychat.tokenizer import Tokenizer

    turns = []
    for k in range(12):
        turns += [{"from": "human", "value": f"Question {k}: tell me about topic {k} " * 3}]
        turns += [{"from": "gpt", "value": f"<p>Answer {k}: topic {k} is interesting, 今天天气很好。</p>" * 3}]
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"id": "long", "conversations": turns}) + "\n")
    out = tmp_path / "out.jsonl"
    res = convert(ConvertConfig(input=src, from_="sharegpt", out=out, max_tokens=200, tokenizer=tok_dir))
    tok = Tokenizer.from_pretrained(tok_dir)
    got = rows(out)
    assert res["split"] == 1 and len(got) > 2 and res["over_limit"] == 0
    assert [r["id"] for r in got] == [f"sharegpt:long#{k}" for k in range(len(got))]
    lengths = [len(tok.render_chat(r["messages"]).ids) for r in got]
    assert max(lengths) <= 200
    for a, b in zip(got, got[1:]):  # each piece is full: the next exchange would not have fitted
        assert len(tok.render_chat(a["messages"] + b["messages"][:2]).ids) > 200
    assert sum(len(r["messages"]) for r in got) == 24


def test_output_is_what_sft_reads(tmp_path: Path, tok_dir: Path) -> None:
    from tinychat.tokenizer import Tokenizer
    from tinychat.train.chat_data import encode_sft, read_rows

    _, _ = run(tmp_path, "sharegpt", "sharegpt.json")
    tok = Tokenizer.from_pretrained(tok_dir)
    convs, stats = encode_sft(tok, read_rows(tmp_path / "sharegpt.jsonl", ("messages",), "sft"), 4096)
    assert stats["conversations"] == 3 and all(any(c.mask) for c in convs)


def test_output_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("the previous good output\n")
    with pytest.raises(UserError, match="--force"):
        convert(ConvertConfig(input=HERE / "alpaca.json", from_="alpaca", out=out))

    def boom(row: object) -> list:
        raise RuntimeError("disk full")

    monkeypatch.setattr(cv, "from_dolly", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(ConvertConfig(input=HERE / "dolly.jsonl", from_="dolly", out=out, force=True))
    assert out.read_text() == "the previous good output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temporary file left behind


def test_nothing_convertible_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match="no convertible rows"):
        convert(ConvertConfig(input=HERE / "dolly.jsonl", from_="alpaca", out=out))
    assert list(tmp_path.iterdir()) == []


def test_truncated_json_array(tmp_path: Path) -> None:
    src = tmp_path / "cut.json"
    src.write_text('[\n {"instruction": "Say hi to me.", "output": "Hi!"},\n {"instruction": "Say b')
    res, out = run(tmp_path, "alpaca", str(src))
    assert len(out) == 1 and res["problems"][0].kind == "bad JSON" and res["problems"][0].where.endswith("line 3")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, errs = tmp_path / "a.jsonl", tmp_path / "errors.jsonl"
    argv = ["data", "convert", "--from", "alpaca", str(HERE / "alpaca.json"), "--out", str(out), "--errors", str(errs)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "7 records → 4 conversations → 4 chat rows" in printed
        and "alpaca.json line 17: expected a JSON object" in printed
    )
    assert [json.loads(x)["kind"] for x in errs.read_text().splitlines()] == [
        "missing field",
        "wrong type",
        "not an object",
    ]
    assert main(["data", "convert", "--from", "csv", str(HERE / "alpaca.json"), "--out", str(out)]) == 2
    assert (
        main(["data", "convert", "--from", "alpaca", str(HERE / "alpaca.json"), "--out", str(tmp_path / "x.txt")]) == 2
    )
    assert "must end in .jsonl or .parquet" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- HTML to Markdown


@pytest.mark.parametrize(
    ("html", "md"),
    [
        ("<p>a</p><p>b &lt; c</p>", "a\n\nb < c"),
        ("<h2>Title</h2><p>text <em>it</em> and <b>bold </b>word</p>", "## Title\n\ntext *it* and **bold** word"),
        ("<ul><li>one<ul><li>inner</li></ul></li><li>two</li></ul>", "- one\n\n  - inner\n- two"),
        ('<ol start="3"><li>c</li><li>d</li></ol>', "3. c\n4. d"),
        ("<p>first<p>second (unclosed p)", "first\n\nsecond (unclosed p)"),
        ("<table><tr><th>a</th><th>b|c</th></tr><tr><td>1</td></tr></table>", "| a | b\\|c |\n| --- | --- |\n| 1 |  |"),
        ('<p>see <a href="https://x.org">docs</a><br>next</p>', "see [docs](https://x.org)\nnext"),
        ("<blockquote><p>q1</p><p>q2</p></blockquote>", "> q1\n>\n> q2"),
        ("<pre><code>x = 1\n\ny = 2</code></pre>", "```\nx = 1\n\ny = 2\n```"),
        ("<p>keep_snake_case and *stars*</p>", "keep_snake_case and *stars*"),
        ("2 / 2Rewrite this", "Rewrite this"),
        ("3 / 4 of a cake", "3 / 4 of a cake"),
        ("if a < b and c > d: print(x)", "if a < b and c > d: print(x)"),
        ("```python\nCopy code\n```\nafter", "after"),
    ],
)
def test_html_to_markdown(html: str, md: str) -> None:
    assert html_to_markdown(html) == md


def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path: Path) -> None:
    src = tmp_path / "src.jsonl"
    good = json.dumps({"instruction": "Name a fruit.", "response": "A pear."}).encode()
    src.write_bytes(good + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n' + good + b"\n")
    res, out = run(tmp_path, "dolly", str(src))
    assert len(out) == 2 and where(res) == [(2, "bad UTF-8")]
