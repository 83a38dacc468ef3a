"""RLHF with PPO, as in InstructGPT: sample, score with a reward model, stay near the reference.

`tinychat ppo [--init SFT_DIR] [--reward_model RM_DIR] [--data PROMPTS]`, one rollout at a time:
  1. the policy samples a reply to each prompt (KV-cache batched generation);
  2. the reward model scores prompt + reply (or `--rewards` functions do, on verifiable tasks);
  3. per reply token t: r_t = -kl_coef (log pi_old - log ref)_t, plus the score on the last token;
  4. a value head on the policy's final hidden states estimates returns; advantages by GAE
     (delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lambda)^l delta_{t+l}), whitened per rollout;
  5. `epochs` x `minibatches` optimiser steps on the clipped objective, per reply token:
        L = max(-A rho, -A clip(rho, 1-eps, 1+eps))                       rho = pi / pi_old
          + vf_coef * 0.5 max((V - R)^2, (V_clip - R)^2) - ent_coef * H(pi)
     summed over reply tokens and averaged by the loop over the reply tokens of the step (sum / count).
Logged: reward (the scorer's mean), kl (per reply, sum over tokens of log pi_old - log ref), entropy,
clip_frac, approx_kl, pg_loss, vf_loss, value, response_len.

Why a value head on the shared trunk (not InstructGPT's separate value model): half the memory and
compute, the choice of TRL's original PPOTrainer; vf_coef keeps its gradient from swamping the policy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.model.transformer import Model
from tinychat.train import post
from tinychat.train.chat_data import Prompt
from tinychat.train.config import TrainConfig
from tinychat.train.loop import TrainContext, TrainResult
from tinychat.train.post import entropy, token_logprobs
from tinychat.train.rewards import resolve_rewards
from tinychat.train.rollout import FunctionRewards, RLConfig, RLObjective, Scorer, load_rl_prompts, masked_mean


class PolicyWithValue(Model):
    """The policy with a value head: `model(ids, values=True)` returns (logits, values (B, T) fp32)."""

    def forward(self, input_ids, cache=None, n_new=None, rows=None, values: bool = False, last=None):  # noqa: ANN001, ANN201
        if last is not None:  # generation's prefill: the logits (B, V) at one position per row
            return super().forward(input_ids, cache, n_new, rows, last=last)
        h = self.hidden_states(input_ids, cache, n_new, rows)
        logits = self.lm_head(h)
        return (logits, self.value_head(h).squeeze(-1).float()) if values else logits


def add_value_head(model: Model) -> PolicyWithValue:
    """Give a loaded policy a zero-initialised value head, in place (same parameters, one module more).

    Re-classing the instance keeps every parameter, name and LoRA wrapper where it is; the saved model
    leaves `value_head.*` out (PPOObjective.model_state).
    """
    model.__class__ = PolicyWithValue
    model.value_head = nn.Linear(model.cfg.d_model, 1, device=model.lm_head.weight.device)
    nn.init.zeros_(model.value_head.weight)
    nn.init.zeros_(model.value_head.bias)
    return model  # type: ignore[return-value]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (N, T) by generalised advantage estimation over the masked (reply) positions."""
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    m = mask.float()
    T = values.shape[1]
    for t in reversed(range(T)):
        nxt = m[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_v = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running * nxt) * m[:, t]
        adv[:, t] = running
    return adv, adv + values


class RewardModelScorer:
    """Scores replies with a reward model on prompt + reply (ending at the reply's <|im_end|>)."""

    def __init__(self, rm: nn.Module, pad_id: int, stop_ids: set[int], autocast: Any) -> None:
        self.rm, self.pad_id, self.stop_ids, self.autocast = rm.eval(), pad_id, stop_ids, autocast

    @torch.no_grad()
    def __call__(
        self, prompts: list[Prompt], responses: list[list[int]], texts: list[str], finished: list[bool]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from tinychat.train.rollout import sequences

        dev = next(self.rm.parameters()).device
        ids, _, lengths = sequences([p.ids for p in prompts], responses, self.pad_id, dev)
        with self.autocast():
            return self.rm(ids, lengths).float().cpu(), {}


@dataclass
class PPOConfig(RLConfig):
    stage: str = field("ppo", help="checkpoint folder name under RUNS_DIR/NAME/checkpoints")
    train: TrainConfig = post.train_defaults(lr=3e-5, warmup_steps=5, batch_size=16, eval_every=50, weight_decay=0.0)
    epochs: int = field(2, help="passes over each rollout")
    kl_coef: float = field(0.05, help="per-token KL penalty to the frozen reference, in the reward")
    reward_model: str = field("", help="reward model directory (default RUNS_DIR/NAME/checkpoints/reward)")
    gamma: float = field(1.0, help="discount")
    lam: float = field(0.95, help="GAE lambda")
    vf_coef: float = field(0.1, help="weight of the value loss")
    value_clip: float = field(0.2, help="clip of the value update around the rollout's values")
    ent_coef: float = field(0.0, help="weight of the entropy bonus")
    eval_samples: int = field(0, help="k of the pass@k measured at evaluation (0 = greedy only)")


class PPOObjective(RLObjective):
    name = "ppo"
    uses_values = True

    def __init__(self, *args: Any, reward_model: nn.Module | None = None, **kw: Any) -> None:
        """RLObjective's arguments; with `reward_model` the scorer is that model (placed on the device in setup)."""
        super().__init__(*args, **kw)
        self.reward_model = reward_model

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        if self.reward_model is not None:
            rm = self.reward_model.to(ctx.device)
            self.scorer = RewardModelScorer(rm, self.tok.pad_id, self.stop_ids, ctx.autocast)

    def advantages(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg: PPOConfig = self.cfg  # type: ignore[assignment]
        mask, values = batch["mask"], batch["old_values"]
        kl = (batch["old_logp"] - batch["ref_logp"]) if "ref_logp" in batch else torch.zeros_like(values)
        rewards = -cfg.kl_coef * kl * mask
        last = mask.float().cumsum(-1).argmax(-1)  # the last reply position of each row
        rewards[torch.arange(len(rewards), device=rewards.device), last] += batch["rewards"]
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        mean, std = masked_mean(adv, mask), masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt()
        batch["adv"] = ((adv - mean) / (std + 1e-8)) * mask
        batch["returns"] = returns
        return {"value": masked_mean(values, mask).item(), "return": masked_mean(returns, mask).item()}

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg: PPOConfig = self.cfg  # type: ignore[assignment]
        ids, m, adv = batch["ids"], batch["mask"].float(), batch["adv"]
        logits, values = model(ids, values=True)
        logits, values = logits[:, :-1], values[:, :-1]
        logp = token_logprobs(logits, ids[:, 1:], cfg.temperature)
        ratio = torch.exp(logp - batch["old_logp"])
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip))
        old_v, ret = batch["old_values"], batch["returns"]
        v_clip = old_v + (values - old_v).clamp(-cfg.value_clip, cfg.value_clip)
        vf = 0.5 * torch.max((values - ret) ** 2, (v_clip - ret) ** 2)
        ent = entropy(logits.detach(), cfg.temperature) if cfg.ent_coef == 0 else entropy(logits, cfg.temperature)
        per_token = pg + cfg.vf_coef * vf - cfg.ent_coef * ent
        with torch.no_grad():
            metrics = {
                "pg_loss": (pg * m).sum(),
                "vf_loss": (vf * m).sum(),
                "entropy": (ent * m).sum(),
                "clip_frac": (((ratio - 1).abs() > cfg.clip).float() * m).sum(),
                "approx_kl": (0.5 * (logp - batch["old_logp"]) ** 2 * m).sum(),
                **self.rollout_metrics(batch),
            }
        return (per_token * m).sum(), metrics

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith("value_head.")}


def run_ppo(cfg: PPOConfig) -> TrainResult:
    inputs = post.locate(cfg, ("dpo", "sft"), "rl")
    prompts, val = load_rl_prompts(inputs, cfg, ("messages",), "ppo")
    model = post.start_model(cfg, inputs)
    scorer: Scorer | None = None
    rm = None
    if cfg.rewards:
        scorer = FunctionRewards(resolve_rewards(cfg.rewards), cfg.reward_weights, cfg.rewards)
    else:
        from tinychat.train.reward import load_reward_model

        rm_dir = Path(cfg.reward_model) if cfg.reward_model else inputs.run_dir / "checkpoints" / "reward"
        if not (rm_dir / "config.json").is_file():
            raise UserError(
                f"no reward model at {rm_dir}; train one with `tinychat reward`, pass --reward_model "
                "or use --rewards for a verifiable reward."
            )
        rm = load_reward_model(rm_dir).requires_grad_(False)
        if rm.cfg.vocab_size < inputs.tok.vocab_size:
            raise UserError(f"the reward model {rm_dir} has a smaller vocabulary than the policy's tokenizer.")
    reference = post.make_reference(model, cfg) if cfg.kl_coef > 0 else None
    torch.manual_seed(cfg.train.seed)
    policy = add_value_head(model)
    post.add_peft(policy, cfg, inputs.tok, heads=("value_head",))
    objective = PPOObjective(cfg, inputs.tok, inputs.init, prompts, val, scorer, reference, reward_model=rm)
    return post.launch(cfg, objective, policy, inputs)


def run(cfg: PPOConfig) -> int:
    return post.report("ppo", run_ppo(cfg), ("eval_reward", "eval_accuracy"))
