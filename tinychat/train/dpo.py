"""Direct Preference Optimisation: learn from preference pairs without a reward model or sampling.

`tinychat dpo [--init SFT_DIR] [--data PAIRS] [--beta 0.1]` minimises, per pair (x, y_w chosen, y_l
rejected), with log-probabilities summed over the response's assistant tokens,

    h = beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)        (eps = label_smoothing, 0 = plain DPO)

summed over pairs and averaged by the loop over the pairs of the global batch. With --rpo_alpha a > 0
(RPO, Pang et al. 2024; TRL's `rpo_alpha`) each pair also pays a * NLL(y_w) per chosen token: plain DPO
only constrains the *difference* of the two log-ratios, so on a small model both log-probabilities fall
and the freed mass lands on tokens neither reply used (at temperature 1 the tiny speedrun model's DPO
replies became mixed-script garbage); the NLL term keeps the chosen replies likely. `ref` is the frozen
starting model (with LoRA: the same weights, adapters switched off, so no second copy in memory); its
log-probabilities are computed without gradients while the step's batches are made.
Logged: rewards_chosen = beta (log pi - log ref)(y_w), rewards_rejected, margin (their difference),
accuracy (margin > 0); the same on the validation pairs at each evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tinychat.config import field
from tinychat.train import post
from tinychat.train.chat_data import Pair, pair_batch
from tinychat.train.config import TrainConfig
from tinychat.train.distributed import all_reduce_sum
from tinychat.train.loop import TrainResult
from tinychat.train.post import Reference, sequence_logps
from tinychat.train.reward import load_pairs


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,) and the implicit rewards beta * (log pi - log ref) of chosen and rejected."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    h = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen.detach(), rejected.detach()


@dataclass
class DPOConfig(post.PostConfig):
    stage: str = field("dpo", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    train: TrainConfig = post.train_defaults(lr=1e-4, warmup_steps=10, batch_size=16, eval_every=100)
    beta: float = field(0.1, help="strength of the pull towards the reference (higher = closer)")
    label_smoothing: float = field(0.0, help="assumed fraction of flipped labels (conservative DPO); 0 = DPO")
    rpo_alpha: float = field(0.0, help="weight of the chosen replies' per-token NLL added to the loss (RPO); 0 = DPO")


class DPOObjective(post.ItemObjective):
    name = "dpo"

    def __init__(
        self, cfg: DPOConfig, tok: Any, init: Any, pairs: list[Pair], val: list[Pair], reference: Reference
    ) -> None:
        super().__init__(cfg, tok, init)
        self.cfg: DPOConfig = cfg
        self.items, self.val, self.ref = pairs, val, reference

    def setup(self, ctx: Any) -> None:
        super().setup(ctx)
        self.ref.to(ctx.device)

    def batch(self, pairs: list[Pair], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """ids/mask of [chosen; rejected] and the reference's summed log-probabilities (no gradient)."""
        ids, mask, _ = (t.to(self.ctx.device) for t in pair_batch(pairs, self.tok.pad_id))
        raw = getattr(model, "module", model)
        with torch.no_grad(), self.ctx.autocast():
            ref = sequence_logps(lambda x: self.ref(raw, x), ids, mask)
        return {"ids": ids, "mask": mask, "ref": ref.float()}

    def count(self, batch: Any) -> int:
        return batch["ids"].shape[0] // 2

    def tokens(self, batch: Any) -> int:
        return batch["ids"].numel()

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pc, pr = sequence_logps(model, batch["ids"], batch["mask"]).chunk(2)
        rc, rr = batch["ref"].chunk(2)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.label_smoothing)
        n_chosen = batch["mask"][: pc.shape[0], 1:].sum(-1).clamp(min=1)
        nll_chosen = -pc / n_chosen
        if self.cfg.rpo_alpha:
            losses = losses + self.cfg.rpo_alpha * nll_chosen
        margin = chosen - rejected
        metrics = {
            "rewards_chosen": chosen.sum(),
            "rewards_rejected": rejected.sum(),
            "margin": margin.sum(),
            "accuracy": (margin > 0).float().sum(),
            "logp_chosen": pc.detach().sum(),
            "logp_rejected": pr.detach().sum(),
            "nll_chosen": nll_chosen.detach().sum(),
        }
        return losses.sum(), metrics

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        ctx = self.ctx
        keys = ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "nll_chosen")
        sums = torch.zeros(len(keys) + 2, device=ctx.device)
        for pairs in self.eval_chunks(self.val):
            with ctx.autocast():
                loss, m = self.loss(model, self.batch(pairs, model))
            n = torch.tensor(float(len(pairs)), device=ctx.device)
            sums += torch.stack([loss.float(), *(m[k] for k in keys), n])
        *vals, n = all_reduce_sum(sums).tolist()
        return {f"val_{k}": v / n for k, v in zip(("loss", *keys), vals)} if n else {}


def run_dpo(cfg: DPOConfig) -> TrainResult:
    inputs = post.locate(cfg, ("sft",), "preference")
    pairs = load_pairs(inputs.tok, inputs.data, cfg.train.seq_len, "dpo")
    val = load_pairs(inputs.tok, inputs.val, cfg.train.seq_len, "dpo")
    print(f"dpo: {len(pairs)} preference pairs, {len(val)} validation, beta {cfg.beta}, rpo_alpha {cfg.rpo_alpha}")
    model = post.start_model(cfg, inputs)
    reference = post.make_reference(model, cfg)
    post.add_peft(model, cfg, inputs.tok)
    return post.launch(cfg, DPOObjective(cfg, inputs.tok, inputs.init, pairs, val, reference), model, inputs)


def run(cfg: DPOConfig) -> int:
    return post.report("dpo", run_dpo(cfg), ("val_loss", "val_accuracy", "val_margin"))
