"""Saving and opening Hugging Face model directories (config.json + safetensors), both ways.

Why HF's layout as our only format: every tool a user already has (transformers, vLLM, llama.cpp's
converter, PEFT) opens it, and tinychat opens what those tools saved. Parameter names need no mapping
because tinychat's modules use HF's names. Weights are read with safetensors only: nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.hub import resolve_model_dir
from tinychat.model.positions import ROPE_TYPES
from tinychat.model.transformer import Model, rope_inv_freq

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
# mixture-of-experts families: (arch, HF class, model_type); Qwen2-MoE always has a shared expert, Qwen3-MoE never
MOE_ARCHITECTURES = {"qwen2": ("Qwen2MoeForCausalLM", "qwen2_moe"), "qwen3": ("Qwen3MoeForCausalLM", "qwen3_moe")}
MOE_TYPES = {cls: arch for arch, (cls, _) in MOE_ARCHITECTURES.items()} | {
    mt: arch for arch, (_, mt) in MOE_ARCHITECTURES.items()
}
# No Llama-family class in transformers adds ALiBi biases (BLOOM, MPT and Falcon do, with LayerNorm, GELU and
# fused QKV layouts), so an ALiBi model declares a class transformers does not know: it refuses to open it
# rather than computing rotary logits from ALiBi weights.
ALIBI_ARCHITECTURE, ALIBI_MODEL_TYPE = "TinychatAlibiForCausalLM", "tinychat_alibi"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------- config.json
def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # older transformers read this key ...
        "rope_parameters": rope,  # ... transformers 5 reads this one
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tinychat_preset": cfg.preset,
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.arch in ("llama", "mistral") and (cfg.sliding_window if cfg.arch == "llama" else cfg.max_window_layers):
        raise UserError(f"{cfg.arch} has no per-layer sliding window; use arch mistral (every layer) or qwen2/qwen3.")
    if cfg.arch == "mistral":
        if cfg.qk_norm or cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise UserError("mistral has no q/k norms and no biases: qk_norm/qkv_bias/o_bias/mlp_bias false.")
        d.update(sliding_window=cfg.sliding_window or None)
    elif cfg.arch == "llama":
        if cfg.qk_norm:
            raise UserError("model.qk_norm is not part of the llama family; use arch qwen3.")
        if cfg.qkv_bias != cfg.o_bias:
            raise UserError("llama's attention_bias covers q/k/v and o together; set qkv_bias == o_bias.")
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.arch == "qwen2":
        if cfg.qk_norm or not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise UserError("qwen2 has q/k/v biases and nothing else: qkv_bias=true, qk_norm/o_bias/mlp_bias false.")
        d.update(qkv_bias=True, **_window_fields(cfg))
    else:  # qwen3
        if not cfg.qk_norm or cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
            raise UserError("qwen3 needs qk_norm=true, qkv_bias == o_bias (attention_bias) and no mlp_bias.")
        d.update(attention_bias=cfg.qkv_bias, **_window_fields(cfg))
    if cfg.n_experts:
        d.update(_moe_fields(cfg))
    if cfg.position == "alibi":
        d.update(architectures=[ALIBI_ARCHITECTURE], model_type=ALIBI_MODEL_TYPE, tinychat_arch=cfg.arch)
    return d


def _window_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen2/Qwen3's sliding-window keys, with layer_types spelled out (Qwen2-MoE's default rule differs)."""
    if not cfg.sliding_window:
        return {"use_sliding_window": False, "sliding_window": None}
    return {
        "use_sliding_window": True,
        "sliding_window": cfg.sliding_window,
        "max_window_layers": cfg.max_window_layers,
        "layer_types": ["sliding_attention" if cfg.sliding(i) else "full_attention" for i in range(cfg.n_layer)],
    }


def _moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Qwen3-MoE (no shared expert) or Qwen2-MoE (a shared expert behind a sigmoid gate); every layer sparse."""
    if cfg.arch not in MOE_ARCHITECTURES:
        raise UserError(f"mixture of experts is saved as Qwen2-MoE or Qwen3-MoE; arch {cfg.arch} has no MoE form.")
    if cfg.arch == "qwen3" and cfg.shared_expert_d_ff:
        raise UserError("Qwen3-MoE has no shared expert; use arch qwen2 (Qwen2-MoE) for model.shared_expert_d_ff.")
    if cfg.arch == "qwen2" and not cfg.shared_expert_d_ff:
        raise UserError("Qwen2-MoE always has a shared expert: set model.shared_expert_d_ff (or use arch qwen3).")
    cls, model_type = MOE_ARCHITECTURES[cfg.arch]
    d: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "num_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.experts_per_token,
        "moe_intermediate_size": cfg.expert_d_ff,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "router_aux_loss_coef": cfg.moe_aux_coef,
        "tinychat_router_z_loss_coef": cfg.moe_z_coef,
        "output_router_logits": False,
    }
    if cfg.shared_expert_d_ff:
        d["shared_expert_intermediate_size"] = cfg.shared_expert_d_ff
    return d


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    archs = d.get("architectures") or []
    alibi = d.get("model_type") == ALIBI_MODEL_TYPE or ALIBI_ARCHITECTURE in archs
    moe = any(a in MOE_TYPES for a in [*archs, d.get("model_type")])
    known = MOE_TYPES if moe else MODEL_TYPES
    arch = d.get("tinychat_arch") if alibi else next((known[a] for a in archs if a in known), None)
    if arch is None and d.get("model_type") in (MOE_TYPES if moe else ARCHITECTURES):
        arch = MOE_TYPES[d["model_type"]] if moe else d["model_type"]
    if arch not in ARCHITECTURES:
        found = ", ".join(archs) or d.get("model_type") or "none"
        names = [*ARCHITECTURES.values(), *(c for c, _ in MOE_ARCHITECTURES.values())]
        raise UserError(f"{source}: unsupported architecture {found}; tinychat opens {', '.join(names)}.")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (expected silu).")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope else None
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ROPE_TYPES:
        raise UserError(f"{source}: rope scaling {scaling} is not supported ({', '.join(ROPE_TYPES)}).")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "yarn":
        # transformers falls back on max_position_embeddings when the original length is not given
        scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    window, window_from = _read_window(d, arch, int(d.get("num_hidden_layers", 0)), source)
    n_head = int(d["num_attention_heads"])
    try:
        bias = bool(d.get("attention_bias", False))
        cfg = ModelConfig(
            preset=d.get("tinychat_preset", "custom"),
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["hidden_size"]),
            n_layer=int(d["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(d.get("num_key_value_heads") or n_head),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // n_head),
            d_ff=int(d["intermediate_size"]),
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qk_norm=arch == "qwen3",
            qkv_bias=bool(d.get("qkv_bias", True)) if arch == "qwen2" else bias,
            o_bias=False if arch == "qwen2" else bias,
            position="alibi" if alibi else "rope",
            sliding_window=window,
            max_window_layers=window_from,
            **(_read_moe(d, arch, source) if moe else {}),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_embeddings=bool(d.get("tie_word_embeddings", arch != "llama")),
            init_std=float(d.get("initializer_range", 0.02)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
    except KeyError as e:
        raise UserError(f"{source}: required field {e.args[0]!r} is missing.") from None
    return cfg


def _read_window(d: dict[str, Any], arch: str, n_layer: int, source: str) -> tuple[int, int]:
    """(sliding_window, max_window_layers) from Mistral's or Qwen2/Qwen3's keys; (0, 0) when off."""
    if arch == "mistral":
        return int(d.get("sliding_window") or 0), 0
    if arch == "llama" or not d.get("use_sliding_window") or not d.get("sliding_window"):
        return 0, 0
    window = int(d["sliding_window"])
    types = d.get("layer_types")
    if types is None:  # transformers' Qwen2/Qwen3 rule: layers from max_window_layers on slide
        return window, int(d.get("max_window_layers", 0))
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    start = n_layer - len(sliding)
    if sliding != list(range(start, n_layer)):
        raise UserError(f"{source}: layer_types {types} are not supported (sliding layers must be the last ones).")
    return (window, start) if sliding else (0, 0)


def _read_moe(d: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step", 1)) != 1:
        raise UserError(f"{source}: dense layers among MoE layers (mlp_only_layers) are not supported.")
    return {
        "n_experts": int(d.get("num_experts") or d["num_local_experts"]),
        "experts_per_token": int(d["num_experts_per_tok"]),
        "moe_d_ff": int(d["moe_intermediate_size"]),
        "shared_expert_d_ff": int(d.get("shared_expert_intermediate_size") or 0) if arch == "qwen2" else 0,
        "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
        "moe_aux_coef": float(d.get("router_aux_loss_coef", 0.001)),
        "moe_z_coef": float(d.get("tinychat_router_z_loss_coef", 0.0)),
    }


# ---------------------------------------------------------------------------- atomic directory writes
def write_files_atomically(path: str | Path, files: dict[str, Any]) -> None:
    """Write {name: bytes | callable(tmp_path)} into directory `path` without ever leaving it half-written.

    A new directory is built beside the target and renamed into place in one step. An existing
    directory (which may hold a tokenizer or other files we must not touch) gets each file replaced by
    an atomic os.replace, so every file is always either the old or the new version.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, content in files.items():
            if callable(content):
                content(tmp / name)
            else:
                (tmp / name).write_bytes(content)
        if not target.exists():
            os.replace(tmp, target)
            return
        if not target.is_dir():
            raise UserError(f"{target} exists and is not a directory.")
        for name in files:
            os.replace(tmp / name, target / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    """Copy the tokenizer files a model directory carries (if any) into `dst`."""
    if not src:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


# ---------------------------------------------------------------------------- save
def save_pretrained(
    model: Model,
    path: str | Path,
    dtype: torch.dtype | None = None,
    state_dict: dict | None = None,
    record: dict[str, Any] | None = None,
) -> None:
    """Write config.json, model.safetensors and generation_config.json in HF's layout.

    `state_dict` overrides the model's own (a trainer passes the full weights gathered from FSDP shards).
    `record` (see `training_record`) goes into config.json beside the architecture.
    """
    cfg = model.cfg
    quant = getattr(model, "quantization", None)  # set by tinychat.model.compress.quant
    dtype = torch.float32 if quant else (dtype or next(model.parameters()).dtype)
    state = {}
    if quant:
        from tinychat.model.compress.quant import quantized_state

        state = quantized_state(model)  # integers stay integers
    for name, t in (state_dict if state_dict is not None else model.state_dict()).items():
        if quant or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue  # HF leaves the tied head out and re-ties it on load
        state[name] = t.detach().to("cpu", dtype).contiguous()
    hf_config = config_to_hf(cfg, dtype)
    if quant:
        hf_config["quantization_config"] = quant
        hf_config["tie_word_embeddings"] = False  # the head is stored (see quant.quantized_state)
    if getattr(model, "lowrank", None):
        hf_config["tinychat_lowrank"] = model.lowrank  # tinychat's own layout (see compress/factorize.py)
    hf_config.update(record or {})
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    if cfg.eos_token_id is not None:
        gen["eos_token_id"] = cfg.eos_token_id
    for key in ("bos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            gen[key] = getattr(cfg, key)
    write_files_atomically(
        path,
        {
            "config.json": (json.dumps(hf_config, indent=2) + "\n").encode(),
            "model.safetensors": lambda p: save_file(state, str(p), metadata={"format": "pt"}),
            "generation_config.json": (json.dumps(gen, indent=2) + "\n").encode(),
        },
    )


# ---------------------------------------------------------------------------- load
def read_config(path: str | Path) -> ModelConfig:
    return config_from_hf(read_config_json(path), str(resolve_model_dir(path) / "config.json"))


def read_config_json(path: str | Path) -> dict[str, Any]:
    p = resolve_model_dir(path)
    if not p.is_dir():
        raise UserError(f"model directory {p} does not exist.")
    return read_json_object(p / "config.json", "a model directory needs config.json and model.safetensors")


TRAINING_RECORD = ("tinychat_stage", "tinychat_chat")


def training_record(path: str | Path) -> dict[str, Any]:
    """How the model at `path` was trained, as training wrote it into config.json (tinychat.train.loop.record_stage):
    the keys of TRAINING_RECORD that are there. A command that rewrites a model without training it (quantize,
    prune, factorize) passes this on to save_pretrained, so eval still knows to ask its output as a chat model."""
    raw = read_config_json(path)
    return {k: raw[k] for k in TRAINING_RECORD if k in raw}


def read_json_object(file: Path, needs: str) -> dict[str, Any]:
    """A JSON object from `file`; a UserError naming the file if it is missing (`needs` says what is
    expected), is not valid JSON, or holds something else."""
    if not file.is_file():
        raise UserError(f"{file} is missing; {needs}.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object.")
    return data


def _weight_files(p: Path) -> list[Path]:
    single = p / "model.safetensors"
    index = p / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a valid safetensors index: {e}.") from None
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise UserError(f"{index} names shard {missing[0]}, which is missing.")
        return [p / s for s in shards]
    if (p / "pytorch_model.bin").exists():
        raise UserError(
            f"{p} holds pytorch_model.bin; tinychat reads safetensors only (never unpickles). "
            "Re-save it with transformers' save_pretrained(safe_serialization=True)."
        )
    raise UserError(f"{single} is missing.")


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> Model:
    p = resolve_model_dir(path)
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():  # a PEFT adapter directory
        from tinychat.model.peft import load_with_base

        return load_with_base(p, dtype, device)
    raw = read_config_json(p)
    cfg = config_from_hf(raw, str(p / "config.json"))
    files = _weight_files(p)
    with torch.device("meta"):
        model = Model(cfg)
    if raw.get("tinychat_lowrank"):  # `tinychat factorize` output: two matrices per block Linear
        from tinychat.model.compress.factorize import apply_lowrank_layout

        apply_lowrank_layout(model, raw["tinychat_lowrank"], str(p / "config.json"))
    expected = {k: v for k, v in model.state_dict().items()}
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 - safe_open is not iterable
                    loaded[name] = sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is not a readable safetensors file ({e}).") from None
    if cfg.tie_embeddings:
        loaded.pop("lm_head.weight", None)  # some writers store the tied copy too
        expected.pop("lm_head.weight", None)
    if raw.get("quantization_config"):  # `tinychat quantize` output: integer weights stay integers
        from tinychat.model.compress.quant import load_quantized

        return load_quantized(model, loaded, raw["quantization_config"], str(p), dtype or torch.float32, device)
    unexpected = sorted(set(loaded) - set(expected))
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise UserError(f"{files[0].parent}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all).")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise UserError(f"{files[0].parent}: tensor {missing[0]} is missing ({len(missing)} in all).")
    for name, t in loaded.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{files[0].parent}: tensor {name} has shape {tuple(t.shape)}, "
                f"config.json implies {tuple(expected[name].shape)}."
            )
    if dtype is None:
        dtype = next(iter(loaded.values())).dtype if loaded else torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    model = model.to_empty(device=device or "cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.items()}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # the rotary buffer is not in the file: derive it (it was a meta tensor until now)
    model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device or "cpu"), persistent=False)
    return model.to(device or "cpu").eval()
