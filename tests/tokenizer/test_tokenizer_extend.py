"""`tokenizer extend`: old ids and merges unchanged, old encodings recoverable, HF byte-level BPE files
(Llama 3 / Qwen2 shapes, specials after the vocabulary) extended, transformers opens the result."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer

from tinychat.cli import main
from tinychat.tokenizer import Tokenizer, train_tokenizer
from tinychat.tokenizer.extend import extend_tokenizer, learn_merges

EN = "the quick brown fox jumps over a lazy dog while the small model learns to chat".split()
ZH = "今天天气很好我们一起去公园散步小模型学习说话和调用工具北京上海出生于城市公司"
LLAMA3_SPLIT = (  # Llama 3's pre-tokenizer regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def english(n: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(EN) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(n)]


def chinese(n: int = 150, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    words = [ZH[i : i + 2] for i in range(0, len(ZH), 2)]
    return ["".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "。" for _ in range(n)]


def merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    return [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(tok.backend.to_str())["model"]["merges"]
    ]


def unmerge(ids: list[int], new: Tokenizer, old_vocab: dict[str, int], merges: dict[str, tuple[str, str]]) -> list[int]:
    """Split every new token back into the old tokens it was merged from."""
    out: list[int] = []

    def expand(token: str) -> None:
        if token in old_vocab:
            out.append(old_vocab[token])
        else:
            a, b = merges[token]
            expand(a)
            expand(b)

    for i in ids:
        expand(new.id_to_token(i))
    return out


@pytest.fixture(scope="module")
def extended() -> tuple[Tokenizer, Tokenizer, list]:
    old = train_tokenizer(english(), 350)
    new, merges = extend_tokenizer(old, chinese(), 60)
    return old, new, merges


def test_old_ids_and_merges_are_unchanged_and_new_ones_follow(extended):
    old, new, merges = extended
    assert len(merges) == 60 and new.vocab_size == old.vocab_size + 60
    old_vocab, new_vocab = old.backend.get_vocab(True), new.backend.get_vocab(True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert sorted(new_vocab[a + b] for a, b in merges) == list(range(old.vocab_size, new.vocab_size))
    assert merges_of(new)[: len(merges_of(old))] == merges_of(old)  # old merges first, in their order
    assert merges_of(new)[len(merges_of(old)) :] == merges
    assert new.encode("<|im_end|>") == old.encode("<|im_end|>")  # specials unchanged, still text-safe
    assert new.im_end_id == old.im_end_id and new.eot_id == old.eot_id


def test_english_tokenizes_the_same_and_new_tokens_only_join_old_ones(extended):
    old, new, merges = extended
    for text in english(40, seed=5):
        assert new.encode(text) == old.encode(text)
    table = {a + b: (a, b) for a, b in merges}
    old_vocab = old.backend.get_vocab(True)
    mixed = [*chinese(40, seed=7), "The fox 今天天气很好 in 北京. 12 + 7 = 19 🙂", "公园公园公园园"]
    for text in mixed:
        ids = new.encode(text)
        assert new.decode(ids) == text
        assert unmerge(ids, new, old_vocab, table) == old.encode(text)
    zh = "".join(chinese(40, seed=9))
    assert len(old.encode(zh)) / len(new.encode(zh)) > 2  # the point of it: far fewer tokens per character


def test_transformers_opens_the_extended_tokenizer(extended, tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    _, new, _ = extended
    new.save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(hf) == new.vocab_size
    for text in [*chinese(10, seed=3), *english(5)]:
        assert hf.encode(text, add_special_tokens=False) == new.encode(text)


def test_learn_merges_counts_incrementally_like_naive_bpe():
    words = [list("abab"), list("abc"), list("bcbc")]
    merges = learn_merges([list(w) for w in words], [3, 2, 1], 3, set("abc"))
    # (a,b) 3*2 + 2 = 8 first; then (ab,ab) 3; then ab+c and b+c tie at 2: the smaller pair wins
    assert merges == [("a", "b"), ("ab", "ab"), ("ab", "c")]
    assert learn_merges([list("ab")], [1], 5, set("ab"), min_frequency=2) == []
    again = learn_merges([list("abab")], [5], 1, {"a", "b", "ab"})
    assert again == [("b", "a")]  # (a,b) is more frequent, but "ab" is a token already: skipped


def hf_dir(tmp_path: Path, shape: str) -> Path:
    """A small tokenizer directory of the Llama 3 or Qwen2 shape: byte-level BPE, specials after the vocabulary."""
    tok = RustTokenizer(models.BPE(ignore_merges=shape == "llama3"))
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    if shape == "qwen2":
        tok.normalizer = normalizers.NFC()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(english(), trainer=trainer)
    if shape == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[2]}
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    d = tmp_path / shape
    d.mkdir()
    (d / "tokenizer.json").write_text(tok.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 2048}))
    if shape == "qwen2":  # the slow tokenizer's files a Qwen2 directory also carries
        spec = json.loads(tok.to_str())["model"]
        (d / "vocab.json").write_text(json.dumps(spec["vocab"]))
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in spec["merges"]) + "\n")
    return d


@pytest.mark.parametrize("shape", ["llama3", "qwen2"])
def test_hf_byte_level_bpe_files_are_extended_after_their_special_tokens(shape: str, tmp_path: Path, capsys):
    transformers = pytest.importorskip("transformers")
    src = hf_dir(tmp_path, shape)
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(chinese()) + "\n")
    out = tmp_path / f"{shape}-ext"
    assert (
        main(["tokenizer", "extend", "--tokenizer", str(src), "--input", str(corpus), "--add", "40", "--out", str(out)])
        == 0
    )
    assert "40 new" in capsys.readouterr().out
    old, new = Tokenizer.from_pretrained(src), Tokenizer.from_pretrained(out)
    old_vocab, new_vocab = old.backend.get_vocab(True), new.backend.get_vocab(True)
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert sorted(set(new_vocab.values()) - set(old_vocab.values())) == list(range(old.vocab_size, old.vocab_size + 40))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == json.loads((src / "tokenizer_config.json").read_text())["tokenizer_class"]
    hf = transformers.AutoTokenizer.from_pretrained(out)
    hf_old = transformers.AutoTokenizer.from_pretrained(src)
    for text in [*chinese(8, seed=4), *english(4, seed=2)]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == new.encode(text)
        assert hf.decode(ids) == text
    for text in english(20, seed=8):  # text the old tokenizer handled tokenizes the same
        assert hf.encode(text) == hf_old.encode(text)
    if shape == "qwen2":
        assert len(json.loads((out / "vocab.json").read_text())) == new.vocab_size - 3
        assert len((out / "merges.txt").read_text().splitlines()) == len(merges_of(new)) + 1


def test_bad_input_is_one_sentence(tmp_path: Path, tiny_tokenizer, capsys):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(chinese(20)) + "\n")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    word = RustTokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    (tmp_path / "wl").mkdir()
    (tmp_path / "wl" / "tokenizer.json").write_text(word.to_str())
    (tmp_path / "wl" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (
            [
                "--tokenizer",
                str(tmp_path / "tok"),
                "--input",
                str(tmp_path / "empty.txt"),
                "--out",
                str(tmp_path / "o"),
            ],
            "no text",
        ),
        (["--tokenizer", str(tmp_path / "wl"), "--input", str(corpus), "--out", str(tmp_path / "o")], "only BPE"),
        (["--tokenizer", str(tmp_path / "tok"), "--input", str(corpus), "--out", str(tmp_path / "tok")], "must differ"),
        (
            ["--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "does not exist",
        ),
        (
            ["--tokenizer", str(tmp_path / "tok"), "--input", str(corpus), "--add", "0", "--out", str(tmp_path / "o")],
            "positive",
        ),
    ]
    for args, message in cases:
        assert main(["tokenizer", "extend", *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _spanning(tok: Tokenizer, texts: list[str]) -> int:
    """Tokens of the chinese() sentences that hold whole characters of two of its two-character words.

    Only whole characters count: a byte pair learned inside a word (the last byte of one character and
    the first of the next) can still fire across an edge at encoding, joining two pieces of characters.
    """
    n = 0
    for text in texts:
        enc = tok.backend.encode(text, add_special_tokens=False)
        for (start, end), i in zip(enc.offsets, enc.ids, strict=True):
            piece = tok.decode([i])
            n += "\ufffd" not in piece and len(piece) >= 2 and start // 2 != (end - 1) // 2
    return n


def test_words_keep_new_tokens_inside_them(tmp_path: Path, capsys):
    old = train_tokenizer(english(), 350)
    old.save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(chinese()) + "\n")
    (tmp_path / "words.txt").write_text("\n".join(ZH[i : i + 2] for i in range(0, len(ZH), 2)) + "\n")
    base = ["tokenizer", "extend", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpus), "--add", "200"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "whole"), "--words", str(tmp_path / "words.txt")]) == 0
    capsys.readouterr()
    plain, whole = Tokenizer.from_pretrained(tmp_path / "plain"), Tokenizer.from_pretrained(tmp_path / "whole")
    texts = chinese(40, seed=9)
    assert _spanning(plain, texts) > 0  # without the words, BPE joins frequent neighbours
    assert _spanning(whole, texts) == 0 and whole.vocab_size > old.vocab_size
    assert main([*base, "--out", str(tmp_path / "x"), "--words", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt is not a file" in capsys.readouterr().err
