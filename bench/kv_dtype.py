"""What `serve --kv_cache_dtype float16|bfloat16` and `--prefill_dtype bfloat16` cost in answers: the eval suites
through the serving engine.

    .venv/bin/python bench/kv_dtype.py --run runs/speedrun [--stage grpo] [--suites facts_heldout,instruction]
    .venv/bin/python bench/kv_dtype.py --run runs/speedrun --dtypes float32,prefill:bfloat16

Each suite's questions (the whole suite, chat-rendered as `tinychat eval` asks them, greedy, the same token
budget) go through an Engine once per setup: a KV dtype (float32, the default on a CPU, and the two 16-bit
caches), or `prefill:DTYPE`, prompts on a copy of the weights in that dtype with the float32 cache. Printed per
suite: accuracy with its 95% interval under each setup, and how many replies are identical to the first's (the
rounding of the cached keys/values, or of the prompt's whole forward, is the only difference between the runs).
Grading is eval's own (`check`). This measures answers, not speed: bench/attention.py and bench/serve.py time them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from tinychat.eval.report import wilson
from tinychat.eval.suites import SuiteOptions, run_suite
from tinychat.infer.complete import load
from tinychat.infer.engine import Engine, EngineConfig, GenerationRequest, collect
from tinychat.infer.sampling import SamplingParams


class EngineCompleter:
    """eval's Completer through the serving engine: every prompt submitted at once, greedy."""

    def __init__(self, engine: Engine, tokenizer: object, max_seq_len: int) -> None:
        self.engine, self.tokenizer, self.max_seq_len = engine, tokenizer, max_seq_len

    def complete(self, prompts: list[list[int]], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=[s for s in stop if s])
        handles = [self.engine.submit(GenerationRequest(list(p), params)) for p in prompts]
        return [collect(h, 1)[0][0]["text"] for h in handles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a speedrun directory (its world and checkpoints)")
    ap.add_argument("--stage", default="grpo", help="the checkpoint to serve")
    ap.add_argument("--suites", default="facts_trained,facts_heldout,refusal,instruction,multistep")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="KV dtypes, or prefill:DTYPE")
    ap.add_argument("--limit", type=int, default=0, help="questions per suite (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    world = run / "world"
    dtypes = args.dtypes.split(",")
    results: dict[str, dict[str, dict]] = {}
    for dt in dtypes:
        model, tok = load(run / "checkpoints" / args.stage)
        kv, prefill = ("auto", dt.removeprefix("prefill:")) if dt.startswith("prefill:") else (dt, "auto")
        cfg = EngineConfig(max_num_seqs=64, max_queue=10**6, kv_cache_dtype=kv, prefill_dtype=prefill)
        engine = Engine(model, tok, cfg).start()
        try:
            completer = EngineCompleter(engine, tok, int(model.cfg.max_seq_len))
            for name in args.suites.split(","):
                opts = SuiteOptions(limit=args.limit, samples=10**6)
                results.setdefault(name, {})[dt] = run_suite(completer, world, name, "chat", opts)
        finally:
            engine.stop()
    print(f"{run / 'checkpoints' / args.stage}: eval suites through the engine, greedy, per KV-cache or prefill dtype")
    head = f"{'suite':>14} {'n':>4}" + "".join(f" {dt + ' acc (95% CI)':>26}" for dt in dtypes)
    print(head + "".join(f" {'same as ' + dtypes[0] + ' (' + dt + ')':>24}" for dt in dtypes[1:]))
    for name, by in results.items():
        first = by[dtypes[0]]
        n = first["n"]
        line = f"{name:>14} {n:>4}"
        for dt in dtypes:
            acc = by[dt]["accuracy"]
            lo, hi = wilson(acc, n)
            line += f" {f'{100 * acc:.1f}% ({100 * lo:.1f}-{100 * hi:.1f})':>26}"
        for dt in dtypes[1:]:
            same = sum(a["reply"] == b["reply"] for a, b in zip(first["samples"], by[dt]["samples"]))
            total = len(first["samples"])
            line += f" {f'{same}/{total}':>24}"
        print(line)


if __name__ == "__main__":
    main()
