"""`tinychat export gguf`: the file reads back with the gguf package (names, shapes, types, metadata,
tokenizer), weights dequantize to what was exported, llama's rope permutation, refusals; and, when
llama-cpp-python is installed, the real llama.cpp runs the file like tinychat does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinychat.cli import main
from tinychat.errors import UserError
from tinychat.model import Model, preset
from tinychat.model.gguf_export import export_gguf, permute_rope, pre_tokenizer_name

gguf = pytest.importorskip("gguf")

PROSE = (
    "Velmora's 12 harbours shipped 3,141 crates in 1998 -- didn't they?\n\n  Indented line\twith a tab. "
    "我想在苹果公司工作 1314 天。 Ünïcödé naïve café! <|im_end|> is text here. I'll, we've, THEY'RE.\n"
)


def _model_dir(tok, root: Path, arch: str = "qwen3", seed: int = 0, **overrides) -> Path:
    kw = dict(d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128, max_seq_len=128)
    if arch == "llama":
        kw.update(qk_norm=False, tie_embeddings=False)
    if arch == "qwen2":
        kw.update(qk_norm=False, qkv_bias=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = preset("tiny", arch=arch, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **kw)
    model = Model(cfg)
    with torch.no_grad():  # random non-trivial norms and biases, so a misplaced one shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.uniform_(0.5, 1.5) if n.endswith("norm.weight") else p.normal_(0, 0.1)
    d = root / f"{arch}-{seed}"
    model.save_pretrained(str(d))
    tok.save_pretrained(d)
    return d


def _fields(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        out[name] = f.contents() if hasattr(f, "contents") else f
    return out


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_file_reads_back_with_names_shapes_metadata_and_tokenizer(arch, tiny_tokenizer, tmp_path: Path):
    d = _model_dir(tiny_tokenizer, tmp_path, arch)
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(d), "--type", "f16", "--out", str(out)]) == 0
    r = gguf.GGUFReader(out)
    f = _fields(r)
    cfg = Model.from_pretrained(str(d)).cfg
    assert f["general.architecture"] == arch
    assert f[f"{arch}.block_count"] == 2 and f[f"{arch}.embedding_length"] == 64
    assert f[f"{arch}.attention.head_count"] == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    assert f[f"{arch}.attention.key_length"] == 16 and f[f"{arch}.feed_forward_length"] == 128
    assert f[f"{arch}.context_length"] == 128 and f[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tok = tiny_tokenizer
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.im_end_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_id and f["tokenizer.ggml.padding_token_id"] == tok.pad_id
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == tok.chat_template

    tensors = {t.name: t for t in r.tensors}
    expect = {"token_embd.weight", "output_norm.weight"}
    for i in range(2):
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        expect |= {f"blk.{i}.{n}.weight" for n in names}
        if arch == "qwen3":
            expect |= {f"blk.{i}.attn_q_norm.weight", f"blk.{i}.attn_k_norm.weight"}
        if arch == "qwen2":
            expect |= {f"blk.{i}.attn_{x}.bias" for x in "qkv"}
    if arch == "llama":
        expect.add("output.weight")  # untied head
    assert set(tensors) == expect
    # ggml lists dimensions innermost first: a (out, in) torch weight is [in, out]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [64, 32]
    assert list(tensors["token_embd.weight"].shape) == [64, cfg.vocab_size]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_weights_round_trip_for_each_type(tiny_tokenizer, tmp_path: Path):
    """Dequantized tensors equal the exported weights within each format's rounding."""
    from gguf.quants import dequantize

    d = _model_dir(tiny_tokenizer, tmp_path, "qwen3")
    sd = Model.from_pretrained(str(d)).state_dict()
    Q = gguf.GGMLQuantizationType
    for kind, main_type, tol in (("f16", Q.F16, 1e-3), ("q8_0", Q.Q8_0, 0.02), ("q4_0", Q.Q4_0, 0.25)):
        out = export_gguf(d, tmp_path / f"{kind}.gguf", kind)
        assert out["tensors"][main_type.name] >= 14
        tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{kind}.gguf").tensors}
        w = sd["model.layers.1.mlp.down_proj.weight"].numpy()
        t = tensors["blk.1.ffn_down.weight"]
        assert t.tensor_type == main_type
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        assert np.abs(got - w).max() <= tol * np.abs(w).max()
        emb = tensors["token_embd.weight"]
        assert emb.tensor_type == (Q.Q8_0 if kind == "q4_0" else main_type)  # q4_0 keeps the head at 8 bits
        norm = tensors["blk.0.attn_q_norm.weight"]
        assert norm.tensor_type == Q.F32
        np.testing.assert_array_equal(norm.data, sd["model.layers.0.self_attn.q_norm.weight"].numpy())
    sizes = [(tmp_path / f"{k}.gguf").stat().st_size for k in ("f16", "q8_0", "q4_0")]
    assert sizes[0] > sizes[1] > sizes[2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half rotary embedding (first half pairs with second half): the reference layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_llama_permutation_turns_rotate_half_into_adjacent_pairs():
    """Rotating permuted q with GPT-J pairs gives the permuted result of HF's rotate-half: the scores agree."""
    torch.manual_seed(0)
    n_head, hd = 3, 8
    w = torch.randn(n_head * hd, 5)
    x = torch.randn(5)
    q = (w @ x).view(n_head, hd)
    qp = (permute_rope(w, n_head) @ x).view(n_head, hd)
    angle = torch.rand(hd // 2)
    cos, sin = angle.cos().repeat(2), angle.sin().repeat(2)
    hf = apply_rope(q, cos, sin)  # (n_head, hd), rotate-half
    pairs = qp.view(n_head, hd // 2, 2)  # GPT-J: (x0, x1) rotated together
    c, s = angle.cos(), angle.sin()
    gptj = torch.stack((pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c), -1)
    torch.testing.assert_close(gptj.view(n_head, hd), permute_rope(hf.reshape(-1, 1), n_head).view(n_head, hd))


def test_pre_tokenizer_names(tiny_tokenizer):
    tok_json = json.loads(tiny_tokenizer.backend.to_str())
    assert pre_tokenizer_name(tok_json, "t") == "qwen2"
    llama3 = json.loads(json.dumps(tok_json))
    llama3["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = tok_json["pre_tokenizer"]["pretokenizers"][0][
        "pattern"
    ]["Regex"].replace(r"\p{N}|", r"\p{N}{1,3}|")
    llama3["model"]["ignore_merges"] = True
    assert pre_tokenizer_name(llama3, "t") == "llama-bpe"
    llama3["model"]["ignore_merges"] = False  # llama.cpp's llama-bpe always ignores merges: not the same
    with pytest.raises(UserError, match="pre-tokenizer"):
        pre_tokenizer_name(llama3, "t")
    gpt2 = json.loads(json.dumps(tok_json))
    gpt2["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True, "trim_offsets": True}
    with pytest.raises(UserError, match="pre-tokenizer"):
        pre_tokenizer_name(gpt2, "t")


def test_cli_errors(tiny_tokenizer, tmp_path: Path, capsys):
    d = _model_dir(tiny_tokenizer, tmp_path, "qwen3")
    assert main(["export", "gguf", "--model", str(d), "--out", str(tmp_path / "x.gguf"), "--type", "q2_k"]) == 2
    assert "--type" in capsys.readouterr().err
    assert main(["export", "gguf", "--model", str(d)]) == 2
    assert main(["export", "gguf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", "gguf", "--model", str(d), "--out", str(tmp_path)]) == 2
    bare = tmp_path / "bare"
    Model.from_pretrained(str(d)).save_pretrained(str(bare))  # weights without a tokenizer
    assert main(["export", "gguf", "--model", str(bare), "--out", str(tmp_path / "x.gguf")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
    biased = _model_dir(tiny_tokenizer, tmp_path, "qwen3", qkv_bias=True, o_bias=True)
    with pytest.raises(UserError, match="qwen3 graph"):
        export_gguf(biased, tmp_path / "b.gguf")


# ------------------------------------------------------------------------------ the real llama.cpp
def _llama(path: Path, n_ctx: int = 128):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=2, verbose=False, seed=0)


def _ours_at(d: Path, kind: str) -> Model:
    """tinychat's model with the weights llama.cpp gets (rounded to f16), computing in fp32."""
    model = Model.from_pretrained(str(d), dtype=torch.float32)
    if kind == "f16":
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(p.half().float())
    return model


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained a few hundred steps on the tiny corpus: peaked distributions, like a real one."""
    pytest.importorskip("llama_cpp")
    from helpers import tiny_corpus

    from tinychat.tokenizer import train_tokenizer

    tok = train_tokenizer(tiny_corpus(), 400)
    root = tmp_path_factory.mktemp("gguf-trained")
    d = _model_dir(tok, root, "qwen3")
    model = Model.from_pretrained(str(d))
    ids = torch.tensor([i for doc in tiny_corpus(400, seed=1) for i in [*tok.encode(doc), tok.eot_id]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(d))
    return d


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_llama_cpp_tokenizes_like_tinychat(arch, tiny_tokenizer, tmp_path: Path):
    d = _model_dir(tiny_tokenizer, tmp_path, arch)
    export_gguf(d, tmp_path / "m.gguf", "f16")
    llm = _llama(tmp_path / "m.gguf")
    from helpers import tiny_corpus

    for text in [PROSE, *tiny_corpus(20, seed=3)]:
        ours = tiny_tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert llm.detokenize(ours).decode() == text


LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}  # fmt: skip


@pytest.mark.parametrize(
    "arch, scaling",
    [
        ("qwen3", None),
        ("qwen2", None),
        ("llama", None),
        ("llama", LLAMA3_ROPE),
        ("qwen3", {"rope_type": "linear", "factor": 2.0}),
    ],
)
def test_llama_cpp_f16_logits_match(arch, scaling, tiny_tokenizer, tmp_path: Path):
    d = _model_dir(tiny_tokenizer, tmp_path, arch, rope_scaling=scaling)
    model = Model.from_pretrained(str(d))
    with torch.no_grad():  # sharp attention, so a wrong rotary position (or scaling) moves the logits
        for layer in model.model.layers:
            attn = layer.self_attn
            (attn.q_norm.weight if arch == "qwen3" else attn.q_proj.weight).mul_(8.0)
    model.save_pretrained(str(d))
    export_gguf(d, tmp_path / "m.gguf", "f16")
    llm = _llama(tmp_path / "m.gguf")
    ids = tiny_tokenizer.encode(PROSE)[:100]
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        ours = _ours_at(d, "f16")(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max().item() < 1e-2


def test_llama_cpp_f16_greedy_64_tokens_and_q8_top1(trained_dir: Path, tmp_path: Path):
    from tinychat.infer.generate import generate_ids
    from tinychat.infer.sampling import SamplingParams
    from tinychat.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(trained_dir)
    export_gguf(trained_dir, tmp_path / "f16.gguf", "f16")
    llm = _llama(tmp_path / "f16.gguf")
    prompt = tok.encode("Velmora")
    ours_model = _ours_at(trained_dir, "f16")
    params = SamplingParams(temperature=0.0, max_new_tokens=64, stop_on_eos=False)
    ours = generate_ids(ours_model, [prompt], params)[0][0]
    llm.reset()
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 64:
            break
    assert theirs == ours
    # q8_0: the top-1 next token agrees on >= 95% of the positions of held-out text
    from helpers import tiny_corpus

    export_gguf(trained_dir, tmp_path / "q8.gguf", "q8_0")
    q8 = _llama(tmp_path / "q8.gguf")
    fp32 = Model.from_pretrained(str(trained_dir))
    agree = total = 0
    for doc in tiny_corpus(8, seed=7):
        ids = tok.encode(doc)[:120]
        q8.reset()
        q8.eval(ids)
        theirs_top = np.asarray(q8.scores[: len(ids)]).argmax(-1)
        with torch.no_grad():
            ours_top = fp32(torch.tensor([ids]))[0].argmax(-1).numpy()
        agree += int((theirs_top == ours_top).sum())
        total += len(ids)
    assert agree / total >= 0.95, agree / total
