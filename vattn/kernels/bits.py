"""Bit signatures (SimHash) of the scan pipeline, and their torch scoring.

    sign_bits(x [..., D], proj [D, 32*W]) -> int32 [..., W]   packed signs of x @ proj
    bit_scores_ref(qsig [B,Hq,T,W], ksig [B,Hkv,N,W], shared) -> int32 [B,H,T,N]
        agreement = sum over words of popcount(XNOR(q, k)); shared sums the G heads of a group

Scores are small integers (0..G*32*W): the scan kernels histogram them to cut an
approximate top-k, reading 4*W bytes per key, never K (kernels/scan.py).
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError


def sign_bits(x: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Pack the signs of x @ proj into int32 words (bit i of word w = sign of column 32*w + i)."""
    if proj.shape[-1] % 32 or proj.shape[0] != x.shape[-1]:
        raise VattnError(f"proj must be [D={x.shape[-1]}, 32*W], got {tuple(proj.shape)}")
    bits = (x.to(proj.dtype) @ proj) > 0
    W = proj.shape[-1] // 32
    bits = bits.view(*bits.shape[:-1], W, 32).to(torch.int64)
    word = (bits << torch.arange(32, device=x.device)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


_M1, _M2, _M4 = 0x55555555, 0x33333333, 0x0F0F0F0F


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of the low 32 bits of each int64 element (SWAR)."""
    x = x & 0xFFFFFFFF
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def bit_scores_ref(qsig, ksig, shared):
    B, Hq, T, W = qsig.shape
    Hkv = ksig.shape[1]
    G = Hq // Hkv
    x = qsig.view(B, Hkv, G, T, 1, W).long() ^ ksig.view(B, Hkv, 1, 1, -1, W).long()  # [B,Hkv,G,T,N,W]
    agree = (32 * W - popcount(x).sum(-1)).to(torch.int32)  # [B,Hkv,G,T,N]
    if shared:
        return agree.sum(2).to(torch.int32)
    return agree.reshape(B, Hq, T, -1)
