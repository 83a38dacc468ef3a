"""tinychat quantize / prune / factorize on tiny random models: integers really stored, round trips exact,
logits close to fp32, structured pruning and quantized directories open in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.model import Model, preset
from tinychat.model.compress.factorize import factorize_model, merge_lowrank
from tinychat.model.compress.prune import prune_channels, prune_heads, prune_magnitude
from tinychat.model.compress.quant import (
    QuantLinear,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)
from tinychat.model.hf import load_pretrained

V = 256


def tiny(arch: str = "qwen3", seed: int = 0, **kw: object) -> Model:
    torch.manual_seed(seed)
    extra = {"qk_norm": False, "tie_embeddings": False} if arch == "llama" else {}
    cfg = preset("tiny", vocab_size=V, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)
    for k, v in {**extra, **kw, "arch": arch}.items():
        setattr(cfg, k, v)
    return Model(cfg).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


IDS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- integer math
def test_int8_and_int4_reconstruct_within_half_a_step() -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (q.float() * s - w).abs().max() <= s.max() / 2 + 1e-6
    q4, s4 = quantize_int4(w, 32)
    assert q4.min() >= -8 and q4.max() <= 7 and s4.shape == (32, 4)
    err = q4.float().view(32, 4, 32) * s4[..., None] - w.view(32, 4, 32)
    # within one step: the peak's own sign gets 8 levels, the other sign 7, so +|peak| clips by one step
    assert (err.abs() <= s4.abs()[..., None] + 1e-6).all()
    # q4_0's trick: the largest-magnitude value of each group lands exactly on level -8
    assert (q4.view(32, 4, 32) == -8).any(dim=-1).all()


def test_pack_int4_round_trip_and_matches_compressed_tensors() -> None:
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (16, 8)
    assert torch.equal(unpack_int4(packed, 64), q)
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(ct.pack_to_int32(q, 4), packed)


@pytest.mark.parametrize(("bits", "n", "k"), [(8, 48, 64), (8, 8, 24), (4, 32, 64), (4, 8, 64)])
def test_quant_linear_kernel_and_plain_path_match_the_dequantized_weight(bits: int, n: int, k: int) -> None:
    """The kernels (aten's: bf16 activations, fp32 accumulation; int8 on AVX2: native.py's, activations rounded
    to int8 per 32) against x @ dequantized W^T in fp32: the differences are the activations' and outputs'
    rounding (relative 2^-8 each, or ~0.5% for int8 activations), so 1% relative is the bound. The
    (8, 8, 24) and (4, 8, 64) shapes take the plain path the kernels cannot (K % 16, N % 16)."""
    torch.manual_seed(0)
    w, x = torch.randn(n, k), torch.randn(5, k)
    q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
    lin = QuantLinear(q, s, bits, 32 if bits == 4 else 0, bias=torch.randn(n))
    assert lin.fast == (k % 16 == 0 if bits == 8 else n % 16 == 0)
    ref = x @ lin.dequantized().t() + lin.bias
    assert rel(lin(x), ref) < 1e-2
    assert torch.equal(lin.int_values(), q)


# ---------------------------------------------------------------------------- quantized directories
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_directory_stores_integers_and_round_trips(tmp_path: Path, arch: str, bits: int) -> None:
    model = tiny(arch)
    model.save_pretrained(tmp_path / "fp")
    ref = logits(model, IDS)
    q = quantize_model(load_pretrained(tmp_path / "fp"), bits, 32)
    q.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    key = "model.layers.0.mlp.up_proj." + ("weight" if bits == 8 else "weight_packed")
    assert dtypes[key] == ("I8" if bits == 8 else "I32")
    assert dtypes["model.embed_tokens.weight"] == "I8" and dtypes["lm_head.weight"] == "I8"
    floats = [n for n, d in dtypes.items() if d == "F32" and not n.endswith(("weight_scale", "norm.weight"))]
    assert floats == []  # nothing but scales and norms is floating point
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    fp_size = (tmp_path / "fp" / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < fp_size * (0.45 if bits == 8 else 0.4)

    back = load_pretrained(tmp_path / "q")
    assert back.num_params() == model.num_params()  # integer weights are counted, a tied head once
    assert not any(p.is_floating_point() and p.numel() > 64 for p in back.parameters())  # only norms
    assert torch.equal(logits(back, IDS), logits(q, IDS))  # the round trip is exact
    assert weight_bytes(back) < weight_bytes(model) * (0.35 if bits == 8 else 0.3)
    # a random model's logits are small and flat; relative error of the logits: measured 1% (int8), 7% (int4)
    assert rel(logits(back, IDS), ref) < (0.03 if bits == 8 else 0.15)
    if bits == 8:
        assert (logits(back, IDS).argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_int8_projections_change_nothing_but_the_calls(tmp_path: Path, bits: int) -> None:
    """fuse_projections on a quantized model: int8 q/k/v and gate/up become one integer matmul each, whose
    integers the projections then view (no memory added), with the very same logits and files; int4's
    packed kernel layout does not split by rows, so it stays unfused."""
    q = quantize_model(tiny(), bits, 32)
    ref, size = logits(q, IDS), weight_bytes(q)
    q.save_pretrained(tmp_path / "before")
    q.fuse_projections()
    attn, mlp = q.model.layers[0].self_attn, q.model.layers[0].mlp
    assert bool(attn.qkv_mod) == bool(mlp.gate_up_mod) == (bits == 8)
    if bits == 8:
        assert attn.q_proj.qweight.data_ptr() == attn.qkv_mod[0].qweight.data_ptr()
        assert mlp.up_proj.qweight.data_ptr() == mlp.gate_up_mod[0].qweight[mlp.gate_proj.out_features :].data_ptr()
    norms = sum(b.self_attn.qk_weight.numel() * 4 for b in q.model.layers if bits == 8)  # fused q/k-norm weights
    assert torch.equal(logits(q, IDS), ref) and weight_bytes(q) == size + norms
    assert not any(n.endswith(("qkv_mod", "gate_up_mod")) for n, _ in q.named_modules())
    q.save_pretrained(tmp_path / "after")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_opens_a_quantized_directory(tmp_path: Path, bits: int) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    q = quantize_model(tiny(), bits, 32)
    q.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    # transformers dequantizes the same integers to fp32; tinychat multiplies bf16 activations (see above)
    assert rel(logits(q, IDS), theirs) < 1e-2


def test_quantize_cli_and_generate_on_the_result(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tinychat.infer import SamplingParams, generate_ids

    tiny().save_pretrained(tmp_path / "fp")
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--bits", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--bits", "4", "--group-size", "48"]) == 2
    assert not (tmp_path / "x").exists()
    out = str(tmp_path / "q4")
    assert main(["quantize", "--model", str(tmp_path / "fp"), "--bits", "4", "--group-size", "32", "--out", out]) == 0
    assert "int4 group 32" in capsys.readouterr().out
    assert main(["quantize", "--model", out, "--bits", "8", "--out", str(tmp_path / "again")]) == 2
    model = Model.from_pretrained(out)
    params = SamplingParams(temperature=0, max_new_tokens=8, stop_on_eos=False)
    rows, _, _ = generate_ids(model, [[1, 2, 3], [4, 5]], params)
    assert [len(r) for r in rows] == [8, 8]
    with pytest.raises(UserError, match="CPU only"):
        load_pretrained(out, device="meta")


# ---------------------------------------------------------------------------- pruning
def test_magnitude_pruning_zeroes_the_smallest_fraction() -> None:
    model = prune_magnitude(tiny(), 0.5)
    w = model.model.layers[1].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    assert float((model.model.embed_tokens.weight == 0).float().mean()) == 0.0  # only block Linears


@pytest.mark.parametrize(("sparsity", "heads", "kv"), [(0.5, 2, 2), (0.25, 3, 3)])
def test_head_pruning_removes_exactly_the_dead_heads(sparsity: float, heads: int, kv: int) -> None:
    """Heads whose o_proj columns are zero contribute nothing; pruning must pick them and leave the function
    unchanged. 3 of 4 heads in 2 kv groups cannot stay GQA: each kept head gets its own kv copy."""
    model = tiny()
    with torch.no_grad():
        for layer, dead in zip(model.model.layers, ([1, 2], [0, 3])):
            for h in dead[: 4 - heads]:
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    ref = logits(model, IDS)
    pruned = prune_heads(model, sparsity)
    assert (pruned.cfg.n_head, pruned.cfg.n_kv_head) == (heads, kv)
    assert torch.allclose(logits(pruned, IDS), ref, atol=1e-5)


def test_channel_pruning_removes_exactly_the_dead_channels() -> None:
    model = tiny(d_ff=256)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, torch.randperm(256)[:64]] = 0
    ref = logits(model, IDS)
    pruned = prune_channels(model, 0.25)
    assert pruned.cfg.d_ff == 192 and pruned.num_params() < model.num_params()
    assert torch.allclose(logits(pruned, IDS), ref, atol=1e-5)


@pytest.mark.parametrize("method", ["heads", "channels"])
def test_structured_pruning_saves_a_directory_transformers_opens(tmp_path: Path, method: str) -> None:
    transformers = pytest.importorskip("transformers")
    tiny().save_pretrained(tmp_path / "fp")
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(tmp_path / "fp"), "--method", method, "--sparsity", "0.5", "--out", str(out)]
    assert main(args) == 0
    ours = Model.from_pretrained(str(out))
    assert ours.num_params() < tiny().num_params()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, logits(ours, IDS), atol=1e-4)
    assert main(["prune", "--model", str(tmp_path / "fp"), "--sparsity", "1.0", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------- factorisation
def test_full_rank_factorisation_equals_the_original(tmp_path: Path) -> None:
    model = tiny()
    ref = logits(model, IDS)
    fact = factorize_model(tiny(), rank=10_000)
    assert torch.allclose(logits(fact, IDS), ref, atol=1e-5)
    fact.save_pretrained(tmp_path / "f")
    assert "tinychat_lowrank" in json.loads((tmp_path / "f" / "config.json").read_text())
    assert torch.allclose(logits(Model.from_pretrained(str(tmp_path / "f")), IDS), ref, atol=1e-5)


def test_low_rank_factorisation_cli_saves_parameters_and_merges_back(tmp_path: Path) -> None:
    tiny().save_pretrained(tmp_path / "fp")
    f = str(tmp_path / "f")
    assert main(["factorize", "--model", str(tmp_path / "fp"), "--rank", "4", "--sparsity", "0.5", "--out", f]) == 2
    assert main(["factorize", "--model", str(tmp_path / "fp"), "--sparsity", "0.5", "--out", f]) == 0
    low = Model.from_pretrained(f)
    base = tiny()
    block = base.num_params() - base.model.embed_tokens.weight.numel()
    assert low.num_params() <= base.num_params() - 0.45 * block
    assert low.model.layers[0].mlp.up_proj.rank == int(0.5 * 128 * 64 / 192)
    ref = logits(low, IDS)
    assert main(["factorize", "--model", f, "--merge", "--out", str(tmp_path / "m")]) == 0
    merged = Model.from_pretrained(str(tmp_path / "m"))
    assert merged.num_params() == base.num_params()
    assert torch.allclose(logits(merged, IDS), ref, atol=1e-5)
    assert merge_lowrank(low).lowrank is None


def test_compressed_directories_keep_the_training_record(tmp_path: Path) -> None:
    """quantize, prune and factorize rewrite config.json; eval's --mode auto must still see a chat model."""
    from tinychat.eval.backend import detect_mode

    tiny().save_pretrained(tmp_path / "plain")
    assert main(["quantize", "--model", str(tmp_path / "plain"), "--bits", "8", "--out", str(tmp_path / "p8")]) == 0
    assert "tinychat_chat" not in json.loads((tmp_path / "p8" / "config.json").read_text())  # nothing to carry
    fp = tmp_path / "fp"
    tiny().save_pretrained(fp)
    cfg = json.loads((fp / "config.json").read_text())
    (fp / "config.json").write_text(json.dumps({**cfg, "tinychat_stage": "pretrain", "tinychat_chat": True}))
    commands = {
        "q8": ["quantize", "--model", str(fp), "--bits", "8"],
        "q4": ["quantize", "--model", str(fp), "--bits", "4", "--group-size", "32"],
        "heads": ["prune", "--model", str(fp), "--method", "heads", "--sparsity", "0.5"],
        "magnitude": ["prune", "--model", str(fp), "--method", "magnitude", "--sparsity", "0.5"],
        "low": ["factorize", "--model", str(fp), "--rank", "4"],
        "merged": ["factorize", "--model", str(tmp_path / "low"), "--merge"],
    }
    for name, argv in commands.items():
        assert main([*argv, "--out", str(tmp_path / name)]) == 0, name
        record = json.loads((tmp_path / name / "config.json").read_text())
        assert (record["tinychat_stage"], record["tinychat_chat"]) == ("pretrain", True), name
        assert detect_mode(str(tmp_path / name), stage="pretrain") == "chat", name
        Model.from_pretrained(str(tmp_path / name))  # the record does not get in the way of loading


def test_serve_engine_and_eval_run_a_quantized_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The serving engine and `tinychat eval`'s bits per byte load the integer directory like any other."""
    from tinychat.eval.run import evaluate_model
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.tokenizer import Tokenizer

    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "8", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    model, tok = Model.from_pretrained(str(out)), Tokenizer.from_pretrained(out)
    prompt = tok.encode("the quick brown fox")
    params = SamplingParams(temperature=0, max_new_tokens=10, stop_on_eos=False)
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=8)).start()
    try:
        served = collect(engine.submit(GenerationRequest(prompt, params)), 1)[0][0]["token_ids"]
    finally:
        engine.stop()
    assert served == generate_ids(model, [prompt], params)[0][0]
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": "the quick brown fox jumps over a lazy dog"}) + "\n" for _ in range(20))
    )
    kw = {"suites": [], "bpb_data": [str(text)], "seq_len": 32, "bpb_tokens": 256}
    fp, q = evaluate_model(tiny_model_dir, **kw)["bpb"]["bpb"], evaluate_model(out, **kw)["bpb"]["bpb"]
    assert abs(q / fp - 1) < 0.01
