"""Train a byte-level BPE tokenizer: `tinychat tokenizer train --input FILES/DIRS... --vocab-size N --out DIR`.

Choices, and why:
  * Byte level with all 256 bytes in the initial alphabet: every string encodes, no unknown token ever,
    and decode(encode(s)) == s exactly (there is no normalizer to change the text either).
  * Pre-tokenisation with the Qwen2 / GPT-4 style regex, but digits one by one (\\p{N} singly): numbers
    then tokenize the same way whatever their length, which small models need to learn arithmetic.
    Letter runs are \\p{L}+, so Chinese and other scripts without spaces form words too.
  * The 16 special tokens come first (ids 0..15) so that every tinychat tokenizer, whatever its size,
    agrees on them.
  * Optional whole words (`--words FILE`): merges are learned as if each occurrence of a listed word stood
    alone, so no merge is learned across a word's edge. Why: Chinese has no spaces, and the regex keeps a
    run of Han characters as one pre-token, so BPE fuses names and values with the words around them
    ("总是喜欢编织", "。塞敦赞"): the same value then has other ids in every sentence than in a bare answer,
    and a small model stores and recalls it under each separately (docs/speedrun.md, rounds 18-19).
    The saved pre-tokenizer and BPE are the usual ones, only the merges differ, so llama.cpp still
    tokenizes identically. Encoding runs the merges over the whole pre-token, so a byte pair learned inside
    some word can still join the bytes of two characters across an edge: 0.1-1.3% of the speedrun world's
    names and values still share a token with a neighbour.
Reading uses tinychat.data's streaming readers: one document at a time, bad lines or files skipped with
a warning and counted, a missing path a UserError before any work starts.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from tinychat.config import field
from tinychat.data.readers import expand_paths, iter_documents
from tinychat.errors import UserError
from tinychat.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "SPLIT_PATTERN",
    "TokenizerTrainConfig",
    "build_backend",
    "read_words",
    "run",
    "split_at_words",
    "train_tokenizer",
    "word_pieces",
]

# Qwen2's pattern (itself GPT-4's with \p{N} taken singly instead of in runs of up to three).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"  # a word, with one leading space or punctuation mark
    r"|\p{N}"  # ONE digit
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation runs
    r"|\s*[\r\n]+"  # newlines (with the spaces before them)
    r"|\s+(?!\S)"  # spaces, leaving the last one to the next word
    r"|\s+"
)
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + one token per byte


def build_backend() -> tokenizers.Tokenizer:
    """An untrained tokenizer with tinychat's pipeline: regex split -> bytes -> BPE; ByteLevel decoder."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _words_pattern(words: Iterable[str]) -> re.Pattern[str]:
    """One alternation, longest word first, so that a word inside a longer listed word is not cut out of it.

    A word whose edge is an ASCII letter or digit only matches as a whole word there ("art" not in "party");
    scripts written without spaces (Chinese, Japanese) match anywhere.
    """
    alts = []
    for w in sorted(set(words), key=lambda w: (-len(w), w)):
        head = r"(?<![A-Za-z0-9])" if w[0].isascii() and w[0].isalnum() else ""
        tail = r"(?![A-Za-z0-9])" if w[-1].isascii() and w[-1].isalnum() else ""
        alts.append(head + re.escape(w) + tail)
    return re.compile("|".join(alts))


def word_pieces(text: str, pattern: re.Pattern[str]) -> Iterator[str]:
    """`text` cut before and after each listed word wherever a non-space character touches it.

    Each piece is pre-tokenized on its own by the trainer, so a word never shares a pre-token (and hence a
    merge) with its neighbours. Cuts only fall between two non-space characters: a word after a space keeps
    its leading space (" Dalzan", as the regex makes it anyway), and no piece begins or ends in whitespace.
    """
    last = 0
    for m in pattern.finditer(text):
        start, end = m.span()
        if start > last and not text[start - 1].isspace():
            yield text[last:start]
            last = start
        if end < len(text) and not text[end].isspace():
            yield text[last:end]
            last = end
    if last < len(text):
        yield text[last:]


def split_at_words(texts: Iterable[str], words: Iterable[str]) -> Iterable[str]:
    """`texts` as word_pieces for BPE to learn from (unchanged when there are no words); streamed."""
    words = list(words)
    if not words:
        return texts
    pattern = _words_pattern(words)
    return (piece for text in texts for piece in word_pieces(text, pattern))


def read_words(path: str | Path) -> list[str]:
    """A words file: one word per line, blank lines and surrounding whitespace ignored; no path, no words."""
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--words {p} is not a file; give a text file with one word per line.")
    try:
        words = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"--words {p} is not UTF-8 text.") from None
    return [w for w in words if w]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, show_progress: bool = False, words: Iterable[str] = ()
) -> Tokenizer:
    """Learn BPE merges from `texts` (streamed: any iterable, consumed once) up to `vocab_size` ids.

    With `words`, no merge is learned across a word's edge (see word_pieces). The result may be smaller
    than vocab_size when the text has fewer distinct pairs to merge.
    """
    if vocab_size < MIN_VOCAB:
        raise UserError(
            f"vocab_size must be at least {MIN_VOCAB} ({len(SPECIAL_TOKENS)} special tokens + 256 bytes), "
            f"got {vocab_size}."
        )
    backend = build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(split_at_words(texts, words), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert backend.token_to_id(t) == i, f"special token {t} landed on id {backend.token_to_id(t)}, not {i}"
    return Tokenizer(backend)


@dataclass
class TokenizerTrainConfig:
    input: list[str] = field([], help="text files or directories (.txt .md .jsonl .jsonl.gz .parquet), recursive")
    vocab_size: int = field(8192, help="number of ids, the 16 special tokens and 256 bytes included")
    out: str = field("", help="directory to write tokenizer.json and tokenizer_config.json into")
    text_field: str = field("text", help="field holding the text in .jsonl / .parquet rows")
    max_bytes: int | None = field(None, help="stop reading after this many bytes of UTF-8 text (default: all)")
    chat_input: list[str] = field([], help="chat JSONL files ({messages, tools}): their rendered text joins the corpus")
    words: str = field("", help="a file of words, one per line, that no merge is learned across (names, terms)")


@dataclass
class _Stats:
    """What the reader saw: for the summary line and the skip warnings."""

    docs: int = 0
    bytes: int = 0
    skipped: int = 0
    sample: str = ""  # the first ~256 KB, to report bytes per token after training

    def skip(self, what: object) -> None:
        """Count one unreadable file, line or row; warn about the first MAX_WARNINGS of them."""
        self.skipped += 1
        if self.skipped <= MAX_WARNINGS:
            print(f"warning: skipped {what}", file=sys.stderr)
        elif self.skipped == MAX_WARNINGS + 1:
            print("warning: more skipped input; the total is reported at the end.", file=sys.stderr)


MAX_WARNINGS = 10


def _read(files: list[Path], text_field: str, max_bytes: int | None, stats: _Stats) -> Iterator[str]:
    """Texts of `files`, stopping at max_bytes (the last one cut at a character boundary)."""
    for doc in iter_documents(files, text_field=text_field, on_error=stats.skip):
        text = doc.text
        n = len(text.encode("utf-8"))
        if max_bytes is not None and stats.bytes + n > max_bytes:
            text = text.encode("utf-8")[: max_bytes - stats.bytes].decode("utf-8", errors="ignore")
            n = len(text.encode("utf-8"))
        if text:
            stats.docs += 1
            stats.bytes += n
            if len(stats.sample) < 1 << 18:
                stats.sample += text[: (1 << 18) - len(stats.sample)]
            yield text
        if max_bytes is not None and stats.bytes >= max_bytes:
            return


def _read_chat(files: list[Path], stats: _Stats) -> Iterator[str]:
    """Chat rows as the model will see them: the chat template's text, without its special tokens.

    Why: a tokenizer trained on prose alone splits what chat data repeats in every row (the tool preamble,
    JSON schemas, <tool_call> bodies) into near-bytes. On the speedrun's world the calculator's schema
    and preamble took 418 of a 512-token context.
    """
    from tinychat.tokenizer.chat import render_parts

    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    parts = render_parts(row["messages"], row.get("tools"))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UserError) as e:
                    stats.skip(f"{path} line {n}: not a chat row ({e})")
                    continue
                text = "".join(t for t, special, _ in parts if not special)
                stats.docs += 1
                stats.bytes += len(text.encode("utf-8"))
                yield text


def run(cfg: TokenizerTrainConfig) -> int:
    """The CLI command: read, train, save, print one summary line."""
    if not cfg.input:
        raise UserError("--input is required: give one or more text files or directories.")
    if not cfg.out:
        raise UserError("--out is required: the directory to write the tokenizer into.")
    if cfg.max_bytes is not None and cfg.max_bytes <= 0:
        raise UserError(f"--max-bytes must be positive, got {cfg.max_bytes}.")
    if cfg.vocab_size < MIN_VOCAB:
        raise UserError(
            f"--vocab-size must be at least {MIN_VOCAB} (16 special tokens + 256 bytes), got {cfg.vocab_size}."
        )
    files = expand_paths(cfg.input)  # UserError for a missing path, before any work
    if not files:
        raise UserError(
            f"no input files (.txt .md .jsonl .jsonl.gz .parquet) found under {', '.join(map(str, cfg.input))}."
        )
    chat_files = [Path(p) for p in cfg.chat_input]
    for p in chat_files:
        if not p.is_file():
            raise UserError(f"--chat-input {p} is not a file; give chat JSONL files.")
    words = read_words(cfg.words)
    stats = _Stats()
    texts = itertools.chain(_read(files, cfg.text_field, cfg.max_bytes, stats), _read_chat(chat_files, stats))
    tok = train_tokenizer(texts, cfg.vocab_size, sys.stderr.isatty(), words)
    if stats.skipped:
        print(f"warning: skipped {stats.skipped} unreadable files, lines or rows in total.", file=sys.stderr)
    if stats.docs == 0:
        raise UserError(f"no text could be read from {', '.join(map(str, cfg.input))}; nothing to train on.")
    out = tok.save_pretrained(cfg.out)
    n_tokens = len(tok.encode(stats.sample))
    ratio = len(stats.sample.encode("utf-8")) / max(1, n_tokens)
    print(
        f"trained a {tok.vocab_size}-token BPE tokenizer on {stats.docs} documents "
        f"({stats.bytes / 1e6:.2f} MB, {len(files)} files, {stats.skipped} skipped"
        f"{f', {len(words)} whole words' if words else ''}); "
        f"{ratio:.2f} bytes/token on the first {len(stats.sample)} characters; wrote {out}"
    )
    return 0
