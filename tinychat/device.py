"""Choosing a device and a precision without hard-coding CUDA.

`auto` picks CUDA, then Apple's MPS, then the CPU. bf16 is the fast path on CPUs with AVX-512/AMX and on
recent GPUs; fp16 is never chosen silently because it needs loss scaling in training.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from tinychat.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for but this torch build sees no CUDA GPU.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"device '{name}' was asked for but MPS is not available here.")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA GPUs that support it, else fp32 (weights for inference)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not known; use auto, float32, bfloat16 or float16.")
    return DTYPES[name]


def compiler_missing(device: torch.device) -> str:
    """Why torch.compile cannot build kernels for `device` here ("" when it can): inductor writes C++ for
    the CPU, which needs a C++ compiler on PATH (g++ by default) that can build its kernels (OpenMP headers
    included: Apple's clang lacks them), and Triton for GPUs. A laptop without working build tools then
    trains eagerly with a note, instead of failing at the first step. The CPU check compiles and runs one
    small kernel: ~3 s, ~12 s on a machine whose inductor cache is empty, mostly the imports and setup that
    compiling the model would pay anyway."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:  # noqa: BLE001 - inductor raises its own types (or RuntimeError) when none is found
            return "no C++ compiler (g++, or $CXX) was found on PATH for inductor's CPU kernels"
        try:
            probe = torch.compile(lambda x: (x * 2 + 1).sum(), dynamic=False)
            probe(torch.ones(8))
        except Exception as e:  # noqa: BLE001 - any failure to build or run a kernel means: train eagerly
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"inductor could not build a CPU kernel here ({type(e).__name__}: {first})"
        return ""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed for inductor's GPU kernels"
    return ""
