"""tinychat's one native kernel (int8_gemv.cpp), built on first use with the machine's C++ compiler.

Why a kernel of our own: a decode step at batch 1 reads every weight once, and aten's weight-only int8
matmul runs well below memory speed on AVX2 CPUs (it converts each weight to float first), which held int8
decoding at half of llama.cpp's q8_0 on the same weights (docs/compress.md). int8_gemv.cpp multiplies in
integers as q8_0 does.

Why built here rather than shipped: wheels of compiled code per platform are a packaging project of their
own, while every machine that runs `--compile` already has the compiler inductor needs. The library is
built once per source and torch version into ~/.cache/tinychat/kernels (TINYCHAT_CACHE moves it; ~20 s
on 2 cores) and loaded with `torch.ops.load_library`. Where it cannot be built or run (no AVX2/FMA, no
g++, a build error, or TINYCHAT_NATIVE=0), `int8_gemv()` answers None once and callers keep aten's path:
the kernel is a speed-up, never a requirement.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp

SOURCE = Path(__file__).with_name("int8_gemv.cpp")
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("TINYCHAT_CACHE") or Path.home() / ".cache" / "tinychat"
    return Path(root) / "kernels"


def _cpu_ok() -> bool:
    """AVX2 and FMA on this CPU (the kernel's instructions)."""
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def _build() -> Path:
    """The shared library for this source and torch, compiled unless the cache has it."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    lib = cache_dir() / f"tinychat_int8_gemv_{key}.so"
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
    cmd += [f"-I{p}" for p in cpp.include_paths()] + [str(SOURCE), "-o", str(tmp)]
    cmd += [f"-L{p}" for p in cpp.library_paths()] + ["-lc10", "-ltorch_cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed: {done.stderr.strip()[-500:]}")
    tmp.replace(lib)
    return lib


def int8_gemv() -> object | None:
    """torch.ops.tinychat.int8_gemv, built and loaded on first call; None where it cannot run here."""
    if "op" in _state:
        return _state["op"]
    op = None
    if os.environ.get("TINYCHAT_NATIVE", "1") != "0" and _cpu_ok():
        try:
            torch.ops.load_library(str(_build()))
            op = torch.ops.tinychat.int8_gemv

            @torch.library.register_fake("tinychat::int8_gemv")
            def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
                return x.new_empty(x.shape[0], w.shape[0])

        except (RuntimeError, OSError) as e:
            print(f"tinychat: the int8 kernel is not available ({e}); using aten's int8 matmul", file=sys.stderr)
            op = None
    _state["op"] = op
    return op
