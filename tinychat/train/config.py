"""Options of the one training loop, shared by every objective (pretrain, sft, reward, dpo, ppo, grpo, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tinychat.config import field


@dataclass
class TrainConfig:
    device: str = field("auto", help="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["auto", "bf16", "fp32", "fp16"] = field(
        "auto", help="autocast dtype; auto = bf16 where this machine's matmul probe shows it faster"
    )
    compile: bool = field(False, help="torch.compile the model")
    activation_checkpointing: bool = field(False, help="recompute block activations in the backward pass")
    distributed: Literal["ddp", "fsdp"] = field("ddp", help="how torchrun ranks share the model")
    mesh: str = field(
        "",
        help="torchrun ranks as a pp x dp x tp grid, e.g. dp=2,tp=2 or pp=2,tp=2 (dp takes the ranks left over); "
        "beside tp or pp, data parallelism is FSDP2",
    )
    pp_schedule: Literal["1f1b", "gpipe"] = field("1f1b", help="pipeline schedule when --train.mesh has pp > 1")
    pp_microbatches: int = field(0, help="micro-batches a step's sequences are cut into for the pipeline (0 = pp)")
    seed: int = field(1337)
    batch_size: int = field(16, help="sequences per micro-batch per rank")
    seq_len: int = field(256, help="tokens per training sequence")
    batch_tokens: int = field(0, help="tokens per optimiser step across ranks (0 = one micro-batch per rank)")
    optimizer: Literal["adamw", "muon"] = field(
        "adamw", help="adamw, or muon: Muon for the hidden matrices, AdamW for embeddings, head and gains"
    )
    lr: float = field(3e-3, help="peak learning rate (AdamW's; with muon, of the embeddings, head and gains)")
    mup_base_width: int = field(
        0,
        help="μP-style width scaling from this base d_model: hidden matrices' AdamW LR x base/d_model and their "
        "initial std x sqrt(base/d_model), so an LR tuned at the base width carries over (0 = off)",
    )
    muon_lr: float = field(0.02, help="muon: peak learning rate of the hidden matrices (same schedule)")
    min_lr_ratio: float = field(0.1, help="final learning rate as a fraction of the peak")
    warmup_steps: int = field(50)
    schedule: Literal["cosine", "wsd", "constant"] = field("cosine", help="cosine, warmup-stable-decay, constant")
    decay_frac: float = field(0.2, help="wsd: fraction of the run spent decaying")
    weight_decay: float = field(0.1, help="AdamW decay on matrices only (not norms or biases)")
    beta1: float = field(0.9)
    beta2: float = field(0.95)
    eps: float = field(1e-8)
    grad_clip: float = field(1.0, help="clip the global gradient norm (0 = off)")
    ema: float = field(
        0.0,
        help="keep an exponential moving average of the weights with this decay per step (e.g. 0.99; 0 = off): "
        "the stage's final model is the average (tinychat.train.ema)",
    )
    twin_tokens: bool = field(
        False,
        help="while training, give each word's two BPE ids (with and without the leading space) a shared part of "
        "their embedding; saved models are plain (tinychat.train.twins)",
    )
    keep_sparsity: bool = field(
        False, help="keep the zeros of a magnitude-pruned model's block Linears zero (its recovery fine-tune)"
    )
    max_steps: int = field(0, help="optimiser steps (0 = no step budget)")
    max_tokens: int = field(0, help="training tokens (0 = no token budget)")
    max_time: float = field(0.0, help="minutes of training (0 = no time budget)")
    reserve_tokens: int = field(
        0,
        help="with max_time: stop early by the time this many training tokens take at the measured rate "
        "(later work that runs at this machine's speed; at most reserve_cap of max_time)",
    )
    reserve_cap: float = field(
        0.5,
        help="the largest share of max_time the reserve may take: the training rate overprices later work "
        "on a machine that trains in fp32 but evaluates at a similar speed",
    )
    reserve_floor: int = field(
        0,
        help="the reserve never stops training before this step (the time its steps take at the measured rate): "
        "later work budgeted in time gives way to it; at most max_time (0 = no floor)",
    )
    epochs: float = field(0.0, help="passes over the training data (0 = no epoch budget)")
    eval_every: int = field(100, help="steps between evaluations (0 = only at the end)")
    eval_batches: int = field(8, help="validation micro-batches per evaluation")
    checkpoint_every: int = field(200, help="steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = field(2, help="step checkpoints kept on disk")
    log_every: int = field(10, help="steps between log lines when the output is not a terminal")
    tensorboard: bool = field(True, help="write TensorBoard event files")
    peak_flops: float = field(
        0.0,
        help="peak TFLOP/s per device that MFU divides by (e.g. 989 for an H100's dense bf16); "
        "0 = the best of five short matmul probes and of earlier ones on this machine",
    )
