"""HF-compatible directories both ways, for the Llama, Qwen2 and Qwen3 families, and every load error."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_helpers import HF_SMALL  # noqa: E402

from tinychat.errors import UserError  # noqa: E402
from tinychat.model import Model, preset  # noqa: E402

V = 256
HF_FAMILIES = {
    # GQA, untied head, attention bias on q/k/v/o
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **{**HF_SMALL, "vocab_size": V},
            tie_word_embeddings=False,
            attention_bias=True,
            rms_norm_eps=1e-5,
        )
    ),
    # q/k/v biases, tied embeddings, MQA
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**{**HF_SMALL, "vocab_size": V, "num_key_value_heads": 1}, tie_word_embeddings=True)
    ),
    # QK-norm, head_dim independent of hidden_size, untied
    "qwen3": lambda: transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**{**HF_SMALL, "vocab_size": V}, head_dim=24, tie_word_embeddings=False)
    ),
}


def _randomise(module: torch.nn.Module) -> None:
    """Random norms and biases too, so a swapped or missing tensor cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] in (24, 64) else 0))


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_transformers_dir_opens_in_tinychat(family, tmp_path):
    torch.manual_seed(0)
    hf = HF_FAMILIES[family]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    ours = Model.from_pretrained(str(tmp_path))
    assert ours.cfg.arch == family
    x = torch.randint(0, V, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", dict(qk_norm=False, qkv_bias=True, o_bias=True, tie_embeddings=False, n_kv_head=1)),
        ("qwen2", dict(qk_norm=False, qkv_bias=True, tie_embeddings=True)),
        ("qwen3", dict(qk_norm=True, tie_embeddings=True, head_dim=24)),
        ("qwen3", dict(qk_norm=True, tie_embeddings=False, qkv_bias=True, o_bias=True)),
    ],
)
def test_tinychat_dir_opens_in_transformers(family, kw, tmp_path):
    torch.manual_seed(0)
    cfg = preset(
        "tiny",
        arch=family,
        vocab_size=V,
        d_model=64,
        n_layer=2,
        n_head=4,
        n_kv_head=kw.pop("n_kv_head", 2),
        d_ff=96,
        **kw,
    )
    ours = Model(cfg).eval()
    _randomise(ours)
    ours.save_pretrained(str(tmp_path / "m"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert (
        type(hf).__name__
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    )
    x = torch.randint(0, V, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    # and back again
    again = Model.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_greedy_decoding_matches_transformers_generate(tmp_path):
    torch.manual_seed(0)
    hf = HF_FAMILIES["qwen3"]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    ours = Model.from_pretrained(str(tmp_path))
    from tinychat.infer import SamplingParams, generate_ids

    prompt = torch.randint(0, V, (1, 7))
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    new, reasons, _ = generate_ids(ours, [prompt[0].tolist()], SamplingParams(temperature=0, max_new_tokens=12))
    assert new[0] == ref and reasons == ["length"]


def test_llama3_rope_scaling_matches(tmp_path):
    small = {**HF_SMALL, "vocab_size": V, "num_hidden_layers": 1, "num_key_value_heads": 4}
    small["max_position_embeddings"] = 256
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **small,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    ).eval()
    hf.save_pretrained(tmp_path)
    ours = Model.from_pretrained(str(tmp_path))
    x = torch.randint(0, V, (1, 100))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ errors
@pytest.fixture
def saved(tmp_path):
    m = Model(preset("tiny", vocab_size=V, d_model=32, n_layer=1, n_head=2, n_kv_head=1, head_dim=16, d_ff=64))
    m.save_pretrained(str(tmp_path / "m"))
    return tmp_path / "m"


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Model.from_pretrained(str(tmp_path / "nope"))


def test_missing_config_and_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors is missing"):
        Model.from_pretrained(str(saved))
    (saved / "config.json").unlink()
    with pytest.raises(UserError, match="config.json is missing"):
        Model.from_pretrained(str(saved))


def test_unsupported_architecture_names_it_and_lists_supported(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        Model.from_pretrained(str(saved))


def test_shape_mismatch_names_the_tensor(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        Model.from_pretrained(str(saved))


def test_corrupt_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        Model.from_pretrained(str(saved))
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        Model.from_pretrained(str(saved))


def test_pickle_weights_are_refused(saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="safetensors only"):
        Model.from_pretrained(str(saved))


def test_save_into_existing_dir_keeps_other_files(saved):
    (saved / "tokenizer.json").write_text("{}")
    m = Model.from_pretrained(str(saved))
    m.save_pretrained(str(saved))
    assert (saved / "tokenizer.json").read_text() == "{}"
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".m.tmp")]


def test_sharded_checkpoint_opens(tmp_path):
    hf = HF_FAMILIES["llama"]().eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Model.from_pretrained(str(tmp_path))
    x = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    shutil.rmtree(tmp_path)
