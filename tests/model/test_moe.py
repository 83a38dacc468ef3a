"""Mixture of experts: Qwen3-MoE / Qwen2-MoE parity with transformers both ways, router losses, training, serving."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_helpers import HF_SMALL, V, small_model  # noqa: E402

from tinychat.errors import UserError  # noqa: E402
from tinychat.model import Model, preset  # noqa: E402
from tinychat.model.moe import MoE, router_losses  # noqa: E402


def tiny_moe(**kw) -> Model:
    return small_model(router_scale=0.5, **{"n_experts": 4, "max_seq_len": 64, **kw})


def hf_config(family: str, **kw):
    moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen3":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(head_dim=16, **HF_SMALL, **moe, **kw))
    config = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=48, **HF_SMALL, **moe, **kw)
    return transformers.Qwen2MoeForCausalLM(config)


@pytest.mark.parametrize(
    "kw,cls",
    [
        (dict(), "Qwen3MoeForCausalLM"),
        (dict(norm_topk_prob=False, experts_per_token=1, moe_d_ff=24), "Qwen3MoeForCausalLM"),
        (dict(arch="qwen2", qk_norm=False, qkv_bias=True, shared_expert_d_ff=40), "Qwen2MoeForCausalLM"),
    ],
)
def test_tinychat_moe_opens_in_transformers(kw, cls, tmp_path):
    model = tiny_moe(**kw)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [cls]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    x = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        ours = model(x)
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=0)
    again = Model.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, atol=0, rtol=0)


@pytest.mark.parametrize("family,kw", [("qwen3", dict(norm_topk_prob=True)), ("qwen3", {}), ("qwen2", {})])
def test_transformers_moe_opens_in_tinychat(family, kw, tmp_path):
    torch.manual_seed(0)
    hf = hf_config(family, **kw).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] in (16, 64) else 0))
    hf.save_pretrained(tmp_path)
    ours = Model.from_pretrained(str(tmp_path))
    assert ours.cfg.n_experts == 4 and ours.cfg.experts_per_token == 2 and ours.cfg.expert_d_ff == 32
    assert ours.cfg.shared_expert_d_ff == (48 if family == "qwen2" else 0)
    x = torch.randint(0, V, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_moe_layout_errors(tmp_path):
    with pytest.raises(UserError, match="no shared expert"):
        tiny_moe(shared_expert_d_ff=16).save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match="always has a shared expert"):
        tiny_moe(arch="qwen2", qk_norm=False, qkv_bias=True).save_pretrained(tmp_path / "b")
    with pytest.raises(UserError, match="no MoE form"):
        tiny_moe(arch="llama", qk_norm=False).save_pretrained(tmp_path / "c")
    with pytest.raises(UserError, match="experts_per_token"):
        preset("tiny", n_experts=4, experts_per_token=5)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_router_losses_values_and_gradients():
    model = tiny_moe()
    layer = model.model.layers[0].mlp
    assert isinstance(layer, MoE)
    with torch.no_grad():
        for m in (model.model.layers[0].mlp, model.model.layers[1].mlp):
            m.gate.weight.zero_()  # uniform router: aux = k whatever the counts, z = log(E)^2
    model.train()
    x = torch.randint(0, V, (2, 16))
    model(x)
    aux, metrics = router_losses(model, units=10)
    cfg = model.cfg
    expect = (cfg.moe_aux_coef * 2 + cfg.moe_z_coef * math.log(4) ** 2) * 10
    assert float(aux.detach()) == pytest.approx(expect, rel=1e-5)
    assert float(metrics["moe_aux"]) == pytest.approx(20.0, rel=1e-5)
    assert float(sum(metrics[f"moe_load_e{e}"] for e in range(4))) == pytest.approx(10.0, rel=1e-5)
    assert router_losses(model, 10) == (0.0, {})  # records are consumed once
    # gradients reach the router through the auxiliary loss, and nothing is recorded in eval or no_grad
    model = tiny_moe()
    model.train()
    model(x)
    aux, _ = router_losses(model, 1)
    aux.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    model.eval()
    model(x)
    assert router_losses(model, 1) == (0.0, {})


def test_active_parameter_flops():
    dense = Model(preset("tiny", vocab_size=V, n_layer=2, d_ff=256))
    moe = Model(preset("tiny", vocab_size=V, n_layer=2, d_ff=256, n_experts=8, experts_per_token=2))
    assert moe.cfg.expert_d_ff == 128  # k experts of d_ff/k: the same active MLP size as the dense model
    assert moe.num_params() > 3 * dense.num_params() / 2
    router = 2 * 2 * moe.cfg.d_model * 8 * 3  # the router's matmul, forward + backward
    assert moe.flops_per_token(64) == pytest.approx(dense.flops_per_token(64) + router, rel=1e-6)


def test_moe_generates_through_the_engine():
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, 300)
    model = tiny_moe(vocab_size=tok.vocab_size, max_seq_len=64)
    prompts = [tok.encode("the quick brown"), tok.encode("lazy dog jumps over the fox")]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    ref = [generate_ids(model, [p], greedy)[0][0] for p in prompts]
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=4)).start()
    try:
        outs = [collect(engine.submit(GenerationRequest(p, greedy)), 1)[0][0]["token_ids"] for p in prompts]
    finally:
        engine.stop()
    assert outs == ref and all(len(o) > 0 for o in outs)
