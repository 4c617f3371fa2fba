"""Paged-attention ops (trtlm.runtime.kernels): the torch references against plain dense attention
(CPU, float32/float64, runs in CI) and the Triton kernels against the references (CUDA only).

Every case writes per-sequence K/V through ``write_kv`` into blocks whose ids are shuffled (never
contiguous, never in order), with a last block only partly filled and block-table padding entries
that point nowhere (so a kernel that read them would fault or read garbage), then checks the
attention output against an independent computation on the logical (unpaged) K/V.

Tolerances, and why:
* reference (float32) vs dense oracle (float64, explicit softmax): ``atol=rtol=1e-5`` — float32
  rounding of dot products over <= 128 elements and of the softmax sums.
* Triton float32 vs reference: ``atol=rtol=2e-4`` — exact (IEEE) dots, but a different summation
  order (tiles of 64 keys, split partitions) and the hardware ``exp2``.
* Triton bf16 vs reference computed in float32 from the same bf16 inputs: ``atol=rtol=2e-2`` —
  the kernel rounds the softmax weights to bf16 (relative 2**-9) before the P·V product, as
  flash attention does, and the output itself is rounded to bf16.
* quantized caches: both paths read the same stored bytes and dequantize exactly (fp8/int8 -> bf16
  is exact), so the tolerance is the one of the query dtype.
"""
from __future__ import annotations

import importlib.util
import math
import random
import zlib

import pytest
import torch

from trtlm.runtime.alibi import alibi_slopes as make_alibi_slopes
from trtlm.runtime.kernels import (
    paged_decode_attention, paged_decode_attention_ref, paged_prefill_attention, paged_prefill_attention_ref,
    quantize_kv, dequantize_kv, write_kv, write_kv_ref,
)

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRITON),
    reason="the Triton kernels need " + " and ".join(
        [w for w, ok in (("a CUDA GPU", HAS_CUDA), ("the optional package triton", HAS_TRITON)) if not ok])
    + " (the torch references are tested above on CPU)")

PAD_IDS = (10**7, -5)  # block-table padding: ids far outside the pool, never to be read


# ----------------------------------------------------------------------------- building cases

class Case:
    """A batch of sequences, their logical K/V, and the same K/V in a shuffled paged cache."""

    def __init__(self, *, seed: int, chunks: list[tuple[int, int]], heads: int, kv_heads: int, head_d: int,
                 block_size: int, dtype=torch.float32, cache_dtype=None, device="cpu", spare_blocks: int = 3):
        """``chunks``: per sequence ``(context_len, q_len)`` with ``q_len <= context_len``."""
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        cache_dtype = cache_dtype or dtype
        self.chunks, self.heads, self.kv_heads, self.head_d = chunks, heads, kv_heads, head_d
        self.block_size, self.dtype, self.cache_dtype, self.device = block_size, dtype, cache_dtype, device
        nblocks = [-(-ctx // block_size) for ctx, _ in chunks]
        num_blocks = sum(nblocks) + spare_blocks
        ids = list(range(num_blocks))
        rng.shuffle(ids)
        width = max(nblocks) + 2
        table = []
        for n in nblocks:
            row, ids = ids[:n], ids[n:]
            table.append(row + [PAD_IDS[len(table) % 2]] * (width - n))
        self.block_tables = torch.tensor(table, dtype=torch.int32, device=device)
        self.context_lens = torch.tensor([c for c, _ in chunks], dtype=torch.int32, device=device)
        self.query_start_loc = torch.tensor([0] + list(_cumsum([q for _, q in chunks])), dtype=torch.int32,
                                            device=device)
        # logical K/V per sequence (float32 master values, rounded to the model dtype)
        self.k = [torch.randn(ctx, kv_heads, head_d, generator=gen).to(dtype) for ctx, _ in chunks]
        self.v = [torch.randn(ctx, kv_heads, head_d, generator=gen).to(dtype) for ctx, _ in chunks]
        self.q = torch.randn(sum(q for _, q in chunks), heads, head_d, generator=gen).to(dtype).to(device)
        quantized = cache_dtype in (torch.int8, torch.float8_e4m3fn)
        top = 127.0 if cache_dtype == torch.int8 else 448.0
        self.k_scale = self.v_scale = None
        if quantized:
            amax_k = max(float(k.float().abs().max()) for k in self.k)
            amax_v = max(float(v.float().abs().max()) for v in self.v)
            self.k_scale = torch.tensor([amax_k / top], dtype=torch.float32, device=device)
            self.v_scale = torch.tensor([amax_v / top], dtype=torch.float32, device=device)
        shape = (num_blocks, block_size, kv_heads, head_d)
        fill = 0 if quantized else float("nan")  # unused slots: NaN wherever NaN is representable
        self.k_cache = torch.full(shape, fill, dtype=torch.float32, device=device).to(cache_dtype)
        self.v_cache = torch.full(shape, fill, dtype=torch.float32, device=device).to(cache_dtype)
        self.slot_mapping = self.slots_for_all_tokens()

    def slots_for_all_tokens(self) -> torch.Tensor:
        slots = []
        for s, (ctx, _) in enumerate(self.chunks):
            row = self.block_tables[s].tolist()
            slots += [row[t // self.block_size] * self.block_size + t % self.block_size for t in range(ctx)]
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def all_k(self) -> torch.Tensor:
        return torch.cat(self.k).to(self.device)

    def all_v(self) -> torch.Tensor:
        return torch.cat(self.v).to(self.device)

    def fill(self, writer=write_kv_ref) -> "Case":
        writer(self.all_k(), self.all_v(), self.k_cache, self.v_cache, self.slot_mapping, self.k_scale, self.v_scale)
        return self

    def logical_kv(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``s``'s K/V as the cache holds them (quantize-dequantize), float64 on CPU."""
        k, v = self.k[s], self.v[s]
        if self.k_scale is not None:
            k = dequantize_kv(quantize_kv(k, self.cache_dtype, self.k_scale.cpu()), self.k_scale.cpu())
            v = dequantize_kv(quantize_kv(v, self.cache_dtype, self.v_scale.cpu()), self.v_scale.cpu())
        return k.double(), v.double()

    def args(self):
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def dense_attention(case: Case, scale: float, window=None, slopes=None) -> torch.Tensor:
    """Plain attention on the logical K/V, float64, one explicit softmax per (query, head)."""
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    q_all = case.q.double().cpu()
    group = case.heads // case.kv_heads
    row = 0
    for s, (ctx, q_len) in enumerate(case.chunks):
        k, v = case.logical_kv(s)
        for i in range(q_len):
            qpos = ctx - q_len + i
            lo = 0 if window is None else max(0, qpos - window + 1)
            for h in range(case.heads):
                keys = k[lo:qpos + 1, h // group]  # [n, D]
                scores = keys @ q_all[row + i, h] * scale
                if slopes is not None:
                    scores = scores + float(slopes[h]) * (torch.arange(lo, qpos + 1, dtype=torch.float64) - qpos)
                w = torch.exp(scores - scores.max())
                out[row + i, h] = (w / w.sum()) @ v[lo:qpos + 1, h // group]
        row += q_len
    return out


# ----------------------------------------------------------------------------- CPU: reference vs dense

CPU_CASES = [
    # id, heads, kv_heads, head_d, block, chunks (ctx, q_len), window, alibi, cache dtype
    ("mha-prefill-b16", 4, 4, 16, 16, [(37, 37), (16, 16), (5, 5)], None, False, None),
    ("gqa-chunked-b32", 8, 2, 32, 32, [(100, 30), (64, 64), (33, 1)], None, False, None),
    ("mqa-window-b16", 6, 1, 16, 16, [(70, 70), (50, 9)], 13, False, None),
    ("gqa3-alibi-b16", 12, 4, 8, 16, [(45, 20), (17, 17)], None, True, None),
    ("gqa-window-alibi-b32", 8, 4, 16, 32, [(90, 40), (31, 31)], 24, True, None),
    ("int8-gqa-b16", 8, 2, 16, 16, [(60, 25), (19, 19), (7, 1)], None, False, torch.int8),
    ("int8-window-alibi-b32", 4, 2, 16, 32, [(75, 75)], 30, True, torch.int8),
    ("fp8-gqa-b16", 8, 2, 16, 16, [(40, 12), (23, 23)], None, False, torch.float8_e4m3fn),
]


@pytest.mark.parametrize("cid,heads,kv,d,bs,chunks,window,alibi,cdt", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_reference_prefill_matches_dense(cid, heads, kv, d, bs, chunks, window, alibi, cdt):
    case = Case(seed=zlib.crc32(cid.encode()) % 1000, chunks=chunks, heads=heads, kv_heads=kv, head_d=d, block_size=bs,
                cache_dtype=cdt).fill(write_kv)  # public write_kv: the CPU path is the reference
    slopes = make_alibi_slopes(heads) if alibi else None
    scale = 1 / math.sqrt(d)
    got = paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.query_start_loc,
                                  case.context_lens, scale, window=window, alibi_slopes=slopes, **case.args())
    want = dense_attention(case, scale, window, slopes)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cid,heads,kv,d,bs,chunks,window,alibi,cdt", CPU_CASES, ids=[c[0] for c in CPU_CASES])
def test_reference_decode_matches_dense(cid, heads, kv, d, bs, chunks, window, alibi, cdt):
    chunks = [(ctx, 1) for ctx, _ in chunks]
    case = Case(seed=zlib.crc32(cid.encode()) % 1000 + 1, chunks=chunks, heads=heads, kv_heads=kv, head_d=d, block_size=bs,
                cache_dtype=cdt).fill(write_kv)
    slopes = make_alibi_slopes(heads) if alibi else None
    scale = 0.3
    got = paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                 scale, window=window, alibi_slopes=slopes, **case.args())
    want = dense_attention(case, scale, window, slopes)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_random_shapes_match_dense():
    """Many small random configurations: every combination the fixed cases above do not pin down."""
    rng = random.Random(1234)
    for trial in range(30):
        kv = rng.choice([1, 2, 3])
        heads = kv * rng.choice([1, 2, 4])
        d = rng.choice([8, 16])
        bs = rng.choice([16, 32])
        chunks = []
        for _ in range(rng.randint(1, 4)):
            ctx = rng.randint(1, 80)
            chunks.append((ctx, rng.randint(1, ctx)))
        window = rng.choice([None, None, rng.randint(1, 40)])
        alibi = rng.random() < 0.3
        cdt = rng.choice([None, None, torch.int8])
        case = Case(seed=trial, chunks=chunks, heads=heads, kv_heads=kv, head_d=d, block_size=bs,
                    cache_dtype=cdt).fill()
        slopes = make_alibi_slopes(heads) if alibi else None
        got = paged_prefill_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables,
                                          case.query_start_loc, case.context_lens, 0.25, window=window,
                                          alibi_slopes=slopes, **case.args())
        want = dense_attention(case, 0.25, window, slopes)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"trial {trial} {chunks} H={heads} KV={kv} bs={bs} "
                                                 f"window={window} alibi={alibi} {cdt}: {m}")


def test_decode_output_quantized_for_an_fp8_projection():
    """``out_fp8_scale`` makes decode attention return the FP8 codes of its output (what an FP8
    output projection would quantize its input to): on the CPU the reference output, then
    ``quantize_fp8_ref`` (the GPU kernels write the same codes; tested below)."""
    from trtlm.runtime.kernels.fused import quantize_fp8_ref

    case = Case(seed=3, chunks=[(50, 1), (7, 1)], heads=8, kv_heads=2, head_d=64, block_size=16,
                dtype=torch.bfloat16, cache_dtype=None, device="cpu").fill()
    args = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.1)
    scale = torch.tensor([0.01])
    codes = paged_decode_attention(*args, out_fp8_scale=scale)
    assert codes.dtype == torch.float8_e4m3fn
    want = quantize_fp8_ref(paged_decode_attention(*args), scale)
    assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))


def test_write_kv_skips_minus_one_and_touches_only_its_slots():
    case = Case(seed=3, chunks=[(20, 20), (9, 9)], heads=2, kv_heads=2, head_d=8, block_size=16)
    n = case.slot_mapping.numel()
    slots = case.slot_mapping.clone()
    slots[::3] = -1  # every third token skipped
    k, v = case.all_k(), case.all_v()
    write_kv(k, v, case.k_cache, case.v_cache, slots)
    flat_k = case.k_cache.view(-1, 2, 8)
    written = slots[slots >= 0]
    torch.testing.assert_close(flat_k[written], k[slots >= 0], atol=0, rtol=0)  # a copy, no arithmetic
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert torch.isnan(flat_k[untouched]).all(), "write_kv wrote a slot it was not given (or slot -1)"
    assert n - written.numel() == len(range(0, n, 3))


@pytest.mark.parametrize("cdt,top", [(torch.int8, 127.0), (torch.float8_e4m3fn, 448.0)])
def test_write_kv_quantizes_with_the_layer_scale(cdt, top):
    case = Case(seed=5, chunks=[(40, 40)], heads=2, kv_heads=2, head_d=16, block_size=16, cache_dtype=cdt).fill(write_kv)
    k = case.all_k()
    assert case.k_cache.dtype == cdt
    stored = case.k_cache.view(torch.int8).view(-1, 2, 16)[case.slot_mapping].view(cdt)
    back = stored.float() * case.k_scale
    if cdt == torch.int8:  # round to nearest: off by at most half a step
        assert float((back - k).abs().max()) <= float(case.k_scale) / 2 + 1e-6
        assert int(stored.abs().max()) == 127  # the scale maps the largest value to the top of the range
    else:  # e4m3: 3 mantissa bits -> relative error <= 2**-4 for normal values
        normal = k.abs() > float(case.k_scale) * 2 ** -6
        assert float(((back - k).abs() / k.abs())[normal].max()) <= 2 ** -4 + 1e-6
        assert float(stored.float().abs().max()) == top


def test_int8_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -300.0]).view(7, 1, 1)
    out = quantize_kv(x, torch.int8, torch.tensor([1.0])).view(-1).tolist()
    assert out == [0, 2, 2, 0, -2, 127, -128]


@pytest.mark.parametrize("bad,match", [
    (dict(block_tables=lambda c: c.block_tables.long()), "block_tables must be int32"),
    (dict(context_lens=lambda c: c.context_lens[:1]), "context_lens must be int32"),
    (dict(q=lambda c: c.q[:, :3]), "not a multiple"),
    (dict(alibi_slopes=lambda c: torch.ones(3)), "alibi_slopes must be"),
    (dict(window=lambda c: 0), "window must be"),
])
def test_bad_arguments_name_the_tensor(bad, match):
    case = Case(seed=1, chunks=[(10, 10), (5, 5)], heads=4, kv_heads=2, head_d=8, block_size=16).fill()
    args = dict(q=case.q, block_tables=case.block_tables, context_lens=case.context_lens, alibi_slopes=None,
                window=None)
    args.update({key: fn(case) for key, fn in bad.items()})
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(args["q"], case.k_cache, case.v_cache, args["block_tables"],
                                case.query_start_loc, args["context_lens"], 0.1, window=args["window"],
                                alibi_slopes=args["alibi_slopes"])


def test_quantized_cache_without_scale_is_refused():
    case = Case(seed=1, chunks=[(10, 10)], heads=2, kv_heads=2, head_d=8, block_size=16, cache_dtype=torch.int8)
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        write_kv(case.all_k(), case.all_v(), case.k_cache, case.v_cache, case.slot_mapping)


# ----------------------------------------------------------------------------- CUDA: Triton vs reference

def _triton_ops():
    from trtlm.runtime.kernels import triton_ops
    return triton_ops


def _tol(dtype):
    return dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


GPU_CASES = [
    # id, heads, kv, d, block, chunks, window, alibi, dtype, cache dtype
    ("bf16-gqa-b32", 32, 8, 128, 32, [(1000, 1000), (77, 40), (2100, 300), (1, 1), (33, 1)], None, False,
     torch.bfloat16, None),
    ("fp32-gqa-b16", 8, 2, 64, 16, [(300, 300), (129, 5), (64, 64)], None, False, torch.float32, None),
    ("fp32-mqa-window-b16", 8, 1, 64, 16, [(400, 150), (50, 50)], 37, False, torch.float32, None),
    ("bf16-mha-alibi-b32", 8, 8, 64, 32, [(260, 260), (90, 17)], None, True, torch.bfloat16, None),
    ("fp32-gqa3-window-alibi-b32", 12, 4, 80, 32, [(333, 100), (70, 70)], 64, True, torch.float32, None),
    ("bf16-fp8-gqa-b32", 32, 8, 128, 32, [(700, 200), (45, 45)], None, False, torch.bfloat16,
     torch.float8_e4m3fn),
    ("fp32-int8-gqa-b16", 8, 2, 64, 16, [(250, 90), (31, 31)], 100, False, torch.float32, torch.int8),
]
DECODE_CTX = [1, 2, 31, 32, 33, 500, 3000, 9000]  # 9000 tokens at batch 1 forces split partitions


def _gpu_case(seed, heads, kv, d, bs, chunks, dtype, cdt):
    return Case(seed=seed, chunks=chunks, heads=heads, kv_heads=kv, head_d=d, block_size=bs, dtype=dtype,
                cache_dtype=cdt, device="cuda")


@GPU
@pytest.mark.parametrize("cdt", [torch.bfloat16, torch.float8_e4m3fn, torch.int8])
def test_triton_write_kv_matches_reference(cdt):
    ops = _triton_ops()
    a = _gpu_case(7, 8, 8, 128, 32, [(100, 100), (37, 37)], torch.bfloat16, cdt)
    b = _gpu_case(7, 8, 8, 128, 32, [(100, 100), (37, 37)], torch.bfloat16, cdt)
    slots = a.slot_mapping.clone()
    slots[5::7] = -1
    write_kv_ref(a.all_k(), a.all_v(), a.k_cache, a.v_cache, slots, a.k_scale, a.v_scale)
    ops.write_kv(b.all_k(), b.all_v(), b.k_cache, b.v_cache, slots, b.k_scale, b.v_scale)
    for want, got in ((a.k_cache, b.k_cache), (a.v_cache, b.v_cache)):
        if cdt == torch.bfloat16:  # a copy: bit-identical, untouched slots still NaN in both
            assert torch.equal(want.view(torch.int16), got.view(torch.int16))
        else:  # one division and one rounding each; torch may divide by a scalar as a multiplication by
            # its reciprocal (one rounding more), so a value on a rounding boundary can land one code away
            diff = (want.view(torch.int8).int() - got.view(torch.int8).int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3


@GPU
@pytest.mark.parametrize("cid,heads,kv,d,bs,chunks,window,alibi,dtype,cdt", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_triton_prefill_matches_reference(cid, heads, kv, d, bs, chunks, window, alibi, dtype, cdt):
    ops = _triton_ops()
    case = _gpu_case(11, heads, kv, d, bs, chunks, dtype, cdt).fill()
    slopes = make_alibi_slopes(heads).cuda() if alibi else None
    scale = 1 / math.sqrt(d)
    args = dict(window=window, alibi_slopes=slopes, **case.args())
    want = paged_prefill_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables,
                                       case.query_start_loc, case.context_lens, scale, **args)
    got = ops.paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                      case.query_start_loc, case.context_lens, scale, **args)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    # the public entry point dispatches to the same kernel on CUDA (max_query_len given: no sync)
    again = paged_prefill_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.query_start_loc,
                                    case.context_lens, scale, max_query_len=max(q for _, q in chunks), **args)
    torch.testing.assert_close(again, got, atol=0, rtol=0)  # same kernel, same launch: deterministic


@GPU
@pytest.mark.parametrize("cid,heads,kv,d,bs,chunks,window,alibi,dtype,cdt", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("batch", [1, 5])
def test_triton_decode_matches_reference(cid, heads, kv, d, bs, chunks, window, alibi, dtype, cdt, batch):
    ops = _triton_ops()
    rng = random.Random(batch)
    chunks = [(rng.choice(DECODE_CTX), 1) for _ in range(batch)]
    case = _gpu_case(13, heads, kv, d, bs, chunks, dtype, cdt).fill()
    slopes = make_alibi_slopes(heads).cuda() if alibi else None
    scale = 1 / math.sqrt(d)
    args = dict(window=window, alibi_slopes=slopes, **case.args())
    want = paged_decode_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                      scale, **args)
    for cap in (None, max(c for c, _ in chunks)):  # grid over the table width, or over the caller's bound
        got = ops.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                         scale, max_context_len=cap, **args)
        torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))


@GPU
@pytest.mark.parametrize("batch,ctx", [(1, 9000), (3, 200), (64, 700)])
def test_triton_decode_split_and_unsplit_agree(batch, ctx):
    """Flash-decoding partitions (forced on and off) give the reference's answer at every length."""
    ops = _triton_ops()
    case = _gpu_case(17, 32, 8, 128, 32, [(ctx - i, 1) for i in range(batch)], torch.float32, None).fill()
    want = paged_decode_attention_ref(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.08)
    for cfg in ({"max_parts": 1}, {"max_parts": 64, "programs_per_sm": 64}, {"TILE_N": 32}, {"TILE_N": 128}):
        got = ops.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                         0.08, config=cfg)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4, msg=lambda m: f"{cfg}: {m}")


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_writes_the_fp8_codes_of_its_output(dtype):
    """With ``out_fp8_scale`` the decode kernels (unsplit, and flash-decoding's combine) store the
    output projection's FP8 input: exactly ``quantize_fp8_ref`` of the output they store without
    it (the same kernel computes the same values; only the store differs), saturating values
    beyond the FP8 range.  The CPU reference path quantizes the same way."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9+ (FP8)")
    from trtlm.runtime.kernels.fused import quantize_fp8_ref

    ops = _triton_ops()
    case = _gpu_case(23, 32, 8, 128, 32, [(900, 1), (40, 1), (2500, 1)], dtype, None).fill()
    scale = torch.tensor([0.002], device="cuda")  # small: some outputs saturate at +-448
    for cfg in ({"max_parts": 1}, {}):
        plain = ops.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                           case.context_lens, 0.09, config=cfg)
        codes = ops.paged_decode_attention(case.q, case.k_cache, case.v_cache, case.block_tables,
                                           case.context_lens, 0.09, config=cfg, out_fp8_scale=scale)
        want = quantize_fp8_ref(plain, scale)
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8)), cfg
        assert (codes.float().abs() == 448).any()
    cpu = paged_decode_attention(case.q.cpu(), case.k_cache.cpu(), case.v_cache.cpu(), case.block_tables.cpu(),
                                 case.context_lens.cpu(), 0.09, out_fp8_scale=scale.cpu())
    assert cpu.dtype == torch.float8_e4m3fn


@GPU
def test_triton_decode_is_cuda_graph_capturable():
    """Capture write_kv + decode once, then replay with new queries, K/V and lengths written in place."""
    case = _gpu_case(19, 32, 8, 128, 32, [(1024, 1), (2048, 1), (512, 1)], torch.bfloat16,
                     torch.float8_e4m3fn).fill()
    q = case.q.clone()
    new_k = torch.zeros(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    new_v = torch.zeros_like(new_k)
    slots = torch.full((3,), -1, dtype=torch.int64, device="cuda")
    ctx = case.context_lens.clone()
    args = (case.k_cache, case.v_cache)

    def step():
        write_kv(new_k, new_v, *args, slots, case.k_scale, case.v_scale)
        return paged_decode_attention(q, *args, case.block_tables, ctx, 0.09, k_scale=case.k_scale,
                                      v_scale=case.v_scale, max_context_len=2048)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = case.block_tables.tolist()
    for lens in ([501, 1201, 65], [1024, 2000, 7], [3, 2048, 512]):  # all inside the allocated blocks
        # this step's token of sequence b lands at position lens[b]-1 of its shuffled blocks
        slot_list = [table[b][(n - 1) // 32] * 32 + (n - 1) % 32 for b, n in enumerate(lens)]
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype))
        new_k.copy_(torch.randn(new_k.shape, generator=gen, device="cuda").to(new_k.dtype))
        new_v.copy_(torch.randn(new_v.shape, generator=gen, device="cuda").to(new_v.dtype))
        slots.copy_(torch.tensor(slot_list, device="cuda"))
        ctx.copy_(torch.tensor(lens, dtype=torch.int32, device="cuda"))
        graph.replay()
        stored = case.k_cache.view(torch.int8).view(-1, 8, 128)[slots]  # the captured write_kv used the new slots
        expect = quantize_kv(new_k, torch.float8_e4m3fn, case.k_scale)
        assert torch.equal(stored, expect.view(torch.int8))
        want = paged_decode_attention_ref(q, *args, case.block_tables, ctx, 0.09, k_scale=case.k_scale,
                                          v_scale=case.v_scale)
        torch.testing.assert_close(out.float(), want.float(), **_tol(torch.bfloat16))
