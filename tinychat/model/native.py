"""tinychat's native kernels, built on first use with the machine's C++ compiler.

Four kernels, each a speed-up that tinychat runs without:
  * `int8_gemv` (compress/int8_gemv.cpp): a decode step at batch 1 reads every weight once, and aten's
    weight-only int8 matmul runs well below memory speed on AVX2 CPUs (it converts each weight to float
    first), which held int8 decoding at half of llama.cpp's q8_0 on the same weights (docs/compress.md).
    The kernel multiplies in integers as q8_0 does. `int4_gemv` (compress/int4_gemv.cpp) does the same
    job for group-wise int4 over the layout aten's int4 kernel already keeps, with fp32 activations.
  * `paged_decode_attention` (paged_attention.cpp): the serving engine's decode step attends over each
    row's keys where they lie in the paged pool, instead of gathering them into a copy and masking it for
    SDPA (docs/engine.md).
  * `packed_linear` (packed_linear.cpp): fp32 matmuls of a decode step's few rows over weights packed once
    into 16-column panels, where MKL's sgemm runs far below the core's speed (model/packed.py).

Why built here rather than shipped: wheels of compiled code per platform are a packaging project of their
own, while every machine that runs `--compile` already has the compiler inductor needs. Each library is
built once per source and torch version into ~/.cache/tinychat/kernels (TINYCHAT_CACHE moves it; ~20 s
on 2 cores) and loaded with `torch.ops.load_library`. Where one cannot be built or run (no AVX2/FMA, no
g++, a build error, or TINYCHAT_NATIVE=0), its function answers None once and callers keep aten's path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp

HERE = Path(__file__).parent
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("TINYCHAT_CACHE") or Path.home() / ".cache" / "tinychat"
    return Path(root) / "kernels"


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere, or when /proc/cpuinfo cannot be read)."""
    if "flags" not in _state:
        try:
            _state["flags"] = set(Path("/proc/cpuinfo").read_text().split()) if sys.platform == "linux" else set()
        except OSError:
            _state["flags"] = set()
    return _state["flags"]  # type: ignore[return-value]


def _cpu_ok() -> bool:
    """AVX2 and FMA on this CPU (the kernel's instructions)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    return {"avx2", "fma"} <= cpu_flags()


def _build(source: Path) -> Path:
    """The shared library for this source and torch, compiled unless the cache has it."""
    key = hashlib.sha256(source.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    lib = cache_dir() / f"tinychat_{source.stem}_{key}.so"
    if lib.is_file():
        return lib
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")  # another process may build the same library meanwhile
    abi = int(torch.compiled_with_cxx11_abi())
    cmd = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in cpp.include_paths()] + [str(source), "-o", str(tmp)]
    cmd += [f"-L{p}" for p in cpp.library_paths()] + ["-lc10", "-ltorch_cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {source.name} failed: {done.stderr.strip()[-500:]}")
    tmp.replace(lib)
    return lib


def _load(name: str, source: Path, what: str, fake: Callable[..., torch.Tensor]) -> object | None:
    """torch.ops.tinychat.<name>, built and loaded on first call (`fake` gives torch.compile its output's shape);
    None where it cannot run here, told once on stderr when a build was tried and failed."""
    if name in _state:
        return _state[name]
    op = None
    if os.environ.get("TINYCHAT_NATIVE", "1") != "0" and _cpu_ok():
        try:
            torch.ops.load_library(str(_build(source)))
            op = getattr(torch.ops.tinychat, name)
            torch.library.register_fake(f"tinychat::{name}")(fake)
        except (RuntimeError, OSError) as e:
            print(f"tinychat: the {what} is not available ({e}); using aten's", file=sys.stderr)
            op = None
    _state[name] = op
    return op


def _int8_gemv_fake(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def int8_gemv() -> object | None:
    """torch.ops.tinychat.int8_gemv(x (M, K) fp32, w (N, K) int8, scale (N,)) -> (M, N); None where it cannot run."""
    return _load("int8_gemv", HERE / "compress" / "int8_gemv.cpp", "int8 kernel", _int8_gemv_fake)


def _int4_gemv_fake(x: torch.Tensor, w: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def int4_gemv() -> object | None:
    """torch.ops.tinychat.int4_gemv(x (M, K) fp32, w (N, K/2) uint8 in aten's CPU int4 layout, sz (K/group, N, 2)
    bf16, group) -> (M, N); None where it cannot run, or where aten packs int4 otherwise than the kernel reads."""
    if "int4_layout" not in _state:
        _state["int4_layout"] = _atens_int4_layout_is_avx2()
    if not _state["int4_layout"]:
        return None
    return _load("int4_gemv", HERE / "compress" / "int4_gemv.cpp", "int4 kernel", _int4_gemv_fake)


def _atens_int4_layout_is_avx2() -> bool:
    """Whether `_convert_weight_to_int4pack_for_cpu` packs as its AVX2 build does, the layout int4_gemv.cpp reads:
    panels of 32 output columns, each k's 16 bytes holding columns j (low nibble) and 16 + j (high nibble).
    aten's AVX-512 build packs 64-column panels with other lane pairs, and its scalar build neighbouring columns,
    so the layout is checked on a probe matrix rather than assumed."""
    n, k = 64, 8
    u = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    except RuntimeError:
        return False
    halves = u.reshape(n // 32, 2, 16, k).permute(0, 3, 1, 2)  # (panel, k, low/high, j)
    expect = (halves[:, :, 0] | (halves[:, :, 1] << 4)).to(torch.uint8)  # (panel, k, 16)
    return packed.shape == (n, k // 2) and torch.equal(packed.reshape(-1), expect.reshape(-1))


def _attention_fake(q: torch.Tensor, *_: object) -> torch.Tensor:
    return q.new_empty(q.shape)


def paged_decode_attention() -> object | None:
    """torch.ops.tinychat.paged_decode_attention(q (B, H, 1, hd) float32, k_pool, v_pool (P, n_kv, hd) float32,
    float16 or bfloat16, keys (B, S), positions (B, 1), scale) -> (B, H, 1, hd) float32; None where it cannot run
    here. A float16 pool needs F16C as well (`cpu_flags`)."""
    return _load("paged_decode_attention", HERE / "paged_attention.cpp", "paged attention kernel", _attention_fake)


def _packed_fake(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def packed_linear() -> object | None:
    """torch.ops.tinychat.packed_linear(x (M, K) fp32, packed (ceil(N/16), K, 16), bias (N,) or None, N) -> (M, N),
    over a weight from torch.ops.tinychat.pack_linear_weight(w (N, K)); None where it cannot run here. Its AVX-512
    tiles run where torch's own kernels do (ATEN_CPU_CAPABILITY=avx2 keeps both on AVX2; TINYCHAT_AVX512=0 only
    the kernel, for a side-by-side measurement)."""
    if "packed_linear" in _state:
        return _state["packed_linear"]
    op = _load("packed_linear", HERE / "packed_linear.cpp", "packed matmul kernel", _packed_fake)
    wide = torch.backends.cpu.get_cpu_capability() == "AVX512" and os.environ.get("TINYCHAT_AVX512", "1") != "0"
    if op is not None and not wide:
        torch.ops.tinychat.packed_linear_avx512(False)
    return op
