"""A graphed greedy step's tail: the next token of every batch row and its next position, in two
launches (torch's argmax of one 128K-entry row runs in one reduction of ~28 us on an H200; the
copies behind it took two launches more).

    next_ids(logits, src, ids, pos)       ids[r] = argmax(logits[src[r]]), pos += 1, in place
    next_ids_ref(...)                      the same in torch (tests hold the kernel to it)

logits f32 [R, V]; src int64 [b] (a padding row repeats row 0's token); ids, pos int64 [b].
As torch.argmax: the first index of the largest value, NaN above everything, -0.0 == 0.0.
"""
from __future__ import annotations

import functools

import torch

from vattn.errors import VattnError
from vattn.kernels.common import check_runnable, next_pow2

BLOCK = 4096  # logits a first-stage program reduces: 32 programs a row for a 128K vocabulary


def next_ids_ref(logits, src, ids, pos):
    ids.copy_(logits.argmax(-1)[src])
    pos.add_(1)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def part(x, out, V, sx, C, BLOCK: tl.constexpr):
        # program (row, chunk): the chunk's best entry as one int64, value in the high word
        # (an int32 image ordered as the float), 2^32 - 1 - index in the low word (first index wins)
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        i = c * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x + r * sx + i, mask=i < V, other=float("-inf")) + 0.0  # -0.0 -> 0.0
        b = v.to(tl.int32, bitcast=True)
        key = tl.where(b < 0, b ^ 0x7FFFFFFF, b)
        key = tl.where(v != v, 0x7FFFFFFF, key)  # NaN: above +inf
        packed = (key.to(tl.int64) << 32) + (4294967296 - (i.to(tl.int64) + 1))  # (int64 constants only)
        tl.store(out + r * C + c, tl.max(packed, 0))

    @triton.jit
    def pick(parts, src, ids, pos, C, CP: tl.constexpr):
        r = tl.program_id(0)
        s = tl.load(src + r)
        c = tl.arange(0, CP)
        best = tl.max(tl.load(parts + s * C + c, mask=c < C, other=-(2 ** 63)), 0)
        low = best - ((best >> 32) << 32)
        tl.store(ids + r, 4294967296 - (low + 1))
        tl.store(pos + r, tl.load(pos + r) + 1)

    return part, pick


def next_ids(logits, src, ids, pos):
    """ids[r] = argmax(logits[src[r]]) and pos += 1, in place (module docstring)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise VattnError(f"logits must be f32 [R, V] with contiguous rows, got {logits.dtype} {tuple(logits.shape)}")
    b = src.shape[0]
    for name, t in (("src", src), ("ids", ids), ("pos", pos)):
        if t.dtype != torch.long or tuple(t.shape) != (b,) or t.stride(0) != 1:
            raise VattnError(f"{name} must be contiguous int64 [{b}], got {t.dtype} {tuple(t.shape)}")
    check_runnable(logits, src, ids, pos)
    rows, v = logits.shape
    c = -(-v // BLOCK)
    parts = torch.empty(rows, c, dtype=torch.long, device=logits.device)
    part, pick = _kernels()
    part[(rows, c)](logits, parts, v, logits.stride(0), c, BLOCK=BLOCK)
    pick[(b,)](parts, src, ids, pos, c, CP=max(2, next_pow2(c)))
