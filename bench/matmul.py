"""A decode step's matmuls through F.linear (MKL) and through the packed kernel (model/packed.py), side by side.

    .venv/bin/python bench/matmul.py [--preset tiny] [--rows 1,2,4,8,16,32,64] [--threads 1] [--evict-mb 16]

For each row count, one "step" applies every projection of a `--preset` model (q/k/v and gate/up fused as the
engine runs them, o, down, the head) to that many rows of random activations, one after another as a decode
step reads them. Between steps `--evict-mb` of other memory is written, as the KV cache and activations
would, so the weights come from where a real step finds them rather than from a warm L1/L2. Prints the median
step time of each path (the best of two interleaved passes), its GFLOP/s and the ratio. Where the CPU has
AVX-512 the kernel is timed twice, with its AVX-512 tiles off ("packed") and on ("avx512"; both give the same
bits). Timings live here, never in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tinychat.model import Model, native, preset


def shapes(preset_name: str) -> list[tuple[int, int]]:
    """(N, K) of every matmul a decode step runs, in order."""
    m = Model(preset(preset_name)).fuse_projections()
    out = []
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        out += [tuple(a.qkv_weight.shape), tuple(a.o_proj.weight.shape)]
        out += [tuple(mlp.gate_up_weight.shape), tuple(mlp.down_proj.weight.shape)]
    return out + [tuple(m.lm_head.weight.shape)]


def interleaved_medians(
    paths: list[tuple[str, Callable[[], None]]], steps: int, junk: torch.Tensor
) -> dict[str, float]:
    """Each path's median step time, the best of two interleaved passes; `junk` is written before every step so
    what a step reads comes from where a real step finds it, not from a warm cache."""
    best: dict[str, float] = {}
    for name, step in paths * 2:
        times = []
        for _ in range(steps):
            junk.add_(1.0)
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        best[name] = min(best.get(name, float("inf")), statistics.median(times))
    return best


def step_parser(doc: str, what: str, rows: str, evict_mb: int) -> argparse.ArgumentParser:
    """The options of a bench that times one decode step's `what` per row count (this one and attention.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help=f"the model shape whose {what} a step runs")
    ap.add_argument("--rows", default=rows, help="rows per step (running sequences)")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads (the server's default is 1 on 2 cores)")
    ap.add_argument("--evict-mb", type=int, default=evict_mb, help="other memory written between steps")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per pass (medians)")
    return ap


def main() -> None:
    args = step_parser(__doc__, "matmuls", "1,2,4,8,16,32,64", 16).parse_args()
    torch.set_num_threads(args.threads)
    op = native.packed_linear()
    if op is None:
        raise SystemExit("the packed kernel cannot run on this machine (no AVX2/FMA or g++, or TINYCHAT_NATIVE=0)")
    torch.manual_seed(0)
    dims = shapes(args.preset)
    ws = [torch.randn(n, k) / k**0.5 for n, k in dims]
    packed = [torch.ops.tinychat.pack_linear_weight(w) for w in ws]
    junk = torch.empty(args.evict_mb * 2**18)
    print(f"{args.preset}: {len(ws)} matmuls, {sum(w.numel() for w in ws) * 4 / 2**20:.1f} MiB of fp32 weights")
    avx512 = torch.ops.tinychat.packed_linear_avx512(True)
    head = f"{'rows':>5} {'F.linear ms':>12} {'GFLOP/s':>8} {'packed ms':>10} {'GFLOP/s':>8} {'x':>6}"
    print(head + (f" {'avx512 ms':>10} {'GFLOP/s':>8} {'x packed':>9}" if avx512 else ""))
    with torch.no_grad():
        for M in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(M, k) for _, k in dims]
            for w, p, x in zip(ws, packed, xs):  # the same numbers, or the timing means nothing
                torch.testing.assert_close(op(x, p, None, w.shape[0]), F.linear(x, w), atol=1e-4, rtol=1e-4)

            def aten(xs: list[torch.Tensor] = xs) -> None:
                for w, x in zip(ws, xs):
                    F.linear(x, w)

            def kernel(xs: list[torch.Tensor] = xs, wide: bool = False) -> None:
                torch.ops.tinychat.packed_linear_avx512(wide)
                for w, p, x in zip(ws, packed, xs):
                    op(x, p, None, w.shape[0])

            paths = [("aten", aten), ("packed", kernel)] + ([("avx512", lambda: kernel(wide=True))] if avx512 else [])
            best = interleaved_medians(paths, args.steps, junk)
            flops = sum(2 * M * n * k for n, k in dims)
            a, k = best["aten"], best["packed"]
            gf_a, gf_k = flops / a / 1e9, flops / k / 1e9
            line = f"{M:>5} {a * 1e3:>12.2f} {gf_a:>8.1f} {k * 1e3:>10.2f} {gf_k:>8.1f} {a / k:>6.2f}"
            if avx512:
                z = best["avx512"]
                line += f" {z * 1e3:>10.2f} {flops / z / 1e9:>8.1f} {k / z:>9.2f}"
            print(line)


if __name__ == "__main__":
    main()
