"""Model FLOPs utilisation against the peak this machine actually reaches, or one the user pins.

Why a probe and not a datasheet: a laptop CPU's "peak" depends on its vector units, thread count and
thermal state, and GPU datasheets quote sparse or boosted numbers. A short matmul loop measures what
this torch build can do here. One probe is at the mercy of whatever else loads the machine (the same
CPU read 429, 800 and 961 GFLOP/s in three runs), and a low peak inflates every MFU computed from it,
so a run takes the best of five short probes and of every earlier probe on this machine (cached per
device, dtype, threads and torch version), and records the probes' spread beside the MFU it reports.
`--train.peak_flops` (TFLOP/s per device) skips the probe: MFU then compares runs on a fixed yardstick.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinychat.errors import UserError

PROBES = 5  # short bursts per measurement; the best counts
PROBE_SECONDS = 0.4  # all bursts together (plus one matmul of warm-up and sizing)


@dataclass(frozen=True)
class Peak:
    """The FLOP/s per device that MFU divides by, and where it came from."""

    flops: float
    source: str  # "pinned" (--train.peak_flops) or "probe"
    probes: tuple[float, ...] = ()  # this run's bursts, FLOP/s
    cached: float = 0.0  # the best earlier probe on this machine, 0 if none

    def record(self) -> dict[str, Any]:
        """What metrics.jsonl keeps about the peak (kind "peak"), so a report can show how firm it is."""
        rec: dict[str, Any] = {"peak_flops": self.flops, "source": self.source}
        if self.probes:
            rec.update(
                probes=list(self.probes),
                probe_min=min(self.probes),
                probe_median=statistics.median(self.probes),
                probe_max=max(self.probes),
                cached_best=self.cached,
            )
        return rec

    def describe(self) -> str:
        if not self.probes:
            return f"MFU peak {self.flops / 1e12:.3g} TFLOP/s (pinned)"
        lo, mid, hi = (v / 1e12 for v in (min(self.probes), statistics.median(self.probes), max(self.probes)))
        return (
            f"MFU peak {self.flops / 1e12:.3g} TFLOP/s (probes min {lo:.3g} / median {mid:.3g} / max {hi:.3g}, "
            f"earlier best {self.cached / 1e12:.3g}; pin it with --train.peak_flops)"
        )


def peak_flops(device: torch.device, dtype: torch.dtype, pinned_tflops: float = 0.0) -> Peak:
    """The pinned peak, or the best of this run's probes and of the earlier ones cached on this machine."""
    if not (math.isfinite(pinned_tflops) and pinned_tflops >= 0):
        raise UserError(f"train.peak_flops must be a positive number of TFLOP/s (0 = measure), got {pinned_tflops}.")
    if pinned_tflops:
        return Peak(pinned_tflops * 1e12, "pinned")
    key = _key(device, dtype)
    cached = _read_cache().get(key, 0.0)
    probes = tuple(probe_flops(device, dtype))
    _remember(key, max(probes))
    return Peak(max(max(probes), cached), "probe", probes, cached)


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype, seconds: float = PROBE_SECONDS, use_cache: bool = True
) -> float:
    """FLOP/s of a square matmul: the cached best on this machine, else the best of a fresh set of probes."""
    key = _key(device, dtype)
    if use_cache and key in (cache := _read_cache()):
        return cache[key]
    best = max(probe_flops(device, dtype, seconds))
    _remember(key, best)
    return best


def probe_flops(device: torch.device, dtype: torch.dtype, seconds: float = PROBE_SECONDS) -> list[float]:
    """FLOP/s of PROBES bursts of a square matmul loop, `seconds` in all."""
    burst = seconds / PROBES
    n = _probe_size(device, dtype, burst)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _sync(device)
    a @ b  # warm-up
    _sync(device)
    return [_burst(a, b, burst) for _ in range(PROBES)]


def _probe_size(device: torch.device, dtype: torch.dtype, burst: float) -> int:
    """4096 on a GPU; on a CPU the largest of 256..1024 whose matmul takes at most a quarter of a burst
    (a CPU without native fp16/bf16 kernels emulates them, thousands of times slower)."""
    if device.type == "cuda":
        return 4096
    n = 256
    while n < 1024:
        a = torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ a
        if 8 * (time.perf_counter() - t0) > burst / 4:  # doubling n costs 8x
            break
        n *= 2
    return n


def _burst(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    n, device = a.shape[0], a.device
    iters, t0 = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cuda" and iters % 10:
            continue
        _sync(device)
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_file() -> Path:
    root = Path(os.environ.get("TINYCHAT_CACHE", Path.home() / ".cache" / "tinychat"))
    return root / "peak_flops.json"


def _key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    return f"{name}|{dtype}|threads{torch.get_num_threads()}|torch{torch.__version__}"


def _read_cache() -> dict[str, float]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}


def _remember(key: str, flops: float) -> None:
    """Keep the best probe per key: a peak is an upper bound, so a higher reading is the better estimate."""
    cached = _read_cache()
    if flops <= cached.get(key, 0.0):
        return
    cached[key] = flops
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time


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
