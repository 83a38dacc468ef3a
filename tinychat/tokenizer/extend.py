"""Extend a byte-level BPE tokenizer with new tokens:
`tinychat tokenizer extend --tokenizer DIR --input CORPUS --add N --out DIR`.

Why: a tokenizer trained on English spends three byte tokens on every Chinese character, so a model
built on it reads and writes Chinese slowly and sees little of it per context window. Chinese-LLaMA
fixed this by adding 20k Chinese tokens to LLaMA's vocabulary and continuing pretraining.

How, and why this way: BPE training is *continued* on the new corpus instead of training a second
tokenizer and merging vocabularies. The corpus is pre-tokenized and encoded with the old merges; then
the most frequent adjacent pair is merged, N times, exactly as BPE training does. Each new token is
appended after every existing id and its merge after every existing merge. So:
  * every old id and every old merge is unchanged (an old model's embedding rows keep their meaning);
  * the old merges, having lower ranks, are all applied first: a new token only ever joins what the old
    tokenizer would have produced, so un-merging the new tokens of any encoding gives the old encoding
    exactly, and text without the new pairs (English, here) tokenizes identically;
  * a pair whose merged string is already a token is never added (that would create a second route to
    an old token and let old merges fire on top of new ones).
With `--words FILE` (names and terms, one per line), the new merges never cross a listed word's edge, as in
`tokenizer train --words`: Chinese-LLaMA added whole Chinese *words*, not the character runs BPE would fuse
across them. The old merges are kept as they are, so only the new tokens respect the words.
Works on tinychat's tokenizers and on Hugging Face byte-level BPE tokenizer.json files of the Llama 3 /
Qwen2 / GPT-2 shape, whose special tokens sit after the vocabulary: new ids then start after them.
"""

from __future__ import annotations

import heapq
import itertools
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from tinychat.config import field
from tinychat.data.readers import expand_paths
from tinychat.errors import UserError
from tinychat.tokenizer.tokenizer import Tokenizer
from tinychat.tokenizer.train import _read, _Stats, read_words, split_at_words

Pair = tuple[str, str]


@dataclass
class TokenizerExtendConfig:
    tokenizer: str = field("", help="tokenizer directory to extend (tinychat's, or a Hugging Face byte-level BPE one)")
    input: list[str] = field([], help="text files or directories of the new language (.txt .md .jsonl .parquet)")
    add: int = field(1000, help="number of new tokens to learn (fewer if the corpus runs out of frequent pairs)")
    out: str = field("", help="directory to write the extended tokenizer into")
    min_frequency: int = field(2, help="a pair must occur at least this often to become a token")
    text_field: str = field("text", help="field holding the text in .jsonl / .parquet rows")
    max_bytes: int | None = field(None, help="stop reading after this many bytes of UTF-8 text (default: all)")
    words: str = field("", help="a file of words, one per line, that no new merge is learned across (names, terms)")


def check_byte_level_bpe(spec: dict[str, Any], source: str) -> None:
    """Refuse what this algorithm cannot extend safely, with the reason (a tokenizer.json as a dict)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{source}: the model is {model.get('type')!r}; only BPE tokenizers can be extended.")
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError(f"{source}: not a byte-level BPE (no ByteLevel pre-tokenizer); it cannot be extended.")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UserError(f"{source}: BPE {key}={model[key]!r} is not supported (byte-level BPE has none).")


def word_counts(backend: tokenizers.Tokenizer, texts: Any) -> Counter[str]:
    """Pre-tokenized words of `texts` (in the byte-level alphabet) and how often each occurs."""
    counts: Counter[str] = Counter()
    norm, pre = backend.normalizer, backend.pre_tokenizer
    for text in texts:
        if norm is not None:
            text = norm.normalize_str(text)
        pieces = pre.pre_tokenize_str(text) if pre is not None else [(text, None)]
        counts.update(p for p, _ in pieces)
    return counts


def learn_merges(
    words: list[list[str]], freqs: list[int], n: int, taken: set[str], min_frequency: int = 2
) -> list[Pair]:
    """Continue BPE on `words` (token strings, the old merges already applied): up to n new merges.

    Incremental pair counts (which words hold each pair, a lazy max-heap) so each merge touches only the
    words that contain it. Ties go to the lexicographically smaller pair, so the result is deterministic.
    `taken` holds every existing token string; a pair that would recreate one is skipped. Mutates words.
    """
    count: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            count[p] += freqs[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in count.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    while heap and len(merges) < n:
        neg, pair = heapq.heappop(heap)
        if count.get(pair, 0) != -neg:
            continue  # stale: the pair's current count was pushed when it changed
        if -neg < min_frequency:
            break
        a, b = pair
        if a + b in taken:
            continue
        merges.append(pair)
        taken.add(a + b)
        changed: set[Pair] = set()
        for i in where.pop(pair):
            w, f = words[i], freqs[i]
            merged: list[str] = []
            j = 0
            while j < len(w):  # left to right, non-overlapping: the order HF's BPE applies one merge in
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            old_pairs, new_pairs = list(zip(w, w[1:])), list(zip(merged, merged[1:]))
            for p in old_pairs:
                count[p] -= f
            for p in new_pairs:
                count[p] += f
                where[p].add(i)
            for p in set(old_pairs) - set(new_pairs):
                if p != pair:
                    where[p].discard(i)
            changed.update(old_pairs, new_pairs)
            words[i] = merged
        count.pop(pair, None)
        for p in changed:
            if count.get(p, 0) >= min_frequency and p != pair:
                heapq.heappush(heap, (-count[p], p))
    return merges


def extend_backend(
    backend: tokenizers.Tokenizer, texts: Any, n_add: int, min_frequency: int = 2, source: str = "tokenizer"
) -> tuple[tokenizers.Tokenizer, list[Pair]]:
    """A new backend with up to n_add tokens learned from `texts` appended; returns it and the new merges."""
    spec = json.loads(backend.to_str())
    check_byte_level_bpe(spec, source)
    counts = word_counts(backend, texts)
    if not counts:
        raise UserError("no text could be read from the corpus; there is nothing to learn new tokens from.")
    model = backend.model
    pieces = list(counts)
    words = [[t.value for t in model.tokenize(p)] for p in pieces]  # the old merges applied
    freqs = [counts[p] for p in pieces]
    taken = set(backend.get_vocab(with_added_tokens=True))
    merges = learn_merges(words, freqs, n_add, taken, min_frequency)
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = spec.get("added_tokens", [])
    next_id = max(itertools.chain(vocab.values(), (t["id"] for t in added), [-1])) + 1
    for t in added:
        # The Rust library re-numbers added tokens on load from the model's vocabulary size unless the model's
        # vocabulary holds them: Llama 3's specials (ids 128000+) would move to after our new tokens. Listing
        # them in the vocabulary pins their ids; the pre-tokenizer never yields a whole special as one word,
        # so the BPE model cannot produce them from text.
        vocab.setdefault(t["content"], t["id"])
    old_merges = spec["model"]["merges"]
    as_strings = bool(old_merges) and isinstance(old_merges[0], str)  # older files write "a b"
    for i, (a, b) in enumerate(merges):
        vocab[a + b] = next_id + i
        old_merges.append(f"{a} {b}" if as_strings else [a, b])
    try:
        new = tokenizers.Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    except Exception as e:  # the Rust library raises a bare Exception for an invalid spec
        raise UserError(f"{source}: the extended tokenizer.json does not load ({e}).") from None
    return new, merges


def check_extends(old: Tokenizer, new: Tokenizer, what: str = "the new tokenizer") -> list[int]:
    """The ids `new` adds to `old`, after checking every old token keeps its id; else a UserError."""
    old_vocab = old.backend.get_vocab(with_added_tokens=True)
    new_vocab = new.backend.get_vocab(with_added_tokens=True)
    for token, i in old_vocab.items():
        if new_vocab.get(token) != i:
            raise UserError(
                f"{what} does not extend the old one: token {token!r} has id {new_vocab.get(token)} instead of {i}."
            )
    return sorted(i for t, i in new_vocab.items() if t not in old_vocab)


def extend_tokenizer(tok: Tokenizer, texts: Any, n_add: int, min_frequency: int = 2) -> tuple[Tokenizer, list[Pair]]:
    """`tok` with up to n_add new BPE tokens learned from `texts`; chat template and special tokens kept."""
    if n_add <= 0:
        raise UserError(f"--add must be positive, got {n_add}.")
    backend, merges = extend_backend(tok.backend, texts, n_add, min_frequency)
    new = Tokenizer(
        backend,
        chat_template=tok.chat_template,
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        bos_token=tok.bos_token,
        model_max_length=tok.model_max_length,
        extra_config=tok.extra_config,
    )
    check_extends(tok, new)
    return new, merges


def save_slow_files(tok: Tokenizer, src: Path, out: Path) -> list[str]:
    """Rewrite vocab.json / merges.txt (the slow-tokenizer files of GPT-2/Qwen2 directories) if `src` has them,
    so no stale copy of the old vocabulary sits beside the new tokenizer.json."""
    full = json.loads(tok.backend.to_str())
    spec, added = full["model"], {t["content"] for t in full.get("added_tokens", [])}
    written = []
    if (src / "vocab.json").is_file():  # the slow files list added tokens apart (tokenizer_config.json)
        vocab = {t: i for t, i in spec["vocab"].items() if t not in added}
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        written.append("vocab.json")
    if (src / "merges.txt").is_file():
        lines = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
        written.append("merges.txt")
    return written


def chars_per_token(tok: Tokenizer, text: str) -> float:
    return len(text) / max(1, len(tok.encode(text)))


def run(cfg: TokenizerExtendConfig) -> int:
    """The CLI command: read the corpus, learn the tokens, write the directory, print one summary line."""
    if not cfg.tokenizer or not cfg.input or not cfg.out:
        raise UserError("tokenizer extend needs --tokenizer DIR, --input FILES and --out DIR.")
    if cfg.min_frequency < 1:
        raise UserError(f"--min-frequency must be at least 1, got {cfg.min_frequency}.")
    src, out = Path(cfg.tokenizer), Path(cfg.out)
    if src.resolve() == out.resolve():
        raise UserError("--out must differ from --tokenizer: the old tokenizer is kept beside the new one.")
    tok = Tokenizer.from_pretrained(src)
    files = expand_paths(cfg.input)
    if not files:
        raise UserError(f"no input files found under {', '.join(cfg.input)}.")
    words = read_words(cfg.words)
    stats = _Stats()
    texts = split_at_words(_read(files, cfg.text_field, cfg.max_bytes, stats), words)  # streamed: only counts kept
    new, merges = extend_tokenizer(tok, texts, cfg.add, cfg.min_frequency)
    if stats.skipped:
        print(f"warning: skipped {stats.skipped} unreadable files, lines or rows in total.", file=sys.stderr)
    new.save_pretrained(out)
    save_slow_files(new, src, out)
    before, after = chars_per_token(tok, stats.sample), chars_per_token(new, stats.sample)
    note = ""
    if len(merges) < cfg.add:
        note = f" (the corpus had only {len(merges)} pairs seen {cfg.min_frequency}+ times)"
    print(
        f"extended {src} from {tok.vocab_size} to {new.vocab_size} tokens: {len(merges)} new{note}; "
        f"{before:.2f} -> {after:.2f} characters/token on the first {len(stats.sample)} characters of the corpus; "
        f"wrote {out}"
    )
    return 0
