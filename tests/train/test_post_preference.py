"""DPO and the reward model: the loss against hand computation, a planted preference learned, and the
reward model directory transformers opens as a sequence classifier."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from post_helpers import RUN, common, metrics, preference_rows

from tinychat.cli import main
from tinychat.train.chat_data import encode_pairs
from tinychat.train.dpo import DPOConfig, DPOObjective, dpo_loss
from tinychat.train.post import Reference, frozen_copy, token_logprobs

pytest_plugins = ("post_helpers",)  # its fixtures: toy_runs, one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_loss_equals_the_hand_computed_value():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # h = 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; loss = -log sigmoid(0.5) = log(1 + e^-0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25))
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(0.8 * math.log1p(math.exp(-0.5)) + 0.2 * math.log1p(math.exp(0.5)))


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.7])
def test_dpo_objective_loss_matches_per_sequence_log_probabilities(tiny_tokenizer, tiny_model_dir: Path, rpo_alpha):
    from tinychat.model import Model
    from tinychat.train.distributed import DistInfo
    from tinychat.train.loop import TrainContext

    tok = tiny_tokenizer
    policy = Model.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(5)
    other = Model(policy.cfg)  # a reference unlike the policy, so both terms matter
    pairs, _ = encode_pairs(tok, [(f"row {i}", r) for i, r in enumerate(preference_rows(3))], 100)
    cfg = DPOConfig(beta=0.3, rpo_alpha=rpo_alpha)
    obj = DPOObjective(cfg, tok, tiny_model_dir, pairs, [], Reference(frozen_copy(other)))
    obj.setup(
        TrainContext(cfg.train, DistInfo(0, 1, 0, torch.device("cpu")), torch.device("cpu"), None, Path("."), "dpo")
    )
    loss, m = obj.loss(policy, obj.batch(pairs, policy))

    def logp(model: torch.nn.Module, ids: list[int], mask: list[bool]) -> float:  # one unpadded sequence
        with torch.no_grad():
            lp = token_logprobs(model(torch.tensor([ids]))[:, :-1], torch.tensor([ids[1:]]))[0]
        return sum(v for v, keep in zip(lp.tolist(), mask[1:]) if keep)

    expected, margins = 0.0, 0.0
    for p in pairs:
        n_chosen = sum(p.chosen_mask[1:])  # RPO: the chosen reply's NLL per token, weighted by rpo_alpha
        expected += rpo_alpha * -logp(policy, p.chosen, p.chosen_mask) / n_chosen
        h = cfg.beta * (logp(policy, p.chosen, p.chosen_mask) - logp(other, p.chosen, p.chosen_mask)) - cfg.beta * (
            logp(policy, p.rejected, p.rejected_mask) - logp(other, p.rejected, p.rejected_mask)
        )
        expected += math.log1p(math.exp(-h))
        margins += h
    assert obj.count(obj.batch(pairs, policy)) == 3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert m["margin"].item() == pytest.approx(margins, rel=1e-4, abs=1e-5)


def test_dpo_learns_the_planted_preference_and_logs_rewards(toy_runs: Path):
    args = ["--train.max_steps", "24", "--train.lr", "3e-3", "--train.eval_every", "12", "--beta", "0.5"]
    assert main(["dpo", *common(toy_runs), "--init", str(toy_runs / RUN / "checkpoints" / "pretrain"), *args]) == 0
    train = metrics(toy_runs / RUN, "dpo")
    for key in ("rewards_chosen", "rewards_rejected", "margin", "accuracy", "loss"):
        assert key in train[-1]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    ev = metrics(toy_runs / RUN, "dpo", "eval")[-1]
    assert ev["val_accuracy"] == 1.0 and ev["val_margin"] > 0.5 and ev["val_loss"] < 0.5
    assert ev["val_rewards_chosen"] > ev["val_rewards_rejected"]
    assert (toy_runs / RUN / "checkpoints" / "dpo" / "model.safetensors").is_file()


def test_reward_model_ranks_the_planted_preference_and_opens_in_transformers(toy_runs: Path):
    args = ["--train.max_steps", "30", "--train.lr", "3e-3", "--train.eval_every", "0"]
    assert main(["reward", *common(toy_runs), "--init", str(toy_runs / RUN / "checkpoints" / "pretrain"), *args]) == 0
    ev = metrics(toy_runs / RUN, "reward", "eval")[-1]
    assert ev["val_accuracy"] == 1.0, ev
    assert "accuracy" in metrics(toy_runs / RUN, "reward")[-1]
    out = toy_runs / RUN / "checkpoints" / "reward"
    from tinychat.tokenizer import Tokenizer
    from tinychat.train.chat_data import pair_batch
    from tinychat.train.reward import load_reward_model

    tok = Tokenizer.from_pretrained(out)
    pairs, _ = encode_pairs(tok, [("r", r) for r in preference_rows(6, seed=7)], 100)
    ids, _, lengths = pair_batch(pairs, tok.pad_id)
    rm = load_reward_model(out)
    with torch.no_grad():
        ours = rm(ids, lengths)
    chosen, rejected = ours.chunk(2)
    assert (chosen > rejected).all()  # held-out pairs: "yes ..." outranks "no ..."
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3ForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_id
    with torch.no_grad():
        theirs = hf(ids).logits.squeeze(-1)  # transformers finds the last non-padding token itself
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_reward_model_with_lora_saves_a_seq_cls_adapter_that_merges(toy_runs: Path, tmp_path: Path):
    args = ["--train.max_steps", "4", "--train.eval_every", "0", "--lora.rank", "4", "--stage", "reward_lora"]
    assert main(["reward", *common(toy_runs), "--init", str(toy_runs / RUN / "checkpoints" / "pretrain"), *args]) == 0
    stage = toy_runs / RUN / "checkpoints" / "reward_lora"
    import json

    conf = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["modules_to_save"] == ["score"]
    assert main(["merge", "--adapter", str(stage / "adapter"), "--out", str(tmp_path / "rm")]) == 0
    from tinychat.train.reward import load_reward_model

    ids = torch.randint(16, 200, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            load_reward_model(tmp_path / "rm")(ids), load_reward_model(stage)(ids), atol=1e-5, rtol=0
        )


def test_pairs_with_tools_render_the_schema_and_learn_only_the_assistant_turns(tiny_tokenizer):
    """A calculator pair (tinychat.world.preference.tool_pairs): both replies are scored after the same prompt with
    the tool schema in it, and the tool's result is context, not a trained token."""
    from tinychat.world.arith import CALCULATOR_TOOL
    from tinychat.world.messages import assistant, tool_call, tool_result, user

    tok = tiny_tokenizer
    prompt = [user("What is 383 times 42?")]
    chosen = [
        tool_call("c0", "calculator", {"expression": "383 * 42"}),
        tool_result("c0", "calculator", "16086"),
        assistant("16086"),
    ]
    row = {"prompt": prompt, "chosen": chosen, "rejected": [assistant("16090")], "tools": [CALCULATOR_TOOL]}
    (pair,), skipped = encode_pairs(tok, [("r", row)], 4096)
    head = tok.render_chat(prompt, [CALCULATOR_TOOL], add_generation_prompt=False).ids
    assert skipped == 0 and pair.chosen[: len(head)] == pair.rejected[: len(head)] == head  # the schema is in both
    full = tok.render_chat(prompt + chosen, [CALCULATOR_TOOL])
    result = tok.render_chat(prompt + chosen[:2], [CALCULATOR_TOOL]).ids
    call = tok.render_chat(prompt + chosen[:1], [CALCULATOR_TOOL]).ids
    assert pair.chosen == full.ids[: len(pair.chosen)]
    assert not any(pair.chosen_mask[len(call) : len(result)])  # the tool's message is not learned
    assert any(pair.chosen_mask[len(head) : len(call)]) and any(pair.chosen_mask[len(result) :])
