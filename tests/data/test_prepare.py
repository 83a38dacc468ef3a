"""`data prepare` end to end on a messy corpus: every input unit is accounted for, PII is gone, output is
deterministic for any worker count, and outputs are written atomically."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datagen import en_doc, make_cn_id, mutate_chars, mutate_words, zh_doc

from tinychat.cli import main
from tinychat.data.prepare import PrepareConfig, prepare
from tinychat.data.readers import iter_documents
from tinychat.errors import UserError

EN_PII = {
    "email": "jane.roe@example.org",
    "phone": "+44 20 7946 0958",
    "ipv4": "203.0.113.77",
    "ipv6": "2001:db8::ff00:42:8329",
    "credit_card": "4111 1111 1111 1111",
    "cn_id": make_cn_id("44030419900101123"),
}
ZH_PII = {"phone": "13912345678", "email": "wang.wu@example.cn"}
EXPECTED = {  # documents dropped per reason by the corpus below
    "read_error": 5,
    "empty": 1,
    "lang": 1,
    "quality.words": 1,
    "quality.bullet_lines": 1,
    "quality.dup_lines": 1,
    "exact_dup": 7,
    "near_dup": 8,
}
EXPECTED_KEPT = 30 + len(EN_PII) + 20 + 1 + 3


def build_messy_corpus(root: Path) -> Path:
    rng = random.Random(99)
    web = root / "web"
    web.mkdir(parents=True)
    en = [en_doc(rng) for _ in range(30)]
    pii_docs = [en_doc(rng) + f" Contact: {value}. Thanks!" for value in EN_PII.values()]
    lines = [json.dumps({"text": d}) for d in en + pii_docs]
    lines += [json.dumps({"text": en[0]}), json.dumps({"text": en[1]})]  # exact copies
    lines += [json.dumps({"text": en[2].upper()}), json.dumps({"text": en[3].replace(" ", "   ")})]
    lines += [json.dumps({"text": "\n" + en[4] + "  \n\n"})]  # same after cleaning
    lines += [json.dumps({"text": mutate_words(en[i], rng, 1)}) for i in range(5, 10)]  # near copies
    lines += [json.dumps({"text": "\x00\x01\x02\x03\x1b\x7f"})]  # binary junk that is valid UTF-8
    raw = [line.encode("utf-8") for line in lines]
    raw.insert(7, b'{"text": "caf\xe9 in latin-1"}')  # invalid UTF-8
    raw.insert(12, b'{"text": "unterminated')  # bad JSON
    raw.insert(20, b'{"body": "wrong field"}')  # missing field
    (web / "en.jsonl").write_bytes(b"\n".join(raw) + b"\n")

    zh = [zh_doc(rng) for _ in range(20)]
    zh_rows = zh + [zh_doc(rng) + f"联系电话{ZH_PII['phone']}，邮箱{ZH_PII['email']}。"]
    zh_rows += [zh[0], zh[1]] + [mutate_chars(zh[i], rng, 2) for i in range(2, 5)]
    pq.write_table(pa.table({"text": zh_rows}), web / "zh.parquet", row_group_size=8)
    good = (web / "zh.parquet").read_bytes()
    (web / "truncated.parquet").write_bytes(good[: len(good) // 2])

    with gzip.open(web / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for _ in range(3):
            f.write(json.dumps({"text": en_doc(rng)}) + "\n")
    (web / "junk.txt").write_bytes(bytes(random.Random(5).randrange(256) for _ in range(4000)))
    (web / "short.txt").write_text("Too short to keep.", encoding="utf-8")
    fr = "Le chat est sur la table et il ne veut pas descendre, mais nous sommes patients avec lui. " * 2
    (web / "french.md").write_text(fr + en_doc(rng, 1), encoding="utf-8")
    (web / "menu.txt").write_text("\n".join(f"- {w} page" for w in en_doc(rng).split()[:60]), encoding="utf-8")
    spam = en_doc(rng, 4).split("\n")[0] + "\n" + "\n".join(["Subscribe to our newsletter for more news."] * 8)
    (web / "spam.txt").write_text(spam, encoding="utf-8")
    (web / "logo.png").write_bytes(b"\x89PNG\r\n")
    return web


def _cfg(inp: Path, out: Path, **kw) -> PrepareConfig:
    cfg = PrepareConfig(input=[inp], out=out, progress=False, workers=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_messy_corpus(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "out"
    return out, prepare(_cfg(corpus, out, workers=2))


def test_counts_add_up(prepared):
    out, st = prepared
    dropped = {r: d["docs"] for r, d in st["dropped"].items() if d["docs"]}
    assert dropped == EXPECTED
    assert st["kept"]["docs"] == EXPECTED_KEPT
    assert st["in"]["docs"] == st["kept"]["docs"] + sum(d["docs"] for d in st["dropped"].values())
    assert st["in"]["bytes"] == st["kept"]["bytes"] + sum(d["bytes"] for d in st["dropped"].values())
    assert json.loads((out / "stats.json").read_text()) == st
    assert st["languages"]["en"] >= 30 and st["languages"]["zh"] >= 20 and "fr" in st["languages"]


def test_bad_input_is_listed_with_file_and_reason(prepared):
    _, st = prepared
    listed = {
        (os.path.basename(e["source"]), e["reason"].split(" (")[0].split(" at byte")[0])
        for e in st["read_errors"]["listed"]
    }
    assert listed == {
        ("en.jsonl", "invalid UTF-8"),
        ("en.jsonl", "bad JSON"),
        ("en.jsonl", "missing field 'text'"),
        ("truncated.parquet", "corrupt or unreadable Parquet file"),
        ("junk.txt", "invalid UTF-8"),
    }
    assert st["read_errors"]["total"] == 5
    assert [os.path.basename(p) for p in st["ignored_files"]["listed"]] == ["logo.png"]
    assert st["dropped"]["read_error"]["bytes"] >= 4000  # junk.txt's size is counted


def test_pii_is_gone_and_counted(prepared):
    out, st = prepared
    texts = [d.text for d in iter_documents(out)]
    assert len(texts) == EXPECTED_KEPT
    blob = "\n".join(texts)
    for value in [*EN_PII.values(), *ZH_PII.values()]:
        assert value not in blob
    for placeholder in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<ID_NUMBER>"):
        assert placeholder in blob
    assert st["pii"]["replaced"] == {
        "cn_id": 1,
        "credit_card": 1,
        "email": 2,
        "ipv4": 1,
        "ipv6": 1,
        "phone": 2,
    }
    assert st["pii"]["docs"] == len(EN_PII) + 1
    assert "\x00" not in blob


def test_summary_is_readable(prepared):
    out, st = prepared
    text = (out / "summary.md").read_text()
    assert f"{st['in']['docs']:,} documents" in text and "near_dup" in text and "junk.txt" in text


def test_output_is_the_same_for_any_worker_count(corpus, prepared, tmp_path):
    out2, st2 = prepared
    st1 = prepare(_cfg(corpus, tmp_path / "w1", workers=1, chunk_docs=7))
    assert [d.text for d in iter_documents(tmp_path / "w1")] == [d.text for d in iter_documents(out2)]
    for key in ("in", "kept", "dropped", "pii", "languages", "read_errors", "out_bytes"):
        assert st1[key] == st2[key]


def test_steps_can_be_switched_off(corpus, tmp_path):
    cfg = _cfg(corpus, tmp_path / "o", format="jsonl")
    cfg.langid.enabled = cfg.quality.enabled = cfg.pii.enabled = cfg.dedup.near = False
    st = prepare(cfg)
    assert set(st["dropped"]) == {"read_error", "empty", "exact_dup"}
    assert st["dropped"]["exact_dup"]["docs"] == 7 and st["pii"]["replaced"] == {}
    assert (tmp_path / "o" / "part-00000.jsonl").is_file()
    assert sum(1 for _ in iter_documents(tmp_path / "o")) == st["kept"]["docs"]


def test_shards_rotate(corpus, tmp_path):
    st = prepare(_cfg(corpus, tmp_path / "o", shard_mb=0.01))
    assert len(st["shards"]) > 3
    assert sum(s["docs"] for s in st["shards"]) == st["kept"]["docs"]
    assert sum(1 for _ in iter_documents(tmp_path / "o")) == st["kept"]["docs"]


def test_atomic_output(corpus, tmp_path, monkeypatch):
    out = tmp_path / "o"
    prepare(_cfg(corpus, out))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match="not empty"):
        prepare(_cfg(corpus, out))
    import tinychat.data.prepare as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "summary", boom)
    with pytest.raises(RuntimeError):
        prepare(_cfg(corpus, out, force=True))
    assert sorted(p.name for p in out.iterdir()) == before  # the old output survived
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary directories left behind
    monkeypatch.undo()
    prepare(_cfg(corpus, out, force=True))


def test_cli(corpus, tmp_path, capsys):
    assert main(["data", "prepare", str(corpus), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert "documents" in capsys.readouterr().out
    assert main(["data", "prepare", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["data", "prepare", str(corpus), "--out", str(corpus / "inside")]) == 2
    assert main(["data", "prepare", str(corpus / "en.jsonl"), "--out", str(corpus), "--force"]) == 2
    assert "overlaps" in capsys.readouterr().err and (corpus / "en.jsonl").is_file()
