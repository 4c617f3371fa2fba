"""Executing quantized TensorRT-LLM checkpoints in trtlm's torch runtime.

Each module's buffer names are the checkpoint's per-rank tensor names under the linear
(``weight``, ``weights_scaling_factor``, ``activation_scaling_factor``,
``prequant_scaling_factor``), derived from the format's declaration
(:meth:`trtlm.quant.schemes.QuantFormat.tensors`), so ``trtlm build``'s name/shape/dtype check
and ``load_state_dict`` work unchanged.

Two ways to compute, chosen per module in :meth:`QuantLinear.prepare` (call it once after
``load_state_dict``; :func:`prepare_model` does the whole model) and exposed as ``kernel_path``:

* the fast kernels of :mod:`trtlm.quant.kernels` on CUDA (FP8 ``torch._scaled_mm``, a Triton
  dequant-matmul for int8/int4 weight-only, ``torch._int_mm`` for SmoothQuant);
* the *emulation* everywhere else, honest about what each format loses: weights are dequantized
  (float32 math, as :mod:`trtlm.quant.formats`), and where the format quantizes activations too
  they are quantized and dequantized with the checkpoint's static scale before the product (FP8:
  cast through float8_e4m3fn; SmoothQuant: int8 rounding after the pre-quant multiply).

Both compute the same function up to accumulation order.  The weight-only formats fold
``prequant_scaling_factor`` into the dense weight in the emulation (mathematically
``(x * p) @ W^T``), which also makes a tp>1 checkpoint merged by :func:`dequantize_tensors`
compute exactly what the tp=1 quantized model computes.

MoE experts (:class:`QuantExpertWeights`, :func:`quant_moe_forward`): at decode sizes only the
routed experts' weights are read (gathered codes, never a dequantized copy of every expert).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtlm.quant import formats as qf
from trtlm.quant import kernels as qk
from trtlm.quant import schemes
from trtlm.quant.gemv import gemv, gemv_applies
from trtlm.quant.w4_gemv import (W4_GEMM_MAX_ROWS, W4_GEMV_MAX_ROWS, W4Tiles, gemm_cols, prepare_w4_gemv,
                                 repack_w4_tiles, w4_gemm, w4_gemm_config, w4_gemv, w4_gemv_available,
                                 w4_gemv_supports)

#: quant_algo values the runtime executes (every registered format's).
SUPPORTED = schemes.runtime_algos()

_TORCH = {"float8_e4m3fn": torch.float8_e4m3fn, "int8": torch.int8, "float32": torch.float32}


def _qconf(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("quantization") or {}


def has_prequant(config: dict[str, Any]) -> bool:
    """Whether W4A16_AWQ linears carry ``prequant_scaling_factor`` (TensorRT-LLM's ``pre_quant_scale``)."""
    return bool(_qconf(config).get("pre_quant_scale", False))


def fake_quant_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantize-dequantize: ``clamp(round(x / s), -128, 127) * s`` (float32 math)."""
    s = scale.float().reshape(())
    return ((x.float() / s).round().clamp(-128, 127) * s).to(x.dtype)


def _format(quant_algo: str, config: dict[str, Any], what: str) -> schemes.QuantFormat:
    fmt = schemes.for_algo(quant_algo, config)
    if fmt is None:
        from trtlm.errors import UserError

        raise UserError(f"quantization.quant_algo {quant_algo!r} is not supported by trtlm's runtime for {what} "
                        f"(supported: {', '.join(SUPPORTED)})")
    return fmt


def _group_size(fmt: schemes.QuantFormat, config: dict[str, Any], in_features: int, check: bool) -> int:
    group = int(_qconf(config).get("group_size") or 128)
    if check and fmt.weight_scale == "group" and in_features % group:
        from trtlm.errors import UserError

        raise UserError(f"quantization.group_size {group} does not divide a linear's {in_features} "
                        f"input features on this rank")
    return group


def _register(module: nn.Module, stored: dict, dtype: torch.dtype, device) -> None:
    for suffix, (shape, dt) in stored.items():
        t_dtype = _TORCH[dt] if dt else dtype
        make = torch.empty if suffix == "weight" else torch.ones
        module.register_buffer(suffix, make(shape, dtype=t_dtype, device=device))


class QuantLinear(nn.Module):
    """One linear of a quantized checkpoint (``quant_algo`` in :data:`SUPPORTED`).

    ``kernel_path`` (:mod:`trtlm.quant.kernels` path names) and ``kernel_reason`` say how it
    runs; set by :meth:`prepare`.
    """

    def __init__(self, quant_algo: str, config: dict[str, Any], in_features: int, out_features: int,
                 bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.fmt = _format(quant_algo, config, "linears")
        self.algo = self.fmt.quant_algo
        self.dtype = dtype or torch.float32
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _group_size(self.fmt, config, in_features, check=True)
        _register(self, self.fmt.tensors(out_features, in_features, group_size=self.group_size,
                                         prequant=self.fmt.has_prequant(False, config)), self.dtype, device)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device), requires_grad=False)
                     if bias else None)
        self.kernel_path, self.kernel_reason = qk.EMULATION, "not prepared"
        self._prepared_on: torch.device | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mm: qk.MixedWeight | None = None  #: the codes repacked for mixed_mm (weight-only, many rows)
        self._gemv = False  #: one row takes :func:`trtlm.quant.gemv.gemv`
        self._w4: W4Tiles | None = None  #: the codes repacked for :func:`trtlm.quant.w4_gemv.w4_gemv` (int4, few rows)
        self._w4_gemm_rows = 0  #: rows up to which :func:`trtlm.quant.w4_gemv.w4_gemm` takes the product
        self._w4_swiglu = False  #: :meth:`swiglu_forward` applies the SwiGLU in the GEMV (:meth:`prepare_swiglu`)

    # -- load time ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self) -> str:
        """Pick the kernel for this device/dtype (and repack weights if it needs to), once after loading.

        Idempotent; called lazily by :meth:`forward` if the loader did not (do call it before
        capturing CUDA graphs: a repack allocates).  Returns ``kernel_path``.
        """
        dev = self.weight.device
        self.kernel_path, self.kernel_reason = qk.linear_plan(
            self.fmt.weight, self.fmt.activation, dev, self.dtype, self.in_features, self.out_features)
        if (self.kernel_path == qk.TRITON and self.fmt.weight == "int4" and qk.INT4_KERNEL == qk.INT4PACK
                and self.dtype == torch.bfloat16 and self.group_size in (32, 64, 128, 256)
                and self.in_features % 128 == 0 and self.out_features % 8 == 0):  # tinygemm's limits
            self.kernel_path, self.kernel_reason = qk.INT4PACK, (
                f"torch._weight_int4pack_mm up to {qk.INT4PACK_MAX_ROWS} rows (weights repacked at load), "
                f"tiled Triton GEMM beyond")
        many_rows = self.kernel_path in (qk.TRITON, qk.INT4PACK) and self.fmt.activation is None and \
            qk.mixed_mm_supports(self.fmt.weight, self.fmt.weight_scale, self.in_features, self.group_size)
        self._mm = (qk.repack_for_mm(self.weight, self.weights_scaling_factor, self.fmt.weight, self.group_size)
                    if many_rows else None)
        fmt = self.fmt
        self._prepare_int4(dev)
        if many_rows:  # (from the first row count the int4 kernels above leave)
            self.kernel_reason += f"; mixed-input Triton GEMM from {max(qk.MIXED_MM_MIN_ROWS, self._w4_rows + 1)} rows"
        self._gemv = self._w4 is None and self.kernel_path != qk.EMULATION and qk.triton_available() and gemv_applies(
            fmt.weight, fmt.activation, fmt.weight_scale, self.in_features, self.out_features, self.group_size)
        if self._gemv:
            self.kernel_reason = f"one-row Triton GEMV at 1 row; {self.kernel_reason}"
        self._prepared_on = dev
        return self.kernel_path

    def _prepare_int4(self, dev: torch.device) -> None:
        """int4 at decode sizes: the tensor-core kernels of :mod:`trtlm.quant.w4_gemv` where they
        compile (a repacked copy of the codes), tinygemm (another copy) only for the rows they leave."""
        self._w4, self._w4_gemm_rows, self._w4_swiglu = None, 0, False
        failed = ""
        if (self._mm is not None and qk.W4_GEMV and self.fmt.weight == "int4" and w4_gemv_available(dev)
                and w4_gemv_supports(self.group_size, self.out_features, self.in_features)):
            gemm_rows = min(qk.W4_GEMM_ROWS, W4_GEMM_MAX_ROWS)
            if gemm_rows > W4_GEMV_MAX_ROWS and w4_gemm_config(
                    self.out_features, self.in_features, gemm_cols(gemm_rows)) is None:
                gemm_rows = 0
            tiles = repack_w4_tiles(self.weight, self._mm.scales, self.group_size)
            try:  # (NVRTC compiles the kernels here, once per shape)
                prepare_w4_gemv(tiles, self.dtype, hasattr(self, "prequant_scaling_factor"),
                                gemm_rows=gemm_rows)
                self._w4, self._w4_gemm_rows = tiles, gemm_rows
            except RuntimeError as e:  # the other kernels still run; the report says why
                failed = f"; the CUDA C int4 kernels did not compile ({str(e).splitlines()[0][:120]})"
        tiny = self.kernel_path == qk.INT4PACK and self._w4_rows < qk.INT4PACK_MAX_ROWS
        self._packed = qk.repack_int4pack(self.weight, self.weights_scaling_factor) if tiny else None
        if self._w4 is not None:
            self.kernel_path = qk.W4
            self.kernel_reason = f"tensor-core int4 GEMV (CUDA C) up to {W4_GEMV_MAX_ROWS} rows" + (
                f", its GEMM up to {self._w4_rows}" if self._w4_rows > W4_GEMV_MAX_ROWS else "") + (
                f"; torch._weight_int4pack_mm up to {qk.INT4PACK_MAX_ROWS} rows" if tiny else "")
        self.kernel_reason += failed

    @property
    def _w4_rows(self) -> int:
        """Rows up to which the CUDA C int4 kernels take this linear's products (0: none)."""
        return max(W4_GEMV_MAX_ROWS, self._w4_gemm_rows) if self._w4 is not None else 0

    @classmethod
    def stacked(cls, parts: list["QuantLinear"]) -> "QuantLinear | None":
        """One linear whose output is the parts' outputs side by side, for parts that read the same
        input (the SwiGLU's ``fc`` and ``gate``): one kernel and one pass over the input instead of
        one per part.  The parts' codes and scales become views of the stacked module's, so their
        state_dict is unchanged and nothing is stored twice.  ``None`` where the parts cannot
        share one product: other formats, a bias, activation quantization (FP8 has its own fusion,
        ``GatedMLP._fuse_fp8``), different pre-quant scales, per-tensor scales that differ."""
        first = parts[0]
        fmt = first.fmt
        if (fmt.activation is not None or any(p.bias is not None or p.fmt != fmt or p.dtype != first.dtype
                                               or p.in_features != first.in_features
                                               or p.group_size != first.group_size for p in parts)):
            return None
        pre = [getattr(p, "prequant_scaling_factor", None) for p in parts]
        if pre[0] is not None and any(not torch.equal(pre[0], q) for q in pre[1:]):
            return None
        if fmt.weight_scale == "tensor" and any(not torch.equal(first.weights_scaling_factor,
                                                                p.weights_scaling_factor) for p in parts[1:]):
            return None
        stacked = cls.__new__(cls)
        nn.Module.__init__(stacked)
        stacked.fmt, stacked.algo, stacked.dtype = fmt, first.algo, first.dtype
        stacked.in_features, stacked.group_size = first.in_features, first.group_size
        stacked.out_features = sum(p.out_features for p in parts)
        stacked.bias = None
        stacked._prepared_on = None
        with torch.no_grad():
            shared = {"prequant_scaling_factor"}
            if fmt.weight_scale == "tensor":
                shared.add("weights_scaling_factor")
            for name, _ in first.named_buffers(recurse=False):
                if name in shared:  # one value for every part (checked equal above)
                    stacked.register_buffer(name, getattr(first, name))
                    continue
                whole = torch.cat([getattr(p, name) for p in parts])
                stacked.register_buffer(name, whole)
                start = 0
                for p in parts:  # the parts read their slice of the stacked tensor
                    n = getattr(p, name).shape[0]
                    setattr(p, name, whole[start:start + n])
                    start += n
            for p in parts:
                p._prepared_on = None  # their repacked copies (if any) are dropped; re-made if ever called
                p._packed = p._mm = p._w4 = None
        stacked.prepare()
        return stacked

    def fp8_input_scale(self) -> torch.Tensor | None:
        """The static activation scale when this linear runs FP8 ``_scaled_mm`` on its input
        quantized with it, else ``None``.  The op that produces the input (the RMSNorm before it,
        the SwiGLU before the down projection) can then emit FP8 itself and hand it over as is:
        :meth:`forward` takes an FP8 input as already quantized with this scale."""
        if self._prepared_on != self.weight.device:
            self.prepare()
        return self.activation_scaling_factor if self.kernel_path == qk.SCALED_MM else None

    # -- compute -----------------------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight applying to the *unscaled* input (prequant folded for weight-only)."""
        dtype = dtype or self.dtype
        tensors = dict(self.named_buffers(recurse=False))
        fold = self.fmt.activation is None
        return qf.dequantize(self.algo, tensors, dtype, fold_prequant=fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_on != self.weight.device:
            self.prepare()
        path = self.kernel_path
        if x.dtype == torch.float8_e4m3fn:  # quantized by the op before (see fp8_input_scale)
            if path != qk.SCALED_MM:
                x = qf.dequantize_fp8(x, self.activation_scaling_factor, self.dtype)
                return self.emulate(x)
        elif path == qk.EMULATION or x.dtype != self.dtype or not x.is_cuda:
            return self.emulate(x)
        x2 = x.reshape(-1, x.shape[-1])
        y = self._fast(x2, path)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + self.bias if self.bias is not None else y

    def prepare_swiglu(self) -> bool:
        """Let :meth:`swiglu_forward` apply the SwiGLU inside the int4 GEMV (as it stages x: one
        kernel fewer per layer at decode sizes), compiling that variant now (load time).  Called by
        ``GatedMLP`` for its ``proj`` after :meth:`prepare`; whether the GEMV takes it."""
        if self._w4 is None:
            return False
        try:
            prepare_w4_gemv(self._w4, self.dtype, hasattr(self, "prequant_scaling_factor"), swiglu=True)
        except RuntimeError:  # (the plain GEMV compiled, so this is not expected; the SwiGLU kernel stays)
            return False
        self._w4_swiglu = True
        return True

    def swiglu_forward(self, y: torch.Tensor) -> torch.Tensor:
        """``self(silu(a) * g)`` for the SwiGLU's input ``y = [a | g]``: in one kernel where the int4
        GEMV takes the rows (:meth:`prepare_swiglu`), else the SwiGLU's kernel, then this linear."""
        if (self._w4_swiglu and y.dim() == 2 and y.is_cuda and y.dtype == self.dtype
                and y.shape[0] <= W4_GEMV_MAX_ROWS and self._prepared_on == y.device):
            out = w4_gemv(y, self._w4, getattr(self, "prequant_scaling_factor", None), swiglu=True)
            return out + self.bias if self.bias is not None else out
        from trtlm.runtime.kernels import fused

        return self(fused.silu_mul(y))

    def _fast(self, x: torch.Tensor, path: str) -> torch.Tensor:
        fmt, rows = self.fmt, x.shape[0]
        p = getattr(self, "prequant_scaling_factor", None)
        if self._w4 is not None and rows <= W4_GEMV_MAX_ROWS:  # int4 decode at small batches
            return w4_gemv(x, self._w4, p)
        if self._w4 is not None and rows <= self._w4_gemm_rows:
            return w4_gemm(x, self._w4, p)
        if rows == 1 and self._gemv:  # decode at batch 1: the bandwidth-bound GEMV
            return gemv(x, self.weight, self.weights_scaling_factor, weight_kind=fmt.weight,
                        scale_kind=fmt.weight_scale, group_size=self.group_size, prequant=p,
                        input_scale=getattr(self, "activation_scaling_factor", None), out_dtype=self.dtype)
        if path == qk.SCALED_MM:  # FP8 W8A8
            a_s, w_s = self.activation_scaling_factor, self.weights_scaling_factor
            return qk.fp8_scaled_mm(x, self.weight, w_s, a_s, out_dtype=self.dtype)
        if path == qk.INT_MM:  # SmoothQuant W8A8
            a_s, w_s = self.activation_scaling_factor, self.weights_scaling_factor
            if rows >= qk.INT_MM_MIN_ROWS:
                return qk.int8_int_mm(x, self.weight, w_s, a_s, p)
            xq = fake_quant_int8(x * p.to(x.dtype) if p is not None else x, a_s)
            if qk.triton_available():
                return qk.dequant_mm(xq, self.weight, w_s, weight_kind="int8", scale_kind="channel")
            return F.linear(xq, qf.dequantize_int8(self.weight, w_s, x.dtype))
        if self._packed is not None and rows <= qk.INT4PACK_MAX_ROWS:  # tinygemm
            return qk.int4pack_mm(x, *self._packed, self.group_size, p)
        if qk.DENSE_MIN_ROWS and rows >= qk.DENSE_MIN_ROWS:  # compute-bound: one dequantizing pass, then cuBLAS
            w = qk.dequantize_fast(self.weight, self.weights_scaling_factor, weight_kind=fmt.weight,
                                   scale_kind=fmt.weight_scale, group_size=self.group_size, dtype=x.dtype,
                                   out_features=self.out_features)
            return F.linear(x * p.to(x.dtype) if p is not None else x, w)
        if self._mm is not None and rows >= qk.MIXED_MM_MIN_ROWS:
            # AWQ's pre-quant scale once on x (rounded as the kernel would), not once per output tile
            return qk.mixed_mm(x * p.to(x.dtype) if p is not None else x, self._mm)
        return qk.dequant_mm(x, self.weight, self.weights_scaling_factor, weight_kind=fmt.weight,
                             scale_kind=fmt.weight_scale, group_size=self.group_size,
                             prequant=p.to(x.dtype) if p is not None else None)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation (any device and dtype)."""
        if self.fmt.activation == "fp8":
            return F.linear(qf.fake_quant_fp8(x, self.activation_scaling_factor), self.dense_weight(x.dtype), self.bias)
        if self.fmt.activation == "int8":
            xs = x * self.prequant_scaling_factor.to(x.dtype) if hasattr(self, "prequant_scaling_factor") else x
            xs = fake_quant_int8(xs, self.activation_scaling_factor)
            return F.linear(xs, self.dense_weight(x.dtype), self.bias)
        return F.linear(x, self.dense_weight(x.dtype), self.bias)


class QuantExpertWeights(nn.Module):
    """A quantized expert stack ``[E_local, out, in]`` for :class:`trtlm.runtime.model.MoE`.

    Experts are quantized per expert (FP8: one scale per expert ``[E, 1]``; int8: per output
    channel ``[E, out]``; int4: groups ``[E, out, in/group]``).  Expert linears carry no
    pre-quant scale; FP8/SmoothQuant checkpoints carry one static ``activation_scaling_factor``
    per expert stack, applied to the MoE input for ``fc`` (see :meth:`quantize_input`).
    Run through :func:`quant_moe_forward`.
    """

    def __init__(self, quant_algo: str, config: dict[str, Any], experts: int, out_features: int, in_features: int,
                 dtype=None, device=None):
        super().__init__()
        self.fmt = _format(quant_algo, config, "MoE experts")
        self.algo = self.fmt.quant_algo
        self.dtype = dtype or torch.float32
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _group_size(self.fmt, config, in_features, check=False)
        _register(self, self.fmt.tensors(out_features, in_features, experts=experts, group_size=self.group_size),
                  self.dtype, device)
        self.kernel_path, self.kernel_reason = qk.EMULATION, "not prepared"
        self._prepared_on: torch.device | None = None

    @torch.no_grad()
    def prepare(self) -> str:
        """Pick the kernel for the gathered-expert products (see :meth:`QuantLinear.prepare`)."""
        dev = self.weight.device
        path, why = qk.linear_plan(self.fmt.weight, None, dev, self.dtype, self.in_features, self.out_features)
        if path == qk.SCALED_MM:  # experts: the Triton kernel reads the routed experts' fp8 codes
            path, why = (qk.TRITON, "Triton dequant-matmul over the routed experts") if qk.triton_available() else (
                qk.EMULATION, "Triton is not installed")
        if path == qk.TRITON and self.fmt.weight_scale == "group" and self.in_features % self.group_size:
            path, why = qk.EMULATION, "group size does not divide the expert's input features"
        self.kernel_path, self.kernel_reason = path, (
            f"{self.fmt.weight} experts: Triton GEMV over the routed experts only at decode, Triton dequantize "
            f"of the local experts + the dense MoE path beyond" if path == qk.TRITON else why)
        self._prepared_on = dev
        return path

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every local expert dequantized ``[E, out, in]`` (Triton, one pass per expert, where available)."""
        dtype = dtype or self.dtype
        if self.fast_for(dtype):
            out = torch.empty(self.weight.shape[0], self.out_features, self.in_features, dtype=dtype,
                              device=self.weight.device)
            for e in range(out.shape[0]):
                qk.dequantize_fast(self.weight[e], self.weights_scaling_factor[e], weight_kind=self.fmt.weight,
                                   scale_kind=self.fmt.weight_scale, group_size=self.group_size, dtype=dtype,
                                   out=out[e], out_features=self.out_features)
            return out
        return qf.dequantize(self.algo, dict(self.named_buffers(recurse=False)), dtype)

    def fast_for(self, dtype: torch.dtype) -> bool:
        if self._prepared_on != self.weight.device:
            self.prepare()
        return self.kernel_path == qk.TRITON and self.weight.is_cuda and dtype == self.dtype

    def dense_experts(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantized weights of the experts ``ids`` only: ``[len(ids), out, in]``."""
        t = dict(self.named_buffers(recurse=False))
        sel = {"weight": t["weight"][ids], "weights_scaling_factor": t["weights_scaling_factor"][ids]}
        return qf.dequantize(self.algo, sel, dtype or self.dtype)

    def gathered_mm(self, x: torch.Tensor, ids: torch.Tensor, rows_per_id: int) -> torch.Tensor:
        """Row ``s`` of the result is expert ``ids[s]`` applied to ``x[s // rows_per_id]``: ``[S, out]``."""
        if self._prepared_on != self.weight.device:
            self.prepare()
        if self.kernel_path == qk.TRITON and x.is_cuda and x.dtype == self.dtype:
            return qk.dequant_mm(x, self.weight, self.weights_scaling_factor, weight_kind=self.fmt.weight,
                                 scale_kind=self.fmt.weight_scale, group_size=self.group_size,
                                 expert_ids=ids, rows_per_id=rows_per_id, out_features=self.out_features)
        xs = x.repeat_interleave(rows_per_id, dim=0) if rows_per_id > 1 else x
        return torch.bmm(self.dense_experts(ids, x.dtype), xs.unsqueeze(-1)).squeeze(-1)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activation quantization of the formats that have it (emulated, static per-tensor scale)."""
        if self.fmt.activation == "fp8":
            return qf.fake_quant_fp8(x, self.activation_scaling_factor)
        if self.fmt.activation == "int8":
            return fake_quant_int8(x, self.activation_scaling_factor)
        return x


def quant_moe_forward(x: torch.Tensor, router_weight: torch.Tensor, fc: QuantExpertWeights,
                      proj: QuantExpertWeights, top_k: int, normalization_mode: int, expert_offset: int = 0,
                      *, strategy: str | None = None) -> torch.Tensor:
    """:func:`trtlm.runtime.moe.moe_forward` for quantized experts (same routing and combination).

    The input is quantized as the format does (the router sees it too, as before).  With the
    ``"gather"`` strategy (decode at small batch) only the routed experts' codes are read --
    through the Triton kernel on CUDA, else by dequantizing just those experts; beyond, every
    local expert is dequantized once per call (one Triton pass per expert on CUDA) and
    ``moe_forward`` runs its dense/sorted path.
    """
    from trtlm.runtime import moe as rm

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xin = fc.quantize_input(x2)
    num_local = fc.weight.shape[0]
    if strategy is None:
        strategy = rm.select_strategy(x2.shape[0], top_k, num_local)
    if strategy != "gather" or x2.shape[0] == 0:
        out = rm.moe_forward(xin, router_weight, fc.dense(x.dtype), proj.dense(x.dtype), top_k, normalization_mode,
                             expert_offset=expert_offset, strategy=None if strategy == "gather" else strategy)
        return out.reshape(shape)
    logits = F.linear(xin.float(), router_weight.float())
    scales, expert_ids = rm.route(logits, top_k, normalization_mode)
    local = expert_ids - expert_offset if expert_offset else expert_ids
    valid = None if num_local == router_weight.shape[0] else (local >= 0) & (local < num_local)
    idx = local.reshape(-1)
    if valid is not None:
        idx = idx.clamp(0, num_local - 1)
    h = fc.gathered_mm(xin, idx, rows_per_id=top_k)  # [T*k, 2I], pair order t*k + j
    y = proj.gathered_mm(rm._swiglu(h), idx, rows_per_id=1)  # [T*k, H]
    return rm._combine(y, scales, valid, x.dtype).reshape(shape)


def quant_linear(quant_algo: str, config: dict[str, Any], in_features: int, out_features: int, bias: bool,
                 dtype, device) -> nn.Module:
    """The module :func:`trtlm.runtime.model.make_linear` builds for a quantized checkpoint."""
    return QuantLinear(quant_algo, config, in_features, out_features, bias, dtype, device)


def prepare_model(model: nn.Module) -> dict[str, str]:
    """Call ``prepare()`` on every quantized module (after ``load_state_dict``, before CUDA graphs).

    Returns :func:`kernel_paths` for the one-line report of ``trtlm run``/``bench``.
    """
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExpertWeights)):
            m.prepare()
    return kernel_paths(model)


def kernel_paths(model: nn.Module) -> dict[str, str]:
    """Layer type (``attention.qkv``, ``mlp.fc``, ``mlp.fc (experts)``...) -> ``"path: why"``.

    Layers of one type normally agree; if they do not, every distinct answer is listed.
    """
    import re

    out: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantExpertWeights)):
            kind = re.sub(r"^.*?layers\.\d+\.", "", name) + (" (experts)" if isinstance(m, QuantExpertWeights) else "")
            desc = f"{m.kernel_path}: {m.kernel_reason}"
            if desc not in out.setdefault(kind, []):
                out[kind].append(desc)
    return {k: " | ".join(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- KV cache

def kv_cache_quant(config: dict[str, Any]) -> str | None:
    """``"FP8"`` / ``"INT8"`` when the checkpoint quantizes the KV cache, else None."""
    algo = _qconf(config).get("kv_cache_quant_algo")
    return str(algo).upper() if algo else None


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor, algo: str) -> torch.Tensor:
    """What a K/V value becomes after a round trip through the quantized cache."""
    if algo == "FP8":
        return qf.fake_quant_fp8(x, scale)
    return fake_quant_int8(x, scale)


# ----------------------------------------------------------------------------- merging ranks

_SCALE_SUFFIXES = (".weights_scaling_factor", ".weights_scaling_factor_2", ".per_channel_scale",
                   ".prequant_scaling_factor", ".activation_scaling_factor")


def dequantize_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One rank's tensors with every quantized linear replaced by its dense weight.

    Used to merge the ranks of a quantized tp>1 checkpoint in one process (the merged model runs
    with ``quant_algo`` None).  The dense weight is in the checkpoint dtype with the
    pre-quant scale folded in (it then applies to the unscaled input, so the merged model needs no
    prequant tensor), and the scale tensors are dropped; K/V cache scales are kept (the KV cache
    stays quantized).  Activation quantization (FP8, SmoothQuant) is not emulated by such a
    merged model: run the checkpoint with one process per rank for that.

    Vocabulary padding: trtlm never pads the vocabulary of its own AWQ checkpoints (modelopt pads to
    a multiple of 64 for its kernels; TensorRT-LLM does not require it); a modelopt checkpoint whose
    config carries the padded vocab_size is merged as is (the padded rows are zero).
    """
    from trtlm import dtypes

    algo = _qconf(config).get("quant_algo")
    found = dtypes.lookup(str(config.get("dtype", "float16")))
    dtype = dtypes.torch_dtype(found.name) if found is not None else torch.float16
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(_SCALE_SUFFIXES):
            continue
        if name.endswith(".weight") and t.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8):
            base = name[: -len(".weight")]
            parts = {"weight": t}
            for suffix in _SCALE_SUFFIXES:
                if base + suffix in tensors:
                    parts[suffix[1:]] = tensors[base + suffix]
            out[name] = qf.dequantize(algo, parts, dtype, fold_prequant=True)
        else:
            out[name] = t
    return out


def merge_quantized_ranks(config: dict[str, Any], ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """All ranks of a quantized checkpoint -> the *quantized* tensors of the tp=pp=1 checkpoint.

    Unlike :func:`dequantize_tensors` this keeps the format, so the merged single-process model
    emulates activation and KV quantization too and computes what the tp=1 quantized engine
    computes (every scale is computed on the full tensor before sharding: per-tensor scales are
    replicated, per-channel and group scales follow their weight's rows or columns, see
    :func:`trtlm.layout.split_rule`).  Packed int4 weights are unpacked for the merge (a
    tensor-parallel split cuts whole output rows) and packed again.
    """
    from trtlm.runtime.checkpoint import merge_ranks

    algo = str(_qconf(config).get("quant_algo") or "").upper()
    int4 = algo in ("W4A16_AWQ", "W4A16", "W4A8_AWQ")

    def is_packed(name: str, t: torch.Tensor) -> bool:
        return int4 and name.endswith(".weight") and t.dtype == torch.int8

    unpacked = [{n: (qf.unpack_int4(t) if is_packed(n, t) else t) for n, t in r.items()} for r in ranks]
    merged = merge_ranks(config, unpacked)
    return {n: (qf.pack_int4(t) if is_packed(n, t) else t) for n, t in merged.items()}
