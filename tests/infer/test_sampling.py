"""Sampling knobs on hand-made logits: each one keeps or drops exactly what it should."""

import pytest
import torch

from tinychat.errors import UserError
from tinychat.infer.sampling import BatchSampling, SamplingParams, apply_penalties, filter_logits, sample


def bs(**kw) -> BatchSampling:
    return BatchSampling.stack([SamplingParams(**kw)])


def kept(logits, **kw):
    out = filter_logits(torch.tensor([logits]), bs(**kw))[0]
    return (out > torch.finfo(out.dtype).min).nonzero().flatten().tolist()


def test_top_k_top_p_min_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()
    assert kept(probs, top_k=2) == [0, 1]
    assert kept(probs, top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(probs, top_p=0.81) == [0, 1, 2]
    assert kept(probs, min_p=0.2) == [0, 1, 2]  # 0.15 >= 0.2 * 0.5, 0.05 < 0.1
    assert kept(probs, top_p=0.01) == [0]  # the most likely token always survives
    assert kept(probs) == [0, 1, 2, 3]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, BatchSampling.stack([SamplingParams(temperature=0)] * 4)), logits.argmax(-1))
    sp = BatchSampling.stack([SamplingParams(temperature=1.0)] * 4)
    a = sample(logits, sp, torch.Generator().manual_seed(1))
    b = sample(logits, sp, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    sp = BatchSampling.stack([SamplingParams()] * 20000)
    freq = torch.bincount(sample(logits, sp, torch.Generator().manual_seed(0)), minlength=3) / 20000
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    counts = torch.tensor([[0.0, 0.0, 2.0]])
    out = apply_penalties(logits, seen, torch.zeros(1, 3), bs(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    out = apply_penalties(logits, torch.zeros_like(seen), counts, bs(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25]]


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(min_p=1),
        dict(max_new_tokens=0),
        dict(stop=[""]),
        dict(repetition_penalty=0),
    ],
)
def test_invalid_params(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw).validate()
