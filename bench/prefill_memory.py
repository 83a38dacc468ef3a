"""Peak memory of one long prefill on CPU: the tiny model reading an 8k-token prompt.

    .venv/bin/python bench/prefill_memory.py [--tokens 8192] [--model DIR] [--dtype fp32|bf16]

Each measurement runs in a fresh subprocess, so the peak resident set size (getrusage's ru_maxrss) is
that prefill's alone: the process loads the model, records its RSS, prefills the prompt through the KV
cache exactly as `generate` does (one forward of every prompt token, then the first token's logits),
and prints the peak RSS and the tracemalloc peak (Python-side allocations; torch's tensors live outside
it, so RSS is the number that counts). Without --model, a randomly initialised tiny preset with an
8k-token window and the speedrun's 8,192-token vocabulary is used (weights do not change memory).
This is a memory measurement, not a timing: the machine's load does not change it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tracemalloc


def measure(tokens: int, model_dir: str, dtype: str, last_only: bool) -> dict:
    import torch

    from tinychat.model import Model, preset

    torch.manual_seed(0)
    if model_dir:
        model = Model.from_pretrained(model_dir)
        model.cfg.max_seq_len = max(model.cfg.max_seq_len, tokens)
    else:
        model = Model(preset("tiny", vocab_size=8192, max_seq_len=tokens)).eval()
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x = torch.randint(1, model.cfg.vocab_size, (1, tokens))
    tracemalloc.start()
    with torch.no_grad():
        cache = model.new_cache(1, tokens + 1)
        if last_only:  # what a serving engine needs: hidden states of every token, logits of the last
            h = model.hidden_states(x, cache)
            logits = model.lm_head(h[:, -1:])
        else:
            logits = model(x, cache)  # generate's prefill: logits of every prompt position
    _, py_peak = tracemalloc.get_traced_memory()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens": tokens,
        "dtype": dtype,
        "all_logits": not last_only,
        "params": model.num_params(),
        "rss_after_load_mib": round(rss_loaded, 1),
        "rss_peak_mib": round(rss_peak, 1),
        "prefill_extra_mib": round(rss_peak - rss_loaded, 1),
        "tracemalloc_peak_mib": round(py_peak / 2**20, 2),
        "next_token": int(logits[0, -1].argmax()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--model", default="")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--last-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.tokens, args.model, args.dtype, args.last_only)))
        return 0
    rows = []
    for last_only in (False, True):
        cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--dtype", args.dtype]
        cmd += ["--model", args.model] + (["--last-only"] if last_only else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'prefill':<28} {'tokens':>7} {'dtype':>5} {'after load':>11} {'peak RSS':>10} {'prefill +':>10}")
    for r in rows:
        what = "all logits (generate)" if r["all_logits"] else "last logits (engine)"
        print(
            f"{what:<28} {r['tokens']:>7} {r['dtype']:>5} {r['rss_after_load_mib']:>8.0f} MiB "
            f"{r['rss_peak_mib']:>6.0f} MiB {r['prefill_extra_mib']:>6.0f} MiB"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
