"""Speculative decoding: greedy output identical to plain decoding; sampled output keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

from tinychat.errors import UserError
from tinychat.infer.generate import generate_ids
from tinychat.infer.sampling import SamplingParams
from tinychat.infer.speculative import Speculative, lookup, speculative_generate_ids
from tinychat.model import Model, ModelConfig


def toy(seed: int, vocab: int = 300, **kw) -> Model:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, d_model=32, n_layer=2, n_head=2, n_kv_head=1, head_dim=16, d_ff=64, max_seq_len=128)
    return Model(ModelConfig(**{**cfg, **kw})).eval()


def test_prompt_lookup_finds_the_latest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2], 3, 3, 1) == [3, 7, 5]  # "1 2" last seen before "3 7 5"
    assert lookup([4, 5, 6], 2, 3, 1) == []
    assert lookup([7, 8, 7], 4, 2, 1) == [8, 7]


@pytest.mark.parametrize("use_draft", [True, False])
def test_greedy_output_is_identical_to_plain_decoding(use_draft):
    target = toy(0)
    draft = toy(1, n_layer=1) if use_draft else None
    torch.manual_seed(5)
    for trial in range(4):
        prompt = torch.randint(0, 300, (3 + 7 * trial,)).tolist()
        prompt = prompt + prompt[: 5 + trial]  # a repeat gives prompt lookup something to find
        params = SamplingParams(temperature=0, max_new_tokens=30, stop_on_eos=False)
        plain = generate_ids(target, [prompt], params)[0][0]
        spec = Speculative(draft=draft, k=4)
        ids, reason = speculative_generate_ids(target, prompt, params, spec)
        assert ids == plain and reason == "length"
    assert spec.stats["rounds"] < 30  # some guesses were accepted (fewer target calls than tokens)


@pytest.mark.parametrize("use_draft", [True, False])
def test_greedy_output_is_identical_with_virtual_tokens(use_draft):
    """A prefix adapter's virtual tokens sit first in the target's cache: every rewind keeps them."""
    from tinychat.model.peft import prompt as vt

    target = toy(0, vocab=50, init_std=0.2)  # larger weights: the output depends on the whole context
    torch.manual_seed(3)
    vt.attach_virtual_tokens(target, vt.PromptSpec(kind="prefix", n=5, trained=False))
    draft = toy(1, vocab=50, n_layer=1, init_std=0.2) if use_draft else None
    prompt = [1, 2, 3, 4] * 3
    params = SamplingParams(temperature=0, max_new_tokens=30, stop_on_eos=False)
    plain = generate_ids(target, [prompt], params)[0][0]
    spec = Speculative(draft=draft, k=4)
    assert speculative_generate_ids(target, prompt, params, spec)[0] == plain
    assert spec.stats["rounds"] < 30  # guesses were accepted: the cache was rewound between rounds


def test_a_draft_of_the_target_itself_is_always_accepted():
    target = toy(0)
    spec = Speculative(draft=target, k=3)
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_on_eos=False)
    speculative_generate_ids(target, [5, 6, 7], params, spec)
    assert spec.acceptance == 1.0 and spec.stats["rounds"] == 5  # 4 tokens a round: 3 guesses and a bonus


@pytest.mark.slow
@pytest.mark.parametrize("use_draft", [True, False])
def test_sampled_output_keeps_the_target_distribution(use_draft):
    """Two tokens sampled speculatively, many times: their joint frequencies match the target's exact
    probabilities (enumerated), though the proposer's distribution is far from the target's."""
    V = 6
    target, draft = toy(0, vocab=V, tie_embeddings=False), toy(3, vocab=V, tie_embeddings=False)
    with torch.no_grad():  # larger heads: peaked, different distributions
        for m in (target, draft):
            m.lm_head.weight.normal_(0.0, 0.4)
    prompt = [1, 2, 1]  # prompt lookup proposes "2 1" after the trailing "1"
    params = SamplingParams(temperature=1.0, max_new_tokens=2, stop_on_eos=False, seed=0)
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        exact = torch.stack([p1[a] * target(torch.tensor([prompt + [a]]))[0, -1].softmax(-1) for a in range(V)])
        q1 = draft(torch.tensor([prompt]))[0, -1].softmax(-1)
    assert (q1 - p1).abs().sum() / 2 > 0.2  # the proposer alone would be visibly wrong
    N = 1000
    counts = torch.zeros(V, V)
    spec = Speculative(draft=draft if use_draft else None, k=2)
    for seed in range(N):
        params.seed = seed
        a, b = speculative_generate_ids(target, prompt, params, spec)[0]
        counts[a, b] += 1
    tv = (counts / N - exact).abs().sum() / 2
    assert tv < 0.07, f"total variation {tv:.3f} from the target's distribution"
    assert spec.stats["accepted"] > 0


def test_penalties_and_mismatched_drafts_are_refused():
    target = toy(0)
    with pytest.raises(UserError, match="penalties"):
        speculative_generate_ids(target, [1, 2], SamplingParams(repetition_penalty=1.2), Speculative())
    with pytest.raises(UserError, match="vocabulary"):
        speculative_generate_ids(target, [1, 2], SamplingParams(), Speculative(draft=toy(1, vocab=50)))


def test_cli_generate_with_a_draft_model_or_prompt_lookup(tiny_model_dir, capsys):
    """The same greedy text with --draft_model (the model drafting for itself: every guess accepted) and ngram."""
    from tinychat.cli import main

    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "the quick", "--max-new-tokens", "12"]
    base += ["--temperature", "0", "--stream", "false"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--draft-model", str(tiny_model_dir)]) == 0
    drafted = capsys.readouterr()
    assert drafted.out == plain and "guesses accepted" in drafted.err
    assert main([*base, "--speculative", "ngram"]) == 0
    assert capsys.readouterr().out == plain
    two = ["generate", "--model", str(tiny_model_dir), "--prompt", "one", "two", "--speculative", "ngram"]
    assert main(two) == 2 and "single prompt" in capsys.readouterr().err  # one prompt at a time
