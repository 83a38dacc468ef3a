"""A decode step's attention over the paged KV pool: the native kernel against the gather + SDPA path it replaced.

    .venv/bin/python bench/attention.py [--preset tiny] [--rows 1,16,64] [--keys 64] [--threads 1]
    git show b9a05b1:tinychat/model/paged_attention.cpp > /tmp/old.cpp
    .venv/bin/python bench/attention.py --against /tmp/old.cpp     # another build of the kernel, same run
    .venv/bin/python bench/attention.py --kv-dtypes float16,bfloat16  # 16-bit pools (serve --kv_cache_dtype)

For each row count, one "step" runs every layer's attention of a `--preset` model over a pool laid out as the
engine lays it out (each row's keys in its own consecutive blocks of 16 positions, rows side by side, one pool
per layer), each row seeing `--keys` keys. Between steps `--evict-mb` of other memory is written, as the weights
and activations of a real step would, so the keys come from where a real step finds them. Prints the median step
time of each path (the best of two interleaved passes), the key/value bytes it read per second, and the ratios.
`--against` builds a second copy of the kernel from another source (its op renamed) and times it beside the
current one: how a change to paged_attention.cpp is measured. `--kv-dtypes` times the kernel over 16-bit pools
too, beside the float32 one. Timings live here, never in tests.
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from matmul import interleaved_medians, step_parser  # bench/matmul.py, beside this file

from tinychat.model import native, preset
from tinychat.model.kv_cache import visible_keys


def against_op(source: Path) -> object:
    """The kernel built from `source` under the op name paged_decode_attention_against."""
    text = re.sub(r"\bpaged_decode_attention\b", "paged_decode_attention_against", source.read_text())
    copy = Path(tempfile.mkdtemp()) / "paged_attention_against.cpp"
    copy.write_text(text)
    torch.ops.load_library(str(native._build(copy)))
    return torch.ops.tinychat.paged_decode_attention_against


def main() -> None:
    ap = step_parser(__doc__, "attention", "1,4,16,64", 32)
    ap.add_argument("--keys", type=int, default=64, help="keys each row sees (prompt + output so far)")
    ap.add_argument("--against", default="", help="another paged_attention.cpp to time beside the current one")
    ap.add_argument("--kv-dtypes", default="", help="e.g. float16,bfloat16: also the kernel over such pools")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    op = native.paged_decode_attention()
    if op is None:
        raise SystemExit("the attention kernel cannot run on this machine (no AVX2/FMA or g++, or TINYCHAT_NATIVE=0)")
    other = against_op(Path(args.against)) if args.against else None
    cfg = preset(args.preset)
    L, H, KV, hd, n, bs = cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, args.keys, 16
    per = -(-n // bs) * bs + bs  # positions each row's blocks hold (a block of room to grow)
    junk = torch.empty(args.evict_mb * 2**18)
    print(f"{args.preset}: {L} layers, {H} query / {KV} key-value heads of {hd}, {n} keys per row, fp32")
    head = f"{'rows':>5} {'gather+sdpa ms':>15} {'kernel ms':>10} {'GB/s':>6} {'x sdpa':>7}"
    narrow = [getattr(torch, d) for d in args.kv_dtypes.split(",") if d]
    head += f" {'against ms':>11} {'x against':>10}" if other else ""
    print(head + "".join(f" {str(d).removeprefix('torch.') + ' ms':>13} {'x fp32':>7}" for d in narrow))
    torch.manual_seed(0)
    with torch.no_grad():
        for B in (int(r) for r in args.rows.split(",")):
            P = bs + B * per
            pools = [(torch.randn(P, KV, hd), torch.randn(P, KV, hd)) for _ in range(L)]
            keys = torch.stack([bs + b * per + torch.arange(n) for b in range(B)])  # (B, n) pool positions
            positions = torch.full((B, 1), n - 1)
            qs = [torch.randn(B, 1, H, hd).transpose(1, 2) for _ in range(L)]  # (B, H, 1, hd), as the model passes it
            mask = visible_keys(positions, n)
            scale = 1.0 / math.sqrt(hd)

            def sdpa() -> None:
                for q, (pk, pv) in zip(qs, pools):
                    ks = pk[keys.reshape(-1)].view(B, n, KV, hd).transpose(1, 2)
                    vs = pv[keys.reshape(-1)].view(B, n, KV, hd).transpose(1, 2)
                    F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=True)

            def kernel(fn: object = op) -> None:
                for q, (pk, pv) in zip(qs, pools):
                    fn(q, pk, pv, keys, positions, scale)

            want = op(qs[0], *pools[0], keys, positions, scale)
            ks = pools[0][0][keys.reshape(-1)].view(B, n, KV, hd).transpose(1, 2)
            vs = pools[0][1][keys.reshape(-1)].view(B, n, KV, hd).transpose(1, 2)
            ref = F.scaled_dot_product_attention(qs[0], ks, vs, attn_mask=mask, enable_gqa=True)
            torch.testing.assert_close(want, ref, atol=2e-5, rtol=1e-4)  # the same numbers, or timing means nothing
            paths = [("sdpa", sdpa), ("kernel", kernel)] + ([("against", lambda: kernel(other))] if other else [])
            for d in narrow:
                small = [(pk.to(d), pv.to(d)) for pk, pv in pools]

                def kernel16(small: list = small) -> None:
                    for q, (pk, pv) in zip(qs, small):
                        op(q, pk, pv, keys, positions, scale)

                paths.append((str(d), kernel16))
            best = interleaved_medians(paths, args.steps, junk)
            read = 2 * L * B * n * KV * hd * 4  # key and value bytes a step reads
            s, k = best["sdpa"], best["kernel"]
            line = f"{B:>5} {s * 1e3:>15.3f} {k * 1e3:>10.3f} {read / k / 1e9:>6.1f} {s / k:>7.2f}"
            if other:
                line += f" {best['against'] * 1e3:>11.3f} {best['against'] / k:>10.2f}"
            for d in narrow:
                line += f" {best[str(d)] * 1e3:>13.3f} {k / best[str(d)]:>7.2f}"
            print(line)


if __name__ == "__main__":
    main()
