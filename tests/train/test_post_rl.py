"""PPO and GRPO raise a toy verifiable reward; GAE and group advantages against hand computation;
PPO with a reward model; the reward functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from post_helpers import RUN, common, metrics

from tinychat.cli import main
from tinychat.train.grpo import group_advantages
from tinychat.train.ppo import gae
from tinychat.train.rewards import answer_reward, exact_match, format_reward

pytest_plugins = ("post_helpers",)  # its fixtures: toy_runs, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")
TOY = ["--rewards", "post_helpers:digit_reward", "--reward_weights", "1", "--max_new_tokens", "8", "--samples", "4"]


def rl_args(runs: Path, *extra: str) -> list[str]:
    return [*common(runs), "--init", str(runs / RUN / "checkpoints" / "pretrain"), "--train.lr", "1e-2", *TOY, *extra]


def rollout_rewards(runs: Path, stage: str) -> list[float]:
    return [r["reward"] for r in metrics(runs / RUN, stage)]


def test_grpo_raises_the_reward_on_a_toy_task(toy_runs: Path):
    extra = ["--train.max_steps", "30", "--train.eval_every", "30", "--eval_rows", "8", "--eval_samples", "2"]
    assert main(["grpo", *rl_args(toy_runs, *extra)]) == 0
    rewards = rollout_rewards(toy_runs, "grpo")
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    last = metrics(toy_runs / RUN, "grpo")[-1]
    for key in ("pass@4", "reward_std", "reward_digit_reward", "clip_frac", "entropy", "response_len"):
        assert key in last
    ev = metrics(toy_runs / RUN, "grpo", "eval")[-1]
    assert {"eval_reward", "eval_accuracy", "eval_pass@2"} <= set(ev)  # the rows carry an "answer"


def test_ppo_raises_the_reward_on_a_toy_task(toy_runs: Path):
    extra = [
        "--train.max_steps",
        "30",
        "--train.eval_every",
        "0",
        "--eval_rows",
        "0",
        "--epochs",
        "1",
        "--kl_coef",
        "0.01",
    ]
    assert main(["ppo", *rl_args(toy_runs, *extra)]) == 0
    rewards = rollout_rewards(toy_runs, "ppo")
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    last = metrics(toy_runs / RUN, "ppo")[-1]
    for key in ("kl", "entropy", "clip_frac", "approx_kl", "pg_loss", "vf_loss", "value"):
        assert key in last
    assert last["kl"] > 0  # the policy moved away from the reference, and the log says by how much
    from safetensors import safe_open

    with safe_open(str(toy_runs / RUN / "checkpoints" / "ppo" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("value_head") for k in f.keys())  # noqa: SIM118 - the saved policy has no value head


def test_ppo_scores_with_a_reward_model_and_grpo_trains_lora_with_kl(toy_runs: Path):
    from tinychat.model import Model
    from tinychat.tokenizer import Tokenizer
    from tinychat.train.reward import RewardModel, save_reward_model

    base = toy_runs / RUN / "checkpoints" / "pretrain"
    rm = RewardModel.from_causal_lm(Model.from_pretrained(str(base)))
    save_reward_model(rm, toy_runs / "rm", rm.state_dict(), Tokenizer.from_pretrained(base).pad_id)
    args = [
        *common(toy_runs),
        "--init",
        str(base),
        "--max_new_tokens",
        "6",
        "--train.max_steps",
        "2",
        "--train.eval_every",
        "0",
        "--eval_rows",
        "4",
    ]
    assert main(["ppo", *args, "--reward_model", str(toy_runs / "rm"), "--stage", "ppo_rm"]) == 0
    rec = metrics(toy_runs / RUN, "ppo_rm")
    assert len(rec) == 2 and rec[0]["reward"] != 0.0 and "eval_reward" in metrics(toy_runs / RUN, "ppo_rm", "eval")[0]
    # LoRA with a KL term: the reference is the policy with its adapters off (no second model)
    assert main(["grpo", *args, "--samples", "2", "--kl_coef", "0.1", "--lora.rank", "2", "--stage", "grpo_lora"]) == 0
    assert "kl_k3" in metrics(toy_runs / RUN, "grpo_lora")[-1]
    assert (toy_runs / RUN / "checkpoints" / "grpo_lora" / "adapter" / "adapter_model.safetensors").is_file()


def test_gae_matches_a_direct_computation():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:5], mask[1, 0:7], mask[2, 4:6] = True, True, True
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i in range(3):
        pos = mask[i].nonzero().flatten().tolist()
        for j, t in enumerate(pos):
            want = 0.0
            for k, s in enumerate(pos[j:]):
                nxt = values[i, pos[j + k + 1]] if j + k + 1 < len(pos) else 0.0
                want += (0.9 * 0.8) ** k * (rewards[i, s] + 0.9 * nxt - values[i, s])
            assert adv[i, t].item() == pytest.approx(float(want), abs=1e-5)
    assert (adv[~mask] == 0).all()
    torch.testing.assert_close(ret, adv + values)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(r, 4)
    assert adv[:4].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-3)  # std of [1,0,0,0] is 0.5
    assert adv[4:].abs().max() == 0  # a group that agrees teaches nothing
    assert group_advantages(r, 4, scale=False)[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_reward_functions():
    assert exact_match("The answer is: Velmora.", "velmora") is False  # not the final answer alone
    assert exact_match("Step 1 ...\nAnswer: Velmora.", "velmora")
    assert exact_match("1,234", "1234") and exact_match("It is 42", "42") and not exact_match("41", "42")
    assert answer_reward(" 12 ", {"answer": "12"}) == 1.0
    assert answer_reward("Answer: 1979", {"answer": "1979", "check": "number"}) == 1.0  # tinyworld's checker
    assert format_reward("5", {}, True) == 1.0
    assert format_reward("5", {}, False) == 0.0 and format_reward("<think>hm", {}, True) == 0.0
    row = {"answer": "87", "check": "number"}
    assert format_reward("I don't have any information about that.", row, True) == 0.0  # not a free reward
    assert format_reward("87", row, True) == 1.0
