"""The native int8 kernel (model/compress/int8_gemv.cpp via native.py): its arithmetic, where QuantLinear uses it,
and that every way it can be unavailable falls back to aten's kernel with one message.

The kernel is built with the machine's g++ on first use (~15 s, cached per source and torch version); the
tests that need it skip where it cannot run (no AVX2/FMA), and the fallback tests run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinychat.model import native
from tinychat.model.compress.quant import NATIVE_ROWS, QuantLinear, quantize_int8

OP = native.int8_gemv()
needs_kernel = pytest.mark.skipif(OP is None, reason="the native int8 kernel cannot run on this machine")


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
    """K not a multiple of 32, or a weight of -128 (the kernel negates weights in int8), or int4: no kernel."""
    q, s = quantize_int8(torch.randn(32, 48))
    assert QuantLinear(q, s, 8).native is None  # K = 48
    q, s = quantize_int8(torch.randn(32, 64))
    q[0, 0] = -128
    assert QuantLinear(q, s, 8).native is None


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
