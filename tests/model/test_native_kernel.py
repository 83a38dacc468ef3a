"""The native int8 and int4 kernels (model/compress/int8_gemv.cpp, int4_gemv.cpp via native.py): their arithmetic,
where QuantLinear uses them, and that every way a kernel can be unavailable falls back to aten's with one message.

The kernel is built with the machine's g++ on first use (~15 s, cached per source and torch version); the
tests that need it skip where it cannot run (no AVX2/FMA), and the fallback tests run everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinychat.model import native
from tinychat.model.compress.quant import NATIVE_ROWS, NATIVE_ROWS_INT4, QuantLinear, quantize_int4, quantize_int8

OP = native.int8_gemv()
OP4 = native.int4_gemv()
needs_kernel = pytest.mark.skipif(OP is None, reason="the native int8 kernel cannot run on this machine")
needs_int4 = pytest.mark.skipif(OP4 is None, reason="the native int4 kernel cannot run on this machine")


def q8_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's algorithm in float64: x rounded to int8 per block of 32 (scale max|x| / 127), exact integer
    dot products per block, the two scales applied per block and per row."""
    M, K = x.shape
    xb = x.double().reshape(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    qx = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)), 0)  # (M, K/32, 32)
    w = q.double().reshape(q.shape[0], K // 32, 32)  # (N, K/32, 32)
    per_block = torch.einsum("mbi,nbi->mnb", qx, w)  # exact: integers below 2^53
    return (per_block * d.squeeze(-1)[:, None, :]).sum(-1) * scale.double().reshape(1, -1)


@needs_kernel
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 16), (1, 512, 1536), (3, 96, 7), (64, 160, 130)])
def test_kernel_computes_the_q8_block_algorithm(m: int, k: int, n: int) -> None:
    """Against q8_reference to float rounding (1e-5 relative), for shapes with row tails (n % 4) and several
    threads' chunks (n > 64); and within 1% of the unquantized product (the activations' 8-bit rounding)."""
    torch.manual_seed(0)
    q, s = quantize_int8(torch.randn(n, k))
    x = torch.randn(m, k) * torch.linspace(0.1, 3, k)  # blocks of different magnitudes
    y = OP(x, q, s.reshape(-1).contiguous())
    ref = q8_reference(x, q, s)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    exact = x.double() @ (q.double() * s.double()).t()
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-2


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch_mates() -> None:
    """Every row is summed in the same order whatever M is, so a decode step's row gives the same bits alone and
    beside others (the engine's seeded outputs must not depend on who else is running)."""
    torch.manual_seed(2)
    q, s = quantize_int8(torch.randn(200, 416))  # 13 blocks: the four-block loop and its tail
    s = s.reshape(-1).contiguous()
    x = torch.randn(9, 416)
    batch = OP(x, q, s)
    for i in (0, 4, 8):
        assert torch.equal(OP(x[i : i + 1], q, s)[0], batch[i])
    assert torch.equal(OP(x[2:5], q, s), batch[2:5])


@needs_kernel
def test_quant_linear_uses_the_kernel_for_short_inputs_only() -> None:
    """Up to NATIVE_ROWS rows (decode steps, short prompts) QuantLinear computes the q8 algorithm, bias added;
    longer inputs take aten's kernel (bf16 activations), so they differ from the q8 reference."""
    torch.manual_seed(1)
    q, s = quantize_int8(torch.randn(48, 64))
    bias = torch.randn(48)
    lin = QuantLinear(q, s, 8, bias=bias)
    assert lin.native is OP
    for rows in (1, NATIVE_ROWS):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(lin(x).double(), q8_reference(x, q, s) + bias.double(), rtol=1e-5, atol=1e-5)
    x = torch.randn(NATIVE_ROWS + 1, 64)
    assert not torch.allclose(lin(x).double(), q8_reference(x, q, s) + bias.double(), rtol=1e-5, atol=1e-5)
    assert float((lin(x) - (x @ lin.dequantized().t() + bias)).norm() / lin(x).norm()) < 1e-2


def test_layers_the_kernel_cannot_take_keep_atens_path() -> None:
    """int8: K not a multiple of 32, or a weight of -128 (the kernel negates weights); int4: N not a multiple of
    32 (the panels of aten's layout), or a layer off aten's fast path: no kernel."""
    q, s = quantize_int8(torch.randn(32, 48))
    assert QuantLinear(q, s, 8).native is None  # K = 48
    q, s = quantize_int8(torch.randn(32, 64))
    q[0, 0] = -128
    assert QuantLinear(q, s, 8).native is None
    q, s = quantize_int4(torch.randn(48, 64), 32)
    assert QuantLinear(q, s, 4, 32).native is None  # N = 48: aten's kernel takes it, this one does not
    q, s = quantize_int4(torch.randn(40, 64), 32)
    assert QuantLinear(q, s, 4, 32).native is None and not QuantLinear(q, s, 4, 32).fast


@needs_int4
@pytest.mark.parametrize(
    ("m", "k", "n", "group"), [(1, 64, 32, 32), (1, 512, 1536, 64), (3, 256, 96, 128), (4, 512, 2048, 256)]
)
def test_int4_kernel_reads_atens_layout(m: int, k: int, n: int, group: int) -> None:
    """Over the very bytes aten's int4 kernel holds (panels of 32 columns, two per byte, bf16 scale pairs), the
    kernel computes x @ W^T of the dequantized weights with fp32 activations: to float rounding, for every group
    size aten accepts and several threads' panels (n > 32), bias added."""
    torch.manual_seed(3)
    q, s = quantize_int4(torch.randn(n, k), group)
    bias = torch.randn(n)
    lin = QuantLinear(q, s, 4, group, bias=bias)
    assert lin.native is OP4 and lin.fast
    x = torch.randn(m, k) * torch.linspace(0.1, 3, k)
    exact = x.double() @ lin.dequantized().double().t() + bias.double()
    y = lin(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-5


@needs_int4
def test_int4_kernel_serves_short_inputs_only_and_rows_do_not_depend_on_batch_mates() -> None:
    """Up to NATIVE_ROWS_INT4 rows the kernel (fp32 activations, ~1e-7 from the exact product); longer inputs take
    aten's kernel (bf16 activations, ~1e-3 from it). A row gives the same bits alone and in a batch."""
    torch.manual_seed(4)
    q, s = quantize_int4(torch.randn(64, 128), 64)
    lin = QuantLinear(q, s, 4, 64)
    w = lin.dequantized().double()

    def err(x: torch.Tensor) -> float:
        exact = x.double() @ w.t()
        return float((lin(x).double() - exact).norm() / exact.norm())

    assert err(torch.randn(NATIVE_ROWS_INT4, 128)) < 1e-6
    assert 1e-5 < err(torch.randn(NATIVE_ROWS_INT4 + 1, 128)) < 1e-2
    x = torch.randn(NATIVE_ROWS_INT4, 128)
    assert torch.equal(lin(x[1:2])[0], lin(x)[1])


@pytest.mark.parametrize("how", ["disabled", "no compiler", "build error"])
def test_an_unavailable_kernel_falls_back_with_one_message(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """TINYCHAT_NATIVE=0 turns it off silently; a missing or failing compiler says so once, on stderr, and
    leaves nothing half-written in the cache; either way int8_gemv() is None and QuantLinear runs aten."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("TINYCHAT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_cpu_ok", lambda: True)
    if how == "disabled":
        monkeypatch.setenv("TINYCHAT_NATIVE", "0")
    elif how == "no compiler":
        monkeypatch.setenv("CXX", "no-such-compiler")
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
    else:
        monkeypatch.setenv("CXX", "false")  # runs and fails, as a compiler with an error would
    assert native.int8_gemv() is None and native.int8_gemv() is None
    err = capsys.readouterr().err
    assert err.count("tinychat: the int8 kernel is not available") == (0 if how == "disabled" else 1)
    assert not any(tmp_path.rglob("*.so")) and not any(tmp_path.rglob("*.tmp"))
    q, s = quantize_int8(torch.randn(16, 64))
    lin = QuantLinear(q, s, 8)
    x = torch.randn(2, 64)
    assert lin.native is None and float((lin(x) - x @ lin.dequantized().t()).norm() / lin(x).norm()) < 1e-2


def test_int4_kernel_is_used_only_over_the_layout_it_reads() -> None:
    """aten packs int4 per build: 32-column panels on AVX2 (what int4_gemv.cpp reads), 64-column ones with other
    lane pairs on AVX-512, neighbouring columns without vector units. Forced to its scalar build
    (ATEN_CPU_CAPABILITY=default, a fresh process), aten packs otherwise: the probe says so, no kernel is used,
    and int4 layers still compute the dequantized product through aten."""
    code = (
        "import torch\n"
        "from tinychat.model import native\n"
        "from tinychat.model.compress.quant import QuantLinear, quantize_int4\n"
        "q, s = quantize_int4(torch.randn(64, 128), 64)\n"
        "lin = QuantLinear(q, s, 4, 64)\n"
        "x = torch.randn(1, 128)\n"
        "exact = x.double() @ lin.dequantized().double().t()\n"
        "err = float((lin(x).double() - exact).norm() / exact.norm())\n"
        "print(native._atens_int4_layout_is_avx2(), lin.native is None, lin.fast, err < 1e-2)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "True", "True"]
    if OP4 is not None:  # this machine's own build packs as the kernel reads
        assert native._atens_int4_layout_is_avx2()


def test_int4_kernel_waits_for_the_layout_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the probe finds another layout (an AVX-512 build of aten), int4_gemv() is None before anything is
    built, and int4 layers keep aten's kernel."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_atens_int4_layout_is_avx2", lambda: False)
    assert native.int4_gemv() is None
    q, s = quantize_int4(torch.randn(64, 128), 64)
    assert QuantLinear(q, s, 4, 64).native is None
