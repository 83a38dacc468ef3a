"""Pipeline parallelism (GPipe, PipeDream-1F1B) with torch.distributed.pipelining, from outside the model.

Each pipeline rank keeps a contiguous run of blocks; the first also keeps the embedding, the last the final
norm and the head. The stage is the same `Model` object with the other parts removed (torchtitan's way):
foreign blocks are dropped from `model.layers` without renumbering, so parameter names stay the whole
model's (`model.layers.5.mlp...` on stage 1) and checkpoints merge by name; a missing embedding or head
becomes an identity, so the model's own forward carries hidden states (B, T, d_model) from stage to stage.

A training step's sequences are cut into micro-batches that flow through the stages so that the stages
work at the same time. GPipe runs every forward, then every backward (activations of all micro-batches
are held); 1F1B (PipeDream-Flush) alternates one forward and one backward once the pipeline is full, so a
stage holds at most (stages) micro-batches of activations. Both idle each stage for (stages - 1) micro-batch
slots per step (the "bubble"), so more micro-batches per step means a smaller fraction lost.

Evaluation runs forward only with plain point-to-point sends (shapes may differ from training's), and the
last stage broadcasts the logits so the objective's evaluation code runs unchanged on every rank.

A tied embedding and head would live on two different stages; Megatron all-reduces their gradients, tinychat
asks for `--model.tie_embeddings false` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from tinychat.errors import UserError
from tinychat.train.parallel import MeshShape, check_mesh

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layer: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: contiguous, the first stages taking one more when they do not divide evenly."""
    per, extra = divmod(n_layer, stages)
    start = stage * per + min(stage, extra)
    return range(start, start + per + (stage < extra))


def split_stage(model: nn.Module, stage: int, stages: int) -> None:
    """Keep only `stage`'s part of `model` (in place); parameter names are unchanged."""
    cfg = model.cfg
    check_mesh(MeshShape(pp=stages), cfg)
    keep = {str(i) for i in stage_layers(cfg.n_layer, stages, stage)}
    layers = model.model.layers
    for key in [k for k in layers._modules if k not in keep]:
        del layers._modules[key]  # not `del layers[i]`, which renumbers the rest
    if stage > 0:
        model.model.embed_tokens = nn.Identity()  # the input is the previous stage's hidden states
    if stage < stages - 1:
        model.model.norm = nn.Identity()
        model.lm_head = nn.Identity()  # hand on the hidden states (B, T, d_model)


class Pipeline:
    """One rank's stage and schedule; `train_step` runs a whole step's micro-batches forward and backward."""

    def __init__(
        self,
        module: nn.Module,
        mesh: DeviceMesh,
        device: torch.device,
        schedule: str,
        microbatches: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.module, self.device = module, device
        self.group = mesh["pp"].get_group()
        self.stage, self.stages = mesh["pp"].get_local_rank(), mesh["pp"].size()
        self.first, self.last = self.stage == 0, self.stage == self.stages - 1
        self.microbatches = microbatches or self.stages
        self.loss_fn = loss_fn
        self.scale = 1.0
        stage = PipelineStage(module, self.stage, self.stages, device, group=self.group)
        self.schedule = SCHEDULES[schedule](stage, self.microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(out, target) * self.scale  # summed over the micro-batch's units, then normalised

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        """Forward and backward over (B, T) inputs/targets; the summed loss, the same on every stage."""
        if inputs.shape[0] % self.microbatches:
            raise UserError(
                f"pipeline parallelism: {inputs.shape[0]} sequences per step do not split into "
                f"--train.pp_microbatches {self.microbatches}."
            )
        self.scale = scale
        args = (inputs,) if self.first else ()
        losses: list[torch.Tensor] = []  # the last stage's scaled loss per micro-batch
        self.schedule.step(*args, target=targets if self.last else None, losses=losses if self.last else None)
        total = torch.stack(losses).detach().float().sum() / scale if self.last else torch.zeros((), device=self.device)
        dist.all_reduce(total, group=self.group)
        return total

    def gather_to_first(self, obj: Any) -> list[Any] | None:
        """Every stage's `obj` on the first stage (None elsewhere): checkpoints merge the stages' parts."""
        out = [None] * self.stages if self.first else None
        dist.gather_object(obj, out, group=self.group, group_dst=0)
        return out


class PipelineForward(nn.Module):
    """The whole model's forward for evaluation: (B, T) ids -> logits (B, T, vocab) on every pipeline rank."""

    def __init__(self, pipe: Pipeline, d_model: int, vocab: int) -> None:
        super().__init__()
        self.pipe, self.d_model, self.vocab = pipe, d_model, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        p = self.pipe
        B, T = input_ids.shape
        if p.first:
            h = p.module(input_ids)
        else:
            h = torch.empty(B, T, self.d_model, device=p.device)
            dist.recv(h, group=p.group, group_src=p.stage - 1)
            h = p.module(h)
        if not p.last:
            dist.send(h.float().contiguous(), group=p.group, group_dst=p.stage + 1)
            logits = torch.empty(B, T, self.vocab, device=p.device)
        else:
            logits = h.float().contiguous()
        dist.broadcast(logits, group=p.group, group_src=p.stages - 1)
        return logits
