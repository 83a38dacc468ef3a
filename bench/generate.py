"""Decode throughput of tinychat's KV-cache generation vs transformers' generate, same weights, one run.

    .venv/bin/python bench/generate.py [--presets tiny,small] [--new-tokens 128] [--prompt-len 32]

For each preset a random model is saved once; tinychat and transformers (AutoModelForCausalLM on the
very same directory) then generate the same number of new tokens greedily for batch 1 and batch 8.
Prints new tokens per second of eager and compiled decoding (`generate_ids(..., compiled=True)`, infer/compiled.py;
its one-off compile is not timed) and each one's ratio to transformers, and the matmul floor: the tokens/s of
the weight matmuls alone (`matmul_floor`), which bounds every engine holding fp32 weights on this machine.
Timings live here, never in tests.

    .venv/bin/python bench/generate.py --llama-cpp [--presets tiny,small] [--model DIR]

adds llama.cpp (llama-cpp-python) on the same weights, exported with `tinychat export gguf` as f16, q8_0
and q4_0: batch-1 prompt (prefill) and decode tokens per second beside tinychat fp32, bf16, int8 and int4
(`tinychat quantize`, group 64), each eager and compiled (infer/compiled.py), int8 and int4 compiled once more on
aten's kernels instead of native.py's ("comp. aten"), and each one's decode speed relative to llama.cpp q8_0.
--model DIR benches a trained model directory.

    .venv/bin/python bench/generate.py --speculative [--model DIR --draft DIR[,DIR]] [--draft-dtype fp32,bf16]
        [--draft-k 2,3,4] [--prompt-file F]

batch-1 greedy decode with speculative decoding (prompt lookup, and each draft model in each dtype and k)
beside plain decoding of the same target: tokens/s, speed-up and acceptance. A draft may be a `tinychat
quantize` directory; its dtype or quantization changes what it proposes, never the target's greedy tokens.
Without --model a random small target and a random tiny draft
(random models agree rarely: the acceptance, and so the speed-up, needs trained models, e.g. the speedrun's).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from tinychat.infer import SamplingParams, generate_ids
from tinychat.infer.compiled import (
    GREEDY_STEPS,
    StaticKVCache,
    greedy_steps,
    static_forward,
    static_length,
)
from tinychat.model import Model, native, preset
from tinychat.model.packed import pack_linears


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_floor(model: torch.nn.Module, batch: int, repeats: int = 20) -> float:
    """Seconds per decode step spent in the weight matmuls alone: every Linear's weight and the head applied to
    `batch` rows of random activations, one after another as a step reads them (no attention, no norms, no
    Python around them), through F.linear or, where faster, the packed kernel (model/packed.py). At batch 1
    this is the memory traffic of the weights, the floor under any engine that keeps them in this dtype
    (transformers included)."""
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not any(w is model.lm_head.weight for w in ws):
        ws.append(model.lm_head.weight)
    xs = {k: torch.randn(batch, k, dtype=ws[0].dtype) for k in {w.shape[1] for w in ws}}

    def step() -> None:
        for w in ws:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    steps = [step]
    op = native.packed_linear() if ws[0].dtype == torch.float32 else None
    if op is not None:
        packed = [(torch.ops.tinychat.pack_linear_weight(w.detach()), w.shape) for w in ws]

        def packed_step() -> None:
            for p, (n, k) in packed:
                op(xs[k], p, None, n)

        steps.append(packed_step)
    with torch.no_grad():
        for f in steps:
            f()
        return min(best_of(lambda f=f: [f() for _ in range(repeats)], 3) for f in steps) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-cpp", action="store_true", help="batch-1 prompt/decode tok/s: tinychat vs llama.cpp")
    ap.add_argument("--model", default="", help="with --llama-cpp: a model directory instead of random presets")
    ap.add_argument("--speculative", action="store_true", help="batch-1 greedy: speculative vs plain decoding")
    ap.add_argument("--draft", default="", help="with --speculative: draft model directories, comma-separated")
    ap.add_argument("--prompt-file", default="", help="with --speculative --model: prompts, one per line")
    ap.add_argument("--draft-dtype", default="fp32", help="with --draft: the draft's dtypes, e.g. fp32,bf16")
    ap.add_argument("--draft-k", default="", help="with --draft: tokens proposed per round, e.g. 2,3,4 (default --k)")
    ap.add_argument("--k", type=int, default=4, help="with --speculative: tokens proposed per round")
    args = ap.parse_args()
    if args.speculative:
        speculative_table(args)
        return
    if args.llama_cpp:
        llama_cpp_table(args)
        return
    from transformers import AutoModelForCausalLM

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, greedy, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per sequence"
    )
    print(
        f"{'preset':<8}{'params':>8}{'batch':>7}{'tinychat tok/s':>16}{'compiled tok/s':>16}{'transformers tok/s':>20}"
        f"{'ratio':>8}{'compiled':>10}{'matmul floor tok/s':>20}"
    )
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = Model(preset(name, vocab_size=8192)).eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        pack_linears(model.fuse_projections())  # the inference path (the engine and `tinychat generate` do the same)
        for B in [int(b) for b in args.batches.split(",")]:
            prompts = torch.randint(0, 8192, (B, args.prompt_len))
            params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, stop_on_eos=False)
            ours = lambda: generate_ids(model, prompts.tolist(), params)  # noqa: E731
            ours_compiled = lambda: generate_ids(model, prompts.tolist(), params, compiled=True)  # noqa: E731

            def theirs() -> None:
                with torch.no_grad():
                    hf.generate(
                        prompts,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                    )

            ours()
            ours_compiled()  # compiles this batch size's graph (not timed)
            theirs()  # warm-up
            # interleaved rounds: a change in the machine's load touches the three alike
            t_ours = t_comp = t_hf = float("inf")
            for _ in range(args.repeats):
                t_ours, t_comp = min(t_ours, best_of(ours, 1)), min(t_comp, best_of(ours_compiled, 1))
                t_hf = min(t_hf, best_of(theirs, 1))
            n = B * args.new_tokens
            print(
                f"{name:<8}{model.num_params() / 1e6:>7.1f}M{B:>7}{n / t_ours:>16.1f}{n / t_comp:>16.1f}"
                f"{n / t_hf:>20.1f}{t_hf / t_ours:>7.2f}x{t_hf / t_comp:>9.2f}x{B / matmul_floor(model, B):>20.1f}"
            )


def _model_dirs(args: argparse.Namespace, root: Path) -> list[tuple[str, Path]]:
    """(label, directory with tokenizer) pairs: --model, or random presets with a small trained tokenizer."""
    if args.model:
        return [(Path(args.model).name, Path(args.model))]
    from tinychat.tokenizer import train_tokenizer

    rng = torch.Generator().manual_seed(0)
    words = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(n),), generator=rng)) for n in range(2000)]
    text = [" ".join(words[i : i + 50]) + " 12 + 7 = 19." for i in range(0, 2000, 50)]
    tok = train_tokenizer(text * 20, 2048)
    out = []
    for name in args.presets.split(","):
        torch.manual_seed(0)
        d = root / name
        Model(preset(name, vocab_size=8192, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)).save_pretrained(str(d))
        tok.save_pretrained(d)
        out.append((name, d))
    return out


def _tinychat_speed(
    model: Model, prompt: list[int], new: int, repeats: int, compiled: bool = False
) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) at batch 1: prefill into a fresh cache, then `new` greedy steps; `compiled`
    decodes through infer/compiled.py (its compile happens in the warm-up, not timed)."""
    L = static_length(len(prompt) + new + GREEDY_STEPS + 1, model.cfg.max_seq_len)

    @torch.no_grad()
    def prefill() -> tuple:
        if compiled:
            cache = StaticKVCache(model.cfg, 1, L, torch.device("cpu"), model.compute_dtype())
            return cache, static_forward(model, torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)[:, -1]
        cache = model.new_cache(1, max_len=len(prompt) + new + 1)
        return cache, model(torch.tensor([prompt]), cache)[:, -1]

    @torch.no_grad()
    def full() -> None:
        cache, last = prefill()
        if compiled:  # greedy, as tinychat generate --compile runs it: GREEDY_STEPS tokens per compiled call
            nxt = last.argmax(-1, keepdim=True)
            for i in range(0, new, GREEDY_STEPS):
                nxt = greedy_steps(model, nxt, cache, torch.tensor([[len(prompt) + i]]))[:, -1:]
            return
        for _ in range(new):
            last = model(last.argmax(-1, keepdim=True), cache)[:, -1]

    prefill()
    full()  # warm-up
    t_pre, t_all = best_of(prefill, repeats), best_of(full, repeats)
    return len(prompt) / t_pre, new / max(t_all - t_pre, 1e-9)


def _llama_cpp_speed(path: Path, prompt: list[int], new: int, repeats: int) -> tuple[float, float]:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=len(prompt) + new + 8, n_batch=512, n_threads=torch.get_num_threads(), verbose=False
    )

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def full() -> None:
        prefill()
        for _ in range(new):  # greedy, one token at a time, as tinychat's loop above
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])

    prefill()
    full()
    t_pre, t_all = best_of(prefill, repeats), best_of(full, repeats)
    return len(prompt) / t_pre, new / max(t_all - t_pre, 1e-9)


def _quant_layers(model: Model) -> list:
    """Every QuantLinear of a quantized model, the fused q/k/v and gate/up ones (kept outside the module tree)
    included."""
    from tinychat.model.compress.quant import QuantLinear

    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in model.model.layers:
        mods += [*layer.self_attn.qkv_mod, *getattr(layer.mlp, "gate_up_mod", ())]
    return mods


def llama_cpp_table(args: argparse.Namespace) -> None:
    """Batch-1 prompt and decode speed of tinychat fp32/bf16/int8/int4 and llama.cpp f16/q8_0/q4_0, same weights."""
    from tinychat.model.compress.quant import quantize_model, quantized_state
    from tinychat.model.gguf_export import export_gguf

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 1, greedy, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens"
    )
    print(f"{'model':<10}{'engine':<22}{'file MiB':>9}{'prompt tok/s':>14}{'decode tok/s':>14}{'vs q8_0':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, d in _model_dirs(args, Path(tmp)):
            model = Model.from_pretrained(str(d), dtype=torch.float32)
            prompt = torch.randint(16, 300, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
            rows = []
            for dtype in (torch.float32, torch.bfloat16):
                m = pack_linears(model.to(dtype).fuse_projections())
                size = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
                for comp in (False, True):
                    speed = _tinychat_speed(m, prompt, args.new_tokens, args.repeats, comp)
                    rows.append((f"tinychat {str(dtype)[6:]}{' compiled' if comp else ''}", size, *speed))
            for bits in (8, 4):  # weight-only int8 / int4 (group 64), the `tinychat quantize` path, in memory
                m = quantize_model(Model.from_pretrained(str(d), dtype=torch.float32), bits, 64).fuse_projections()
                size = sum(v.numel() * v.element_size() for v in quantized_state(m).values()) / 2**20
                for comp in (False, True):
                    speed = _tinychat_speed(m, prompt, args.new_tokens, args.repeats, comp)
                    rows.append((f"tinychat int{bits}{' compiled' if comp else ''}", size, *speed))
                layers = _quant_layers(m)
                kernels = [q.native for q in layers]  # native.py's kernel where QuantLinear chose it, else None
                if any(kernels):  # the same model on aten's int8/int4 kernel, for the ratio (the step recompiles)
                    for q in layers:
                        q.native = None
                    speed = _tinychat_speed(m, prompt, args.new_tokens, args.repeats, True)
                    rows.append((f"tinychat int{bits} comp. aten", size, *speed))
                    for q, kernel in zip(layers, kernels):
                        q.native = kernel
            for kind in ("f16", "q8_0", "q4_0"):
                path = Path(tmp) / f"{label}-{kind}.gguf"
                export_gguf(d, path, kind)
                speed = _llama_cpp_speed(path, prompt, args.new_tokens, args.repeats)
                rows.append((f"llama.cpp {kind}", path.stat().st_size / 2**20, *speed))
            q8 = next(r[3] for r in rows if r[0] == "llama.cpp q8_0")
            for engine, size, pre, dec in rows:
                print(f"{label:<10}{engine:<22}{size:>9.1f}{pre:>14.1f}{dec:>14.1f}{dec / q8:>8.2f}x")


def speculative_table(args: argparse.Namespace) -> None:
    """Batch-1 greedy decode speed of plain, prompt-lookup and draft-model speculative decoding, same target."""
    from tinychat.infer.speculative import Speculative, speculative_generate_ids

    if args.model:
        from tinychat.tokenizer import Tokenizer

        target = Model.from_pretrained(args.model, dtype=torch.float32).eval()
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        drafts = [
            (f"{Path(d).name} {dt}", Model.from_pretrained(d, dtype=dtypes[dt]).eval())
            for d in filter(None, args.draft.split(","))
            for dt in args.draft_dtype.split(",")
        ]
        tok = Tokenizer.from_pretrained(args.model)
        lines = Path(args.prompt_file).read_text().splitlines() if args.prompt_file else ["Tell me about Paris."]
        prompts = [tok.render_chat([{"role": "user", "content": t}], add_generation_prompt=True).ids for t in lines]
    else:
        torch.manual_seed(0)
        target = Model(preset("small", vocab_size=8192)).eval()
        drafts = [("random tiny fp32", Model(preset("tiny", vocab_size=8192)).eval())]
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 8192, (args.prompt_len,), generator=g).tolist() for _ in range(2)]
    pack_linears(target.fuse_projections())
    for _, draft in drafts:
        pack_linears(draft.fuse_projections())
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, stop_on_eos=False)
    modes = [("plain", None), ("prompt lookup", Speculative(k=args.k))]
    for label, draft in drafts:  # a draft's dtype or quantization never changes the target's greedy tokens
        for k in [int(k) for k in args.draft_k.split(",")] if args.draft_k else [args.k]:
            modes.append((f"{label} ({draft.num_params() / 1e6:.1f}M), k={k}", Speculative(draft=draft, k=k)))
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, greedy, batch 1, target "
        f"{target.num_params() / 1e6:.1f}M, {len(prompts)} prompts, {args.new_tokens} new tokens, k={args.k}"
    )
    print(f"{'mode':<44}{'tok/s':>9}{'speed-up':>10}{'accepted':>10}")

    def run(spec: Speculative | None) -> int:
        n = 0
        for p in prompts:
            if spec is None:
                n += len(generate_ids(target, [p], params)[0][0])
            else:
                n += len(speculative_generate_ids(target, p, params, spec)[0])
        return n

    tokens = {name: run(spec) for name, spec in modes}  # warm-up; the same tokens every round (greedy)
    for _, spec in modes:
        if spec is not None:
            spec.stats.update(proposed=0, accepted=0, rounds=0)
    best = dict.fromkeys(tokens, float("inf"))
    for _ in range(args.repeats):  # interleaved rounds: a neighbour's load touches every mode alike
        for name, spec in modes:
            best[name] = min(best[name], best_of(lambda spec=spec: run(spec), 1))
    base = tokens["plain"] / best["plain"]
    for name, spec in modes:
        rate = tokens[name] / best[name]
        acc = f"{spec.acceptance:.0%}" if spec is not None else "-"
        print(f"{name:<44}{rate:>9.1f}{rate / base:>9.2f}x{acc:>10}")


if __name__ == "__main__":
    main()
