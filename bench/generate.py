"""Decode throughput of tinychat's KV-cache generation vs transformers' generate, same weights, one run.

    .venv/bin/python bench/generate.py [--presets tiny,small] [--new-tokens 128] [--prompt-len 32]

For each preset a random model is saved once; tinychat and transformers (AutoModelForCausalLM on the
very same directory) then generate the same number of new tokens greedily for batch 1 and batch 8.
Prints new tokens per second and the ratio tinychat / transformers. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tinychat.infer import SamplingParams, generate_ids
from tinychat.model import Model, preset


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32, greedy, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per sequence"
    )
    print(f"{'preset':<8}{'params':>8}{'batch':>7}{'tinychat tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = Model(preset(name, vocab_size=8192)).eval()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for B in [int(b) for b in args.batches.split(",")]:
            prompts = torch.randint(0, 8192, (B, args.prompt_len))
            params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, stop_on_eos=False)
            ours = lambda: generate_ids(model, prompts.tolist(), params)  # noqa: E731

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
            theirs()  # warm-up
            t_ours, t_hf = best_of(ours, args.repeats), best_of(theirs, args.repeats)
            n = B * args.new_tokens
            print(
                f"{name:<8}{model.num_params() / 1e6:>7.1f}M{B:>7}{n / t_ours:>16.1f}{n / t_hf:>20.1f}"
                f"{t_hf / t_ours:>7.2f}x"
            )


if __name__ == "__main__":
    main()
