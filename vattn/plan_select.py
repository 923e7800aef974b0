"""The selections the kernel paths of vattn.plan build on the device, sync-free: the sink/window
front of a step, and the topk, hashtopk and quest parts after it (each makes its reference
method's choices; tests/test_plan_paths.py). Every width is a host number (from N and the spec).

topk, hashtopk and quest run the Triton selection kernels (kernels/select.py: scores read K in
place, or the keys' bit signatures (kernels/bits.py), a top-k select, the Selection written with
the front in place); on CPU tensors, under the Triton interpreter. They keep a row's largest
entries with ties to the lowest positions, as the reference methods do (kernels.select.topk_ref):
the reference methods are their twins."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vattn.kernels.bits import hash_scores
from vattn.kernels.quest import bound_pages as bound_pages_kernel
from vattn.kernels.select import attn_scores, page_scores, select_top
from vattn.methods.base import host_size, resolve_size
from vattn.selection import Selection
from vattn.spec import Spec

# page scores per loop step of the select's programs: shorter rows than top-k's, so smaller
# steps and more programs a row (H200, B=1 32K engine step 6.66 -> 6.56 ms against 1024; B=16 equal)
PAGE_BLOCK = 256


@dataclass
class Front:
    """What sink/window choose per row (r = [B, T]), built on the device from host sizes.

    idx int64 [B, T, W] (W = the widest front a buffer of N keys allows; -1 padding), count
    [B, T], and [lo, hi): the row's keys the front left (the keys later parts rank)."""
    idx: torch.Tensor
    count: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    length: torch.Tensor
    memo: dict = field(default_factory=dict)  # what the layers of a step derive from the front alone

    def sizes(self, size, page: int = 1) -> torch.Tensor:
        """int64 [B, T]: a part's size for each row's length (resolve_size), in pages of `page`
        keys rounded up; once per step."""
        key = ("size", type(size).__name__, size, page)
        if key not in self.memo:
            got = resolve_size(size, self.length)
            self.memo[key] = got if page == 1 else torch.div(got + page - 1, page, rounding_mode="floor")
        return self.memo[key]

    def zeros(self, shape, device) -> torch.Tensor:
        """f32 zeros of `shape`: the log-weights of exact keys, one tensor for a step's layers
        (no one writes them)."""
        key = ("zeros", tuple(shape))
        if key not in self.memo:
            self.memo[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        return self.memo[key]

    def selection(self, k) -> Selection:
        """The front alone: shared [B, Hkv, T, W]."""
        b, t, w = self.idx.shape
        expand = (b, k.shape[1], t, w)
        return Selection(self.idx[:, None].expand(expand).to(torch.int32).contiguous(),
                         torch.zeros(expand, dtype=torch.float32, device=k.device),
                         self.count[:, None].expand(b, k.shape[1], t).to(torch.int32).contiguous(), shared=True)


def front_sizes(spec: Spec) -> tuple:
    """(sink size, window size) of a spec's front (0 where it has none)."""
    return tuple(next((p.n for p in spec.parts if p.name == name), 0) for name in ("sink", "window"))


def front_ranges(sink, win, k, starts, ends) -> Front:
    """Row r (length L = end - start): the first ks = size(sink, L) keys, then the last
    kw = min(size(window, L), L - ks) keys; no key twice (the reference's chosen-set rule)."""
    n = k.shape[2]
    kmax = host_size(sink, n) + host_size(win, n)
    length = (ends - starts[:, None]).clamp(min=0)  # [B, T]
    ks = resolve_size(sink, length)
    kw_all = resolve_size(win, length)
    kw = torch.minimum(kw_all, length - ks)
    j = torch.arange(kmax, device=k.device)
    idx = torch.where(j < ks[..., None], starts[:, None, None] + j, ends[..., None] - 1 - (j - ks[..., None]))
    count = ks + kw
    idx = torch.where(j < count[..., None], idx, -1)
    return Front(idx, count, starts[:, None] + ks, ends - kw_all, length)


def step_front(spec: Spec, k, ctx) -> Front:
    """The sink/window front of a spec, built once per step (ctx: plan.StepContext; every layer
    shares it through ctx.memo)."""
    sink, win = front_sizes(spec)
    key = ("front", sink, win, tuple(k.shape))
    return ctx.memo.get(key) or ctx.memo.setdefault(key, front_ranges(sink, win, k, ctx.starts, ctx.ends))


def streaming_selection(spec: Spec, k: torch.Tensor, starts, ends) -> Selection:
    """sink/window index ranges built on the device: shared [B, Hkv, T, K] with K fixed by
    the key buffer's length N (a host number), so nothing waits for the GPU."""
    return front_ranges(*front_sizes(spec), k, starts, ends).selection(k)


def _below_end(end, pos):
    """(row [B], position [B, ...]) to read for positions pos [B or 1, ...]: a position at or
    past its row's end reads the row's last key, and a row without keys reads the row with
    the most, so nothing past a row's end is read (a paged cache may map nothing there)."""
    src = torch.where(end > 0, torch.arange(end.shape[0], device=end.device), end.argmax())
    last = (end[src] - 1).clamp(min=0).view(-1, *([1] * (pos.dim() - 1)))
    return src, torch.minimum(pos, last).clamp(min=0)


def topk_selection(spec: Spec, q, k, starts, ends, scale: float, front: Front) -> Selection:
    """[sink+][window+]topk(k) on the device, per query head: [B, Hq, T, K], K = min(N,
    front width + size(k, N)) (host numbers).

    The oracle part's rule (methods/oracle.py): exact scores (float32), keys outside [lo, hi)
    (not in the row, or chosen by sink/window) at -inf, a row keeps its size(k, L) largest
    finite ones, ties to the lowest positions (kernels.select.topk_ref)."""
    return _top_selection(spec.parts[-1].k, q, k, front, lambda: attn_scores(q, k, front.lo, front.hi, scale))


def hashtopk_selection(spec: Spec, q, k, sig, proj, front: Front, lengths=None) -> Selection:
    """[sink+][window+]hashtopk(k, bits, proj='random'[, share]) on the device, per query head (per
    KV head with share='kv': the summed agreement of the group's heads), as
    topk_selection with the bit agreement of the query's signature (signed in the kernel by
    the layer's projection proj [D, 32 W]) and the keys' (sig, kept by the plan) for scores:
    the hashtopk part's rule (methods/hashing.py), ties to the lowest positions. lengths int32
    [B]: the scores kernel also signs each row's newest key (in the window: Plan._kernel_signs)."""
    part = spec.parts[-1]
    g = q.shape[1] // k.shape[1] if part.share == "kv" else 1  # share='kv': the group's summed agreement
    sign = None if lengths is None else (k, lengths)

    def scores():
        return hash_scores(q, sig, proj, front.lo, front.hi, k.shape[2], part.bits, shared=g > 1, sign=sign)

    return _top_selection(part.k, q, k, front, scores, levels=g * part.bits + 1, shared=part.share == "kv")


def _top_selection(size, q, k, front: Front, scores, levels: int = 0, shared: bool = False) -> Selection:
    """The front, then each row's size(size, L) largest finite scores() f32 [B, H, T, N]
    (H: Hq, or Hkv when shared; levels: select_top's, for integer scores)."""
    b, hq, t, _ = q.shape
    n = k.shape[2]
    kt = host_size(size, n)
    width = min(n, front.idx.shape[-1] + kt)
    if width == 0:
        return Selection.empty(b, k.shape[1] if shared else hq, t, q.device, shared)
    idx, count = select_top(scores(), front.sizes(size), kt, width=width, front=(front.idx, front.count),
                            levels=levels)
    return Selection(idx, front.zeros(idx.shape, q.device), count, shared)


def quest_selection(spec: Spec, q, k, starts, ends, scale: float, pages, front: Front) -> Selection:
    """[sink+][window+]quest(budget, page) on the device, per query head (per KV head with
    share='kv'): [B, Hq or Hkv, T, K], K =
    min(N, front width + (pages(budget, N) + 1) * page) (host numbers).

    The quest part's rule (methods/quest.py): bounds U of the pages (pages: Plan._pages), a
    page ranks when it holds a key in [lo, hi) (in the row, not chosen by sink/window) and is
    not the row's last page, a row keeps its ceil(size(budget, L) / page) pages of largest
    finite U, ties to the lowest pages (kernels.select.topk_ref); the last page and those
    pages give their keys in [lo, hi)."""
    b, hq, t, _ = q.shape
    n = k.shape[2]
    part = spec.parts[-1]
    sz = part.page
    p = -(-n // sz)
    kp = min(-(-host_size(part.budget, n) // sz), p)
    width = min(n, front.idx.shape[-1] + (kp + 1) * sz)
    rank = page_scores(q, pages, front.lo, front.hi, ends, scale, sz, p)
    shared = part.share == "kv"  # one row of pages per KV head (Quest.share), grouped in the select
    idx, count = select_top(rank, front.sizes(part.budget, sz), kp, width=width, front=(front.idx, front.count),
                            page=sz, lo=front.lo, hi=front.hi, ends=ends, starts=starts, block=PAGE_BLOCK,
                            group=hq // k.shape[1] if shared else 1)
    return Selection(idx, front.zeros(idx.shape, q.device), count, shared)


def page_shape(k) -> tuple:
    return (k.shape[0], k.shape[1], k.shape[3], k.dtype)


@dataclass
class PageUpdate:
    """Which pages a step bounds again and where their keys are: the same for every layer of a
    step (Plan._pages builds it once a step), so a layer adds only its own gather and bounds."""
    src: torch.Tensor  # [B]: the row each batch row reads (_below_end)
    safe: torch.Tensor  # [B, J, S]: the positions it reads
    seen: torch.Tensor  # [B, J, S]: position in [starts, end)
    where: torch.Tensor  # [B, J]: the page written (the scratch page where not ok)


def page_update(pid, ok, starts, end, s: int, scratch: int) -> PageUpdate:
    """Pages pid [B, J] of s keys, each bounded over its row's keys in [starts[b], end[b]) where
    ok[b, j]; the rest write page `scratch`. An ok page holds at least one such key (Plan._pages:
    the page starts below end and ends above starts), so no bound written stays at +-inf."""
    pos = pid[..., None] * s + torch.arange(s, device=pid.device)  # [B, J, S]
    vis = (pos >= starts[:, None, None]) & (pos < end[:, None, None])
    src, safe = _below_end(end, pos)
    return PageUpdate(src, safe, vis, torch.where(ok, pid, scratch))


def bound_pages(pages, k, up: PageUpdate):
    """pages[b, :, up.where[b, j]] = (min, max) of that page's visible keys (kernels/quest.py)."""
    bound_pages_kernel(pages, k, up.src, up.safe, up.seen, up.where)
