"""Bit-signature (SimHash) scoring and an exact top-k by histogram threshold.

    sign_bits(x [..., D], proj [D, 32*W]) -> int32 [..., W]   packed signs of x @ proj
    bit_scores_ref(qsig [B,Hq,T,W], ksig [B,Hkv,N,W], shared) -> int32 [B,H,T,N]
        agreement = sum over words of popcount(XNOR(q, k)); shared sums the G heads of a group
    bit_topk(qsig, ksig, k, lo, hi, shared) -> (indices int32 [B,H,T,k], count int32 [B,H,T],
                                               member uint8 [B,H,T,N])
        the k keys in [lo, hi[b]) with the largest agreement; -1 padding when fewer exist.

Scores are small integers (0..R*32*W), so top-k is a counting select: one pass stores a
histogram per program, a second pass sums its row's histograms (the exact threshold) and the
earlier programs' counts (its slot offsets) and writes the winners in position order (keys
above the threshold, then the first ties), with no atomics: the slot order is deterministic. It reads 4*W bytes per key, never K. `topk_launch` is the same select
with the query signature computed inside the kernels (fused), writing into a caller's buffer.
No host synchronisation anywhere.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError
from vattn.kernels._common import check_runnable, next_pow2


def sign_bits(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Pack the signs of x @ proj into int32 words (bit i of word w = sign of column 32*w + i)."""
    if proj.shape[-1] % 32 or proj.shape[0] != x.shape[-1]:
        raise VattnError(f"proj must be [D={x.shape[-1]}, 32*W], got {tuple(proj.shape)}")
    bits = (x.to(proj.dtype) @ proj) > 0
    W = proj.shape[-1] // 32
    bits = bits.view(*bits.shape[:-1], W, 32).to(torch.int64)
    word = (bits << torch.arange(32, device=x.device)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def bit_scores_ref(qsig, ksig, shared):
    B, Hq, T, W = qsig.shape
    Hkv = ksig.shape[1]
    G = Hq // Hkv
    x = qsig.view(B, Hkv, G, T, 1, W) ^ ksig.view(B, Hkv, 1, 1, -1, W)  # [B,Hkv,G,T,N,W]
    x = x.to(torch.int64) & 0xFFFFFFFF
    pc = torch.zeros_like(x)
    for i in range(32):
        pc += (x >> i) & 1
    agree = (32 * W - pc.sum(-1)).to(torch.int32)  # [B,Hkv,G,T,N]
    if shared:
        return agree.sum(2).to(torch.int32)
    return agree.reshape(B, Hq, T, -1)


def bit_topk_ref(qsig, ksig, k, lo, hi, shared):
    """Reference: scores, then torch.topk over [lo, hi[b]). Returns (indices, count)."""
    s = bit_scores_ref(qsig, ksig, shared).float()
    N = s.shape[-1]
    n = torch.arange(N, device=s.device)
    inr = (n >= lo) & (n.view(1, -1) < hi.view(-1, 1).long())  # [B, N]
    s = s.masked_fill(~inr[:, None, None], float("-inf"))
    val, idx = torch.topk(s, min(k, N), dim=-1)
    idx = torch.where(val > float("-inf"), idx, -1).to(torch.int32)
    return idx, (idx >= 0).sum(-1).to(torch.int32)


def _kernels():
    from vattn.kernels import _bits_triton as kt  # triton imported only here (GPU / interpreter)
    return kt.hist_kernel, kt.emit_kernel


def _check(qsig, ksig, k, hi, shared):
    if qsig.dim() != 4 or ksig.dim() != 4 or qsig.shape[-1] != ksig.shape[-1] or qsig.shape[0] != ksig.shape[0]:
        raise VattnError(f"qsig must be [B,Hq,T,W] and ksig [B,Hkv,N,W] with the same B and W, "
                         f"got {tuple(qsig.shape)} and {tuple(ksig.shape)}")
    if qsig.dtype != torch.int32 or ksig.dtype != torch.int32:
        raise VattnError(f"signatures must be int32 (use sign_bits), got {qsig.dtype} and {ksig.dtype}")
    if qsig.shape[1] % ksig.shape[1]:
        raise VattnError(f"query heads {qsig.shape[1]} must be a multiple of KV heads {ksig.shape[1]}")
    if hi.dtype != torch.int32 or hi.shape != (qsig.shape[0],):
        raise VattnError(f"hi must be int32 [B={qsig.shape[0]}], got {hi.dtype} {tuple(hi.shape)}")
    if k < 1:
        raise VattnError(f"k must be >= 1, got {k}")


def check_sig_inputs(name, q, k, ksig, proj):
    """The hash decode pipelines' shared checks: one query row, key signatures of k's shape."""
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if T != 1:
        raise VattnError(f"{name} handles one query row (T=1), got T={T}")
    if ksig.shape[:3] != (B, Hkv, N) or ksig.dtype != torch.int32 or proj.shape != (D, 32 * ksig.shape[-1]):
        raise VattnError(f"ksig must be int32 [B,Hkv,N,W] = {(B, Hkv, N)}+(W,) and proj f32 [D, 32*W], got "
                         f"{tuple(ksig.shape)} {ksig.dtype} and {tuple(proj.shape)}")


def split_rows(rows: int, n: int, block_n: int, device, most=32) -> tuple[int, int]:
    """(programs per row, keys per program): about 4 programs per SM in all, whole blocks each,
    at most `most` per row (the emit pass reads all of its row's histograms)."""
    from vattn.kernels._common import target_programs
    want = max(1, min(triton_cdiv(2 * target_programs(device), rows), triton_cdiv(n, block_n), most))
    span = triton_cdiv(triton_cdiv(n, want), block_n) * block_n
    return triton_cdiv(n, span), span


def topk_launch(q, qsig, proj, ksig, hi, k, lo, out, off, stride, *, shared, block_n=1024, cache=True,
                num_warps=4, lw=None, fixed=False, most=32):
    """Counting select into out[row*stride + off + slot]; q/proj (fused signature) or qsig.

    lw (optional, same layout as out) gets log-weight 0 at the written slots. fixed=True also
    writes the sinks [0, lo) and the window [hi, hi + off - lo) at slots [0, off).
    Returns (count int32 [rows], member uint8 [rows, N], thr int32 [rows]): key n in [lo, hi)
    is a winner iff member[row, n] > thr[row] (member is not written elsewhere). Two device ops:
    the histogram pass (one histogram per program) and the emit pass; slot order is deterministic.
    """
    hist_kernel, emit_kernel = _kernels()
    fuse = qsig is None
    src = q if fuse else qsig
    B, Hq, T = src.shape[:3]
    Hkv, N, W = ksig.shape[1], ksig.shape[2], ksig.shape[3]
    G = Hq // Hkv
    H, R = (Hkv, G) if shared else (Hq, 1)
    rows = B * H * T
    top = R * 32 * W
    # bins [0, NH) plus one count of scores >= NH: half the width when the top score is a power of two
    NH = top if top & (top - 1) == 0 else next_pow2(top + 1)
    dev = ksig.device
    splits, span = split_rows(rows, N, block_n, dev, most)
    work = torch.empty(rows * splits * (NH + 1), dtype=torch.int32, device=dev)
    hist, tops = work[:rows * splits * NH], work[rows * splits * NH:]
    member = torch.empty((rows, N), dtype=torch.uint8, device=dev)
    cnt = torch.empty((2, rows), dtype=torch.int32, device=dev)
    cnt, thr = cnt[0], cnt[1]
    if fuse:
        D = q.shape[-1]
        sq = (q.stride(0), q.stride(1), q.stride(2))
        qs_arg, q_arg, proj_arg = ksig, q, proj
    else:
        D, sq = 16, (0, 0, 0)
        qs_arg, q_arg, proj_arg = qsig, qsig, qsig
    from vattn.kernels._common import interpret
    meta = dict(G=G, R=R, W=W, D=D, RWP=max(2, next_pow2(R * W)), NH=NH, BN=block_n, FUSEQ=fuse,
                HW=not interpret(), CACHE=cache and top < 256, num_warps=num_warps)
    hist_kernel[(rows, splits)](q_arg, qs_arg, proj_arg, ksig, hi, hist, tops, member, lo, H, Hkv, T, N, span, *sq,
                                **meta)
    emit_kernel[(rows, splits)](q_arg, qs_arg, proj_arg, ksig, hi, hist, tops, out, out if lw is None else lw, cnt, thr,
                                member, lo, H, Hkv, T, N, span, *sq, k, off, stride, WLW=lw is not None,
                                SPP=max(2, next_pow2(splits)), FIX=max(16, next_pow2(off)) if fixed else 0, **meta)
    return cnt, member, thr


def bit_topk(qsig, ksig, k: int, lo: int, hi: torch.Tensor, shared: bool, *, block_n=1024, cache=True, most=32):
    """Top-k keys by bit agreement in [lo, hi[b]) (see module docstring)."""
    _check(qsig, ksig, k, hi, shared)
    check_runnable(qsig, ksig, hi)
    qsig, ksig = qsig.contiguous(), ksig.contiguous()
    B, Hq, T, W = qsig.shape
    Hkv, N = ksig.shape[1], ksig.shape[2]
    H = Hkv if shared else Hq
    out = torch.full((B * H * T, k), -1, dtype=torch.int32, device=qsig.device)
    cnt, member, thr = topk_launch(None, qsig, None, ksig, hi, k, lo, out, 0, k, shared=shared, block_n=block_n,
                                   cache=cache, most=most)
    # member is written on [lo, hi[b]) only: 0/1 there, 0 elsewhere
    n = torch.arange(N, device=qsig.device)
    inr = ((n >= lo) & (n < hi.view(-1, 1))).repeat_interleave(H * T, 0)
    member = ((member > thr.view(-1, 1)) & inr).to(torch.uint8)
    return out.view(B, H, T, k), cnt.view(B, H, T), member.view(B, H, T, N)


def triton_cdiv(a, b):
    return (a + b - 1) // b
