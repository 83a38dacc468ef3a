"""`tinychat tokenizer train` end to end on every input format, and every input mistake."""

import gzip
import json

import pytest

from tinychat.cli import main
from tinychat.tokenizer import Tokenizer
from tinychat.tokenizer.train import (
    TokenizerTrainConfig,
    _read,
    _Stats,
    _words_pattern,
    train_tokenizer,
    word_pieces,
)


def write_inputs(root, corpus):
    """One file of each format (plus broken input); returns (directory, number of good documents)."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    root.mkdir()
    (root / "a.txt").write_text("".join(corpus[:50]), encoding="utf-8")
    (root / "b.md").write_text("# Notes\n\n" + "".join(corpus[50:60]), encoding="utf-8")
    sub = root / "nested" / "deeper"
    sub.mkdir(parents=True)
    lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(corpus[60:100])]
    lines.insert(3, "{not json")  # bad line
    lines.insert(7, json.dumps({"body": "no text field"}))  # bad line
    lines.insert(9, "")  # blank: ignored silently
    (sub / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(sub / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in corpus[100:150]:
            f.write(json.dumps({"text": t}) + "\n")
    pq.write_table(pa.table({"text": corpus[150:200], "n": list(range(50))}), root / "nested" / "e.parquet")
    (root / "bad.txt").write_bytes(b"caf\xe9 latin-1 is not UTF-8")  # skipped with a warning
    (root / "README.rst").write_text("ignored: unknown suffix inside a directory")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("ignored: hidden directory")
    return root, 1 + 1 + 40 + 50 + 50


def test_cli_trains_on_every_format(tmp_path, corpus, capsys):
    src, n_docs = write_inputs(tmp_path / "in", corpus)
    out = tmp_path / "out"
    rc = main(["tokenizer", "train", "--input", str(src), "--vocab-size", "500", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"on {n_docs} documents" in captured.out and "3 skipped" in captured.out
    assert captured.err.count("warning: skipped") == 4  # three bad inputs + the total
    assert "c.jsonl:3" in captured.err and "bad.txt" in captured.err
    assert "skipped 3 unreadable files, lines or rows in total" in captured.err
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == 500
    text = corpus[7] + "<|im_end|>"
    assert tok.decode(tok.encode(text)) == text


def test_cli_text_field_files_and_max_bytes(tmp_path, corpus, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps({"content": t}) for t in corpus[:40]) + "\n")
    other = tmp_path / "more.md"
    other.write_text("".join(corpus[40:80]))
    out = tmp_path / "out"
    argv = ["tokenizer", "train", "--input", str(src), str(other), "--text-field", "content", "--out", str(out)]
    assert main([*argv, "--vocab_size", "300", "--max-bytes", "2000"]) == 0
    assert "(0.00 MB, 2 files, 0 skipped)" in capsys.readouterr().out
    assert Tokenizer.from_pretrained(out).vocab_size == 300


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
    paths = []
    for i, t in enumerate(["aaaa", "你好世界", "never read"]):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(t, encoding="utf-8")
    stats = _Stats()
    assert list(_read(paths, "text", 10, stats)) == ["aaaa", "你好"]
    assert stats.bytes == 10 and stats.docs == 2


def test_chat_input_puts_the_rendered_conversations_in_the_corpus(tmp_path, corpus, capsys):
    """Chat rows count as documents (their template text, no special tokens); a bad row is skipped with its
    line number; the schema a tool row repeats ends up as far fewer tokens than prose alone gives it."""
    from tinychat.world.arith import CALCULATOR_TOOL

    prose = tmp_path / "prose.txt"
    prose.write_text("".join(corpus[:60]), encoding="utf-8")
    row = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    lines = [json.dumps({**row, "tools": [CALCULATOR_TOOL]})] * 40 + ['{"no": "messages"}']
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["tokenizer", "train", "--input", str(prose), "--vocab-size", "600"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--chat-input", str(chat), "--out", str(tmp_path / "chat")]) == 0
    out, err = capsys.readouterr()
    assert "on 41 documents" in out.splitlines()[-1] and "1 skipped" in out.splitlines()[-1]  # 1 prose file + 40 rows
    assert f"{chat} line 41" in err
    plain, with_chat = (Tokenizer.from_pretrained(tmp_path / d) for d in ("plain", "chat"))
    text = json.dumps(CALCULATOR_TOOL)
    assert len(with_chat.encode(text)) < 0.6 * len(plain.encode(text))
    stats = _Stats()
    from tinychat.tokenizer.train import _read_chat

    texts = list(_read_chat([chat], stats))
    assert len(texts) == 40 and stats.skipped == 1
    assert "<|im_start|>" not in texts[0] and "What is 2 + 3?" in texts[0] and "calculator" in texts[0]


def test_word_pieces_cut_only_where_a_word_touches_a_non_space():
    pat = _words_pattern(["塞敦赞·达仁", "编织", "art", "织"])
    text = "。塞敦赞·达仁总是喜欢编织。 I like art. A party, art"
    pieces = list(word_pieces(text, pat))
    assert "".join(pieces) == text  # nothing lost or added
    assert pieces == ["。", "塞敦赞·达仁", "总是喜欢", "编织", "。 I like art", ". A party, art"]
    assert list(word_pieces("", pat)) == [] and list(word_pieces("编织", pat)) == ["编织"]


def _crossing(tok, text: str, words: list[str]) -> int:
    """How many occurrences of `words` in `text` share a token with a neighbour (an edge inside a token)."""
    enc = tok.backend.encode(text, add_special_tokens=False)
    edges = {o for span in enc.offsets for o in span}
    pat = _words_pattern(words)
    return sum(not (m.start() in edges and m.end() in edges) for m in pat.finditer(text))


def test_whole_words_are_never_fused_with_their_neighbours():
    names, values = ["塞敦赞·达仁", "米莉", "霍瓦"], ["编织", "击剑", "陶艺"]
    templates = ["。{n}总是喜欢{v}。", "{n}的爱好是{v}，", "空闲的时候，{n}热爱{v}。"]
    docs = [t.format(n=n, v=v) for t in templates for n in names for v in values] * 20
    text = "".join(docs)
    plain = train_tokenizer(docs, 400)
    whole = train_tokenizer(docs, 400, words=names + values)
    assert _crossing(plain, text, names + values) > 0  # the fusion the option exists for
    assert _crossing(whole, text, names + values) == 0
    assert whole.decode(whole.encode(text)) == text
    assert whole.encode("编织") == whole.encode("总是喜欢编织")[-len(whole.encode("编织")) :]


def test_cli_words_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("空闲的时候，米莉总是喜欢编织。\n" * 50, encoding="utf-8")
    (tmp_path / "words.txt").write_text("米莉\n\n 编织 \n", encoding="utf-8")
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"),
               "--vocab-size", "300", "--words", str(tmp_path / "words.txt")])  # fmt: skip
    assert rc == 0 and "2 whole words" in capsys.readouterr().out
    tok = Tokenizer.from_pretrained(tmp_path / "o")
    assert _crossing(tok, "空闲的时候，米莉总是喜欢编织。", ["米莉", "编织"]) == 0


def test_config_defaults():
    cfg = TokenizerTrainConfig()
    assert (cfg.input, cfg.vocab_size, cfg.out, cfg.text_field, cfg.max_bytes) == ([], 8192, "", "text", None)


@pytest.mark.parametrize(
    "make_argv,pattern",
    [
        (lambda t: ["--input", str(t / "missing.txt"), "--out", str(t / "o")], "missing.txt does not exist"),
        (lambda t: ["--input", str(t / "empty"), "--out", str(t / "o")], "no input files"),
        (lambda t: ["--input", str(t / "notes.rst"), "--out", str(t / "o")], "notes.rst has an unknown format"),
        (lambda t: ["--input", str(t / "broken.txt"), "--out", str(t / "o")], "no text could be read"),
        (lambda t: ["--out", str(t / "o")], "--input is required"),
        (lambda t: ["--input", str(t / "ok.txt")], "--out is required"),
        (lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--vocab-size", "100"], "at least 272"),
        (lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--max-bytes", "0"], "must be positive"),
        (lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--vocab", "300"], "unknown option"),
        (
            lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--chat-input", str(t / "nochat.jsonl")],
            "nochat.jsonl is not a file",
        ),
        (
            lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--words", str(t / "no.txt")],
            "no.txt is not a file",
        ),
        (
            lambda t: ["--input", str(t / "ok.txt"), "--out", str(t / "o"), "--words", str(t / "broken.txt")],
            "not UTF-8",
        ),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(tmp_path, capsys, make_argv, pattern):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.rst").write_text("x")
    (tmp_path / "broken.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "ok.txt").write_text("fine text")
    rc = main(["tokenizer", "train", *make_argv(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and pattern in last
    assert not (tmp_path / "o").exists()


def test_cli_help(capsys):
    assert main(["tokenizer", "train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--vocab_size", "--out", "--text_field", "--max_bytes"):
        assert flag in out
