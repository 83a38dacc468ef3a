"""The batch loader: deterministic in (seed, step, rank, world size), resumable, ranks never overlap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tinychat.data.loader import PackedLoader, val_batches
from tinychat.data.shards import TOKENS_INDEX, TOKENS_KIND, TokenShardWriter
from tinychat.errors import UserError

N_TRAIN = 10_007  # tokens; stream[i] == i so a window shows where it came from


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    splits = {}
    for split, n, per_shard in (("train", N_TRAIN, 3000), ("val", 2000, 10_000)):
        w = TokenShardWriter(root, split, np.dtype(np.uint16), per_shard)
        for start in range(0, n, 700):  # "documents" of 700 tokens, shards cut between them
            w.write_doc(np.arange(start, min(n, start + 700)))
        splits[split] = w.close()
    meta = {"kind": TOKENS_KIND, "dtype": "uint16", "vocab_size": 60_000, "eot_id": 0, "splits": splits}
    (root / TOKENS_INDEX).write_text(json.dumps(meta))
    return root


def test_windows_are_contiguous_across_shards(data_dir):
    loader = PackedLoader(data_dir, batch_size=4, seq_len=64, seed=0)
    assert loader.total_tokens == N_TRAIN and len(loader.maps) == 4
    for step in range(loader.steps_per_epoch):
        x, y = loader.batch(step)
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
        ids = loader.seq_ids(step)
        assert torch.equal(x, torch.from_numpy(ids[:, None] * 64 + np.arange(64)))
        assert torch.equal(y, x + 1)


def test_deterministic_and_resumable(data_dir):
    a = PackedLoader(data_dir, 3, 32, seed=5)
    b = PackedLoader(data_dir, 3, 32, seed=5)
    first = [next(a) for _ in range(10)]
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, [next(b) for _ in range(10)]))
    state = a.state_dict()
    assert state == {"seed": 5, "step": 10}
    c = PackedLoader(data_dir, 3, 32, seed=5)
    c.load_state_dict(state)
    assert torch.equal(next(a)[0], next(c)[0])
    d = PackedLoader(data_dir, 3, 32, seed=6)
    assert not torch.equal(d.batch(0)[0], PackedLoader(data_dir, 3, 32, seed=5).batch(0)[0])
    with pytest.raises(UserError, match="seed"):
        d.load_state_dict(state)


def test_ranks_are_disjoint_and_epochs_reshuffle(data_dir):
    world = 4
    loaders = [PackedLoader(data_dir, 2, 50, seed=1, rank=r, world_size=world) for r in range(world)]
    spe = loaders[0].steps_per_epoch
    seen = [int(i) for step in range(spe) for ld in loaders for i in ld.seq_ids(step)]
    assert len(seen) == len(set(seen)) == spe * 2 * world
    assert max(seen) < loaders[0].n_seqs
    assert loaders[0].epoch_of(spe) == 1
    assert not np.array_equal(loaders[0].seq_ids(0), loaders[0].seq_ids(spe))
    loaders[0].step = spe
    assert loaders[0].epoch == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 80), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_disjointness_property(data_dir, batch, seq_len, world, seed):
    loaders = [PackedLoader(data_dir, batch, seq_len, seed=seed, rank=r, world_size=world) for r in range(world)]
    spe = loaders[0].steps_per_epoch
    for step in (0, spe // 2, spe - 1):
        ids = np.concatenate([ld.seq_ids(step) for ld in loaders])
        assert len(np.unique(ids)) == batch * world


def test_validation_batches_are_fixed_and_disjoint(data_dir):
    one = list(val_batches(data_dir, 2, 64))
    again = list(val_batches(data_dir, 2, 64))
    assert len(one) == (2000 - 1) // 64 // 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    assert one[0][0][0, 0].item() == 0  # in order, unshuffled
    r0 = list(val_batches(data_dir, 2, 64, rank=0, world_size=2))
    r1 = list(val_batches(data_dir, 2, 64, rank=1, world_size=2))
    starts = {int(x[i, 0]) for x, _ in r0 + r1 for i in range(2)}
    assert len(starts) == 4 * len(r0)
    assert len(list(val_batches(data_dir, 2, 64, max_batches=3))) == 3


def test_errors(data_dir):
    with pytest.raises(UserError, match="fewer than one global batch"):
        PackedLoader(data_dir, 64, 1024, split="val")
    with pytest.raises(UserError, match="rank"):
        PackedLoader(data_dir, 2, 8, rank=2, world_size=2)
    with pytest.raises(UserError, match="no 'test' split"):
        PackedLoader(data_dir, 2, 8, split="test")
