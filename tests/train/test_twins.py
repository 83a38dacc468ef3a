"""`--train.twin_tokens`: a word's spaced and bare BPE ids share part of their embedding while training; the
function is unchanged when applied, the shared part gets both twins' gradient, checkpoints are plain models,
and a resume (which splits E again as W = E, S = 0) continues exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import short_run, train_losses

from tinychat.errors import UserError
from tinychat.model import Model, ModelConfig
from tinychat.model.loss import summed_ce
from tinychat.tokenizer import Tokenizer
from tinychat.train.twins import SPACE, TwinShare, apply_twins, fold_state, split_state, twin_index


def _tok(corpus_run: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(corpus_run / "base" / "tokenizer")


def test_each_pair_is_a_word_with_and_without_its_space(corpus_run: Path):
    tok = _tok(corpus_run)
    index, n = twin_index(tok)
    assert n >= 5 and index.shape == (tok.vocab_size,)
    vocab = tok.backend.get_vocab()
    names = {i: t for t, i in vocab.items()}
    for row in range(n):
        ids = (index == row).nonzero().flatten().tolist()
        assert len(ids) == 2, row
        a, b = sorted((names[i] for i in ids), key=len)
        assert b == SPACE + a
    spaced_the, the = vocab.get(SPACE + "the"), vocab.get("the")
    if spaced_the is not None and the is not None:
        assert index[spaced_the] == index[the] < n
    lonely = [i for t, i in vocab.items() if not t.startswith(SPACE) and SPACE + t not in vocab]
    assert lonely and all(index[i] == n for i in lonely)


def _model(vocab: int) -> Model:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, n_layer=1, d_model=32, n_head=2, n_kv_head=1, head_dim=16, d_ff=64)
    return Model(cfg)


def test_twins_keep_the_function_and_sum_the_twins_gradients(corpus_run: Path):
    tok = _tok(corpus_run)
    model = _model(tok.vocab_size)
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    targets = torch.randint(0, tok.vocab_size, (2, 12))
    before = model(ids).detach()
    n = apply_twins(model, tok)
    torch.testing.assert_close(model(ids), before)  # S starts at zero
    share = model.model.embed_tokens.parametrizations.weight[0]
    assert isinstance(share, TwinShare) and model.lm_head.parametrizations.weight[0] is share  # tied: one S
    with torch.no_grad():
        share.shared.normal_()
    loss = model(ids, targets=targets)  # the fused head-and-loss path still applies to the parametrized head
    torch.testing.assert_close(loss, summed_ce(model(ids), targets))
    loss.backward()
    w_grad = model.model.embed_tokens.parametrizations.weight.original.grad
    index, _ = twin_index(tok)
    for row in (0, n // 2, n - 1):
        a, b = (index == row).nonzero().flatten().tolist()
        torch.testing.assert_close(share.shared.grad[row], w_grad[a] + w_grad[b])
    # a state dict folds to the plain model's names and values, and splits back to the same function
    folded = fold_state(model, model.state_dict())
    assert not any("parametrizations" in k for k in folded)
    torch.testing.assert_close(folded["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
    plain = _model(tok.vocab_size)
    plain.load_state_dict(folded)
    torch.testing.assert_close(plain(ids), model(ids).detach())
    again = _model(tok.vocab_size)
    apply_twins(again, tok)
    again.load_state_dict(split_state(again, folded))
    torch.testing.assert_close(again(ids), model(ids).detach())
    assert not again.model.embed_tokens.parametrizations.weight[0].shared.any()


def test_twins_need_a_trainable_embedding_and_the_right_tokenizer(corpus_run: Path):
    tok = _tok(corpus_run)
    frozen = _model(tok.vocab_size)
    frozen.model.embed_tokens.weight.requires_grad_(False)
    with pytest.raises(UserError, match="trainable embedding"):
        apply_twins(frozen, tok)
    with pytest.raises(UserError, match="tokenizer has"):
        apply_twins(_model(tok.vocab_size + 8), tok)


def test_training_with_twins_saves_plain_models_and_resumes_exactly(corpus_run: Path):
    plain = short_run(corpus_run, "notwin", "--train.max_steps", "6")
    whole = short_run(corpus_run, "twin6", "--train.max_steps", "6", "--train.twin_tokens", "true")
    part = short_run(corpus_run, "twin3", "--train.max_steps", "3", "--train.twin_tokens", "true")
    short_run(corpus_run, "twin3", "--train.max_steps", "6", "--train.twin_tokens", "true", "--resume")
    assert train_losses(whole)[6] != train_losses(plain)[6]  # the shared rows change training
    a = load_file(str(whole / "checkpoints" / "pretrain" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "pretrain" / "model.safetensors"))
    step = load_file(str(whole / "checkpoints" / "pretrain" / "step_000003" / "model.safetensors"))
    plain_keys = set(load_file(str(plain / "checkpoints" / "pretrain" / "model.safetensors")))
    assert set(a) == set(b) == set(step) == plain_keys
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    Model.from_pretrained(str(whole / "checkpoints" / "pretrain"))  # opens as a plain model
