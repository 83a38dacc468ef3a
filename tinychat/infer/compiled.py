"""A compiled decode step: one token per row through `torch.compile`, with static shapes.

Why: at batch 1 a small model's token is a few hundred tiny kernels dispatched from Python (docs/engine.md:
~240 aten calls per token for the 6.8M tiny preset), so eager decoding is bound by dispatch, not by
arithmetic. Inductor fuses the norms, rotary embedding, SiLU and residual adds into a few generated
C++/Triton kernels per layer and leaves the matmuls to the BLAS, which removes most of that overhead. The
graph's kernels are called from generated C++ (`cpp_wrapper`), not from Python, and attention is written
as matmuls and a softmax (kv_cache.matmul_attention) that inductor fuses with the mask: 1.34x and 1.25x
tokens/s on the tiny int8 model (docs/compress.md).

Compiling needs shapes that do not change from token to token, or every step would recompile. So the
decode step attends over a *whole* fixed-length buffer per layer (`StaticKVCache`) with a mask that hides
each row's positions beyond its own length, and writes the new key/value at each row's own position; the
call's `CacheMeta` is built here (`static_meta`) instead of by `KVCache.plan`, whose span grows by one every
token. The cost is attention over the buffer's length instead of the filled positions, small beside the
matmuls for the short contexts of small models; that length is rounded up to a multiple of `BUCKET` so that
different prompt lengths share a graph. The serving engine pads its paged metadata the same way
(infer/engine/core.py, `_compiled_decode`) and calls the same `decode_step`.

One compiled graph per model and shape (batch size, buffer length, dtype); torch.compile caches them. The
first call compiles (10-30 s on a laptop CPU); `tinychat generate --compile` is worth it for long or many
generations, not for one short answer. Prefill stays eager: it runs once per prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tinychat.errors import UserError
from tinychat.model.config import ModelConfig
from tinychat.model.kv_cache import CacheMeta, PagedKVCache, PagedMeta, sdpa, visible_keys

BUCKET = 128  # buffer lengths are rounded up to a multiple of this (fewer distinct shapes, fewer compiles)


def check_compilable(model: torch.nn.Module) -> None:
    """A clear error for the models the compiled step does not run (instead of a failure inside dynamo)."""
    if getattr(model, "virtual_tokens", None) is not None:
        raise UserError("compiled decoding does not run prompt/prefix adapters; decode them without --compile.")
    if getattr(model.cfg, "n_experts", 0):
        raise UserError(
            "compiled decoding does not run mixture-of-experts models (their routing has data-dependent "
            "shapes); decode them without --compile."
        )


def static_length(needed: int, context: int) -> int:
    """The cache buffer's length for `needed` positions: rounded up to a bucket, never past the context."""
    return min(context, -(-needed // BUCKET) * BUCKET)


class StaticKVCache:
    """A key/value buffer of fixed shape per layer, (B, n_kv, max_len, hd), written by (row, position).

    Separate tensors per layer (not views of one), written by advanced indexing (an `index_put_`):
    inductor then updates them in place, where a scatter into a view of one big input was compiled as a
    copy of the whole buffer per layer and step (measured: 33 ms per step for the small preset at batch 8)."""

    def __init__(
        self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1)
        self.batch_size, self.max_len = batch_size, max_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: CacheMeta) -> torch.Tensor:
        """Write k/v (B, n_kv, T, hd) at each row's positions (B, T), attend q over the whole masked buffer."""
        ck, cv = self.k[layer], self.v[layer]
        ck[self.rows, :, m.positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, n_kv, hd) at [b, :, pos[b, t]]
        cv[self.rows, :, m.positions] = v.transpose(1, 2).to(cv.dtype)
        return sdpa(q, ck, cv, m.mask, False)


def static_meta(positions: torch.Tensor, max_len: int) -> CacheMeta:
    """Metadata of a call over a whole `StaticKVCache` buffer: row b writes its keys at positions[b] (B, T)
    and a query at position p sees the keys at 0..p (mask (B, 1, T, max_len)); later slots hold junk or
    zeros, masked, and are overwritten before any query reaches them."""
    return CacheMeta(positions, None, None, max_len, visible_keys(positions, max_len), False)


def static_forward(
    model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache
) -> torch.Tensor:
    """Logits (B, T, V) of ids (B, T) at positions (B, T): the eager prefill, and what the compiled step runs."""
    return model(ids, cache, meta=static_meta(positions, cache.max_len))


def _step(model: torch.nn.Module, ids: torch.Tensor, cache: object, meta: object) -> torch.Tensor:
    return model(ids, cache, meta=meta)[:, -1]


_compiled: Callable[..., torch.Tensor] | None = None
_compiled_greedy: Callable[..., torch.Tensor] | None = None
_compiled_sampled: Callable[..., torch.Tensor] | None = None
GREEDY_STEPS = 4  # greedy tokens per compiled call (greedy_steps)


def _compile(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # cpp_wrapper: the graph's kernels are called from generated C++, not Python. One graph per model, dtype,
    # batch bucket and buffer length: dynamo's default of 8 is reached by one server's batch buckets plus a
    # draft model, and fullgraph turns the 9th into an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def decode_step(
    model: torch.nn.Module, ids: torch.Tensor, cache: StaticKVCache | PagedKVCache, meta: CacheMeta | PagedMeta
) -> torch.Tensor:
    """Logits (B, V) of one new token per row, ids (B, 1), through the compiled step.

    The call's metadata must have static shapes: `static_meta` over a `StaticKVCache` (tinychat generate),
    or the serving engine's padded `PagedMeta` over a pool of fixed size (infer/engine/core.py). The model
    is an argument of the compiled function, so a new model or shape compiles a new graph (dynamo's
    guards) and the same ones are reused from call to call."""
    global _compiled
    if _compiled is None:
        _compiled = _compile(_step)
    return _compiled(model, ids, cache, meta)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, cache: StaticKVCache, positions: torch.Tensor) -> torch.Tensor:
    out = []
    for j in range(GREEDY_STEPS):  # unrolled by dynamo: one graph for all the steps
        ids = model(ids, cache, meta=static_meta(positions + j, cache.max_len))[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
    return torch.cat(out, 1)


def greedy_steps(
    model: torch.nn.Module, ids: torch.Tensor, cache: StaticKVCache, positions: torch.Tensor
) -> torch.Tensor:
    """The next GREEDY_STEPS greedy tokens (B, GREEDY_STEPS) after ids (B, 1), written at positions (B, 1) and on:
    several decode steps in one compiled graph, the argmax inside it, so Python (dynamo's guards, the call,
    the metadata) runs once per GREEDY_STEPS tokens instead of once per token (tinychat generate --compile,
    greedy without penalties: tiny int8 1,526 against 969 tokens/s, small 353 against 286, same tokens).

    The caller keeps what it needs: tokens after a stop are dropped, and their keys/values, written past the
    row's end, are never read. The buffer must hold GREEDY_STEPS - 1 positions beyond the last one kept."""
    global _compiled_greedy
    if _compiled_greedy is None:
        _compiled_greedy = _compile(_greedy)
    return _compiled_greedy(model, ids, cache, positions)


def _sampled(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache: PagedKVCache,
    meta: PagedMeta,
    slots: torch.Tensor,
    bias: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    out = []
    for j in range(noise.shape[0]):  # unrolled by dynamo: one graph for all the steps
        pos = meta.positions + j
        m = PagedMeta(pos, slots[j], meta.keys, 0, meta.span, visible_keys(pos, meta.span))
        x = model(ids, cache, meta=m)[:, -1].float() + bias  # (B, V): the sampler's logits, bias added
        probs = (x / temperature.clamp(min=1e-5)[:, None]).softmax(-1)
        ids = torch.where(temperature > 0, (probs / noise[j]).argmax(-1), x.argmax(-1))[:, None]
        out.append(ids)
    return torch.cat(out, 1)


def sampled_steps(
    model: torch.nn.Module,
    ids: torch.Tensor,  # (B, 1) each row's next input token
    cache: PagedKVCache,
    meta: PagedMeta,  # positions (B, 1) of ids, keys (B, S) covering every step's position; slots unused
    slots: torch.Tensor,  # (K, B) pool slot of each step's new key/value
    bias: torch.Tensor,  # (B, V) logit bias, -inf for banned ids, 0 elsewhere
    temperature: torch.Tensor,  # (B,) 0 = greedy
    noise: torch.Tensor,  # (K, B, V) Exp(1) draws of each row's generator, in the order K steps would draw them
) -> torch.Tensor:
    """The serving engine's multi-step decode (vLLM's multi-step scheduling): K = noise.shape[0] tokens per row
    (B, K) in one compiled graph, sampled inside it as the engine's sampler samples one step (bias, then
    temperature; `probs / noise` argmax is the exponential-race form of a categorical draw, greedy at
    temperature 0), each fed back as the next step's input. The noise is drawn beforehand from each row's
    own generator, so a seeded request gets the same tokens as one step per call. Rows that need what
    the graph does not do (penalties, top-k/p, grammars, logprobs) decode one step per call instead."""
    global _compiled_sampled
    if _compiled_sampled is None:
        _compiled_sampled = _compile(_sampled)
    return _compiled_sampled(model, ids, cache, meta, slots, bias, temperature, noise)
