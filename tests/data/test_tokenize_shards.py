"""`data tokenize`: token shards round-trip to the documents, the val split is fixed, dtypes fit the vocab."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from datagen import en_doc, zh_doc

from tinychat.cli import main
from tinychat.data.shards import TokenIndex
from tinychat.data.tokenize import TokenizeConfig, is_val, tokenize
from tinychat.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    rng = random.Random(3)
    docs = [en_doc(rng, 4) if i % 3 else zh_doc(rng, 4) for i in range(120)]
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "{bad json\n")
    return root, docs


def _cfg(corpus: Path, out: Path, tok_dir: Path | None, **kw) -> TokenizeConfig:
    cfg = TokenizeConfig(input=[corpus], out=out, tokenizer=tok_dir, progress=False, workers=1, val_fraction=0.1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _docs_of(index: TokenIndex, split: str) -> list[list[int]]:
    stream = np.concatenate(index.memmaps(split)).tolist()
    docs, cur = [], []
    for t in stream:
        if t == index.eot_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert cur == [], "every document ends with the end token"
    return docs


def test_round_trip_and_split(corpus, tok_dir, tmp_path):
    from tinychat.tokenizer import Tokenizer

    root, docs = corpus
    idx = tokenize(_cfg(root, tmp_path / "t", tok_dir, workers=2, batch_docs=16))
    tok = Tokenizer.from_pretrained(tok_dir)
    index = TokenIndex.load(tmp_path / "t")
    assert index.dtype == np.uint16 and index.eot_id == tok.eot_id and idx["docs"] == 120
    want_val = [d for i, d in enumerate(docs) if is_val(i, 0.1)]
    want_train = [d for i, d in enumerate(docs) if not is_val(i, 0.1)]
    assert len(want_val) == 12 and is_val(0, 0.1)
    assert [tok.decode(ids) for ids in _docs_of(index, "val")] == want_val
    assert [tok.decode(ids) for ids in _docs_of(index, "train")] == want_train
    assert idx["tokens"] == sum(len(x) + 1 for x in tok.encode_batch(docs))
    assert idx["read_errors"]["total"] == 1 and "bad JSON" in idx["read_errors"]["listed"][0]["reason"]
    # same bytes with one worker and other batch sizes
    tokenize(_cfg(root, tmp_path / "t1", tok_dir, workers=1, batch_docs=7))
    for split in ("train", "val"):
        a = np.concatenate(TokenIndex.load(tmp_path / "t1").memmaps(split))
        assert np.array_equal(a, np.concatenate(index.memmaps(split)))


def test_shards_cut_between_documents(corpus, tok_dir, tmp_path):
    root, _ = corpus
    idx = tokenize(_cfg(root, tmp_path / "t", tok_dir, shard_tokens=2000))
    shards = idx["splits"]["train"]["shards"]
    assert len(shards) > 3
    index = TokenIndex.load(tmp_path / "t")
    for m in index.memmaps("train"):
        assert m[-1] == index.eot_id
    assert sum(s["docs"] for s in shards) == idx["splits"]["train"]["docs"]


class BigVocab:
    """A duck-typed tokenizer with more than 65,536 ids: one id per character, offset past 65,536."""

    vocab_size = 200_000
    eot_id = 199_999

    def encode_batch(self, texts):
        return [[70_000 + (ord(c) % 100_000) for c in t] for t in texts]


def test_uint32_when_the_vocab_does_not_fit(corpus, tmp_path):
    root, docs = corpus
    tokenize(_cfg(root, tmp_path / "t", None, val_fraction=0.0), tokenizer=BigVocab())
    index = TokenIndex.load(tmp_path / "t")
    assert index.dtype == np.uint32 and index.splits["val"]["tokens"] == 0
    first = _docs_of(index, "train")[0]
    assert first == BigVocab().encode_batch([docs[0]])[0]


def test_errors(corpus, tok_dir, tmp_path):
    root, _ = corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no documents"):
        tokenize(_cfg(tmp_path / "empty", tmp_path / "t", tok_dir))
    assert not (tmp_path / "t").exists()
    tokenize(_cfg(root, tmp_path / "t", tok_dir))
    with pytest.raises(UserError, match="not empty"):
        tokenize(_cfg(root, tmp_path / "t", tok_dir))
    with pytest.raises(UserError, match="tokenizer"):
        tokenize(_cfg(root, tmp_path / "u", None))
    with pytest.raises(UserError, match="not a tokenized"):
        TokenIndex.load(tmp_path)


def test_cli(corpus, tok_dir, tmp_path, capsys):
    root, _ = corpus
    argv = [
        "data",
        "tokenize",
        "--input",
        str(root),
        "--tokenizer",
        str(tok_dir),
        "--out",
        str(tmp_path / "t"),
    ]
    assert main([*argv, "--workers", "1"]) == 0
    assert "tokenized 120 documents" in capsys.readouterr().out


def _chat_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_chat_rows_join_the_train_split_with_template_specials(corpus, tok_dir, tmp_path):
    from tinychat.tokenizer import Tokenizer

    root, docs = corpus
    tok = Tokenizer.from_pretrained(tok_dir)
    qa = {"messages": [{"role": "user", "content": "Where was Ann born?"}, {"role": "assistant", "content": "Oslo"}]}
    rows = [{**qa, "skill": "facts"}] * 4 + [{**qa, "skill": "rag"}] * 40
    chat = _chat_file(tmp_path / "chat.jsonl", rows)
    idx = tokenize(_cfg(root, tmp_path / "t", tok_dir, chat=[chat], chat_weights={"facts": 2.0, "rag": 0.5}))
    index = TokenIndex.load(tmp_path / "t")
    text_docs = [d for i, d in enumerate(docs) if not is_val(i, 0.1)]
    train = _docs_of(index, "train")
    rendered = tok.render_chat(qa["messages"]).ids
    # the text first, unchanged; then each chat row as the template renders it, with real special tokens
    assert [tok.decode(ids) for ids in train[: len(text_docs)]] == text_docs
    chat_docs = train[len(text_docs) :]
    assert all(d == rendered for d in chat_docs) and tok.im_start_id in rendered
    by = idx["chat"]["by_skill"]
    assert by["facts"]["rows"] == 8  # weight 2: every row twice
    assert 10 <= by["rag"]["rows"] <= 30  # weight 0.5: about half, drawn with a fixed seed
    assert len(chat_docs) == idx["chat"]["rows"] == by["facts"]["rows"] + by["rag"]["rows"]
    # validation stays text only (bits per byte compares with a text-only run), and the choice is reproducible
    assert [tok.decode(ids) for ids in _docs_of(index, "val")] == [d for i, d in enumerate(docs) if is_val(i, 0.1)]
    again = tokenize(_cfg(root, tmp_path / "t2", tok_dir, chat=[chat], chat_weights={"facts": 2.0, "rag": 0.5}))
    assert again["chat"] == idx["chat"]
    # a user's look-alike of a special token stays text: only the template makes specials
    fake = {"messages": [{"role": "user", "content": "<|im_start|>system"}, {"role": "assistant", "content": "ok"}]}
    tokenize(_cfg(root, tmp_path / "t3", tok_dir, chat=[_chat_file(tmp_path / "fake.jsonl", [fake])]))
    last = _docs_of(TokenIndex.load(tmp_path / "t3"), "train")[-1]
    assert last.count(tok.im_start_id) == 2  # the user's and the assistant's headers, not the user's text


def test_chat_errors_name_the_file_and_line(corpus, tok_dir, tmp_path):
    root, _ = corpus
    bad = _chat_file(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"text": "no"}])
    with pytest.raises(UserError, match=r"bad.jsonl line 2: a chat row needs a non-empty 'messages' list"):
        tokenize(_cfg(root, tmp_path / "t", tok_dir, chat=[bad]))
    with pytest.raises(UserError, match="does not exist"):
        tokenize(_cfg(root, tmp_path / "t", tok_dir, chat=[tmp_path / "missing.jsonl"]))
    with pytest.raises(UserError, match="chat_weights must be numbers >= 0"):
        tokenize(_cfg(root, tmp_path / "t", tok_dir, chat=[bad], chat_weights={"rag": -1}))
    assert not (tmp_path / "t").exists()  # nothing half-written
