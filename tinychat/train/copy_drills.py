"""Copy drills: a short stage before pretraining that forms the circuit which copies from the context.

`tinychat copy-drills --config PRESET --run NAME` trains a fresh model on nothing but drills
`<eot> x1 .. xn SEP x1 .. xn` (n in [min_len, max_len), xi token ids of the run's own text) into
runs/NAME/checkpoints/copy; `tinychat pretrain --init runs/NAME/checkpoints/copy` then continues it on the
text. The speedrun runs it first when its preset has `[speedrun] copy_drills = true`.

Why a stage of its own (docs/speedrun.md, "Copying"): naming a city from a retrieved document, putting
the question's numbers into a calculator call, or passing a tool's result on all need an induction
circuit (a previous-token head feeding a head that looks up the current token's earlier occurrence;
Olsson et al. 2022). It forms only after a plateau that is counted in optimiser steps (~3,000-3,750 at
16 x 64 tokens, whatever the learning rate), and only on pure drills: mixed into the text at 8% or 32% of
the tokens, or half of every batch, it never formed within 12,000 steps; formed first, it survived the
dilution. So the drills come before the text, and as cheap per step as they can be: short windows.

The softmax: with the full softmax over all V ids, most of a drill token's gradient goes to pushing the
~V ids that never occur in the drills down, and a tied head shares that push with the input embeddings
(their common component grew while the drill tokens' differences shrank, and the tied 8,192-token
model stayed on the plateau). `softmax = "drill"` ranks only the batch's own candidates (its drill ids,
<eot> and the separator): no other row of the head is touched, and the head matmul shrinks to them.
Each batch draws its `per_batch` drill ids afresh from the `alphabet` most frequent ids of the training
text, so no id is special to the circuit and every frequent token learns to be copied.

What it does not do (measured, docs/speedrun.md round 6): on the tiny model the stage reaches 50% in ~3,250
steps (7 minutes on 2 cores), but 693 steps of pretraining erase it unless `tinychat pretrain --drill_rows`
keeps a quarter of every batch as drills; kept, it still copies only in the drills' own format and tokens,
not a list stated in words, and starting from it costs pretraining most of its facts. Hence off by default.

Round 12 (docs/speedrun.md): the plateau grows with the context length. With 16-token rows of drills of 2-6
the tiny model copies 99% by step 600; 64-token rows stay at chance for 1,000 steps. Resuming the stage at
32 and then 64 tokens generalises it to 99% at 64 tokens and 45% at 256. `windows = [16, 32, 64]` is that
curriculum: each window's phase lasts until the copy accuracy reaches `stop_at`, then the next begins, and
every phase trains the same tokens per step (more, shorter rows) so that only the context length changes.
Round 13: in the speedrun it forms in ~800 steps and survives pretraining and post-training at 97-99%, yet the
models copy nothing stated in words (bench/copy_probe.py 0%): the circuit stays gated to the drill format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.config import dumps_toml, field
from tinychat.data.shards import TokenIndex
from tinychat.errors import UserError
from tinychat.model.config import ModelConfig, resolve
from tinychat.model.transformer import Model
from tinychat.tokenizer import Tokenizer
from tinychat.tokenizer.bytes import token_byte_lengths
from tinychat.train.config import TrainConfig
from tinychat.train.loop import Objective, TrainContext, TrainResult, train


@dataclass
class CopyDrillsConfig:
    run: str = field("default", help="run name: everything goes to RUNS_DIR/NAME")
    runs_dir: str = field("runs")
    data: str = field("", help="tokenized data directory whose train split gives the drill ids")
    tokenizer: str = field("", help="tokenizer directory (default RUNS_DIR/NAME/tokenizer)")
    resume: bool = field(False, help="continue from the newest checkpoint of this stage")
    stage: str = field("copy", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    alphabet: int = field(1024, help="drill ids: this many of the train split's most frequent text tokens")
    per_batch: int = field(64, help="each batch's drills use this many of them (0 = the whole alphabet)")
    min_len: int = field(5, help="shortest drill (tokens to copy)")
    max_len: int = field(30, help="longest drill + 1")
    separator: str = field("\n", help="text between a drill's two halves")
    softmax: Literal["drill", "full"] = field("drill", help="rank the batch's candidate ids only, or all ids")
    eval_batches: int = field(4, help="fixed batches for the copy accuracy at each evaluation")
    stop_at: float = field(
        0.0, help="end the stage once the copy accuracy among the candidates reaches this (0 = spend the budget)"
    )
    windows: list[int] = field(
        [],
        help="a length curriculum: rows of these many tokens in turn, each until the copy accuracy reaches stop_at "
        "(default: train.seq_len alone); every phase trains train.batch_size x train.seq_len tokens per step",
    )
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def drill_alphabet(index: TokenIndex, tok: Tokenizer, size: int, exclude: set[int]) -> np.ndarray:
    """The `size` most frequent ids of the train split that stand for text (special tokens have no bytes)."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for m in index.memmaps("train"):
        counts += np.bincount(np.asarray(m, dtype=np.int64), minlength=tok.vocab_size)[: tok.vocab_size]
    text = np.array(token_byte_lengths(tok)) > 0
    counts[~text] = 0
    counts[sorted(exclude)] = 0
    ids = np.argsort(-counts, kind="stable")
    ids = ids[counts[ids] > 0][:size]
    if len(ids) < 2:
        raise UserError(f"the train split of {index.root} holds fewer than 2 distinct text tokens to drill.")
    return ids


def shortest_row(sep: list[int], min_len: int) -> int:
    """Tokens of the shortest drill: the start token, min_len ids, the separator, the min_len ids again."""
    return 1 + len(sep) + 2 * min_len


def drill_rows(
    rng: np.random.Generator, ids: np.ndarray, rows: int, length: int, start: int, sep: list[int], lens: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, length) token ids of whole drills, and whether each token repeats its drill's first half.

    Each row holds only drills that fit in it whole (the last one shortened to fit, the rest of the row
    `start` tokens), so every token marked as a copy has its original in the same row: a drill cut at a
    row's edge would ask for a copy of tokens the model cannot see. Rows are independent, so a short row
    is a short context, which is what the circuit's plateau grows with (quadratically in the context
    length, Musat et al. 2025; docs/speedrun.md, round 12).
    """
    lo, hi = lens
    overhead, shortest = 1 + len(sep), shortest_row(sep, lo)
    if length < shortest:
        raise ValueError(f"a row of {length} tokens cannot hold a drill of {lo} tokens (needs {shortest}).")
    toks = np.full((rows, length), start, dtype=np.int64)
    copy = np.zeros((rows, length), dtype=bool)
    for r in range(rows):
        at = 0
        while length - at >= shortest:
            fit = (length - at - overhead) // 2  # the longest drill the rest of the row holds
            xs = rng.choice(ids, size=int(rng.integers(lo, min(hi, fit + 1)))).tolist()
            drill = [start, *xs, *sep, *xs]
            toks[r, at : at + len(drill)] = drill
            copy[r, at + overhead + len(xs) : at + len(drill)] = True
            at += len(drill)
    return toks, copy


@dataclass
class DrillSource:
    """Drill rows over `alphabet`: each call draws `per_batch` of its ids (0 = all), then drills of them."""

    alphabet: np.ndarray
    start: int  # the token that separates documents in the text: it starts each drill
    sep: list[int]  # the separator's tokens, between a drill's two halves
    lens: tuple[int, int] = (5, 30)
    per_batch: int = 64

    @classmethod
    def for_data(
        cls,
        data_dir: Path,
        tok: Tokenizer,
        alphabet: int = 1024,
        per_batch: int = 64,
        separator: str = "\n",
        lens: tuple[int, int] = (5, 30),
    ) -> DrillSource:
        sep = tok.encode(separator)
        if not sep:
            raise UserError("--separator must be some text: it marks where a drill's copy starts.")
        index = TokenIndex.load(data_dir)  # drills start with the token that separates the text's documents
        ids = drill_alphabet(index, tok, alphabet, {index.eot_id, *sep})
        return cls(ids, index.eot_id, sep, lens, per_batch)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """This batch's drill ids."""
        k = min(self.per_batch or len(self.alphabet), len(self.alphabet))
        return rng.choice(self.alphabet, size=k, replace=False)

    def rows(self, rng: np.random.Generator, rows: int, length: int, ids: np.ndarray | None = None) -> np.ndarray:
        """(rows, length) token ids of drills over `ids` (default: a fresh draw)."""
        ids = self.draw(rng) if ids is None else ids
        return drill_rows(rng, ids, rows, length, self.start, self.sep, self.lens)[0]


def phase_rows(cfg: CopyDrillsConfig) -> list[tuple[int, int]]:
    """(window, rows) of each phase of the curriculum: the same tokens per step in each, so more rows when
    shorter; without `windows`, the one phase of train.seq_len x train.batch_size."""
    t = cfg.train
    return [(w, t.batch_size * t.seq_len // w) for w in cfg.windows] or [(t.seq_len, t.batch_size)]


class CopyDrillsObjective(Objective):
    name = "copy"

    def __init__(self, cfg: CopyDrillsConfig, source: DrillSource) -> None:
        self.cfg, self.source = cfg, source
        self.phases = phase_rows(cfg)
        self.phase = 0  # the curriculum's current phase: moved on by evaluate, kept in the checkpoint

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        d = ctx.dist
        for w, rows in self.phases:
            if rows % d.world:
                raise UserError(f"the {rows} rows of {w} tokens per step must be a multiple of the {d.world} ranks.")

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = int(state.get("phase", 0))

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """x, y (rows, T) of the current phase, whether y is a copy, and the candidate ids the drill softmax
        ranks (K,)."""
        src = self.source
        window, rows = self.phases[self.phase]
        ids = src.draw(rng)
        toks, copy = drill_rows(rng, ids, rows, window + 1, src.start, src.sep, src.lens)
        w, c = torch.from_numpy(toks), torch.from_numpy(copy)
        cand = torch.from_numpy(np.unique(np.concatenate([[src.start], src.sep, ids])))
        dev = self.ctx.device
        return (
            w[:, :-1].contiguous().to(dev),
            w[:, 1:].contiguous().to(dev),
            c[:, 1:].contiguous().to(dev),
            cand.to(dev),
        )

    # a batch is a pure function of (seed, step): the same rows whatever the ranks, each rank its own slice
    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        d = self.ctx.dist
        x, y, c, cand = self.batch(np.random.default_rng((self.cfg.train.seed, step)))
        per = len(x) // d.world
        sl = slice(d.rank * per, (d.rank + 1) * per)
        return [(x[sl], y[sl], c[sl], cand)]

    def count(self, batch: Any) -> int:
        return batch[1].numel()

    def tokens(self, batch: Any) -> int:
        return batch[0].numel()

    def logits(self, model: torch.nn.Module, x: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """(B, T, K) logits of the candidates; the head multiplies only their rows when it can."""
        if self.cfg.softmax == "full":
            return model(x)
        if isinstance(model, Model):  # unwrapped: the head's matmul over the K candidate rows only
            return model.hidden_states(x) @ model.lm_head.weight[cand].T
        return model(x)[..., cand]  # a wrapper (DDP, compile) must see its own forward: the same gradient

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, c, cand = batch
        logits = self.logits(model, x, cand)
        if self.cfg.softmax == "drill":
            y = torch.searchsorted(cand, y)  # cand is sorted and holds every target
        per_tok = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return per_tok.sum(), {"copy_loss": (per_tok * c.flatten()).sum() * y.numel() / max(int(c.sum()), 1)}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Copy accuracy on fixed drills of the current phase: the argmax over all ids (what text generation
        will use) and over the batch's candidates; chance is 1/per_batch. Reaching stop_at moves the
        curriculum to its next window, and ends the stage after the last."""
        raw = getattr(model, "module", model)
        right = right_cand = total = 0
        window = self.phases[self.phase][0]
        rng = np.random.default_rng((self.cfg.train.seed, 1 << 40))  # never a training step
        for _ in range(self.cfg.eval_batches):
            x, y, c, cand = self.batch(rng)
            with self.ctx.autocast():
                logits = raw(x).float()
            right += int((logits.argmax(-1)[c] == y[c]).sum())
            right_cand += int((cand[logits[..., cand].argmax(-1)][c] == y[c]).sum())
            total += int(c.sum())
        acc, acc_cand = right / max(total, 1), right_cand / max(total, 1)
        # the circuit is judged among the candidates: ids never drilled keep their random head rows until
        # pretraining trains them, and may outrank a right copy in the full argmax meanwhile
        reached = bool(self.cfg.stop_at) and acc_cand >= self.cfg.stop_at
        done = reached and self.phase == len(self.phases) - 1
        if reached and not done:
            self.phase += 1
        return {"copy_accuracy": acc, "copy_accuracy_candidates": acc_cand, "window": window, "done": done}


def run_copy_drills(cfg: CopyDrillsConfig) -> TrainResult:
    run_dir = Path(cfg.runs_dir) / cfg.run
    tok_dir = Path(cfg.tokenizer) if cfg.tokenizer else run_dir / "tokenizer"
    data_dir = Path(cfg.data) if cfg.data else run_dir / "data" / "tokens"
    if not tok_dir.is_dir():
        raise UserError(f"tokenizer directory {tok_dir} does not exist; run `tinychat tokenizer train` first.")
    if not (data_dir / "index.json").is_file():
        raise UserError(f"{data_dir} is not a tokenized data directory; run `tinychat data tokenize` first.")
    if not 1 <= cfg.min_len < cfg.max_len:
        raise UserError(f"copy drills need 1 <= min_len < max_len, got {cfg.min_len} and {cfg.max_len}.")
    tok = Tokenizer.from_pretrained(tok_dir)
    source = DrillSource.for_data(data_dir, tok, cfg.alphabet, cfg.per_batch, cfg.separator, (cfg.min_len, cfg.max_len))
    mcfg = resolve(cfg.model, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    if len(cfg.windows) > 1 and not cfg.stop_at:
        raise UserError("a curriculum of several windows needs --stop_at > 0: it moves on when that is reached.")
    row = shortest_row(source.sep, cfg.min_len)  # a row holds window + 1 tokens (inputs and targets)
    for w, rows in phase_rows(cfg):
        name = "train.seq_len" if not cfg.windows else "a window"
        if w + 1 < row:
            raise UserError(f"{name} ({w}) cannot hold a drill of min_len {cfg.min_len}: use at least {row - 1}.")
        if w > mcfg.max_seq_len:
            raise UserError(f"{name} ({w}) is larger than the context window ({mcfg.max_seq_len}).")
        if rows < 1:
            step = cfg.train.batch_size * cfg.train.seq_len
            raise UserError(f"a window of {w} tokens is longer than a step's {step} (batch_size x seq_len).")
    torch.manual_seed(cfg.train.seed)
    model = Model(mcfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"config.{cfg.stage}.toml").write_text(dumps_toml(dataclasses.replace(cfg, model=mcfg)))
    objective = CopyDrillsObjective(cfg, source)
    return train(objective, model, cfg.train, run_dir, cfg.stage, tokenizer_dir=tok_dir, resume=cfg.resume)


def run(cfg: CopyDrillsConfig) -> int:
    r = run_copy_drills(cfg)
    acc = r.last_eval.get("copy_accuracy")
    shown = f", copy accuracy {acc:.1%}" if acc is not None else ""
    print(f"copy-drills: {r.steps} steps in {r.seconds / 60:.1f} min, loss {r.final_loss:.3f}{shown} -> {r.model_dir}")
    return 130 if r.interrupted else 0
