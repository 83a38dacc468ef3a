"""Multi-LoRA serving in the engine: requests for different adapters (and the base) decode in the same batches
and each gets exactly the tokens of the model with its adapter merged, served alone; the prefix cache never
hands one adapter's keys/values to another; an unknown adapter is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adapter_helpers import make_lora

from tinychat.errors import UserError
from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
from tinychat.infer.sampling import SamplingParams
from tinychat.model import Model, ModelConfig
from tinychat.model.peft.multi_lora import serve_adapters

NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def dirs(tok, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("engine-adapters")
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128,
        max_seq_len=256, init_std=0.2,
    )  # fmt: skip
    Model(cfg).save_pretrained(str(tmp / "base"))
    out = {"base": tmp / "base"}
    for i, name in enumerate(NAMES):
        out[name] = make_lora(out["base"], tmp / name, seed=i + 1, rank=2 + 2 * i, std=0.5)
    return out


def greedy_tokens(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    handles = [engine.submit(r) for r in reqs]  # all queued before the engine admits: one shared batch
    return [collect(h, 1)[0][0]["token_ids"] for h in handles]


@pytest.mark.parametrize("mode", ["mask", "gather", "group"])
def test_mixed_adapters_batch_equals_each_merged_alone(dirs, tok, prompts, mode: str):
    model = Model.from_pretrained(str(dirs["base"]))
    aset = serve_adapters(model, {n: dirs[n] for n in NAMES}, mode)
    picks = ["", *NAMES] * 3  # 12 requests: base and three adapters, interleaved
    reqs = [GenerationRequest(prompts[i], SamplingParams(temperature=0, max_new_tokens=10), adapter=a)
            for i, a in enumerate(picks)]  # fmt: skip
    engine = Engine(model, tok, EngineConfig(max_num_seqs=16, prefill_chunk=32), aset).start()
    try:
        got = greedy_tokens(engine, reqs)
    finally:
        engine.stop()
    want = []
    for r in reqs:  # each alone, on the model with its adapter merged (the adapter directory opened as a model)
        alone = Engine(Model.from_pretrained(str(dirs[r.adapter or "base"])), tok, EngineConfig(max_num_seqs=1))
        alone.start()
        want += greedy_tokens(alone, [GenerationRequest(r.prompt_ids, r.params)])
        alone.stop()
    assert got == want
    by_adapter = {a: [w for w, p in zip(want, picks) if p == a] for a in picks}
    assert len({tuple(v[0]) for v in by_adapter.values()}) > 1  # the adapters answer differently


def test_prefix_cache_is_per_adapter_and_unknown_names_fail(dirs, tok):
    """The same long prompt under the base, then adapter a, then a again: a's first request must not reuse the
    base's cached blocks (other keys/values), its second may reuse its own."""
    model = Model.from_pretrained(str(dirs["base"]))
    aset = serve_adapters(model, {n: dirs[n] for n in NAMES})
    prompt = tok.encode("the quick brown fox jumps over a lazy dog " * 6)
    assert len(prompt) > 32  # two full blocks of 16 at least
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4), aset).start()
    try:
        params = SamplingParams(temperature=0, max_new_tokens=8)
        outs = [greedy_tokens(engine, [GenerationRequest(prompt, params, adapter=a)])[0] for a in ("", "a", "a")]
        hits = engine.stats.prefix_hit_tokens
        with pytest.raises(UserError, match="unknown adapter 'nope'"):
            engine.submit(GenerationRequest(prompt, params, adapter="nope"))
    finally:
        engine.stop()
    alone = Engine(Model.from_pretrained(str(dirs["a"])), tok, EngineConfig(max_num_seqs=1)).start()
    want = greedy_tokens(alone, [GenerationRequest(prompt, params)])[0]
    alone.stop()
    assert outs[1] == outs[2] == want != outs[0]
    assert hits == 16 * ((len(prompt) - 1) // 16)  # only the third request hit the cache (a's own blocks)
    plain = Engine(Model.from_pretrained(str(dirs["base"])), tok, EngineConfig(max_num_seqs=1)).start()
    with pytest.raises(UserError, match="serves the base and these adapters: none"):
        plain.submit(GenerationRequest(prompt, params, adapter="a"))
    plain.stop()
