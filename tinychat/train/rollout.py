"""Sampling responses inside training, and the part of PPO and GRPO that is the same: rollouts.

Generation uses tinychat.infer.generate_ids, the batched KV-cache path (prompts of different lengths
prefill together and decode one token per step for every row). The log-probabilities of the sampled
tokens are then recomputed by one ordinary forward pass over prompt + response, the same computation
the loss makes, so the importance ratio is exactly 1 before the first update (a sampler's own
probabilities differ in the last bits: different kernels, a KV cache, batch shapes).

A rollout is made once and used for `epochs` passes of `minibatches` optimiser steps each; the loop
asks for one optimiser step at a time, so step s uses rollout s // (epochs x minibatches). Resuming in
the middle of a rollout regenerates it from the resumed policy (rollouts are not checkpointed).
Rollout statistics (reward, KL, pass@k, ...) reach the loop's metrics as `value x count` of each
micro-batch, which the loop's sum / count turns back into the value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tinychat.config import field
from tinychat.errors import UserError
from tinychat.train.chat_data import Prompt, Schedule, encode_prompts, read_rows, shard
from tinychat.train.distributed import all_reduce_sum
from tinychat.train.loop import TrainContext
from tinychat.train.post import PostConfig, PostObjective, Reference, token_logprobs
from tinychat.train.rewards import RewardFn, answer_reward


@dataclass
class RLConfig(PostConfig):
    """Options shared by ppo and grpo."""

    default_budget: ClassVar[dict[str, Any]] = {"max_steps": 200}

    samples: int = field(1, help="responses sampled per prompt (GRPO's group size)")
    max_new_tokens: int = field(64, help="response length limit")
    temperature: float = field(1.0, help="sampling temperature (the log-probabilities use it too)")
    epochs: int = field(1, help="passes over each rollout")
    minibatches: int = field(2, help="optimiser steps per pass over a rollout")
    micro_batch: int = field(0, help="sequences per forward pass (0 = the whole minibatch)")
    clip: float = field(0.2, help="PPO ratio clip epsilon")
    kl_coef: float = field(0.0, help="weight of the KL penalty to the frozen reference")
    rewards: list[str] = field([], help="reward functions: answer, format or module:function")
    reward_weights: list[float] = field([], help="a weight per reward function (default 1 each)")
    success: float = field(1.0, help="a sample with reward >= this counts as solved (pass@k)")
    eval_rows: int = field(64, help="validation prompts answered at each evaluation (0 = none)")
    eval_samples: int = field(4, help="k of the pass@k measured at evaluation (0 = greedy only)")


# ---------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    stop_ids: set[int],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    ctx: TrainContext,
    batch: int = 0,
) -> tuple[list[list[int]], list[bool]]:
    """Responses (ending with their stop token when they stopped) and whether each stopped by itself."""
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams

    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    batch = batch or len(prompts)
    for start in range(0, len(prompts), batch):
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + start)
        # stop_ids=None + on_token: the stop token is kept; the policy chose it, and it is trained like any other
        with ctx.autocast():
            ids, _, _ = generate_ids(model, prompts[start : start + batch], params, None, lambda _r, t: t in stop_ids)
        out.extend(ids)
    model.train(was_training)
    return out, [bool(r) and r[-1] in stop_ids for r in out]


def sequences(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, L) = prompt + response, right-padded; mask (N, L-1) True where the target is a response
    token (position t predicts ids[t+1]); lengths (N,)."""
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    ids = torch.full((len(lens), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lens), L - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : lens[i]] = torch.tensor(p + r)
        mask[i, len(p) - 1 : lens[i] - 1] = True
    return ids.to(device), mask.to(device), torch.tensor(lens, device=device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


class FunctionRewards:
    """Weighted sum of reward functions; also returns each function's mean, for the logs."""

    def __init__(self, fns: list[RewardFn], weights: list[float], names: list[str]) -> None:
        if weights and len(weights) != len(fns):
            raise UserError(f"--reward_weights has {len(weights)} values for {len(fns)} reward functions.")
        self.fns, self.weights = fns, weights or [1.0] * len(fns)
        self.names = [n.split(":")[-1] for n in names]

    def __call__(
        self, prompts: list[Prompt], responses: list[list[int]], texts: list[str], finished: list[bool]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cols = [[float(fn(t, p.row, f)) for p, t, f in zip(prompts, texts, finished)] for fn in self.fns]
        total = torch.tensor([sum(w * c[i] for w, c in zip(self.weights, cols)) for i in range(len(texts))])
        return total, {f"reward_{n}": sum(c) / len(c) for n, c in zip(self.names, cols)}


Scorer = Callable[[list[Prompt], list[list[int]], list[str], list[bool]], tuple[torch.Tensor, dict[str, float]]]


def load_rl_prompts(inputs: Any, cfg: RLConfig, fields: tuple[str, ...], command: str) -> tuple[list, list | None]:
    """Training and validation prompts; prompts too long for seq_len - max_new_tokens are skipped."""
    limit = cfg.train.seq_len - cfg.max_new_tokens
    if limit <= 0:
        raise UserError(f"train.seq_len ({cfg.train.seq_len}) leaves no room for prompts after max_new_tokens.")
    prompts, skipped = encode_prompts(inputs.tok, read_rows(inputs.data, fields, command), limit)
    if skipped:
        print(f"{command}: {skipped} prompts longer than {limit} tokens were skipped")
    if not prompts:
        raise UserError(f"{inputs.data}: no prompt fits in train.seq_len - max_new_tokens ({limit}) tokens.")
    val = None
    if inputs.val is not None:
        val, _ = encode_prompts(inputs.tok, read_rows(inputs.val, fields, command), limit)
    return prompts, val


# ---------------------------------------------------------------------------------------- the shared objective


class RLObjective(PostObjective):
    """Rollout bookkeeping for PPO and GRPO; subclasses add `advantages` and `loss`."""

    uses_values = False  # PPO's policy also returns value estimates

    def __init__(
        self,
        cfg: RLConfig,
        tok: Any,
        init: Any,
        prompts: list[Prompt],
        val_prompts: list[Prompt] | None,
        scorer: Scorer,
        reference: Reference | None,
    ) -> None:
        super().__init__(cfg, tok, init)
        self.cfg: RLConfig = cfg
        self.prompts, self.val_prompts, self.scorer, self.ref = prompts, val_prompts, scorer, reference
        self.stop_ids = set(tok.stop_ids)
        self._cycle, self._rollout = -1, {}

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.sched = Schedule(
            len(self.prompts), self.cfg.train.batch_size, 1, ctx.dist.world, ctx.dist.rank, self.cfg.train.seed
        )
        if self.ref is not None:
            self.ref.to(ctx.device)

    @property
    def steps_per_rollout(self) -> int:
        return self.cfg.epochs * self.cfg.minibatches

    def forward(self, model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.uses_values:
            return model(ids, values=True)
        return model(ids), None

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, prompts: list[Prompt], seed: int) -> dict[str, Any]:
        """Sample, score and measure one batch of prompts (each `samples` times) with the current policy."""
        cfg, dev = self.cfg, self.ctx.device
        reps = [p for p in prompts for _ in range(cfg.samples)]
        responses, finished = sample(
            model, [p.ids for p in reps], self.stop_ids, cfg.max_new_tokens, cfg.temperature, seed, self.ctx
        )
        ids, mask, lengths = sequences([p.ids for p in reps], responses, self.tok.pad_id, dev)
        with self.ctx.autocast():
            logits, values = self.forward(model, ids)
            old_logp = token_logprobs(logits[:, :-1], ids[:, 1:], cfg.temperature)
            ref_logp = None
            if self.ref is not None:
                ref_logp = token_logprobs(self.ref(model, ids)[:, :-1], ids[:, 1:], cfg.temperature)
        texts = [decode_reply(self.tok, r) for r in responses]
        rewards, parts = self.scorer(reps, responses, texts, finished)
        rewards = rewards.to(dev, torch.float32)
        batch = {"ids": ids, "mask": mask, "lengths": lengths, "old_logp": old_logp, "rewards": rewards}
        if values is not None:
            batch["old_values"] = values[:, :-1].float()
        if ref_logp is not None:
            batch["ref_logp"] = ref_logp
        stats = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "response_len": mask.sum(-1).float().mean().item(),
            "finished": sum(finished) / len(finished),
            **parts,
        }
        if ref_logp is not None:
            stats["kl"] = ((old_logp - ref_logp) * mask).sum(-1).mean().item()
        batch["stats"] = {**stats, **self.advantages(batch)}
        return batch

    def advantages(self, batch: dict[str, Any]) -> dict[str, float]:
        """Add "adv" (N, L-1) (and anything else the loss needs) to the rollout; return extra statistics."""
        raise NotImplementedError

    def micro_batches(self, step: int, model: torch.nn.Module) -> list[Any]:
        cycle, within = divmod(step, self.steps_per_rollout)
        if cycle != self._cycle:
            chosen = [self.prompts[i] for i in self.sched.items(cycle, 0)]
            seed = self.cfg.train.seed * 7919 + cycle * 104729 + self.ctx.dist.rank
            self._rollout, self._cycle = self.rollout(model, chosen, seed), cycle
        epoch, part = divmod(within, self.cfg.minibatches)
        roll = self._rollout
        g = torch.Generator().manual_seed(self.cfg.train.seed + 31 * cycle + epoch)
        order = torch.randperm(len(roll["rewards"]), generator=g).tensor_split(self.cfg.minibatches)[part]
        micro = order.split(self.cfg.micro_batch) if self.cfg.micro_batch > 0 else [order]
        return [self._slice(roll, idx.to(self.ctx.device)) for idx in micro if len(idx)]

    @staticmethod
    def _slice(roll: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
        T = int(roll["lengths"][idx].max())  # drop padding columns no row of this micro-batch needs
        out: dict[str, Any] = {"stats": roll["stats"]}
        for k, v in roll.items():
            if isinstance(v, torch.Tensor):
                v = v[idx]
                out[k] = v[:, :T] if k == "ids" else v[:, : T - 1] if v.dim() == 2 else v
        return out

    def count(self, batch: Any) -> int:
        return int(batch["mask"].sum())

    def tokens(self, batch: Any) -> int:
        return batch["ids"].numel()

    def progress(self, step: int) -> float:
        return self.sched.progress(step // self.steps_per_rollout)

    def rollout_metrics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Rollout statistics as `value x count`, so the loop's sum / count logs the value itself."""
        n = batch["mask"].sum().float()
        return {k: n * v for k, v in batch["stats"].items()}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.cfg.train.seed, "steps_per_rollout": self.steps_per_rollout}

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Greedy replies to validation prompts: mean reward, answer accuracy, and pass@k over k samples."""
        if not self.cfg.eval_rows:
            return {}
        rows = self.val_prompts if self.val_prompts else self.prompts  # no validation rows: training prompts
        mine = shard(rows, self.ctx.dist.rank, self.ctx.dist.world, self.cfg.eval_rows)
        cfg = self.cfg
        raw = getattr(model, "module", model)
        result, samples = evaluate_prompts(
            raw, self.tok, mine, self.ctx, cfg.max_new_tokens, cfg.eval_samples, cfg.temperature, self.scorer
        )
        if self.ctx.dist.is_main and samples:
            result["samples"] = samples
        return result


def decode_reply(tok: Any, response: list[int]) -> str:
    """A response's text without its stop token."""
    return tok.decode(response[:-1] if response and response[-1] in tok.stop_ids else response)


def evaluate_prompts(
    raw: torch.nn.Module,
    tok: Any,
    prompts: list[Prompt],
    ctx: TrainContext,
    max_new_tokens: int,
    k: int = 0,
    temperature: float = 1.0,
    scorer: Scorer | None = None,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Answer each rank's prompts greedily (and k times sampled); metrics summed over ranks:
    eval_reward (the scorer's mean, greedy), eval_accuracy and eval_pass@k (rows with an "answer").
    Also returns a few (prompt, reply) samples of this rank."""
    dev, stops = ctx.device, set(tok.stop_ids)
    sums = torch.zeros(6, device=dev)  # reward, n, correct, n_answer, solved, n_solvable
    samples: list[dict[str, str]] = []
    if prompts:
        greedy, fin = sample(raw, [p.ids for p in prompts], stops, max_new_tokens, 0.0, 0, ctx)
        texts = [decode_reply(tok, r) for r in greedy]
        if scorer is not None:
            rewards, _ = scorer(prompts, greedy, texts, fin)
            sums[:2] += torch.tensor([rewards.sum().item(), len(prompts)], device=dev)
        has = [p for p in prompts if "answer" in p.row]
        correct = sum(answer_reward(t, p.row, f) for p, t, f in zip(prompts, texts, fin) if "answer" in p.row)
        sums[2:4] += torch.tensor([correct, len(has)], device=dev)
        if k > 0 and has:
            reps = [p for p in has for _ in range(k)]
            out, fin_k = sample(raw, [p.ids for p in reps], stops, max_new_tokens, temperature, 1, ctx)
            ok = [answer_reward(decode_reply(tok, r), p.row, f) >= 1.0 for p, r, f in zip(reps, out, fin_k)]
            solved = sum(any(ok[i * k : (i + 1) * k]) for i in range(len(has)))
            sums[4:] += torch.tensor([solved, len(has)], device=dev)
        samples = [{"prompt": tok.decode(p.ids[-40:]), "completion": t} for p, t in zip(prompts[:3], texts)]
    s = all_reduce_sum(sums).tolist()
    result: dict[str, float] = {}
    if s[1]:
        result["eval_reward"] = s[0] / s[1]
    if s[3]:
        result["eval_accuracy"] = s[2] / s[3]
    if s[5]:
        result[f"eval_pass@{k}"] = s[4] / s[5]
    return result, samples
