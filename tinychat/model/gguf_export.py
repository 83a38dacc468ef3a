"""`tinychat export gguf --model DIR --type f16|q8_0|q4_0 --out FILE`: one file that llama.cpp runs.

GGUF is llama.cpp's format: the weights (named `blk.N.attn_q.weight` ...), the hyper-parameters and the
whole tokenizer (tokens, merges, special ids, chat template) in one memory-mappable file. This writer
follows llama.cpp's own convert_hf_to_gguf.py for the three families tinychat trains and opens:

* Llama: llama.cpp rotates adjacent pairs of a head's dimensions (GPT-J style) where HF rotates the
  first half against the second, so q_proj/k_proj rows are permuted per head (the converter's
  `permute`); Qwen2 and Qwen3 use the NeoX (rotate-half) layout and need nothing.
* 1-D tensors (norms, biases) stay f32, as llama.cpp's kernels expect; 2-D weights are f16, Q8_0
  (blocks of 32 int8 with an f16 scale) or Q4_0 (blocks of 32 int4 with an f16 scale). In q4_0 files the
  embedding (which is also the output head when tied) stays Q8_0, as llama-quantize keeps the head at
  higher precision; a weight whose rows are not a multiple of 32 falls back to f16.
* The tokenizer: llama.cpp re-implements byte-level BPE and picks its pre-tokenizer regex by name
  (tokenizer.ggml.pre), so the name must denote exactly the regex tokenizer.json holds. tinychat's regex
  is Qwen2's (digits one by one), llama.cpp's "qwen2"; Llama 3's is "llama-bpe". Any other
  pre-tokenizer is refused rather than exported with a guess, since a wrong guess silently tokenizes
  differently.
The file is written beside FILE and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinychat.config import field
from tinychat.errors import UserError

TYPES = ("f16", "q8_0", "q4_0")

# pre-tokenizer regexes llama.cpp knows by name (src/llama-vocab.cpp), as tokenizer.json spells them
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# name -> (regex, whether BPE must skip merges for words already in the vocabulary, as llama.cpp does)
PRE_TOKENIZERS = {"qwen2": (QWEN2_PATTERN, False), "llama-bpe": (LLAMA3_PATTERN, True)}


@dataclass
class GGUFExportConfig:
    model: str = field("", help="model directory (HF layout, with its tokenizer) or hub id")
    type: str = field("f16", help="weight type of 2-D tensors: f16, q8_0 or q4_0")
    out: str = field("", help="the .gguf file to write")


# ------------------------------------------------------------------------------ tokenizer
def pre_tokenizer_name(tok_json: dict[str, Any], source: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json; UserError if none fits."""
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or (tok_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            f"{source}: only byte-level BPE tokenizers can be exported to GGUF (as llama.cpp's gpt2 model)."
        )
    norm = tok_json.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":  # Qwen2 ships NFC, which llama.cpp leaves out too
        raise UserError(f"{source}: the tokenizer's {norm.get('type')} normalizer has no llama.cpp equivalent.")
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    pattern = ((split or {}).get("pattern") or {}).get("Regex")
    if byte_level is None or byte_level.get("add_prefix_space") or (split is None and byte_level.get("use_regex")):
        pattern = None
    ignore_merges = bool(model.get("ignore_merges", False))
    for name, (regex, ignores) in PRE_TOKENIZERS.items():
        if pattern == regex and ignore_merges == ignores:
            return name
    raise UserError(
        f"{source}: its pre-tokenizer is not one llama.cpp knows by name (tinychat exports Qwen2's and "
        "Llama 3's regex), so llama.cpp would tokenize differently; retrain the tokenizer with tinychat."
    )


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and the chat template, as convert_hf_to_gguf's _set_vocab_gpt2."""
    import gguf

    from tinychat.tokenizer import Tokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; a GGUF file carries its tokenizer.")
    tok = Tokenizer.from_pretrained(model_dir)
    tok_json = json.loads(tok_file.read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(tok_json, str(tok_file))
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size} embeddings.")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):  # ids past the tokenizer are padding rows of the embedding
        t = tok.id_to_token(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.pad_id)
    bos = tok.token_to_id(tok.bos_token) if tok.bos_token else None
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_add_bos_token(bool(tok.extra_config.get("add_bos_token", False)) and bos is not None)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# ------------------------------------------------------------------------------ weights
def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's adjacent pairs, per head (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    """HF parameter name -> llama.cpp tensor name."""
    table = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in table:
        return table[name]
    parts = name.split(".")  # model.layers.N.<module>.<proj>.<weight|bias>
    layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[".".join(parts[3:-1])]
    return f"blk.{parts[2]}.{layer}.{parts[-1]}"


def check_supported(cfg: Any) -> None:
    """What llama.cpp's graphs for these families cannot express, refused before writing anything."""
    if cfg.arch == "qwen2" and cfg.q_dim != cfg.d_model:
        raise UserError("llama.cpp's qwen2 graph needs n_head * head_dim == d_model.")
    if cfg.arch == "qwen3" and cfg.o_bias:
        raise UserError("llama.cpp's qwen3 graph has no attention biases.")
    if cfg.n_experts or cfg.position != "rope" or cfg.sliding_window or cfg.arch == "mistral":
        raise UserError("GGUF export covers dense RoPE llama/qwen2/qwen3 models (no MoE, ALiBi or sliding window).")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "yarn":
        raise UserError("GGUF export does not write yarn rope scaling yet.")
    if kind == "llama3" and cfg.arch != "llama":
        raise UserError("llama3 rope scaling is only exported for the llama family.")


def tensor_type(name: str, t: torch.Tensor, kind: str) -> Any:
    """The GGML type of one tensor in a file of `kind` (see the module docstring)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if t.ndim <= 1:
        return Q.F32
    if kind == "f16" or t.shape[-1] % 32:
        return Q.F16
    if kind == "q4_0" and name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f16") -> dict[str, Any]:
    """Write `model_dir` (tinychat or transformers, Llama/Qwen2/Qwen3) as a GGUF file; returns a summary."""
    import gguf

    from tinychat.model.hf import load_pretrained
    from tinychat.model.hub import resolve_model_dir
    from tinychat.model.transformer import rope_inv_freq

    if kind not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}.")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the .gguf file to write.")
    src = resolve_model_dir(model_dir)
    model = load_pretrained(str(model_dir), dtype=torch.float32)
    cfg = model.cfg
    check_supported(cfg)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[cfg.arch]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        hparams = {  # GGUFWriter method -> value, the hyper-parameters llama.cpp reads as ARCH.KEY
            "name": src.name, "vocab_size": cfg.vocab_size, "context_length": cfg.max_seq_len,
            "embedding_length": cfg.d_model, "block_count": cfg.n_layer, "feed_forward_length": cfg.d_ff,
            "head_count": cfg.n_head, "head_count_kv": cfg.n_kv_head, "key_length": cfg.head_dim,
            "value_length": cfg.head_dim, "rope_dimension_count": cfg.head_dim, "rope_freq_base": cfg.rope_theta,
            "layer_norm_rms_eps": cfg.norm_eps,
        }  # fmt: skip
        for key, value in hparams.items():
            getattr(w, f"add_{key}")(value)
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]  # fmt: skip
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, src, cfg.vocab_size)

        counts: dict[str, int] = {}
        state = model.state_dict()
        if cfg.tie_embeddings:
            state.pop("lm_head.weight")  # llama.cpp reuses token_embd as the head when output is absent
        if (scaling.get("rope_type", scaling.get("type"))) == "llama3":
            # llama.cpp divides each frequency by its factor: ours are inv_freq(default) / inv_freq(scaled)
            base = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
            state["rope_freqs.weight"] = base / rope_inv_freq(cfg)
        for name, t in state.items():
            t = t.detach().float()
            if cfg.arch == "llama" and ".self_attn.q_proj." in name:
                t = permute_rope(t, cfg.n_head)
            elif cfg.arch == "llama" and ".self_attn.k_proj." in name:
                t = permute_rope(t, cfg.n_kv_head)
            gname = name if name == "rope_freqs.weight" else gguf_name(name)
            qtype = tensor_type(gname, t, kind)
            data = gguf.quants.quantize(t.numpy().astype(np.float32), qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "arch": cfg.arch, "type": kind, "tensors": counts}


def run(cfg: GGUFExportConfig) -> int:
    if not cfg.model:
        raise UserError("--model DIR is required: the model directory to export.")
    if not cfg.out:
        raise UserError("--out FILE is required: the .gguf file to write.")
    info = export_gguf(cfg.model, cfg.out, cfg.type)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"wrote {info['path']}: {info['arch']} {info['type']}, {info['bytes'] / 2**20:.1f} MiB ({kinds} tensors)")
    return 0
