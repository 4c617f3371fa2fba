"""Triton kernels for the paged KV cache: write new K/V, decode attention, prefill attention.

Imported only when a CUDA tensor reaches :mod:`trtlm.runtime.kernels` and Triton is installed
(``import trtlm`` never needs Triton).  The layout and semantics are those of
:mod:`trtlm.runtime.kernels.reference`, which is the oracle of the tests.

Why one attention kernel for decode and prefill: both are "a tile of query rows against the keys
of one sequence, read in place through its block table".  A program owns one sequence, one KV
head and a tile of ``BLOCK_M`` query rows = ``BLOCK_Q`` tokens x ``G`` query heads of that KV head
(GQA packing: a K/V tile loaded once serves every query head of its group, and the row count
reaches the 16 that ``tl.dot`` needs even for a single decode token).  Keys are visited in tiles
of ``TILE_N`` token positions; each position's block id comes from the block table, so a tile may
span several cache blocks and a block may be partially filled.  Scores, the running max and sum
and the output accumulator are float32 (online softmax in base 2); K/V are converted to the query
dtype for the two ``tl.dot``s, and an FP8/INT8 cache is dequantized by folding its per-layer scale
into the score scale (K) and the final output (V).

Decode (one token per sequence) is memory-bound and has few programs at small batch (B x KV),
so it splits the keys into ``num_parts`` partitions of ``part_tokens`` (flash-decoding): each
partition writes an unnormalized float32 partial output with its max and sum, and a second kernel
combines them.  Every launch has a grid that depends only on shapes and on the caller's
``max_context_len`` (or the block table's width), never on device values, and nothing reads
back to the host: decode is CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from trtlm.runtime.kernels.fused_triton import TL_DTYPES
from trtlm.runtime.kernels.pdl import pdl_options, pdl_release, pdl_wait

__all__ = ["write_kv", "paged_decode_attention", "paged_prefill_attention", "decode_partitions"]

_LOG2E = 1.4426950408889634
_NEG_BIG = -1.0e30  # finite "minus infinity" for running maxima: exp2(m_old - m_new) never NaN


# ----------------------------------------------------------------------------- write_kv

@triton.jit
def _round_half_even(x):
    """torch.round semantics (ties to even) without libdevice, so the interpreter runs it too."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _store_kv(SRC, DST, SCALE, t, src_off_t, src_stride_h, dst_off, dst_stride_h,
              KV_HEADS: tl.constexpr, HEAD_D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
              QUANT: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    mask = (h < KV_HEADS) & (d < HEAD_D)
    x = tl.load(SRC + src_off_t + h * src_stride_h + d, mask=mask, other=0)
    # x / s with IEEE rounding (div_rn): Triton's plain `/` is the approximate div.full.f32, which
    # put a few int8 codes one step away from torch's (measured on the H200)
    if QUANT == 1:  # float8_e4m3fn: clamp(x / s) to the finite range, round to nearest
        y = tl.math.div_rn(x.to(tl.float32), tl.load(SCALE))
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        y = y.to(DST.dtype.element_ty)
    elif QUANT == 2:  # int8: round half to even, clamp to [-128, 127]
        y = _round_half_even(tl.math.div_rn(x.to(tl.float32), tl.load(SCALE)))
        y = tl.minimum(tl.maximum(y, -128.0), 127.0).to(tl.int8)
    else:
        y = x.to(DST.dtype.element_ty)
    tl.store(DST + dst_off + h * dst_stride_h + d, y, mask=mask)


@triton.jit
def _write_kv_kernel(K, V, KC, VC, SLOTS, KS, VS,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                     block_size,
                     KV_HEADS: tl.constexpr, HEAD_D: tl.constexpr, H_PAD: tl.constexpr,
                     D_PAD: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    pdl_release(PDL)
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        t64 = t.to(tl.int64)
        _store_kv(K, KC, KS, t, t64 * stride_kt, stride_kh, blk * stride_kcb + off * stride_kcs, stride_kch,
                  KV_HEADS, HEAD_D, H_PAD, D_PAD, QUANT)
        _store_kv(V, VC, VS, t, t64 * stride_vt, stride_vh, blk * stride_vcb + off * stride_vcs, stride_vch,
                  KV_HEADS, HEAD_D, H_PAD, D_PAD, QUANT)


def _quant_code(cache: torch.Tensor) -> int:
    if cache.dtype == torch.float8_e4m3fn:
        return 1
    if cache.dtype == torch.int8:
        return 2
    return 0


def _scale_tensor(scale, device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
    """A float32 device tensor holding the scale (a fill kernel, no host->device copy: capturable)."""
    if scale is None:
        return dummy
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"KV-cache scale must have one element, got shape {tuple(scale.shape)}")
        return scale.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), float(scale), dtype=torch.float32, device=device)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Triton version of :func:`~trtlm.runtime.kernels.reference.write_kv_ref` (one program per token)."""
    n, kv_heads, head_d = k.shape
    if n == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    quant = _quant_code(k_cache)
    if quant != _quant_code(v_cache):
        raise ValueError("k_cache and v_cache must have the same dtype")
    ks = _scale_tensor(k_scale, k.device, slot_mapping)
    vs = _scale_tensor(v_scale, k.device, slot_mapping)
    _write_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, ks, vs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1],
        KV_HEADS=kv_heads, HEAD_D=head_d, H_PAD=triton.next_power_of_2(kv_heads),
        D_PAD=triton.next_power_of_2(head_d), QUANT=quant, **pdl_options(k.device), num_warps=4)


# ----------------------------------------------------------------------------- attention

# ``stride_bt`` is the step's block-table width: not specialized (Triton would compile a variant
# for widths of 1 and multiples of 16 as steps of such widths come, stalling a server mid-load).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_attn_kernel(
    Q, K, V, Out, BT, CTX, QSL, SLOPES, KS, VS, TMP_O, TMP_ML, OUT_SCALE,
    qk_scale, window, part_tokens, num_parts,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    G: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    IS_DECODE: tl.constexpr, USE_WINDOW: tl.constexpr, USE_ALIBI: tl.constexpr,
    KV_QUANT: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr, QUANT_OUT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_release(PDL)
    seq = tl.program_id(0)
    qtile = tl.program_id(1)
    pid2 = tl.program_id(2)
    kvh = pid2 // num_parts
    part = pid2 % num_parts

    ctx = tl.load(CTX + seq)
    if IS_DECODE:
        q_start = seq
        q_len = 1
    else:
        q_start = tl.load(QSL + seq)
        q_len = tl.load(QSL + seq + 1) - q_start
    tile_q0 = qtile * BLOCK_Q
    if tile_q0 < q_len:
        # query rows of this program: BLOCK_Q tokens x G heads of KV head `kvh`
        rows = tl.arange(0, BLOCK_M)
        r_tok = rows // G
        tok_local = tile_q0 + r_tok
        row_valid = (r_tok < BLOCK_Q) & (tok_local < q_len)
        head = kvh * G + rows % G
        qpos = ctx - q_len + tok_local
        tok = (q_start + tok_local).to(tl.int64)
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_D
        qmask = row_valid[:, None] & dmask[None, :]
        q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)

        # keys this tile can see, intersected with this program's partition
        last_q = tl.minimum(tile_q0 + BLOCK_Q, q_len) - 1
        k_end = ctx - q_len + last_q + 1
        if USE_WINDOW:
            k_start = tl.maximum(ctx - q_len + tile_q0 - window + 1, 0)
        else:
            k_start = 0
        lo = tl.maximum(k_start, part * part_tokens)
        hi = tl.minimum(k_end, (part + 1) * part_tokens)
        if lo < hi:
            scale = qk_scale
            if KV_QUANT:
                scale = scale * tl.load(KS)
            if USE_ALIBI:
                slope = tl.load(SLOPES + head, mask=row_valid, other=0.0) * 1.4426950408889634
            m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            n_off = tl.arange(0, TILE_N)
            bt_row = BT + seq.to(tl.int64) * stride_bt
            for t0 in range((lo // TILE_N) * TILE_N, hi, TILE_N):
                kpos = t0 + n_off
                kmask = (kpos >= lo) & (kpos < hi)
                blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
                slot = kpos % BLOCK_SIZE
                lmask = kmask[:, None] & dmask[None, :]
                k = tl.load(K + (blk * stride_kb + slot * stride_ks + kvh * stride_kh)[:, None] + d[None, :],
                            mask=lmask, other=0.0)
                v = tl.load(V + (blk * stride_vb + slot * stride_vs + kvh * stride_vh)[:, None] + d[None, :],
                            mask=lmask, other=0.0)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale
                rel = kpos[None, :] - qpos[:, None]
                if USE_ALIBI:
                    s += slope[:, None] * rel.to(tl.float32)
                vis = kmask[None, :] & (rel <= 0)
                if USE_WINDOW:
                    vis = vis & (rel > -window)
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
                m_i = m_new
            if KV_QUANT:
                acc = acc * tl.load(VS)
            if SPLIT:
                base = (tok * NUM_HEADS + head) * num_parts + part
                tl.store(TMP_O + base[:, None] * D_PAD + d[None, :], acc, mask=row_valid[:, None])
                tl.store(TMP_ML + base * 2, m_i, mask=row_valid)
                tl.store(TMP_ML + base * 2 + 1, l_i, mask=row_valid)
            else:
                out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
                tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                         _output(out, Q.dtype.element_ty, Out.dtype.element_ty, OUT_SCALE, QUANT_OUT), mask=qmask)


@triton.jit
def _output(out, DT: tl.constexpr, OUT_DT: tl.constexpr, OUT_SCALE, QUANT_OUT: tl.constexpr):
    """Attention's output as stored: in the activation dtype, or (``QUANT_OUT``) the FP8 codes the
    next linear takes -- rounded to the activation dtype first, then ``clamp(x / scale)``, exactly
    as that linear would quantize the unfused output."""
    if QUANT_OUT:
        y = tl.math.div_rn(out.to(DT).to(tl.float32), tl.load(OUT_SCALE))
        return tl.minimum(tl.maximum(y, -448.0), 448.0).to(OUT_DT)
    return out.to(OUT_DT)


@triton.jit
def _combine_kernel(Out, TMP_O, TMP_ML, CTX, OUT_SCALE, window, part_tokens, num_parts, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, HEAD_D: tl.constexpr, D_PAD: tl.constexpr,
                    P_PAD: tl.constexpr, USE_WINDOW: tl.constexpr, DT: tl.constexpr, QUANT_OUT: tl.constexpr,
                    PDL: tl.constexpr):
    """Merge the decode partitions of one (sequence, head): the same ranges the main kernel used."""
    pdl_wait(PDL)
    pdl_release(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(CTX + b)
    if USE_WINDOW:
        k_start = tl.maximum(ctx - window, 0)  # qpos - window + 1 with qpos = ctx - 1
    else:
        k_start = 0
    p = tl.arange(0, P_PAD)
    valid = (p < num_parts) & (p * part_tokens < ctx) & ((p + 1) * part_tokens > k_start)
    base = (b.to(tl.int64) * NUM_HEADS + h) * num_parts + p
    m = tl.load(TMP_ML + base * 2, mask=valid, other=-1.0e30)
    l = tl.load(TMP_ML + base * 2 + 1, mask=valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(valid, tl.exp2(m - m_max), 0.0)
    total = tl.sum(w * l, 0)
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_D
    acc = tl.load(TMP_O + base[:, None] * D_PAD + d[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, 0) / total
    tl.store(Out + b.to(tl.int64) * stride_ot + h * stride_oh + d,
             _output(out, DT, Out.dtype.element_ty, OUT_SCALE, QUANT_OUT), mask=dmask)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # the Triton interpreter (tests of the kernel logic on CPU)
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


#: decode kernel configuration (TILE_N key positions per step, warps, pipeline stages), chosen by
#: bench/paged_attention_bench.py on the H200 (docs/benchmarks.md, "Paged attention kernels"):
#: a K tile of ~16 KB per step (64 tokens of a 2-byte cache, 128 of a 1-byte FP8/INT8 cache),
#: two pipeline stages for 2-byte caches and three for 1-byte ones.
DECODE_CONFIG = {"TILE_N": 64, "num_warps": 4, "num_stages": 2, "max_parts": 64, "programs_per_sm": 2}
DECODE_CONFIG_1BYTE = {"TILE_N": 128, "num_stages": 3}
#: prefill kernel configuration (same sweep)
PREFILL_CONFIG = {"BLOCK_M": 128, "TILE_N": 64, "num_warps": 8, "num_stages": 3}


def decode_partitions(batch: int, kv_heads: int, max_tokens: int, num_sms: int,
                      tile_n: int, max_parts: int, programs_per_sm: int) -> tuple[int, int]:
    """``(num_parts, part_tokens)`` for a decode launch: enough programs to fill the GPU.

    Depends only on shapes (never on device values), so a captured graph stays valid.
    ``num_parts == 1`` means no split (the kernel writes the output directly).
    """
    tiles = max(1, -(-max_tokens // tile_n))
    want = -(-programs_per_sm * num_sms // max(1, batch * kv_heads))
    parts = max(1, min(want, tiles, max_parts))
    tiles_per_part = -(-tiles // parts)
    parts = -(-tiles // tiles_per_part)
    return parts, tiles_per_part * tile_n


def _dot_precision(dtype: torch.dtype) -> str | None:
    """float32 queries get exact (IEEE) dots, not TF32: they are the accuracy-first path."""
    return "ieee" if dtype == torch.float32 else None


def _launch(q, k_cache, v_cache, block_tables, context_lens, qsl, scale, window, alibi_slopes,
            k_scale, v_scale, *, is_decode: bool, grid_q: int, num_parts: int, part_tokens: int,
            block_m: int, block_q: int, tile_n: int, num_warps: int, num_stages: int,
            out: torch.Tensor, tmp_o, tmp_ml, out_scale: torch.Tensor | None = None) -> None:
    kv_heads, head_d = k_cache.shape[2], k_cache.shape[3]
    heads = q.shape[1]
    quant = _quant_code(k_cache)
    dummy = context_lens
    _paged_attn_kernel[(block_tables.shape[0], grid_q, kv_heads * num_parts)](
        q, k_cache, v_cache, out, block_tables, context_lens, qsl,
        alibi_slopes if alibi_slopes is not None else dummy,
        _scale_tensor(k_scale, q.device, dummy) if quant else dummy,
        _scale_tensor(v_scale, q.device, dummy) if quant else dummy,
        tmp_o if tmp_o is not None else dummy, tmp_ml if tmp_ml is not None else dummy,
        out_scale if out_scale is not None else dummy, float(scale) * _LOG2E, int(window or 0), part_tokens, num_parts,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        G=heads // kv_heads, NUM_HEADS=heads, HEAD_D=head_d, D_PAD=max(16, triton.next_power_of_2(head_d)),
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, BLOCK_SIZE=k_cache.shape[1],
        IS_DECODE=is_decode, USE_WINDOW=window is not None, USE_ALIBI=alibi_slopes is not None,
        KV_QUANT=quant != 0, SPLIT=num_parts > 1, DOT_PREC=_dot_precision(q.dtype),
        QUANT_OUT=out_scale is not None, **pdl_options(q.device),
        num_warps=num_warps, num_stages=num_stages)


def _prep(q: torch.Tensor, alibi_slopes):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    return q, alibi_slopes


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float, *,
                           window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                           k_scale=None, v_scale=None, max_context_len: int | None = None,
                           out_fp8_scale: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Triton decode attention; see :func:`trtlm.runtime.kernels.paged_decode_attention`."""
    cfg = {**DECODE_CONFIG, **(DECODE_CONFIG_1BYTE if k_cache.element_size() == 1 else {}), **(config or {})}
    q, alibi_slopes = _prep(q, alibi_slopes)
    batch, heads, head_d = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    max_tokens = block_tables.shape[1] * k_cache.shape[1]
    if max_context_len is not None:
        max_tokens = min(max_tokens, int(max_context_len))
    parts, part_tokens = decode_partitions(batch, kv_heads, max_tokens, _sm_count(q.device), cfg["TILE_N"],
                                           cfg["max_parts"], cfg["programs_per_sm"])
    out = torch.empty_like(q, dtype=torch.float8_e4m3fn if out_fp8_scale is not None else q.dtype)
    if batch == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(head_d))
    tmp_o = tmp_ml = None
    if parts > 1:
        tmp_o = torch.empty(batch, heads, parts, d_pad, dtype=torch.float32, device=q.device)
        tmp_ml = torch.empty(batch, heads, parts, 2, dtype=torch.float32, device=q.device)
    else:
        part_tokens = 1 << 30
    _launch(q, k_cache, v_cache, block_tables, context_lens, context_lens, scale, window, alibi_slopes,
            k_scale, v_scale, is_decode=True, grid_q=1, num_parts=parts, part_tokens=part_tokens,
            block_m=max(16, triton.next_power_of_2(group)), block_q=1, tile_n=cfg["TILE_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], out=out, tmp_o=tmp_o, tmp_ml=tmp_ml,
            out_scale=out_fp8_scale)
    if parts > 1:
        _combine_kernel[(batch, heads)](
            out, tmp_o, tmp_ml, context_lens, out_fp8_scale if out_fp8_scale is not None else context_lens,
            int(window or 0), part_tokens, parts, out.stride(0), out.stride(1),
            NUM_HEADS=heads, HEAD_D=head_d, D_PAD=d_pad, P_PAD=max(2, triton.next_power_of_2(parts)),
            USE_WINDOW=window is not None, DT=TL_DTYPES[q.dtype], QUANT_OUT=out_fp8_scale is not None,
            **pdl_options(q.device), num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            context_lens: torch.Tensor, scale: float, *, window: int | None = None,
                            alibi_slopes: torch.Tensor | None = None, k_scale=None, v_scale=None,
                            max_query_len: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Triton prefill attention; see :func:`trtlm.runtime.kernels.paged_prefill_attention`."""
    cfg = {**PREFILL_CONFIG, **(config or {})}
    q, alibi_slopes = _prep(q, alibi_slopes)
    heads = q.shape[1]
    group = heads // k_cache.shape[2]
    out = torch.empty_like(q)
    if q.shape[0] == 0 or block_tables.shape[0] == 0:
        return out
    if max_query_len is None:  # one host sync; the engine knows it and passes it
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(group))
    block_q = block_m // group
    _launch(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, window, alibi_slopes,
            k_scale, v_scale, is_decode=False, grid_q=max(1, math.ceil(max_query_len / block_q)),
            num_parts=1, part_tokens=1 << 30, block_m=block_m, block_q=block_q, tile_n=cfg["TILE_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], out=out, tmp_o=None, tmp_ml=None)
    return out
