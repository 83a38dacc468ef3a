"""Context extension (rope scaling), sliding windows and ALiBi: parity with transformers both ways, and errors."""

import json
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_helpers import HF_SMALL, V, small_model  # noqa: E402

from tinychat.cli import main  # noqa: E402
from tinychat.errors import UserError  # noqa: E402
from tinychat.model import Model, preset  # noqa: E402
from tinychat.model.extend import extend_config  # noqa: E402
from tinychat.model.positions import alibi_slopes  # noqa: E402
from tinychat.model.transformer import layer_metas  # noqa: E402


def tiny(**kw) -> Model:
    return small_model(**kw)


def hf_logits(path, x: torch.Tensor) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


def cached_logits(model: Model, x: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of x fed as a prefill and then one token at a time through the KV cache."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        out = [model(x[:, :prefill], cache)]
        out += [model(x[:, t : t + 1], cache) for t in range(prefill, x.shape[1])]
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------ rope scaling
@pytest.mark.parametrize("method", ["linear", "ntk", "yarn"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_extended_model_matches_transformers_past_the_old_window(method, arch, tmp_path):
    kw = {"qk_norm": False, "tie_embeddings": False} if arch == "llama" else {}
    model = tiny(arch=arch, **kw)
    model.cfg = extend_config(model.cfg, 4.0, method)
    model.register_buffer("inv_freq", Model(model.cfg).inv_freq, persistent=False)
    assert model.cfg.max_seq_len == 128
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, V, (2, 120))
    with torch.no_grad():
        ours = model(x)
    torch.testing.assert_close(hf_logits(tmp_path / "m", x), ours, atol=1e-4, rtol=0)
    again = Model.from_pretrained(str(tmp_path / "m"))
    assert again.cfg.rope_scaling == model.cfg.rope_scaling and again.cfg.rope_theta == model.cfg.rope_theta
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, atol=0, rtol=0)


def test_scaling_changes_the_logits_beyond_the_old_window():
    """The scaled model is not the unscaled one (a scaling silently ignored would pass the parity test)."""
    model = tiny()
    x = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        plain = model(x)
        model.cfg = extend_config(model.cfg, 4.0, "yarn")
        model.register_buffer("inv_freq", Model(model.cfg).inv_freq, persistent=False)
        assert (model(x) - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": False},
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_transformers_scaled_dirs_open_in_tinychat(params, tmp_path):
    hf = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**HF_SMALL, head_dim=16, rope_parameters={"rope_theta": 10000.0, **params})
    ).eval()
    hf.save_pretrained(tmp_path)
    ours = Model.from_pretrained(str(tmp_path))
    assert ours.cfg.rope_scaling["rope_type"] == params["rope_type"]
    x = torch.randint(0, V, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_unsupported_rope_type_is_refused(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="longrope"):
        Model.from_pretrained(str(tmp_path / "m"))


def test_extend_context_command(tmp_path, capsys):
    model = tiny(max_seq_len=64)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    rc = main(
        ["extend-context", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "long")]
        + [
            "--factor",
            "4",
            "--method",
            "yarn",
            "--original",
            "32",
        ]
    )
    assert rc == 0 and "32 -> 128" in capsys.readouterr().out
    written = json.loads((tmp_path / "long" / "config.json").read_text())
    assert written["max_position_embeddings"] == 128
    assert written["rope_parameters"]["rope_type"] == "yarn"
    assert written["rope_parameters"]["original_max_position_embeddings"] == 32
    assert (tmp_path / "long" / "tokenizer.json").is_file()
    again = Model.from_pretrained(str(tmp_path / "long"))
    for a, b in zip(again.parameters(), model.parameters()):
        assert torch.equal(a, b)  # the weights are copied unchanged
    # errors: one sentence and exit status 2, nothing written
    for argv, words in [
        (["--factor", "1"], "greater than 1"),
        (["--method", "ntk", "--model", str(tmp_path / "long")], "already has rope scaling"),
        (["--out", str(tmp_path / "m")], "must differ"),
    ]:
        base = ["extend-context", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x")]
        assert main(base + argv) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pretrain_refusal_points_at_extend_context():
    from tinychat.train.pretrain import PretrainConfig, check_inputs

    cfg = PretrainConfig()
    cfg.train.seq_len = 1024
    with pytest.raises(UserError, match="extend-context"):
        check_inputs(cfg, preset("tiny"), _FakeDir(), SimpleNamespace(vocab_size=V))


class _FakeDir:
    """A data directory stand-in that exists and holds an index (check_inputs reads only those)."""

    def __truediv__(self, name: str) -> "_FakeDir":
        return self

    def is_dir(self) -> bool:
        return True

    def is_file(self) -> bool:
        return True

    def read_text(self) -> str:
        return "{}"


# ------------------------------------------------------------------ sliding window
@pytest.mark.parametrize(
    "arch,kw",
    [
        ("qwen3", dict(sliding_window=8, max_window_layers=1)),
        ("qwen2", dict(sliding_window=8, max_window_layers=0, qk_norm=False, qkv_bias=True)),
        ("mistral", dict(sliding_window=8, qk_norm=False, tie_embeddings=False)),
    ],
)
def test_sliding_window_matches_transformers_both_ways(arch, kw, tmp_path):
    model = tiny(arch=arch, max_seq_len=64, **kw)
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        ours = model(x)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-4, rtol=0)
    hf.save_pretrained(tmp_path / "back")
    again = Model.from_pretrained(str(tmp_path / "back"))
    assert (again.cfg.sliding_window, again.cfg.max_window_layers) == (8, kw.get("max_window_layers", 0))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, atol=1e-5, rtol=0)
    # the window matters (a mask silently dropped would still agree with itself), and the cache agrees
    full = tiny(arch=arch, max_seq_len=64, **{**kw, "sliding_window": 0})
    with torch.no_grad():
        assert (full(x) - ours)[:, 8:].abs().max() > 1e-3
        torch.testing.assert_close(ours[:, :8], full(x)[:, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached_logits(model, x, 13), ours, atol=1e-4, rtol=0)


def test_sliding_window_generation_matches_transformers(tmp_path):
    from tinychat.infer import SamplingParams, generate_ids

    model = tiny(sliding_window=6, max_seq_len=64)
    model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    prompt = torch.randint(1, V, (1, 9))  # no 0: transformers would read the pad id as padding
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    new, _, _ = generate_ids(model, [prompt[0].tolist()], SamplingParams(temperature=0, max_new_tokens=12))
    assert new[0] == ref


def test_window_config_errors(tmp_path):
    with pytest.raises(UserError, match="sliding window"):
        tiny(arch="llama", qk_norm=False, sliding_window=8).save_pretrained(tmp_path / "a")
    model = tiny(sliding_window=8)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["layer_types"] = ["sliding_attention", "full_attention"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="layer_types"):
        Model.from_pretrained(str(tmp_path / "m"))


# ------------------------------------------------------------------ ALiBi
def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert alibi_slopes(4).tolist() == [0.25, 0.0625, 0.015625, 0.00390625]
    six = alibi_slopes(6)  # 4 of the power-of-two series, then every other slope of the 8-head series
    torch.testing.assert_close(six, torch.tensor([0.25, 0.0625, 0.015625, 0.00390625, 2**-1.0, 2**-3.0]))


def test_alibi_model_saves_reopens_and_transformers_refuses(tmp_path):
    model = tiny(position="alibi")
    x = torch.randint(0, V, (2, 48))  # longer than max_seq_len's 32 is refused; use the window
    x = x[:, :32]
    model.save_pretrained(tmp_path / "m")
    again = Model.from_pretrained(str(tmp_path / "m"))
    assert again.cfg.position == "alibi" and again.cfg.arch == "qwen3"
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)
    with pytest.raises((ValueError, KeyError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(cached_logits(model, x, 5), model(x).detach(), atol=1e-4, rtol=0)
    # the bias is what positions the tokens: with it, shuffling earlier tokens changes a later token's logits
    plain = tiny()
    assert not torch.equal(plain(x).detach(), model(x).detach())


def test_alibi_matches_a_reference_attention():
    """One layer's output against attention written out by hand: softmax(qk^T/sqrt(d) - slope * distance)."""
    model = tiny(position="alibi", n_layer=1)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 10, 64)
    cfg = model.cfg
    with torch.no_grad():
        q = attn.q_norm(attn.q_proj(x).view(1, 10, 4, 16)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(x).view(1, 10, 2, 16)).transpose(1, 2).repeat_interleave(2, dim=1)
        v = attn.v_proj(x).view(1, 10, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        pos = torch.arange(10)
        dist = (pos[:, None] - pos[None, :]).float()
        scores = q @ k.transpose(-1, -2) / 4.0 - alibi_slopes(4)[:, None, None] * dist
        scores = scores.masked_fill(dist < 0, float("-inf"))
        ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 10, 64))
        (meta,) = layer_metas(cfg, pos[None], None, None, torch.float32)
        ones, zeros = torch.ones(1, 1, 10, 16), torch.zeros(1, 1, 10, 16)
        torch.testing.assert_close(attn(x, ones, zeros, None, meta), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(sliding_window=4), dict(position="alibi")])
def test_window_and_alibi_models_decode_alike_in_every_cache(kw):
    """The same greedy tokens from the contiguous cache (ragged batch) and the paged engine (chunked
    prefill, block tables): both read each layer's sliding-window / ALiBi mask from layer_metas."""
    from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 50, 300)
    model = tiny(vocab_size=tok.vocab_size, max_seq_len=64, **kw)
    prompts = [tok.encode("the quick brown fox jumps over the lazy dog the quick"), tok.encode("lazy dog")]
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    alone = [generate_ids(model, [p], greedy)[0][0] for p in prompts]
    assert generate_ids(model, prompts, greedy)[0] == alone  # ragged rows: per-row masks
    engine = Engine(model, tok, EngineConfig(max_num_seqs=4, prefill_chunk=4, block_size=4)).start()
    try:
        outs = [collect(engine.submit(GenerationRequest(p, greedy)), 1)[0][0]["token_ids"] for p in prompts]
    finally:
        engine.stop()
    assert outs == alone
