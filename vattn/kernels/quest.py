"""Quest's page bounds kept up to date on the device: each step bounds again the few pages it
touched (plan_select.page_update says which, and where their keys are), for every KV head of a
layer, in one launch (the torch twin took five: gather, two masked fills, min and max, scatter).

    bound_pages(pages, k, src, safe, seen, where)      in place
    bound_pages_ref(...)                              the same in torch (tests hold the kernel to it)

pages [B, Hkv, P, D, 2] in k's dtype (min, max of each page's visible keys: exact there, and half
the bytes of f32 for a bf16 cache, which Quest's page scores read every step); k [B, Hkv, N, D]; for each
batch row b and touched page j: src [B] the row read, safe [B, J, S] the positions read, seen
bool [B, J, S] which of them are visible, where [B, J] the page written. A page's bound is over
its visible keys only (+inf / -inf where none is: the scratch page of pages that must not land).
"""
from __future__ import annotations

import functools

import torch

from vattn.errors import VattnError
from vattn.kernels.common import check_runnable, next_pow2


def bound_pages_ref(pages, k, src, safe, seen, where):
    b, hkv, _, d = k.shape
    keys = k[src[:, None, None], :, safe].permute(0, 3, 1, 2, 4).float()  # [B, Hkv, J, S, D]
    vis = seen[:, None, :, :, None]
    kmin = keys.masked_fill(~vis, float("inf")).amin(3)
    kmax = keys.masked_fill(~vis, float("-inf")).amax(3)
    new = torch.stack([kmin, kmax], -1).to(pages.dtype)  # [B, Hkv, J, D, 2]
    pages.scatter_(2, where[:, None, :, None, None].expand(b, hkv, where.shape[1], d, 2), new)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bound(pages, k, src, safe, seen, where, spb, sph, spp, skb, skh, skn, J, S, SP: tl.constexpr,
              D: tl.constexpr):
        # program (b * J + j, kv head): the page's S keys, their min and max over the visible ones
        bj = tl.program_id(0)
        h = tl.program_id(1).to(tl.int64)
        b = bj // J
        o = tl.arange(0, SP)
        ok = o < S
        row = tl.load(src + b).to(tl.int64)
        pos = tl.load(safe + bj.to(tl.int64) * S + o, mask=ok, other=0).to(tl.int64)
        vis = tl.load(seen + bj.to(tl.int64) * S + o, mask=ok, other=0) != 0
        d = tl.arange(0, D)
        kk = tl.load(k + row * skb + h * skh + pos[:, None] * skn + d[None, :], mask=ok[:, None], other=0.0)
        kk = kk.to(tl.float32)
        kmin = tl.min(tl.where(vis[:, None], kk, float("inf")), 0)
        kmax = tl.max(tl.where(vis[:, None], kk, float("-inf")), 0)
        w = tl.load(where + bj).to(tl.int64)
        base = pages + b.to(tl.int64) * spb + h * sph + w * spp + d * 2
        tl.store(base, kmin.to(pages.dtype.element_ty))
        tl.store(base + 1, kmax.to(pages.dtype.element_ty))

    return bound


def bound_pages(pages, k, src, safe, seen, where):
    """pages[b, :, where[b, j]] = (min, max) of the visible keys of that page (module docstring)."""
    b, hkv, _, d = k.shape
    if pages.dim() != 5 or tuple(pages.shape[:2]) != (b, hkv) or pages.shape[3:] != (d, 2) or \
            pages.dtype != k.dtype or pages.stride(4) != 1 or pages.stride(3) != 2:
        raise VattnError(f"pages must be {k.dtype} (k's dtype) [B, Hkv, P, D, 2] = [{b}, {hkv}, P, {d}, 2] with "
                         f"contiguous (D, 2), got {pages.dtype} {tuple(pages.shape)}")
    j, s = safe.shape[1], safe.shape[2]
    if tuple(where.shape) != (b, j) or tuple(seen.shape) != (b, j, s) or tuple(src.shape) != (b,):
        raise VattnError(f"src [B], safe/seen [B, J, S], where [B, J] must agree: got {tuple(src.shape)}, "
                         f"{tuple(safe.shape)}, {tuple(seen.shape)}, {tuple(where.shape)}")
    if k.stride(3) != 1 or d & (d - 1):
        raise VattnError(f"k needs a contiguous head dim of a power of two, got shape {tuple(k.shape)}")
    if b * j * hkv == 0:
        return
    check_runnable(pages, k)
    _kernel()[(b * j, hkv)](pages, k, src.contiguous(), safe.contiguous(), seen.contiguous(), where.contiguous(),
                            pages.stride(0), pages.stride(1), pages.stride(2), k.stride(0), k.stride(1), k.stride(2),
                            j, s, SP=max(2, next_pow2(s)), D=d)
