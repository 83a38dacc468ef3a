"""Weight-only quantization: kernels and batch-1 decode, fp32 / bf16 / int8 / int4 side by side in one run.

    .venv/bin/python bench/quantize.py [--presets tiny,small] [--new-tokens 128] [--kernels-only]
    .venv/bin/python bench/quantize.py --model runs/s4/checkpoints/grpo     # a trained directory instead
    .venv/bin/python bench/quantize.py --dirs base,pruned,factorized        # any directories, first = base

Part 1 (kernels): one Linear at several shapes, batch 1 and 8: fp32 F.linear, bf16 F.linear, aten's int8
kernel fed fp32 and bf16 activations, eager dynamic qint8 (torch.ao), torch._int_mm with per-token int8
activations (W8A8) and the int4 kernel with bf16 activations: microseconds per call, best of many.

Part 2 (decode): for each preset a random model is saved, quantized with `tinychat quantize` (int8; int4
group 64) and each variant is loaded in a fresh process that reports the bytes of its tensors and its resident
set, then generates greedily at batch 1 (prompt 32 tokens, best of --repeats). Prints tokens/s,
the ratio to fp32, the safetensors size, tensor bytes and RSS. Part 3 times one decode step of every variant
in one process, interleaved. Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tinychat.model import Model, preset
from tinychat.model.compress.quant import quantize_int4, quantize_int8, quantize_model


def best_us(fns: dict[str, Callable[[], object]], trials: int = 20, n: int = 20) -> dict[str, float]:
    """Interleaved trials, min per function: robust to a machine that is busy some of the time."""
    best = dict.fromkeys(fns, float("inf"))
    for f in fns.values():
        f()
    for _ in range(trials):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / n * 1e6)
    return best


def kernels(shapes: list[tuple[int, int]]) -> None:
    torch.manual_seed(0)
    names = ["fp32", "bf16", "i8 fp32-x", "i8 bf16-x", "dyn qint8", "_int_mm W8A8", "i4 bf16-x"]
    print(f"{'N x K':<12}{'M':>3}" + "".join(f"{n:>14}" for n in names) + "   (µs per call)")
    for N, K in shapes:
        w = torch.randn(N, K) * 0.02
        q, s = quantize_int8(w)
        s1, sb = s.reshape(N), s.reshape(N).bfloat16()
        q4, s4 = quantize_int4(w, 64)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q4.to(torch.int32) + 8).contiguous(), 1)
        sz = torch.stack([s4.t(), torch.zeros_like(s4.t())], -1).bfloat16().contiguous()
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        warnings.filterwarnings("ignore", message=".*(deprecated|quantize_per).*")  # torch.ao's notices
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        wb, qT = w.bfloat16(), q.t()
        for M in (1, 8):
            x = torch.randn(M, K)

            def w8a8(x: torch.Tensor = x) -> torch.Tensor:
                xs = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
                return torch._int_mm(torch.round(x / xs).to(torch.int8), qT).float() * xs * s1

            fns = {
                "fp32": lambda x=x: F.linear(x, w),
                "bf16": lambda x=x: F.linear(x.bfloat16(), wb).float(),
                "i8 fp32-x": lambda x=x: torch.ops.aten._weight_int8pack_mm(x, q, s1),
                "i8 bf16-x": lambda x=x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, sb).float(),
                "dyn qint8": lambda x=x: dyn(x),
                "_int_mm W8A8": w8a8,
                "i4 bf16-x": lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.bfloat16(), packed, 64, sz
                ).float(),
            }
            r = best_us(fns, trials=10 if N * K > 2**22 else 20)
            print(f"{f'{N}x{K}':<12}{M:>3}" + "".join(f"{r[n]:>14.1f}" for n in names), flush=True)


def rss_kb() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * (4096 // 1024)


def child(directory: str, dtype: str, new_tokens: int, prompt_len: int, repeats: int) -> None:
    """Load one variant in this fresh process, decode at batch 1, print one JSON line.

    Memory is reported twice: the bytes of the model's tensors (exact: what the weights occupy) and the
    process's resident set after loading and decoding (what `top` shows: weights, libraries, allocator)."""
    from tinychat.infer import SamplingParams, generate_ids
    from tinychat.model.compress.quant import weight_bytes

    model = Model.from_pretrained(directory, dtype=getattr(torch, dtype))
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, stop_on_eos=False)
    generate_ids(model, prompt.tolist(), params)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_ids(model, prompt.tolist(), params)
        best = min(best, time.perf_counter() - t0)
    tensors = weight_bytes(model) / 2**20
    print(json.dumps({"tok_s": new_tokens / best, "rss_mib": rss_kb() / 1024, "tensor_mib": tensors}))


def decode(dirs: list[tuple[str, str, str]], args: argparse.Namespace, label: str) -> None:
    """dirs: (name, directory, dtype); each measured in its own process."""
    rows = []
    for name, d, dtype in dirs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            d,
            dtype,
            str(args.new_tokens),
            str(args.prompt_len),
            str(args.repeats),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 2**20
        rows.append((name, json.loads(out), size))
    base = rows[0][1]["tok_s"]
    for name, r, size in rows:
        print(
            f"{label:<10}{name:<16}{r['tok_s']:>10.1f}{r['tok_s'] / base:>8.2f}x{size:>12.1f}"
            f"{r['tensor_mib']:>14.1f}{r['rss_mib']:>12.1f}",
            flush=True,
        )


@torch.no_grad()
def decode_steps(models: dict[str, Model], label: str, steps: int = 60) -> None:
    """One KV-cache decode step (batch 1, 32 cached tokens) per variant, interleaved, best of `steps`:
    the model's own speed without the sampler, and robust on a machine that is busy part of the time."""
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    caches = {k: m.new_cache(1, 64) for k, m in models.items()}
    for k, m in models.items():
        m(ids, cache=caches[k])
    best = dict.fromkeys(models, float("inf"))
    tok = torch.tensor([[5]])
    for _ in range(steps):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(tok, cache=caches[k])
            best[k] = min(best[k], time.perf_counter() - t0)
            caches[k].lengths -= 1  # step again at the same position
    base = best["fp32"]
    print(f"{label:<10}" + "".join(f"{k}: {1 / v:.0f} tok/s ({base / v:.2f}x)   " for k, v in best.items()), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        d, dtype, n, p, r = sys.argv[2:7]
        child(d, dtype, int(n), int(p), int(r))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--model", default="", help="a trained model directory instead of random presets")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument(
        "--dirs", default="", help="comma-separated model directories to decode side by side (first = base)"
    )
    ap.add_argument("--shapes", default="1024x1024,512x1536,1536x512,8192x512", help="N x K of the kernel bench")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    if not args.dirs:
        kernels([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")])
    if args.kernels_only:
        return
    print(f"\nbatch-1 greedy decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'model':<10}{'variant':<16}{'tok/s':>10}{'vs fp32':>9}{'file MiB':>12}{'tensors MiB':>14}{'RSS MiB':>12}")
    if args.dirs:  # e.g. pruned and factorised versions of one model: the first directory is the baseline
        decode([(Path(d).name, d, "float32") for d in args.dirs.split(",")], args, "dirs")
        return
    steps: dict[str, dict[str, Model]] = {}
    sources = [("dir", args.model)] if args.model else [(p, "") for p in args.presets.split(",")]
    for label, src in sources:
        with tempfile.TemporaryDirectory() as tmp:
            fp = src or f"{tmp}/fp32"
            if not src:
                torch.manual_seed(0)
                Model(preset(label, vocab_size=8192)).save_pretrained(fp)
            for bits in (8, 4):
                q = quantize_model(Model.from_pretrained(fp, dtype=torch.float32), bits, 64)
                q.save_pretrained(f"{tmp}/int{bits}")
            variants = [("fp32", fp, "float32"), ("bf16", fp, "bfloat16")]
            variants += [(f"int{b}", f"{tmp}/int{b}", "float32") for b in (8, 4)]
            variants += [(f"int{b} bf16-act", f"{tmp}/int{b}", "bfloat16") for b in (8, 4)]
            decode(variants, args, label)
            steps[label] = {name: Model.from_pretrained(d, dtype=getattr(torch, dt)) for name, d, dt in variants}
    print("\none decode step (model forward only), variants interleaved, best of 60")
    for label, models in steps.items():
        decode_steps(models, label)


if __name__ == "__main__":
    main()
