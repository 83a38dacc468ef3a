"""Model FLOPs utilisation against the peak this machine actually reaches.

Why a probe and not a datasheet: a laptop CPU's "peak" depends on its vector units, thread count and
thermal state, and GPU datasheets quote sparse or boosted numbers. A short matmul loop measures what
this torch build can do here; the result is cached per (device, dtype, threads, torch version).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def _cache_file() -> Path:
    root = Path(os.environ.get("TINYCHAT_CACHE", Path.home() / ".cache" / "tinychat"))
    return root / "peak_flops.json"


def _key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    return f"{name}|{dtype}|threads{torch.get_num_threads()}|torch{torch.__version__}"


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, use_cache: bool = True) -> float:
    """FLOP/s of a square matmul loop (best of three bursts), cached on disk after the first measurement.

    Best of three, because a probe that runs while something else loads the machine under-reports the
    peak and would inflate every MFU computed from it afterwards.
    """
    path, key = _cache_file(), _key(device, dtype)
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    if use_cache and key in cached:
        return float(cached[key])
    flops = max(_probe(device, dtype, seconds / 3) for _ in range(3))
    cached[key] = flops
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return flops


def _probe(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10:
            continue
        sync()
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting; `auto` picks bf16 only where it is measurably faster."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        fast = measure_peak_flops(device, torch.bfloat16) > 1.5 * measure_peak_flops(device, torch.float32)
        return torch.bfloat16 if fast else None
    return None
