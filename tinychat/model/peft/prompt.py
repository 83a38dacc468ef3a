"""Virtual-token adapters: prompt tuning, P-tuning (v1), prefix tuning and P-tuning v2, in PEFT's file format.

All four learn n "virtual tokens" the real text is read after; they differ in where the tokens enter:
- prompt tuning (Lester et al. 2021): n trained input embeddings, optionally initialised from a text's tokens;
- P-tuning v1 (Liu et al. 2021): the n embeddings come out of a prompt encoder (an MLP, or a bidirectional
  LSTM + MLP) during training; the encoder is a training aid and only its output is saved;
- prefix tuning (Li & Liang 2021): n trained keys and values at *every* layer, produced during training by a
  re-parameterisation MLP (embedding -> Linear -> tanh -> Linear) that is dropped when saving;
- P-tuning v2 (Liu et al. 2022): prefix tuning without the MLP (the per-layer keys/values are the parameters).

One mechanism serves all four, from outside the Transformer: every method is a per-layer key/value prefix
of n positions (prompt tuning's prefix is what the model computes from the virtual embeddings at positions
0..n-1, which never depends on the text after them) and the real tokens start at position n, exactly as
PEFT runs them. `Model.hidden_states` asks its optional `virtual_tokens` module to `attach` to each call:
- without a cache (training, scoring), attach returns a `PrefixCache`, a one-call stand-in for KVCache whose
  `attend` puts the prefix in front of each layer's keys/values (gradients flow into the prefix);
- with a KVCache (generate), rows at length 0 get the prefix written at positions 0..n-1 before
  their prompt is read, so the cache accounts for the virtual tokens and decoding runs at the base's speed;
- the paged serving engine (chat, serve) writes the prefix once into KV blocks that every sequence shares
  (infer/engine/core.py), so attach leaves a PagedKVCache alone.

File format (PEFT's): adapter_model.safetensors holds one tensor `prompt_embeddings`, (n, d_model) for
prompt/P-tuning and (n, n_layer * 2 * kv_dim) for prefix tuning (per layer: key then value, heads then
head_dim, as PEFT views it); adapter_config.json carries peft_type PROMPT_TUNING / P_TUNING / PREFIX_TUNING.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.kv_cache import CacheMeta, PagedKVCache, sdpa
from tinychat.model.peft.common import base_path, read_adapter_config, read_adapter_weights, write_adapter

KINDS = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING"}


@dataclass
class PromptSpec:
    kind: str  # prompt | ptuning | prefix
    n: int  # virtual tokens
    encoder: str = "mlp"  # ptuning: mlp or lstm
    encoder_hidden: int = 0  # ptuning / prefix projection: hidden width (0 = token width)
    encoder_layers: int = 2  # ptuning lstm layers
    projection: bool = False  # prefix: the re-parameterisation MLP (prefix tuning) or none (P-tuning v2)
    trained: bool = True  # False: a loaded adapter, `embedding` holds the final values (no encoder)
    init_text: str = ""  # prompt tuning / P-tuning v2: the text the tokens started from (prompt: in the config)


class VirtualTokens(nn.Module):
    """The trained virtual tokens of one adapter, attached to a Model as `model.virtual_tokens`.

    Parameter names follow PEFT's prompt encoders (embedding, mlp_head, lstm_head, transform).
    """

    def __init__(self, spec: PromptSpec, cfg: ModelConfig) -> None:
        super().__init__()
        if spec.kind not in KINDS or spec.n <= 0:
            raise UserError(f"--peft.virtual_tokens must be > 0 (got {spec.n}) for {spec.kind}.")
        self.spec, self.cfg = spec, cfg
        self.n_layer, self.n_kv, self.head_dim = cfg.n_layer, cfg.n_kv_head, cfg.head_dim
        self.token_dim = cfg.n_kv_head * cfg.head_dim if spec.kind == "prefix" else cfg.d_model  # PEFT's token_dim
        self.width = self.n_layer * 2 * self.token_dim if spec.kind == "prefix" else self.token_dim
        hidden = spec.encoder_hidden or self.token_dim
        self.hidden = hidden
        self.enabled = True
        trained_encoder = spec.trained and (spec.kind == "ptuning" or (spec.kind == "prefix" and spec.projection))
        self.embedding = nn.Embedding(spec.n, self.token_dim if trained_encoder else self.width)
        if trained_encoder and spec.kind == "prefix":
            self.transform = nn.Sequential(nn.Linear(self.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, self.width))
        elif trained_encoder and spec.encoder == "lstm":
            self.lstm_head = nn.LSTM(self.token_dim, hidden, spec.encoder_layers, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, self.width)
            )
        elif trained_encoder:
            self.mlp_head = nn.Sequential(
                nn.Linear(self.token_dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, self.width),
            )
        if spec.kind == "prefix" and not trained_encoder:  # loaded values or real_prefix replace this at once
            nn.init.normal_(self.embedding.weight, std=1.0 / math.sqrt(self.head_dim))

    @property
    def num_tokens(self) -> int:
        return self.spec.n

    def prompts(self) -> torch.Tensor:
        """The virtual tokens' values (n, width): through the encoder while it exists, else the embedding."""
        e = self.embedding.weight
        if hasattr(self, "transform"):
            return self.transform(e)
        if hasattr(self, "lstm_head"):
            return self.mlp_head(self.lstm_head(e[None])[0])[0]
        if hasattr(self, "mlp_head"):
            return self.mlp_head(e)
        return e

    def prefix_kv(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer keys and values of the virtual tokens, each (n_layer, n_kv_head, n, head_dim)."""
        p = self.prompts()
        n = self.spec.n
        if self.spec.kind == "prefix":  # PEFT: view (n, L*2, heads, hd), layer i's key is 2i, its value 2i+1
            kv = p.view(n, self.n_layer * 2, self.n_kv, self.head_dim).permute(1, 2, 0, 3)  # (2L, n_kv, n, hd)
            return kv[0::2], kv[1::2]
        # prompt / P-tuning: run the model on the virtual embeddings at positions 0..n-1, keeping each layer's
        # keys/values (recorded_kv, with the embeddings swapped in for placeholder ids)
        me = threading.get_ident()  # (1, n, d) in place of ids, in this thread's call only

        def virtual_embeddings(m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return p[None].to(out.dtype) if threading.get_ident() == me else out

        hook = model.model.embed_tokens.register_forward_hook(virtual_embeddings)
        busy = _computing()
        busy.add(id(self))
        try:
            return recorded_kv(model, torch.zeros(n, dtype=torch.long, device=p.device))
        finally:
            hook.remove()
            busy.discard(id(self))

    def attach(self, model: nn.Module, cache: Any, batch: int, rows: torch.Tensor | None) -> Any:
        """Called by Model.hidden_states: the cache this call should use (see the module docstring). UniPELT's
        gated prefix (`self.gate`, model/peft/unipelt.py) wraps it, to add the gate to the prefix's scores."""
        if not self.enabled or id(self) in _computing():
            return cache  # off, or inside its own prefix computation
        gate = getattr(self, "gate", None)
        if isinstance(cache, PagedKVCache):  # the paged engine has placed the prefix
            return cache if gate is None else gate.wrap(model, cache, self.spec.n)
        n = self.spec.n
        if cache is None:
            k, v = self.prefix_kv(model)
            prefixed = PrefixCache(k, v, batch, self.cfg.max_seq_len)
            return prefixed if gate is None else gate.wrap(model, prefixed, n)
        lengths = cache.lengths if rows is None else cache.lengths[rows]
        ids = torch.arange(cache.batch_size, device=lengths.device) if rows is None else rows
        fresh = ids[lengths == 0]  # rows about to read their prompt: the virtual tokens come first
        if fresh.numel() > 0:
            if cache.max_len < n + 1:
                raise ValueError(f"KV cache of {cache.max_len} positions has no room after {n} virtual tokens.")
            with torch.no_grad():
                k, v = self.prefix_kv(model)
            cache.preload(fresh, k, v)
        return cache if gate is None else gate.wrap(model, cache, n)


_THREAD = threading.local()  # per thread: a server's embedding thread runs forwards beside the engine's


def _computing() -> set[int]:
    """Ids of the VirtualTokens whose prefix this thread is computing now (their attach must stand aside)."""
    if not hasattr(_THREAD, "busy"):
        _THREAD.busy = set()
    return _THREAD.busy


class PrefixCache:
    """A KVCache stand-in for one cache-less forward call: each layer attends to the prefix, then causally.

    keys/values (n_layer, n_kv, n, hd) are shared by the batch; the real tokens take positions n..n+T-1.
    Without a prefix (k = v = None) it records each layer's new keys/values instead: how prompt tuning's
    virtual tokens become a prefix, differentiably.
    """

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, batch_size: int, max_len: int) -> None:
        self.k, self.v, self.n = k, v, 0 if k is None else k.shape[2]
        self.batch_size, self.max_len = batch_size, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def plan(self, n_tokens: int, rows: torch.Tensor | None = None) -> CacheMeta:
        """The call's metadata: real tokens at positions n..n+T-1, each seeing the whole prefix, then causally."""
        if n_tokens > self.max_len:
            raise ValueError(f"sequence of {n_tokens} tokens exceeds the context window {self.max_len}.")
        n, dev = self.n, (self.k.device if self.k is not None else None)
        pos = n + torch.arange(n_tokens, device=dev)[None, :]  # (1, T)
        if self.k is None:
            return CacheMeta(pos, None, 0, n_tokens, None, True)
        causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=dev).tril()
        mask = torch.cat([torch.ones(n_tokens, n, dtype=torch.bool, device=dev), causal], dim=1)[None, None]
        return CacheMeta(pos, None, n, n + n_tokens, mask, False)  # mask (1, 1, T, n + T)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, m: CacheMeta, bias: Tensor | None = None) -> Tensor:
        """q (B, H, T, hd) over the prefix's keys/values and the call's own k/v (B, n_kv, T, hd); `bias` (B, H, T,
        n + T) is added to the scores (UniPELT's prefix gate)."""
        if self.k is None or self.v is None:  # recording: keep each layer's keys/values, attend causally
            self.keys.append(k)
            self.values.append(v)
        else:
            B = k.shape[0]  # (B, n_kv, T, hd) -> (B, n_kv, n + T, hd)
            k = torch.cat([self.k[layer].to(k.dtype)[None].expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([self.v[layer].to(v.dtype)[None].expand(B, -1, -1, -1), v], dim=2)
        return sdpa(q, k, v, m.mask, m.is_causal, bias)

    def commit(self, m: CacheMeta, n_new: torch.Tensor | None = None) -> None:
        """Nothing to advance: the cache lives for one call."""


# ---------------------------------------------------------------------------------------- model surgery


def attach_virtual_tokens(model: nn.Module, spec: PromptSpec, init_ids: list[int] | None = None) -> VirtualTokens:
    """Freeze `model` and give it trainable virtual tokens. Prompt tuning starts from `init_ids`' embeddings
    (repeated to n, as PEFT's TEXT init) or, without them, from randomly drawn vocabulary rows (SAMPLE_VOCAB);
    P-tuning v2 starts from the keys/values the model computes for the same tokens (`real_prefix`)."""
    if getattr(model, "virtual_tokens", None) is not None:
        raise UserError("this model already carries virtual tokens (a prompt/prefix adapter); merge is not possible.")
    for p in model.parameters():
        p.requires_grad_(False)
    dev = model.model.norm.weight.device
    vt = VirtualTokens(spec, model.cfg).to(dev)
    raw_prefix = spec.kind == "prefix" and not spec.projection and spec.trained  # P-tuning v2's keys/values
    if spec.kind == "prompt" or raw_prefix:
        emb = model.model.embed_tokens.weight
        if init_ids:
            ids = (init_ids * math.ceil(spec.n / len(init_ids)))[: spec.n]
        else:
            ids = torch.randint(0, emb.shape[0], (spec.n,)).tolist()
        ids_t = torch.tensor(ids, device=emb.device)
        with torch.no_grad():
            vt.embedding.weight.copy_(emb[ids_t].float() if spec.kind == "prompt" else real_prefix(model, ids_t))
    model.virtual_tokens = vt
    return vt


def real_prefix(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values the frozen model computes for `ids` (n,) at positions 0..n-1, laid out as PEFT's
    prefix `prompt_embeddings` (n, n_layer * 2 * kv_dim): P-tuning v2's start. Li & Liang (2021) found that
    prefixes initialised from real words' activations train far better than random ones; a random prefix
    also disturbs every layer's attention at step 0, while this one is text the model could have read."""
    k, v = recorded_kv(model, ids)  # (L, n_kv, n, hd)
    kv = torch.stack([k, v], dim=1).flatten(0, 1)  # (2L, n_kv, n, hd): layer i's key at 2i, its value at 2i+1
    return kv.permute(2, 0, 1, 3).reshape(ids.numel(), -1).float()  # the inverse of VirtualTokens.prefix_kv's view


def recorded_kv(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's keys and values, (n_layer, n_kv, n, hd) each, as the model computes them for `ids` (n,) at
    positions 0..n-1 (a recording PrefixCache: KVCache's in-place writes would break the backward pass)."""
    rec = PrefixCache(None, None, 1, ids.numel())
    model.hidden_states(ids[None], rec)
    return torch.stack([k[0] for k in rec.keys]), torch.stack([v[0] for v in rec.values])


def has_virtual_tokens(model: nn.Module) -> bool:
    return getattr(model, "virtual_tokens", None) is not None


def is_virtual_key(key: str) -> bool:
    return key.startswith("virtual_tokens.")


def export_prompts(model: nn.Module, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The virtual tokens' final values (n, width) as saved (`prompt_embeddings`), computed on the CPU from
    `state` (the gathered weights) so it works whatever wraps the live module."""
    vt: VirtualTokens = model.virtual_tokens
    cpu = VirtualTokens(vt.spec, vt.cfg)
    own = {k.removeprefix("virtual_tokens."): v for k, v in state.items() if is_virtual_key(k)}
    cpu.load_state_dict({k: v.float().cpu() for k, v in own.items() if not k.startswith("gate.")})  # (UniPELT's gate)
    with torch.no_grad():
        return cpu.prompts().float().contiguous()


def save_virtual_tokens(
    path: str | Path, model: nn.Module, state: dict[str, torch.Tensor], base_model: str | Path, task_type: str
) -> None:
    """PEFT's prompt-learning format: the encoder's output as `prompt_embeddings`."""
    vt: VirtualTokens = model.virtual_tokens
    spec, cfg = vt.spec, vt.cfg
    prompts = export_prompts(model, state)
    config: dict[str, Any] = {
        "peft_type": KINDS[spec.kind],
        "task_type": task_type,
        "base_model_name_or_path": base_path(base_model),
        "num_virtual_tokens": spec.n,
        "token_dim": vt.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_kv_head if spec.kind == "prefix" else cfg.n_head,
        "num_layers": cfg.n_layer,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }
    if spec.kind == "prompt":
        text = bool(spec.init_text) and base_model
        config.update(
            prompt_tuning_init="TEXT" if text else "SAMPLE_VOCAB",
            prompt_tuning_init_text=spec.init_text or None,
            tokenizer_name_or_path=base_path(base_model) if text else None,
            tokenizer_kwargs=None,
        )
    elif spec.kind == "ptuning":
        config.update(
            encoder_reparameterization_type=spec.encoder.upper(),
            encoder_hidden_size=vt.hidden,
            encoder_num_layers=spec.encoder_layers,
            encoder_dropout=0.0,
        )
    else:
        config.update(prefix_projection=spec.projection, encoder_hidden_size=vt.hidden, init_weights=None)
    write_adapter(path, config, {"prompt_embeddings": prompts})


def load_virtual_tokens(model: nn.Module, path: str | Path, d: dict[str, Any] | None = None) -> VirtualTokens:
    """Attach the prompt/prefix adapter at `path` (ours or PEFT's) to `model`, for inference."""
    d = d or read_adapter_config(path, tuple(KINDS.values()))
    src = Path(path) / "adapter_config.json"
    kind = {v: k for k, v in KINDS.items()}[d["peft_type"]]
    cfg = model.cfg
    if d.get("num_transformer_submodules", 1) != 1:
        raise UserError(f"{src}: num_transformer_submodules must be 1 for a decoder-only model.")
    if d.get("num_layers") not in (None, cfg.n_layer):
        raise UserError(f"{src}: num_layers is {d['num_layers']}, but the base model has {cfg.n_layer} layers.")
    spec = PromptSpec(kind=kind, n=int(d.get("num_virtual_tokens", 0)), trained=False)
    vt = attach_virtual_tokens(model, spec)
    if d.get("token_dim") not in (None, vt.token_dim):
        raise UserError(f"{src}: token_dim is {d['token_dim']}, expected {vt.token_dim} for this base model.")
    place_prompts(vt, read_adapter_weights(path), path)
    return vt


def place_prompts(vt: VirtualTokens, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Copy a saved `prompt_embeddings` (n, width) into a loaded adapter's embedding; UserError on a bad shape."""
    emb = tensors.get("prompt_embeddings")
    if emb is None or tuple(emb.shape) != (vt.spec.n, vt.width):
        got = None if emb is None else tuple(emb.shape)
        raise UserError(
            f"{Path(path) / 'adapter_model.safetensors'}: prompt_embeddings has shape {got}, "
            f"expected {(vt.spec.n, vt.width)}."
        )
    with torch.no_grad():
        vt.embedding.weight.copy_(emb)
    vt.requires_grad_(False)
