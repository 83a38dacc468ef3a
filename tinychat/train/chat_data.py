"""Chat datasets for post-training: reading rows, rendering them to ids + loss masks, packing, batching.

Formats (DESIGN.md), as JSONL, Parquet or a `datasets.save_to_disk` directory (a file or a directory of
files): SFT rows {"messages", "tools"?}; preference rows {"prompt", "chosen", "rejected"} (each a list of
OpenAI messages, or a string: a user prompt / an assistant reply); RL rows {"messages", "answer"}.
Every row is checked before training, and a bad one stops the command with one sentence naming the
file and line ("data.jsonl line 7: field 'answer' is missing ..."), so nothing trains on a row that
means something else than it says.

Packing (SFT): conversations are packed best-fit-decreasing into rows of seq_len + 1 tokens. Attention
stays causal over the whole packed row (a conversation may attend to the ones before it in the row),
as nanochat and TRL do by default: every conversation starts with <|im_start|> and its loss mask never
covers another conversation's tokens, so the targets are exactly those of the unpacked data; only the
context differs, which costs nothing measurable at these lengths and saves the padding (2-4x tokens).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinychat.data.readers import strict_jsonl_rows
from tinychat.errors import UserError

Row = dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".parquet")


# ---------------------------------------------------------------------------------------- reading rows


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return [path]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if files:
            return files
        raise UserError(f"{path} holds no .jsonl or .parquet files.")
    raise UserError(f"data {path} does not exist.")


def _read_file(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs; `where` is "FILE line N" (JSONL) or "FILE row N" (Parquet, datasets)."""
    if path.is_dir():  # a datasets.save_to_disk directory
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path} is a DatasetDict without a 'train' split; give the split's directory.")
            ds = ds["train"]
        return [(f"{path} row {i + 1}", r) for i, r in enumerate(ds)]
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise UserError(f"{path} is not a readable Parquet file ({e}).") from None
        return [(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]
    return [(f"{path} line {i}", row) for i, row in strict_jsonl_rows(path)]


def read_rows(path: str | Path, fields: Sequence[str], command: str) -> list[tuple[str, Row]]:
    """Every row of `path` as (where, row), each an object holding `fields`; a UserError names the first bad one."""
    rows = [r for f in _files(Path(path)) for r in _read_file(f)]
    need = " and ".join(f"'{f}'" for f in fields)
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{where} must be a JSON object with {need}, got {type(row).__name__}.")
        for f in fields:
            if row.get(f) is None:
                raise UserError(f"{where}: field '{f}' is missing ({command} rows need {need}).")
    if not rows:
        raise UserError(f"{path} holds no rows.")
    return rows


def as_messages(value: Any, role: str, where: str, name: str) -> list[dict[str, Any]]:
    """A field that holds OpenAI messages, or a plain string taken as one message of `role`."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{name}' must be a non-empty list of messages or a string.")
    return value


def render(tok: Any, messages: list[dict], tools: Any, where: str, generation_prompt: bool = False) -> Any:
    """tok.render_chat with the row's location in any error it raises."""
    try:
        return tok.render_chat(messages, tools, add_generation_prompt=generation_prompt)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------- SFT


@dataclass
class Conversation:
    ids: list[int]
    mask: list[bool]  # True on tokens the model learns to produce (assistant turns)


def encode_sft(tok: Any, rows: list[tuple[str, Row]], max_len: int) -> tuple[list[Conversation], dict[str, int]]:
    """Rendered conversations, cut to `max_len` tokens; rows with nothing left to learn are dropped (counted)."""
    out, truncated, empty = [], 0, 0
    for where, row in rows:
        enc = render(tok, as_messages(row["messages"], "user", where, "messages"), row.get("tools"), where)
        ids, mask = enc.ids, enc.mask
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):
            empty += 1
            continue
        out.append(Conversation(ids, mask))
    return out, {"conversations": len(out), "truncated": truncated, "no_targets": empty}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: lists of item indices whose lengths sum to <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), kept sorted
    for i in order:
        n = lengths[i]
        assert n <= capacity, f"item {i} of length {n} exceeds the capacity {capacity}"
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def sft_rows(convs: list[Conversation], seq_len: int, packed: bool) -> list[list[int]]:
    """Training rows as lists of conversation indices: packed into seq_len + 1 tokens, or one per row."""
    if not packed:
        return [[i] for i in range(len(convs))]
    return pack([len(c.ids) for c in convs], seq_len + 1)


def sft_batch(
    convs: list[Conversation], rows: list[list[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, T): inputs and next-token targets, -100 where the target is not an assistant token.

    Rows are right-padded to `width` + 1 tokens (default: the longest row in the batch).
    """
    seqs = [[t for i in r for t in convs[i].ids] for r in rows]
    masks = [[m for i in r for m in convs[i].mask] for r in rows]
    T = (width or max(len(s) - 1 for s in seqs)) + 1
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, : len(s)] = torch.tensor(s)
        keep = torch.tensor(m)
        tgt[b, : len(s)] = torch.where(keep, torch.tensor(s), -100)
    return ids[:, :-1], tgt[:, 1:]


# ---------------------------------------------------------------------------------------- preferences


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    chosen_mask: list[bool]  # True on the response's trained tokens (not the prompt's, not the header)
    rejected_mask: list[bool]


def _response(tok: Any, prompt: list[dict], reply: list[dict], tools: Any, where: str) -> tuple[list[int], list[bool]]:
    full = render(tok, prompt + reply, tools, where)
    head = render(tok, prompt, tools, where).ids
    n_prompt = len(head)
    assert full.ids[:n_prompt] == head, "chat rendering is not prefix-stable"
    mask = [m and i >= n_prompt for i, m in enumerate(full.mask)]
    if not any(mask):
        raise UserError(f"{where}: the response has no assistant message to learn.")
    end = max(i for i, m in enumerate(mask) if m) + 1  # end at the reply's <|im_end|>: the last token scored
    return full.ids[:end], mask[:end]


def encode_pairs(tok: Any, rows: list[tuple[str, Row]], max_len: int) -> tuple[list[Pair], int]:
    """Rendered preference pairs; pairs longer than max_len are skipped (returned count)."""
    out, skipped = [], 0
    for where, row in rows:
        prompt, tools = as_messages(row["prompt"], "user", where, "prompt"), row.get("tools")
        c_ids, c_mask = _response(tok, prompt, as_messages(row["chosen"], "assistant", where, "chosen"), tools, where)
        r_ids, r_mask = _response(
            tok, prompt, as_messages(row["rejected"], "assistant", where, "rejected"), tools, where
        )
        if max(len(c_ids), len(r_ids)) > max_len:
            skipped += 1
            continue
        out.append(Pair(c_ids, r_ids, c_mask, r_mask))
    return out, skipped


def pair_batch(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, lengths) of shape (2B, T): the B chosen sequences, then the B rejected ones, right-padded."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    masks = [p.chosen_mask for p in pairs] + [p.rejected_mask for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(m)] = torch.tensor(m)
    return ids, mask, torch.tensor([len(s) for s in seqs])


# ---------------------------------------------------------------------------------------- RL prompts


@dataclass
class Prompt:
    ids: list[int]  # rendered up to and including "<|im_start|>assistant\n"
    row: Row  # the row itself: reward functions read "answer" (and "aliases", "check") from it


def encode_prompts(tok: Any, rows: list[tuple[str, Row]], max_len: int) -> tuple[list[Prompt], int]:
    """Generation prompts of RL rows; prompts longer than max_len are skipped (returned count)."""
    out, skipped = [], 0
    for where, row in rows:
        messages = as_messages(row["messages"], "user", where, "messages")
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            raise UserError(f"{where}: the last message is the assistant's; RL prompts end with a user or tool turn.")
        ids = render(tok, messages, row.get("tools"), where, generation_prompt=True).ids
        if len(ids) > max_len:
            skipped += 1
            continue
        out.append(Prompt(ids, row))
    return out, skipped


# ---------------------------------------------------------------------------------------- batch schedule


class Schedule:
    """Which items each rank's micro-batches take at each optimiser step, over shuffled epochs.

    The step's global batch is the same set of items whatever the split between ranks and accumulation:
    global position p = step * global_batch + (micro * world + rank) * per_micro + i, item
    perm(epoch = p // n)[p % n], each epoch a fresh permutation from (seed, epoch).
    """

    def __init__(self, n: int, per_micro: int, accum: int, world: int, rank: int, seed: int) -> None:
        assert n > 0
        self.n, self.per_micro, self.accum, self.world, self.rank, self.seed = n, per_micro, accum, world, rank, seed
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.per_micro * self.accum * self.world

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # keep one epoch: memory stays O(n)
        return self._perms[epoch]

    def items(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world + self.rank) * self.per_micro
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.per_micro)]

    def progress(self, step: int) -> float:
        return step * self.global_batch / self.n


def shard(items: Sequence[Any], rank: int, world: int, limit: int = 0) -> list[Any]:
    """This rank's share of a fixed evaluation list (the first `limit` items, 0 = all)."""
    items = list(items[:limit] if limit else items)
    return items[rank::world]
