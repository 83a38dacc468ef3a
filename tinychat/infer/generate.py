"""Batched text generation with the KV cache: prefill once, then one token per step for every row.

Prompts of different lengths share one batch: they are right-padded, prefilled in one forward call
(the cache records each row's real length) and then decode together, each row at its own position.
Whenever half of the rows still decoding have finished, those are dropped from the batch (the cache
keeps the others' rows; one copy each time, at most about twice the cache in all), so a batch of short
answers is not carried to the longest one's length at full width: an evaluation's 64 prompts whose
replies stop after a few tokens, with one that runs to the limit.
Text is streamed as it becomes final: a trailing partial UTF-8 character, or text that could still
turn into a stop string, is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from tinychat.errors import UserError
from tinychat.infer.compiled import (
    GREEDY_STEPS,
    StaticKVCache,
    check_compilable,
    decode_step,
    greedy_steps,
    static_forward,
    static_length,
    static_meta,
)
from tinychat.infer.sampling import BatchSampling, SamplingParams, apply_penalties, sample
from tinychat.infer.speculative import Speculative, speculative_generate_ids
from tinychat.infer.text import TextTracker


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_prompts(
    prompt_ids: list[list[int]], max_new_tokens: int, context: int, truncate: Literal["error", "left"]
) -> list[list[int]]:
    out = []
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise UserError(f"prompt {i} is empty after tokenisation; give at least one token.")
        if len(ids) >= context:
            if truncate != "left":
                raise UserError(
                    f"prompt {i} has {len(ids)} tokens but the context window is {context}; shorten it or "
                    "ask for truncation from the left (truncate='left')."
                )
            ids = ids[-max(1, context - max_new_tokens) :]
        out.append(ids)
    return out


SHARED_PREFIX_MIN = 16  # tokens: below this, one more forward call costs more than it saves
DROP_FINISHED_AT = 0.5  # share of the batch still decoding at which the finished rows are dropped


def shared_prefix(prompts: list[list[int]]) -> int:
    """Leading tokens every prompt has in common (each keeps at least its last token to prefill), or 0
    when there are fewer than SHARED_PREFIX_MIN of them or a single prompt."""
    if len(prompts) < 2:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n if n >= SHARED_PREFIX_MIN else 0


def prefill(model, x: torch.Tensor, lengths: torch.Tensor, cache, shared: int = 0) -> torch.Tensor:  # noqa: ANN001
    """Prefill right-padded prompts x (B, T0) of `lengths` into `cache`; the logits (B, V) at each row's
    last prompt token.

    A prefix of `shared` tokens common to every prompt (a system message, a tool schema, few-shot
    examples) is computed once, for row 0, and copied to the other rows. The LM head runs on the last
    token of each row only: a prefill's other logits (B x T0 x vocab) are never read."""
    if shared and getattr(model, "virtual_tokens", None) is None:
        row0 = torch.zeros(1, dtype=torch.long, device=x.device)
        model(x[:1, :shared], cache, rows=row0, last=row0)
        cache.share_prefix(0)
        x, lengths = x[:, shared:], lengths - shared
    return model(x, cache, n_new=lengths, last=lengths - 1)


@torch.no_grad()
def generate_ids(
    model,  # noqa: ANN001 - tinychat Model
    prompt_ids: list[list[int]],
    params: SamplingParams,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    truncate: Literal["error", "left"] = "error",
    compiled: bool = False,
) -> tuple[list[list[int]], list[str], list[int]]:
    """Generate token ids for a batch of prompts.

    on_token(row, token_id) is called for each new token of an unfinished row and returns True when
    that row should stop (e.g. a stop string appeared). Returns (new ids per row, finish reasons,
    prompt lengths after truncation). `compiled`: decode through `torch.compile` with static shapes
    (infer/compiled.py; the same tokens, faster per token once compiled).
    """
    params.validate()
    context = model.cfg.max_seq_len
    prompts = prepare_prompts(prompt_ids, params.max_new_tokens, context, truncate)
    device = _device(model)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    T0 = int(lengths.max())
    budget = min(params.max_new_tokens, context - T0)  # the longest prompt bounds the shared cache
    x = torch.zeros(B, T0, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, device=device)
    V = model.cfg.vocab_size
    context_mask = torch.zeros(B, V, dtype=torch.bool, device=device)  # tokens seen: repetition penalty
    for i, p in enumerate(prompts):
        context_mask[i, torch.tensor(p, device=device)] = True
    counts = torch.zeros(B, V, device=device)
    sp = BatchSampling.stack([params] * B, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    stop_ids = set(stop_ids or ()) if params.stop_on_eos else set()

    # plain greedy decoding runs several steps per compiled call (compiled.greedy_steps), when the buffer has
    # room for the steps past the budget
    multi = compiled and not sp.any_sampling and not sp.needs_penalties and T0 + budget + GREEDY_STEPS <= context
    pending: list[torch.Tensor] = []  # tokens (b,) that greedy_steps already chose, for the coming steps
    if compiled:  # fixed shapes: a whole buffer per layer, written by (row, position)
        check_compilable(model)
        L = static_length(T0 + budget + (GREEDY_STEPS if multi else 0), context)
        cache = StaticKVCache(model.cfg, B, L, device, model.compute_dtype())
        logits = static_forward(model, x, torch.arange(T0, device=device)[None].expand(B, T0), cache)
        last = logits[torch.arange(B, device=device), lengths - 1]  # (B, V)
    else:
        cache = model.new_cache(B, max_len=T0 + budget)
        last = prefill(model, x, lengths, cache, shared_prefix(prompts))
    new_ids: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B  # on the host: the loop's bookkeeping costs no device ops per token
    rows = list(range(B))  # the caller's row at each position of the batch (finished rows are dropped)
    for step in range(budget):
        nxt = pending.pop(0) if pending else sample(apply_penalties(last.float(), context_mask, counts, sp), sp, gen)
        for row, tok in zip(rows, nxt.tolist()):
            if done[row]:
                continue
            if tok in stop_ids:
                reasons[row], done[row] = "stop", True
                continue
            new_ids[row].append(tok)
            if on_token is not None and on_token(row, tok):
                reasons[row], done[row] = "stop", True
        if all(done) or step == budget - 1:
            break
        live = [not done[row] for row in rows]
        if sp.needs_penalties:
            context_mask.scatter_(1, nxt[:, None], True)
            counts.scatter_add_(1, nxt[:, None], torch.tensor(live, device=device).float()[:, None])
        if not compiled and sum(live) <= DROP_FINISHED_AT * len(rows):  # half the batch is done: drop those rows
            keep = torch.tensor([j for j, alive in enumerate(live) if alive], device=device)
            cache.keep(keep)
            nxt, context_mask, counts, sp = nxt[keep], context_mask[keep], counts[keep], sp.select(keep)
            rows = [rows[j] for j in keep.tolist()]
        if multi:  # tokens step + 1 .. step + GREEDY_STEPS, unless the last call's are still pending
            if not pending:
                pending = list(greedy_steps(model, nxt[:, None], cache, (lengths + step)[:, None]).unbind(1))
        elif compiled:  # the caller's lengths: row b's token goes to position lengths[b] + step
            last = decode_step(model, nxt[:, None], cache, static_meta((lengths + step)[:, None], cache.max_len))
        else:
            last = model(nxt[:, None], cache)[:, -1]
    return new_ids, reasons, [len(p) for p in prompts]


def generate(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    prompts: str | list[int] | list[str] | list[list[int]],
    params: SamplingParams | None = None,
    on_text: Callable[[int, str], None] | None = None,
    truncate: Literal["error", "left"] = "error",
    speculative: Speculative | None = None,
    compiled: bool = False,
) -> list[Generation]:
    """Generate continuations of prompts; on_text(row, delta) streams final text as it comes.

    A prompt is text (encoded as plain text: special-token look-alikes stay text) or token ids (what a
    chat template renders, with real special tokens). `speculative` (one prompt only) proposes tokens
    with a draft model or prompt lookup and verifies them with `model` (infer/speculative.py). `compiled`
    decodes through torch.compile (infer/compiled.py).
    """
    params = params or SamplingParams()
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = list(prompts)
    trackers = [TextTracker(tokenizer, params.stop) for _ in prompts]

    def on_token(row: int, tok: int) -> bool:
        delta = trackers[row].push(tok)
        if delta and on_text is not None:
            on_text(row, delta)
        return trackers[row].stopped

    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if speculative is not None:
        if len(ids) != 1:
            raise UserError("speculative decoding generates one prompt at a time; give a single prompt.")
        ids = prepare_prompts(ids, params.max_new_tokens, model.cfg.max_seq_len, truncate)
        new, reason = speculative_generate_ids(model, ids[0], params, speculative, set(tokenizer.stop_ids), on_token)
        new_ids, reasons, plens = [new], [reason], [len(ids[0])]
    else:
        stops = set(tokenizer.stop_ids)
        new_ids, reasons, plens = generate_ids(model, ids, params, stops, on_token, truncate, compiled)
    out = []
    for row, tr in enumerate(trackers):
        tail = tr.finish()
        if tail and on_text is not None:
            on_text(row, tail)
        out.append(Generation(tr.text, new_ids[row], reasons[row], plens[row]))  # type: ignore[arg-type]
    return out


def stream(model, tokenizer, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:  # noqa: ANN001
    """Yield text pieces of one prompt's continuation as they are generated (a Python generator)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue()
    err: list[BaseException] = []

    def work() -> None:
        try:
            generate(model, tokenizer, prompt, params, on_text=lambda _r, d: q.put(d))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            err.append(e)
        finally:
            q.put(None)

    threading.Thread(target=work, daemon=True).start()
    while (piece := q.get()) is not None:
        yield piece
    if err:
        raise err[0]
