"""`tinychat generate`: text from a model directory, streamed to stdout."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from tinychat.config import field


@dataclass
class GenerateConfig:
    model: str = field("", help="model directory (HF layout, with the tokenizer files) or hub id (Qwen/Qwen3-0.6B)")
    prompt: list[str] = field([], help="one or more prompts; several prompts are generated as one batch")
    chat: bool = field(False, help="wrap each prompt as a user turn in the chat template")
    system: str = field("", help="system message when --chat is given")
    max_new_tokens: int = field(128)
    temperature: float = field(0.8, help="0 = greedy")
    top_k: int = field(0, help="0 = off")
    top_p: float = field(1.0)
    min_p: float = field(0.0)
    repetition_penalty: float = field(1.0)
    stop: list[str] = field([], help="stop strings (not included in the output)")
    seed: int | None = field(None, help="same seed, same text")
    stream: bool = field(True, help="print tokens as they come (batch of one)")
    truncate: Literal["error", "left"] = field("error", help="what to do with a prompt over the context window")
    device: str = field("auto")
    dtype: str = field("auto")
    draft_model: str = field("", help="speculative decoding: a smaller model with the same tokenizer proposes tokens")
    speculative: Literal["", "ngram"] = field("", help="ngram: draft-free speculative decoding (prompt lookup)")
    num_speculative_tokens: int = field(4, help="tokens proposed per speculative round")
    compile: bool = field(False, help="decode through torch.compile: faster per token after a one-off compile (~20 s)")
    pack_weights: bool = field(
        True, help="fp32 on a CPU: decode matmuls over a packed copy of the weights (faster; their memory again)"
    )


def run(cfg: GenerateConfig) -> int:
    from tinychat.device import pick_device, pick_dtype
    from tinychat.errors import UserError
    from tinychat.infer.generate import generate
    from tinychat.infer.locate import tokenizer_dir
    from tinychat.infer.sampling import SamplingParams
    from tinychat.model import Model
    from tinychat.model.hub import resolve_model_dir
    from tinychat.model.packed import pack_linears
    from tinychat.tokenizer import Tokenizer

    if not cfg.model:
        raise UserError("--model DIR is required (a directory saved by tinychat or transformers, or a hub id).")
    if not cfg.prompt:
        raise UserError("--prompt TEXT is required.")
    device = pick_device(cfg.device)
    path = resolve_model_dir(cfg.model)
    model = Model.from_pretrained(str(path), dtype=pick_dtype(cfg.dtype, device), device=str(device))
    model.fuse_projections()  # inference only: q/k/v and gate/up in one matmul each
    if cfg.pack_weights:
        pack_linears(model)  # fp32 on the CPU: decode-step matmuls over packed weights (model/packed.py)
    spec = None
    if cfg.compile and (cfg.draft_model or cfg.speculative):
        raise UserError("--compile decodes without speculation; drop --compile or --draft_model/--speculative.")
    if cfg.draft_model or cfg.speculative:
        from tinychat.infer.speculative import Speculative

        if cfg.num_speculative_tokens < 1:
            raise UserError(f"--num_speculative_tokens must be at least 1, got {cfg.num_speculative_tokens}.")
        draft = None
        if cfg.draft_model:
            d = resolve_model_dir(cfg.draft_model)
            draft = Model.from_pretrained(str(d), dtype=pick_dtype(cfg.dtype, device), device=str(device))
            draft.fuse_projections()
            if cfg.pack_weights:
                pack_linears(draft)
        spec = Speculative(draft=draft, k=cfg.num_speculative_tokens)
    tok = Tokenizer.from_pretrained(tokenizer_dir(path))
    prompts = cfg.prompt
    if cfg.chat:

        def wrap(p: str) -> list[int]:  # token ids: the template's special tokens must stay special
            msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
                {"role": "user", "content": p}
            ]
            return tok.render_chat(msgs, add_generation_prompt=True).ids

        prompts = [wrap(p) for p in prompts]
    params = SamplingParams(
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        max_new_tokens=cfg.max_new_tokens,
        stop=cfg.stop,
        seed=cfg.seed,
    )
    streaming = cfg.stream and len(prompts) == 1
    if streaming:
        if not cfg.chat:
            sys.stdout.write(cfg.prompt[0])
        on_text = lambda _row, delta: (sys.stdout.write(delta), sys.stdout.flush())  # noqa: E731
        generate(model, tok, prompts, params, on_text, cfg.truncate, spec, cfg.compile)
        sys.stdout.write("\n")
    else:
        for i, g in enumerate(generate(model, tok, prompts, params, None, cfg.truncate, spec, cfg.compile)):
            head = "" if cfg.chat else cfg.prompt[i]
            print(f"--- [{i}] ({g.finish_reason}, {len(g.token_ids)} tokens)\n{head}{g.text}")
    if spec is not None:
        st = spec.stats
        accepted = f"{st['accepted']}/{st['proposed']} guesses accepted in {st['rounds']} rounds"
        print(f"speculative: {accepted}", file=sys.stderr)
    return 0
