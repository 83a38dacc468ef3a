"""Knowledge distillation: `tinychat distill --teacher DIR [--model.* | --init DIR] [--data DIR]`.

A small student learns from a bigger teacher that shares its tokenizer, in two ways that combine:

* Token-level (Hinton et al. 2015). At every position of the pretraining data the student also matches
  the teacher's whole next-token distribution, softened at temperature T:
      loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL
  The T^2 keeps the KL term's gradient on the same scale as CE's whatever T is. `--kd forward` is
  KL(teacher || student): mean-seeking, the student spreads mass over everything the teacher thinks
  possible (the classic choice, and the dark knowledge a one-hot label lacks). `--kd reverse` is
  KL(student || teacher): mode-seeking, the student commits to the teacher's likeliest tokens (MiniLLM,
  GKD), better for a student too small to cover the teacher's spread. alpha = 1 switches it off (and
  with it the teacher's forward pass).
* Cached top-k teacher (`--kd_topk K`, token-level KD without the teacher in the loop): before training,
  one inference pass of the teacher over every training window stores its K likeliest next tokens and
  their log-probabilities at temperature T (the loader's windows are fixed, so each position's context is
  the one the student will see). The KL is then taken over K + 1 outcomes, the K tokens and "the rest",
  which is the exact KL between both distributions coarsened that way. The teacher runs once per window,
  not once per window per epoch. At T = 1 the student's head computes both losses in row chunks, as
  pretraining's fused cross-entropy does (model/loss.py, soft targets), so a step costs what a
  cross-entropy step costs: with the (B, T, V) logits and a log-softmax it cost 1.38-1.47x on a 2-core
  AVX2 CPU. Forward KL only (the reverse needs the teacher's probability of every token the student
  favours).
* Sequence-level (Kim & Rush 2016), "use the big model to make data for the small one". With
  `--seq.samples N` the teacher first continues the opening `--seq.prompt_tokens` tokens of N training
  documents; the student then trains on those N teacher-written documents instead of the data. The
  validation split stays the real one, so bits per byte measure the real text. With alpha = 1 this is
  pure sequence-level KD; with alpha < 1 the student also matches the teacher's distribution on them.

The objective is pretraining's (same loader, batches, evaluation and samples) with another loss, so it
runs on the one loop. Results land in runs/NAME/checkpoints/distill/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.loss import summed_ce, summed_soft_ce
from tinychat.train.config import TrainConfig
from tinychat.train.loop import TrainContext, TrainResult, train
from tinychat.train.pretrain import (
    PretrainConfig,
    PretrainObjective,
    freeze_for_stage,
    has_fused_head,
    prepare,
    summary,
    write_config,
)

KD_DIRECTIONS = ("forward", "reverse")


@dataclass
class SeqKDConfig:
    """Sequence-level KD: the teacher writes the training documents (samples = 0: train on --data)."""

    samples: int = field(0, help="documents the teacher writes to train on (0 = off)")
    prompt_tokens: int = field(16, help="tokens of each training document the teacher continues")
    new_tokens: int = field(192, help="tokens the teacher writes per document at most")
    temperature: float = field(1.0, help="sampling temperature of the teacher (0 = greedy)")
    batch: int = field(32, help="documents generated at once")


@dataclass
class DistillConfig(PretrainConfig):
    stage: str = field("distill", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    teacher: str = field("", help="teacher model directory or hub id; it must use the student's tokenizer")
    kd: Literal["forward", "reverse"] = field("forward", help="token-level KL: KL(teacher||student) or the reverse")
    temperature: float = field(2.0, help="softmax temperature of both distributions in the KL term")
    alpha: float = field(0.5, help="weight of cross-entropy on the data; 1 - alpha weighs the KL (1 = no token KD)")
    kd_topk: int = field(
        0,
        help="cache the teacher's top-K next tokens of every training window once, before training (0 = the "
        "teacher runs at every step)",
    )
    seq: SeqKDConfig = dataclasses.field(default_factory=SeqKDConfig)


def kd_loss(
    student_logits: torch.Tensor,  # (B, T, V)
    teacher_logits: torch.Tensor,  # (B, T, V)
    mask: torch.Tensor,  # (B, T) bool: positions that count
    temperature: float,
    direction: str = "forward",
) -> torch.Tensor:
    """T^2 * KL between the temperature-softened distributions, summed over masked positions (fp32)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if direction == "forward":  # KL(p_t || p_s) = sum p_t (log p_t - log p_s)
        kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (B, T)
    elif direction == "reverse":  # KL(p_s || p_t)
        kl = F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    else:
        raise ValueError(f"unknown KL direction {direction!r}")
    return (kl * mask).sum() * temperature**2


@torch.no_grad()
def teacher_topk(
    teacher: torch.nn.Module, loader: Any, k: int, temperature: float, device: torch.device, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k next tokens and log-probabilities (at `temperature`) for every window of `loader`
    (its fixed seq_len windows), (n_windows, T, k) each: int16/int32 ids and fp16 log-probabilities, on the CPU."""
    n, T, V = loader.n_seqs, loader.T, teacher.cfg.vocab_size
    ids = torch.empty(n, T, k, dtype=torch.int16 if V <= 2**15 else torch.int32)
    logp = torch.empty(n, T, k, dtype=torch.float16)
    bs = 32
    for lo in range(0, n, bs):
        w = np.stack([loader.window(i)[:-1] for i in range(lo, min(n, lo + bs))]).astype(np.int64)
        x = torch.from_numpy(w).to(device)
        with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            logits = teacher(x)
        flat = logits.view(-1, V)  # (b*T, V), in chunks of positions that stay in the CPU's cache: 4x faster
        out_i, out_v = ids[lo : lo + len(w)].view(-1, k), logp[lo : lo + len(w)].view(-1, k)
        for c in range(0, flat.shape[0], 512):
            z = flat[c : c + 512].float() / temperature
            top = z.topk(k, dim=-1).indices  # the log-probabilities of the top k only, not all V
            out_i[c : c + 512] = top.to("cpu", ids.dtype)
            out_v[c : c + 512] = (z.gather(-1, top) - z.logsumexp(-1, keepdim=True)).to("cpu", torch.float16)
    return ids, logp


class DistillObjective(PretrainObjective):
    """Pretraining on packed shards, with the teacher's distribution mixed into the loss."""

    name = "distill"

    def __init__(
        self, data_dir: Path, tokenizer: Any, cfg: TrainConfig, samples: list[str], teacher: torch.nn.Module,
        dcfg: DistillConfig,
    ) -> None:  # fmt: skip
        # --lora / --trainable stages work as in pretrain (the adapter is what gets saved)
        super().__init__(data_dir, tokenizer, cfg, samples, dcfg.lora, Path(dcfg.init) if dcfg.init else None)
        self.teacher, self.dcfg = teacher, dcfg
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None  # --kd_topk: (ids, log-probs) per window

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.teacher = self.teacher.to(ctx.device).eval().requires_grad_(False)
        k = self.dcfg.kd_topk
        if k and self.dcfg.alpha < 1.0:
            from tinychat.train.mfu import autocast_dtype

            t0 = time.perf_counter()
            amp = autocast_dtype(ctx.device, self.cfg.precision)
            self.cache = teacher_topk(self.teacher, self.loader, k, self.dcfg.temperature, ctx.device, amp)
            self.teacher = None  # no longer needed: free its memory
            n = self.loader.n_seqs
            print(
                f"distill: the teacher's top-{k} next tokens of {n:,} windows ({n * self.loader.T:,} positions, "
                f"{sum(t.numel() * t.element_size() for t in self.cache) / 2**20:.0f} MiB) cached in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        """(x, y) as pretraining reads them, plus the windows' ids when the teacher's top-k is cached."""
        out = super().micro_batches(step, model)
        if self.cache is None:
            return out
        return [(x, y, self.loader.seq_ids(step * self.accum + m)) for m, (x, y) in enumerate(out)]

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch[0], batch[1]  # (B, T) each
        alpha, T = self.dcfg.alpha, self.dcfg.temperature
        if self.cache is not None and alpha < 1.0:
            rows = torch.as_tensor(batch[2], dtype=torch.long)
            ids, logp = (t[rows].to(x.device) for t in self.cache)  # (B, T, K) each
            if T == 1.0 and has_fused_head(model):
                # the head and both losses in row chunks (model/loss.py): no (B, T, V) logits, so a step costs
                # about a cross-entropy step (1.47x with them on a 2-core AVX2 CPU: docs/compress.md)
                out = model(x, targets=y, soft_targets=(ids, logp), alpha=alpha)
            else:
                soft = (ids.flatten(0, 1), logp.flatten(0, 1))
                out = summed_soft_ce(model(x).flatten(0, 1), y.flatten(), soft, alpha, T)
            return out[0], {"ce": out[1], "kd": out[2]}
        logits = model(x)  # (B, T, V)
        ce = summed_ce(logits, y)
        if alpha >= 1.0:
            return ce, {"ce": ce.detach()}
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        kd = kd_loss(logits, teacher_logits, y != -100, T, self.dcfg.kd)
        return alpha * ce + (1.0 - alpha) * kd, {"ce": ce.detach(), "kd": kd.detach()}


# ------------------------------------------------------------------------------ sequence-level data
@torch.no_grad()
def teacher_corpus(teacher: torch.nn.Module, data_dir: Path, out: Path, cfg: DistillConfig) -> dict[str, Any]:
    """Write a token directory whose train split the teacher wrote and whose val split is data_dir's.

    Prompts are the first seq.prompt_tokens tokens of training documents (drawn without replacement
    while there are enough), so the teacher writes about what the data is about; each document ends with
    end-of-text, where the teacher may also stop on its own. Atomic: `out` appears only when complete.
    """
    from tinychat.data.shards import TOKENS_INDEX, TokenIndex, TokenShardWriter, atomic_output_dir, write_json_atomic
    from tinychat.device import pick_device
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.train.mfu import autocast_dtype

    index = TokenIndex.load(data_dir)
    stream = np.concatenate(index.memmaps("train"))
    ends = np.flatnonzero(stream == index.eot_id)  # every document ends with end-of-text
    starts = np.r_[0, ends[:-1] + 1]
    k = cfg.seq.prompt_tokens
    usable = starts[ends - starts > k]
    if len(usable) == 0:
        raise UserError(f"no training document in {data_dir} is longer than --seq.prompt_tokens {k}.")
    rng = np.random.default_rng(cfg.train.seed)
    picks = rng.choice(usable, size=cfg.seq.samples, replace=cfg.seq.samples > len(usable))
    prompts = [stream[s : s + k].astype(np.int64).tolist() for s in picks]
    device = pick_device(cfg.train.device)
    amp = autocast_dtype(device, cfg.train.precision)
    teacher = teacher.to(device).eval()
    new_tokens = min(cfg.seq.new_tokens, teacher.cfg.max_seq_len - k)
    eot = index.eot_id
    with atomic_output_dir(out, force=True) as tmp:
        writer = TokenShardWriter(tmp, "train", index.dtype, 1 << 24)
        for i in range(0, len(prompts), cfg.seq.batch):
            params = SamplingParams(temperature=cfg.seq.temperature, max_new_tokens=new_tokens, seed=cfg.train.seed + i)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                new, _, _ = generate_ids(teacher, prompts[i : i + cfg.seq.batch], params, stop_ids={eot})
            for p, g in zip(prompts[i : i + cfg.seq.batch], new):
                writer.write_doc(np.asarray([*p, *g, eot]))
            print(f"distill: teacher wrote {min(i + cfg.seq.batch, len(prompts))}/{len(prompts)} documents", flush=True)
        train_split = writer.close()
        for shard in index.splits.get("val", {}).get("shards", []):
            shutil.copy(data_dir / shard["file"], tmp / shard["file"])
        meta = json.loads((data_dir / TOKENS_INDEX).read_text(encoding="utf-8"))
        meta["splits"] = {"train": train_split, **({"val": index.splits["val"]} if "val" in index.splits else {})}
        meta["tokens"] = sum(s["tokens"] for s in meta["splits"].values())
        meta["teacher"] = {
            "model": cfg.teacher, "source": str(data_dir), "samples": cfg.seq.samples, "prompt_tokens": k,
            "new_tokens": new_tokens, "temperature": cfg.seq.temperature, "seed": cfg.train.seed,
        }  # fmt: skip
        write_json_atomic(tmp / TOKENS_INDEX, meta)
    return meta


# ------------------------------------------------------------------------------ the command
def check_distill(cfg: DistillConfig) -> None:
    """The flag mistakes we can see before loading anything, one sentence each."""
    if not cfg.teacher:
        raise UserError("--teacher DIR is required: the model directory (or hub id) to distil from.")
    if cfg.kd not in KD_DIRECTIONS:  # the CLI checks the Literal; this guards calls from Python
        raise UserError(f"--kd must be forward or reverse, got {cfg.kd!r}.")
    if not cfg.temperature > 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}.")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {cfg.alpha}.")
    if cfg.seq.samples < 0 or cfg.seq.prompt_tokens < 1 or cfg.seq.new_tokens < 1 or cfg.seq.batch < 1:
        raise UserError("--seq.samples must be >= 0 and --seq.prompt_tokens, --seq.new_tokens, --seq.batch >= 1.")
    if cfg.seq.temperature < 0:
        raise UserError(f"--seq.temperature must be >= 0, got {cfg.seq.temperature}.")
    if cfg.kd_topk < 0:
        raise UserError(f"--kd_topk must be >= 0, got {cfg.kd_topk}.")
    if cfg.kd_topk and cfg.kd == "reverse":
        raise UserError(
            "--kd_topk caches the teacher's likeliest tokens, which serves forward KL only; use --kd forward."
        )
    if cfg.alpha >= 1.0 and not cfg.seq.samples:
        raise UserError("--alpha 1 without --seq.samples uses no teacher at all; that is `tinychat pretrain`.")


def load_teacher(cfg: DistillConfig, tok: Any, student: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher, checked against the student's tokenizer and vocabulary."""
    from tinychat.model.hub import resolve_model_dir
    from tinychat.model.transformer import Model
    from tinychat.tokenizer import Tokenizer

    teacher = Model.from_pretrained(cfg.teacher, dtype=torch.float32).eval().requires_grad_(False)
    tdir = resolve_model_dir(cfg.teacher)
    has_tok = (tdir / "tokenizer.json").is_file()
    if has_tok and Tokenizer.from_pretrained(tdir).backend.get_vocab() != tok.backend.get_vocab():
        raise UserError(
            f"the teacher {cfg.teacher} uses another tokenizer than the student; distillation compares "
            "next-token distributions id by id, so both need the same one."
        )
    if cfg.kd_topk > teacher.cfg.vocab_size:
        raise UserError(f"--kd_topk {cfg.kd_topk} is more than the vocabulary's {teacher.cfg.vocab_size} tokens.")
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise UserError(
            f"the teacher's vocab_size is {teacher.cfg.vocab_size} but the student's is {student.cfg.vocab_size}; "
            f"set --model.vocab_size {teacher.cfg.vocab_size}."
        )
    return teacher


def run_distill(cfg: DistillConfig) -> TrainResult:
    check_distill(cfg)
    run_dir, tok_dir, data_dir, tok, student = prepare(cfg)
    teacher = load_teacher(cfg, tok, student)
    freeze_for_stage(student, cfg)
    if cfg.seq.samples:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "sequence-level distillation generates its data in one process; run it once without torchrun, "
                "then train on RUN/data/distill with --data."
            )
        out = run_dir / "data" / "distill"
        meta = json.loads((out / "index.json").read_text()) if (out / "index.json").is_file() else {}
        if not (cfg.resume and meta.get("teacher", {}).get("samples") == cfg.seq.samples):
            meta = teacher_corpus(teacher, data_dir, out, cfg)
            print(f"distill: {meta['splits']['train']['tokens']:,} teacher-written tokens -> {out}")
        data_dir = out
    write_config(cfg, run_dir, student)
    objective = DistillObjective(data_dir, tok, cfg.train, cfg.samples, teacher, cfg)
    return train(objective, student, cfg.train, run_dir, cfg.stage, tokenizer_dir=tok_dir, resume=cfg.resume)


def run(cfg: DistillConfig) -> int:
    return summary("distill", run_distill(cfg))
