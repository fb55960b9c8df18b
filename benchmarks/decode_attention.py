"""One new token's attention over the KV cache as two Triton kernels: an experiment for issue #11's batch-1 target.

A decode graph's attention is three kernels a layer today (``lower_decode_step``: two cuBLAS GEMMs around a
fused mask-and-softmax, 7.1 us a layer on the H100, run AD of docs/llm.md), a share of a token the H200's
bandwidth does not shrink. Here: ``_partial`` runs one program per (row, key/value head, 64 cache slots),
the head's grouped queries as the rows of one ``tl.dot`` against those slots' keys, masked, exponentiated
against the block's own maximum and multiplied into the values; ``_combine`` runs one program per query row
and merges the blocks by their maxima (flash decoding's split over the slots). Scores, maxima and sums are
fp32; the probabilities meet the values in the values' dtype with fp32 accumulation, as the GEMM form's do.

``torch.ops.mpcompiler_bench.decode_attention(q, k, v, visible, scale)``: q [B, H, M, D] (M: the head's
grouped queries), k and v [B, H, S, D], visible [B, 1 or H, M, S] bool; D a power of two, at least 16; fp16 or
bf16 (fp32 runs, but Triton's fp32 ``tl.dot`` rounds its inputs to TF32 on the GPU).
Inductor compiles it into the decode graph (``torch.library.triton_op``); off the GPU the same math runs
in torch. ``TRITON_INTERPRET=1`` runs the kernels on the CPU, for checking them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_S = 64  # cache slots a program reads: 576 slots are 9 programs a key/value head


@triton.jit
def _partial(q, k, v, seen, acc, stats, H, M, S, scale,
             sqb, sqh, sqm, sqd, skb, skh, sks, skd, svb, svh, svs, svd, smb, smh, smm, sms,
             BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):  # fmt: skip
    bh, block = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    m = tl.arange(0, BLOCK_M)
    s = block * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    rows, slots = m[:, None] < M, s[:, None] < S
    qs = tl.load(q + b * sqb + h * sqh + m[:, None] * sqm + d[None, :] * sqd, mask=rows, other=0.0)
    ks = tl.load(k + b * skb + h * skh + s[:, None] * sks + d[None, :] * skd, mask=slots, other=0.0)
    vs = tl.load(v + b * svb + h * svh + s[:, None] * svs + d[None, :] * svd, mask=slots, other=0.0)
    visible = tl.load(seen + b * smb + h * smh + m[:, None] * smm + s[None, :] * sms,
                      mask=rows & (s[None, :] < S), other=0) != 0  # fmt: skip
    scores = tl.where(visible, tl.dot(qs, tl.trans(ks)) * scale, float("-inf"))
    top = tl.max(scores, 1)
    p = tl.where(visible, tl.exp(scores - tl.where(top == float("-inf"), 0.0, top)[:, None]), 0.0)
    out = (bh * tl.num_programs(1) + block) * BLOCK_M + m  # this block's rows in the scratch buffers
    tl.store(acc + out[:, None] * D + d[None, :], tl.dot(p.to(vs.dtype), vs))
    tl.store(stats + out * 2, top)
    tl.store(stats + out * 2 + 1, tl.sum(p, 1))


@triton.jit
def _combine(acc, stats, o, H, M, BLOCKS, sob, soh, som, sod,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)  # one query row: (b, h, m)
    bh, m = row // M, row % M
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    at = (bh * BLOCKS + n) * BLOCK_M + m  # the row in each of its head's blocks
    blocks = n < BLOCKS
    top = tl.load(stats + at * 2, mask=blocks, other=float("-inf"))
    total = tl.load(stats + at * 2 + 1, mask=blocks, other=0.0)
    parts = tl.load(acc + at[:, None] * D + d[None, :], mask=blocks[:, None], other=0.0)
    weight = tl.exp(top - tl.max(top, 0))  # a block that saw no slot weighs 0
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(total * weight, 0)
    b, h = bh // H, bh % H
    tl.store(o + b * sob + h * soh + m * som + d * sod, out.to(o.dtype.element_ty))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """The two kernels on ``q``'s device (the CPU under ``TRITON_INTERPRET=1``)."""
    batch, heads, rows, dim = q.shape
    slots = k.shape[2]
    blocks, block_m = triton.cdiv(slots, BLOCK_S), max(16, triton.next_power_of_2(rows))
    acc = torch.empty(batch * heads * blocks * block_m, dim, device=q.device, dtype=torch.float32)
    stats = torch.empty(batch * heads * blocks * block_m, 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    seen = visible.expand(batch, heads, rows, slots)
    wrap_triton(_partial)[(batch * heads, blocks)](
        q, k, v, seen, acc, stats, heads, rows, slots, scale, *q.stride(), *k.stride(), *v.stride(), *seen.stride(),
        BLOCK_M=block_m, BLOCK_S=BLOCK_S, D=dim, num_warps=4,
    )  # fmt: skip
    wrap_triton(_combine)[(batch * heads * rows,)](
        acc, stats, out, heads, rows, blocks, *out.stride(),
        BLOCK_M=block_m, BLOCK_N=triton.next_power_of_2(blocks), D=dim, num_warps=2,
    )  # fmt: skip
    return out


def reference(q, k, v, visible, scale) -> torch.Tensor:
    """The same attention in torch: fp32 scores and softmax, the probabilities in v's dtype."""
    scores = (q.float() @ k.float().transpose(-2, -1) * scale).masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1).to(v.dtype).float() @ v.float()).to(q.dtype)


@triton_op("mpcompiler_bench::decode_attention", mutates_args={})
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """The op Inductor compiles into a decode graph (it traces the launches as its own user kernels)."""
    return launch(q, k, v, visible, scale)


decode_attention.register_kernel("cpu")(reference)
