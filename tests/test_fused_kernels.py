"""The decoder layer's fused elementwise kernels (``trtlm.runtime.kernels.fused``) against their
torch references: on a CUDA device when there is one, and under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, in a subprocess; float32 and float16, as numpy has no bfloat16) when
Triton is installed.

Tolerance: the kernels round every intermediate where the references round it, so the remaining
differences are a float32 sum's order (RMSNorm's mean of squares) and ``exp``'s last bits (SiLU):
at most one unit in the last place of the output dtype.  Outputs are compared with
``atol = rtol = 1 ulp`` of that dtype at the output's magnitude (bf16: 2^-7 relative; float32:
2^-22 relative), and for bf16/fp16 at least 99% of the elements must match exactly.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from trtlm.runtime.kernels import fused

CHECK = textwrap.dedent("""
    import torch
    from trtlm.runtime.kernels import fused, fused_triton

    def close(got, want, dtype):
        rel = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -22}[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * float(want.abs().max()))
        if dtype != torch.float32:
            same = (got == want).float().mean().item()
            assert same >= 0.99, f"only {same:.4f} of the elements equal the reference"

    def run(device, dtypes):
        g = torch.Generator().manual_seed(0)
        for dtype in dtypes:
            for n, h in ((1, 64), (7, 96), (33, 128)):
                x = torch.randn(n, h, generator=g).to(dtype).to(device)
                d = torch.randn(n, h, generator=g).to(dtype).to(device)
                w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype).to(device)
                for delta in (None, d):
                    r_got, o_got = fused_triton.add_rms_norm(x, delta, w, 1e-5)
                    r_want, o_want = fused.add_rms_norm_ref(x, delta, w, 1e-5)
                    assert torch.equal(r_got, r_want)  # the residual add rounds exactly as torch's
                    close(o_got, o_want, dtype)
                # RoPE on a strided view (the engine passes q and k as a slice of the qkv output)
                heads, kv, dh = 4, 2, 32
                qkv = torch.randn(n, (heads + 2 * kv) * dh, generator=g).to(dtype).to(device)
                qk = qkv[:, :(heads + kv) * dh].view(n, heads + kv, dh)
                pos = torch.arange(n, device=device) * 3 + 5
                inv = 1.0 / (10000.0 ** (torch.arange(0, dh, 2, device=device).float() / dh))
                emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)
                cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
                got = fused_triton.rope(qk, cos, sin)
                assert got.is_contiguous()
                close(got, fused.rope_ref(qk, cos, sin), dtype)  # float32: the GPU may fuse a*b + c*d
                gu = torch.randn(n, 2 * h, generator=g).to(dtype).to(device)
                close(fused_triton.silu_mul(gu), fused.silu_mul_ref(gu), dtype)
        print("ok")
""")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not _triton_installed(), reason="Triton is not installed (the GPU path's optional kernels)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device runs the compiled kernels (test below)")
def test_fused_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    # bfloat16 only on the GPU: the interpreter (numpy) has no bfloat16 and truncates its casts
    code = CHECK + "\nrun('cpu', (torch.float32, torch.float16))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and _triton_installed()), reason="needs a CUDA device and Triton")
def test_fused_kernels_on_gpu():
    namespace: dict = {}
    exec(CHECK, namespace)
    namespace["run"]("cuda", (torch.float32, torch.bfloat16, torch.float16))


@pytest.mark.skipif(not _triton_installed(), reason="Triton is not installed (the GPU path's optional kernels)")
def test_programmatic_dependent_launch_only_where_asked_and_possible(monkeypatch):
    """The launch keywords of the step's kernels: PDL off for CPU tensors (the interpreter) and
    whenever TRTLM_PDL=0 -- decided before the device is queried, so no GPU is needed to check it.
    (That PDL changes no output on the GPU: tests/test_gpu.py.)"""
    from trtlm.runtime.kernels.pdl import pdl_available, pdl_options

    assert pdl_options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRTLM_PDL", "0")
    assert not pdl_available(torch.device("cuda", 0))
    assert pdl_options(torch.device("cuda", 0)) == {"PDL": False}


def test_dispatch_keeps_cpu_on_the_references():
    """CPU tensors take the references (what transformers computes), bit for bit."""
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    w = torch.randn(16, generator=g)
    res, out = fused.add_rms_norm(x, d, w, 1e-6)
    h = (x + d).float()
    assert torch.equal(res, x + d)
    assert torch.equal(out, w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)))
    gu = torch.randn(5, 32, generator=g)
    assert torch.equal(fused.silu_mul(gu), torch.nn.functional.silu(gu[:, :16]) * gu[:, 16:])


def test_fp8_references_quantize_what_the_unfused_ops_output():
    """The FP8 variants' references (what the CPU would run, and the GPU kernels' oracle) are the
    unfused ops followed by static FP8 quantization, exactly."""
    from trtlm.quant.kernels import quantize_activation

    g = torch.Generator().manual_seed(2)
    x, d = torch.randn(6, 32, generator=g).bfloat16(), torch.randn(6, 32, generator=g).bfloat16()
    w, scale = (1 + 0.1 * torch.randn(32, generator=g)).bfloat16(), torch.tensor([0.02])
    res, q = fused.add_rms_norm_fp8(x, d, w, 1e-5, scale)
    want_res, h = fused.add_rms_norm_ref(x, d, w, 1e-5)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(res, want_res)
    assert torch.equal(q.view(torch.uint8), quantize_activation(h, scale, "fp8").view(torch.uint8))
    y, cols = torch.randn(6, 64, generator=g) * 30, torch.rand(64, generator=g) + 0.5
    q = fused.silu_mul_fp8(y, cols, torch.bfloat16, scale)
    h = fused.silu_mul_ref(torch.cat([(y[:, :32] * cols[:32]).bfloat16(), (y[:, 32:] * cols[32:]).bfloat16()], 1))
    assert torch.equal(q.view(torch.uint8), quantize_activation(h, scale, "fp8").view(torch.uint8))


@pytest.mark.skipif(not (torch.cuda.is_available() and _triton_installed()), reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_fused_kernels_on_gpu(dtype):
    """The FP8 activation quantization fused into RMSNorm and SwiGLU (issue 15) against quantizing the
    references' outputs.  RMSNorm: the same kernel computes the norm and the quantization is
    elementwise (IEEE division, clamp, round to nearest even) in both, so the FP8 codes are equal
    wherever the unfused kernel's output equals the reference (>= 99%, see the module docstring),
    and within one FP8 step elsewhere; SwiGLU likewise (SiLU's ``exp`` may move the last bit)."""
    from trtlm.runtime.kernels import fused_triton

    def fp8_close(got, want):
        assert got.dtype == want.dtype == torch.float8_e4m3fn
        same = (got.view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
        assert same >= 0.99, f"only {same:.4f} of the codes equal the reference"
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -3, atol=2 ** -9)  # one e4m3 step

    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.05], device="cuda")
    for n, h in ((1, 4096), (5, 96), (64, 4096)):
        x = torch.randn(n, h, generator=g).to(dtype).cuda()
        d = torch.randn(n, h, generator=g).to(dtype).cuda()
        w = (1 + 0.1 * torch.randn(h, generator=g)).to(dtype).cuda()
        for delta in (None, d):
            res, q = fused_triton.add_rms_norm(x, delta, w, 1e-5, scale)
            plain_res, plain = fused_triton.add_rms_norm(x, delta, w, 1e-5)
            assert torch.equal(res, plain_res)
            assert torch.equal(q.view(torch.uint8), fused.quantize_fp8_ref(plain, scale).view(torch.uint8))
            fp8_close(q, fused.add_rms_norm_fp8_ref(x, delta, w, 1e-5, scale)[1])
        y = (torch.randn(n, 2 * h, generator=g) * 20).cuda()
        cols = (torch.rand(2 * h, generator=g) + 0.5).cuda()
        fp8_close(fused_triton.silu_mul_fp8(y, cols, dtype, scale), fused.silu_mul_fp8_ref(y, cols, dtype, scale))
