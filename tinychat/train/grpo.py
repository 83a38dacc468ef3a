"""GRPO: reinforcement learning on verifiable rewards, with the group of samples as its own baseline.

`tinychat grpo [--init SFT_DIR] [--data RL_ROWS] [--samples 8] [--rewards answer format]`, per rollout:
each prompt is answered `samples` (G) times; Python reward functions score each reply (exact answer
against the row's "answer", well-formedness, or a user's own `module:function`); the advantage of
reply i is its reward normalised within its group, A_i = (r_i - mean_G) / (std_G + 1e-4) (with
--scale_rewards false: r_i - mean_G only, as Dr. GRPO argues), on every token of the reply. Loss per
reply token, with rho = pi / pi_old,

    L = -min(rho A, clip(rho, 1-eps, 1+eps) A) + kl_coef * (exp(ref - log pi) - (ref - log pi) - 1)

(the KL term, DeepSeekMath's unbiased estimator, only with kl_coef > 0), summed over reply tokens and
averaged by the loop over the reply tokens of the step: token-level normalisation (DAPO), so long and
short replies weigh per token, not per reply. No value model, no reward model.
Logged: reward (mean) and each reward function's mean, pass@k (groups with a reply scoring >= --success),
reward_std, kl, clip_frac, entropy, response_len; at evaluation eval_accuracy (greedy) and eval_pass@k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinychat.config import field
from tinychat.train import post
from tinychat.train.config import TrainConfig
from tinychat.train.loop import TrainResult
from tinychat.train.post import entropy, token_logprobs
from tinychat.train.rewards import resolve_rewards
from tinychat.train.rollout import FunctionRewards, RLConfig, RLObjective, load_rl_prompts


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N = prompts x group samples (a prompt's samples adjacent) -> advantages (N,)."""
    r = rewards.view(-1, group)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True, unbiased=group > 1) + 1e-4)
    return adv.flatten()


@dataclass
class GRPOConfig(RLConfig):
    stage: str = field("grpo", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    train: TrainConfig = post.train_defaults(lr=5e-5, warmup_steps=5, batch_size=8, eval_every=50, weight_decay=0.0)
    samples: int = field(8, help="replies sampled per prompt: the group")
    rewards: list[str] = field(["answer", "format"], help="reward functions: answer, format or module:function")
    reward_weights: list[float] = field([1.0, 0.1], help="a weight per reward function")
    scale_rewards: bool = field(True, help="divide advantages by the group's reward std (false: Dr. GRPO)")


class GRPOObjective(RLObjective):
    name = "grpo"

    def advantages(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg: GRPOConfig = self.cfg  # type: ignore[assignment]
        rewards = batch["rewards"]
        adv = group_advantages(rewards, cfg.samples, cfg.scale_rewards)
        batch["adv"] = adv[:, None] * batch["mask"]
        solved = (rewards >= cfg.success).view(-1, cfg.samples)
        return {f"pass@{cfg.samples}": solved.any(-1).float().mean().item(), "solved": solved.float().mean().item()}

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg: GRPOConfig = self.cfg  # type: ignore[assignment]
        ids, m, adv = batch["ids"], batch["mask"].float(), batch["adv"]
        logits = model(ids)[:, :-1]
        logp = token_logprobs(logits, ids[:, 1:], cfg.temperature)
        ratio = torch.exp(logp - batch["old_logp"])
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv)
        metrics = {}
        if "ref_logp" in batch:
            d = batch["ref_logp"] - logp
            kl = torch.exp(d) - d - 1
            per_token = per_token + cfg.kl_coef * kl
            metrics["kl_k3"] = (kl.detach() * m).sum()
        with torch.no_grad():
            metrics.update(
                clip_frac=(((ratio - 1).abs() > cfg.clip).float() * m).sum(),
                entropy=(entropy(logits, cfg.temperature) * m).sum(),
                **self.rollout_metrics(batch),
            )
        return (per_token * m).sum(), metrics


def run_grpo(cfg: GRPOConfig) -> TrainResult:
    inputs = post.locate(cfg, ("dpo", "sft"), "rl")
    prompts, val = load_rl_prompts(inputs, cfg, ("messages", "answer"), "grpo")
    scorer = FunctionRewards(resolve_rewards(cfg.rewards), cfg.reward_weights, cfg.rewards)
    model = post.start_model(cfg, inputs)
    reference = post.make_reference(model, cfg) if cfg.kl_coef > 0 else None
    post.add_peft(model, cfg, inputs.tok)
    objective = GRPOObjective(cfg, inputs.tok, inputs.init, prompts, val, scorer, reference)
    return post.launch(cfg, objective, model, inputs)


def run(cfg: GRPOConfig) -> int:
    return post.report("grpo", run_grpo(cfg), ("eval_accuracy", f"eval_pass@{cfg.eval_samples}"))
