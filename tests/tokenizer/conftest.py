"""One tiny tokenizer per test session: trained in milliseconds on a few KB the fixture writes itself."""

import random

import pytest

from tinychat.tokenizer import Tokenizer, train_tokenizer

VOCAB = 600

_SENTENCE = "the quick brown fox jumps over the lazy dog while a tiny model learns to chat and call tools"
_EN = _SENTENCE.split()
_ZH = "今天天气很好我们一起去公园散步小模型学习说话和调用工具北京上海"
_CODE = ["def add(a, b):\n    return a + b\n", 'print("hello, world")\n', "for i in range(10):\n    x += i\n"]


def make_corpus(n_docs: int = 200, seed: int = 0) -> list[str]:
    """Mixed English, Chinese, code, numbers and emoji, so merges exist for every kind of text tested."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        words = " ".join(rng.choice(_EN) for _ in range(rng.randint(5, 15)))
        zh = "".join(rng.choice(_ZH) for _ in range(rng.randint(4, 10)))
        num = f"{rng.randint(0, 10**6)} + {rng.randint(0, 999)} = ?"
        docs.append(f"{words.capitalize()}. {zh}。 {num} 🙂\n{rng.choice(_CODE)}\n")
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def tok(corpus: list[str]) -> Tokenizer:
    return train_tokenizer(corpus, VOCAB)


@pytest.fixture(scope="session")
def saved_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_tok(saved_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved_dir))
