"""Top-k selection on the GPU: exact scores, Quest page bounds, a row-wise radix select and the
Selection it writes, for vattn.plan's topk-kernel and quest-kernel paths (plan_select.py).

    attn_scores(q, k, lo, hi, scale)         f32 [B, Hq, T, N]: scale * q.k, -inf outside [lo, hi)
    page_scores(q, pages, lo, hi, ends, scale, page, n_pages)
                                             f32 [B, Hq, T, P]: Quest's bound of each page that ranks
    select_top(scores, k, kmax, ...)         int32 [B, H, T, W] positions (valid first, -1 padding)
                                             + int32 count [B, H, T]
    topk_ref(x, k)                           the rule, in torch (the CPU reference paths use it)

The rule: a row keeps its k_r = min(k[b, t], kmax) largest entries that are neither -inf nor
NaN (+inf ranks highest, -0.0 ties with +0.0); among equal entries at the threshold the lowest
positions are kept. It fixes the chosen SET (a stable descending sort's first k_r: topk_ref),
so the kernels and the torch references pick the same keys, ties included.

Design (no sort, no host sync, every shape from host numbers so a CUDA graph captures it):
 1. scores: grid (B * Hkv, row blocks, key blocks). The G query heads (times the T rows) of a KV
    head share each K tile in the M dim of tl.dot (padded to 16); K is read in place, only at
    positions in some row's [lo, hi) (nothing at or past a row's end: a vmem cache maps nothing
    there), float32 accumulation, then * scale (the reference's exact_scores order).
    page_scores: the same grid over pages (64 a program): q+ . max + q- . min (methods.quest) as one
    tl.dot of (min(q, 0), max(q, 0)) interleaved against the pages' interleaved (min, max).
 2. candidate lists (top-k rows, when a list is under half a row): a `floor` program per row
    takes SAMPLE entries at the midpoints of equal strata, and two 8-bit histograms give the
    16-bit prefix of their w-th largest, w (w_floor) set so that the row's k_r-th largest lies
    below the floor only at Z standard deviations of the count above it; `count` (programs over
    chunks of the row) counts the entries at or above the floor, `compact` writes them, values
    and positions, into the row's list in position order. A row whose list would hold fewer
    than k_r entries (and not every candidate) or overflow its width selects from its whole
    row: the same keys either way, since every entry at or above the k_r-th is listed in order.
    The select passes below then read ~1.5 k_r entries a row instead of N.
 3. the threshold, over the order-preserving uint32 image u of each score (NaN, -inf -> 0: no
    candidate). Rows of at most ROW_MAX entries (candidate lists, Quest's pages): one `bisect`
    program a row, the row in registers, bisects u for the k_r-th largest (a count a round, done
    when a count hits k_r) and writes what the radix passes below leave: (thr, eq_take) and each
    emit chunk's offsets (one launch, not four: H200, Quest's select B=1 32K 22.1 -> 10.9 us, B=8
    128K 100.6 -> 46.3; top-k's 46.2 -> 35.6 / 314.5 -> 247.8, the same keys). A top-k row that
    lost its list is streamed each round. Longer rows: radix select, four launches of one 8-bit
    digit each, high to low. Each row is split over P
    programs (about 8 programs per SM in all, so the 32 rows of B=1 still fill the GPU; splits
    overrides); program (row, j) histograms (tl.histogram, 256 bins) the digit of the entries of
    its chunk whose higher bits equal the prefix found so far, stores its histogram (no atomics
    on bins) and bumps the row's counter (acq_rel); the last program to arrive sums the P
    histograms (RESOLVE_TILE at a time), picks the digit where the count from the top reaches
    the rank still wanted, extends the prefix and zeroes the counter (kernels.common.
    zeroed_counters: no memset). Pass 1 fixes k_r = min(k, kmax, candidates); k_r = 0 or every
    candidate is done at once and the middle passes skip the row. After pass 4 a row's state is
    (thr, eq_take): take u > thr, and the first eq_take entries with u == thr in position order.
    The last resolver also turns the programs' histograms into each chunk's output offset
    (entries taken, and entries equal to thr, before the chunk), so the writer needs no
    cross-program scan. 8-bit digits: tl.histogram costs each warp about bins / 32 operations
    per element it bins (8 per thread here, 64 with 11-bit digits), so four cheap passes beat
    three dear ones; that cost, over whole rows, was the select's time before the lists.
 4. emit: program (row, j) walks its chunk again, takes by (thr, eq_take) with in-block prefix
    sums, and writes the final Selection row: the front's keys (sink, window: copied), for
    Quest the row's last page, then the taken positions in position order (a page: its keys
    in [lo, hi); only the first and the last candidate page can be partial, and the resolver
    counts them in the offsets), then -1 padding and the count.
Launches per call: scores 1, lists 3 (top-k), select 1 (bisect) or 4 (radix), emit 1. The score matrix (4 bytes per
query head and key) is written once and read twice by the lists (five times without them); the
score kernel reads K once (2 * D bytes per KV head and key). Quest ranks pages (N / page
entries a row) and takes no lists.
"""
from __future__ import annotations

import functools
import math

import torch

from vattn.errors import VattnError
from vattn.kernels.common import (check_dtype, check_runnable, load_online, next_pow2, target_programs,
                                  use_ieee, zeroed_counters)

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
NB = 256  # bins of a radix pass: 8 bits
PASSES = ((24, 8), (16, 8), (8, 8), (0, 8))  # (shift, bits) of the four digits, high to low
NEG = float("-inf")
SAMPLE = 4096  # stratified entries a row's floor is drawn from (a power of two)
Z = 6.0  # the floor's margin: standard deviations of the count above it (w_floor)
RESOLVE_TILE = 16  # program histograms a row's resolver loads at once
BLOCK = 1024  # entries per loop step of the select programs (tests shrink it to get several programs)
ROW_MAX = 32768  # rows (lists, Quest pages) up to this many entries: one bisection program each (tests: 0)


# -- the rule, in torch --------------------------------------------------------------------
def topk_ref(x: torch.Tensor, k: int):
    """(values, indices) of the k largest entries along the last dim, largest first, ties
    broken by the lower position (a stable descending sort); NaN ranks as -inf. k <= size."""
    x = torch.where(torch.isnan(x), NEG, x)
    if x.device.type == "cpu" and 0 < 4 * k < x.shape[-1]:
        got = _topk_cpu(x, k)
        if got is not None:
            return got
    vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def _topk_cpu(x: torch.Tensor, k: int):
    """topk_ref through torch.topk (a stable sort of 4K entries costs ~20x more on the CPU, where
    the reference methods run per layer): exact when no row leaves out an entry equal to its
    k-th value (the set is then fixed); else None, for the sort. The k taken are ordered by
    position, then stably by value: the sort's order. (A host read: the CPU only.)"""
    v, i = torch.topk(x, k, dim=-1)
    thr = v[..., -1:]
    if not torch.equal((v == thr).sum(-1), (x == thr).sum(-1)):
        return None
    idx = torch.sort(i, dim=-1).values
    vals = x.gather(-1, idx)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, order), idx.gather(-1, order)


def group_scores_ref(scores: torch.Tensor, g: int) -> torch.Tensor:
    """f32 [B, Hq, T, N] -> [B, Hq / g, T, N]: the rule of a selection shared by the g query heads
    of a KV head (share='kv'). Each head's scores are shifted so its largest finite entry is 0
    (heads differ in scale and offset; a shift leaves a head's softmax as it is), then each entry
    takes its largest over the group: a key ranks by the most any head of the group weighs it
    against that head's best. NaN counts as -inf; a head without finite entries is not shifted."""
    s = torch.where(torch.isnan(scores), NEG, scores)
    m = torch.where(torch.isfinite(s), s, NEG).amax(-1, keepdim=True)
    s = s - torch.where(m > NEG, m, 0.0)
    b, hq, t, n = s.shape
    return s.reshape(b, hq // g, g, t, n).amax(2)


def select_top_ref(scores: torch.Tensor, k: torch.Tensor, kmax: int):
    """select_top's reference without front or pages: (positions int32 [B, H, T, kmax] in
    position order, -1 padding; count int32 [B, H, T])."""
    vals, idx = topk_ref(scores, kmax)
    want = k.long().clamp(0, kmax)[:, None, :, None]
    ok = (torch.arange(kmax, device=scores.device) < want) & (vals > NEG)
    n = scores.shape[-1]
    pos = torch.sort(torch.where(ok, idx, n), dim=-1).values
    return torch.where(pos < n, pos, -1).to(torch.int32), ok.sum(-1).to(torch.int32)


# -- kernels -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    load_online(globals())

    @triton.jit
    def ukey(x):
        # order-preserving uint32 image of float32 x; -0.0 as +0.0; NaN and -inf -> 0 (not candidates;
        # every candidate's image is >= 0x00800000)
        x = tl.where(x == 0.0, 0.0, x)
        b = x.to(tl.uint32, bitcast=True)
        u = tl.where((b >> 31) != 0, ~b, b | 0x80000000)
        return tl.where(x > float("-inf"), u, tl.zeros_like(u))

    @triton.jit
    def keys_at(row, n, stop):
        # key images of row[n] (a block of positions), none (0) at or past stop
        return _ukey(tl.load(row + n, mask=n < stop, other=float("-inf")))

    globals().update(_ukey=ukey, keys_at=keys_at)

    @triton.jit
    def row_k(kr, r, HT, T, KMAX):
        # selection row r's wanted count min(k[b, t], KMAX), at least 0
        return tl.maximum(tl.minimum(tl.load(kr + (r // HT) * T + r % T).to(tl.int32), KMAX), 0)

    @triton.jit
    def top_digit(h, want):
        # (the largest digit v whose entries from v up number at least `want` (0 when none do), the
        # entries above that digit) of a histogram h over digits
        ge = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # entries with digit >= v
        dig = tl.maximum(tl.sum((ge >= want).to(tl.int32), 0) - 1, 0)
        return dig, tl.sum(tl.where(tl.arange(0, h.shape[0]) == dig, ge - h, 0), 0)

    globals().update(row_k=row_k, top_digit=top_digit)

    @triton.jit
    def group_rows(q, sqb, sqh, sqt, HKV, T, GT, G: tl.constexpr, MR: tl.constexpr, D: tl.constexpr):
        # the program's batch row b, KV head jh and its block of MR of the G*T query rows (query
        # head hq, row t, in range mok); their queries qq [MR, D] (0 out of range)
        bj = tl.program_id(0)
        b = bj // HKV
        jh = bj % HKV
        m = tl.program_id(1) * MR + tl.arange(0, MR)
        mok = m < GT
        t = m % T
        hq = jh * G + m // T
        d = tl.arange(0, D)
        qq = tl.load(q + b.to(tl.int64) * sqb + hq[:, None].to(tl.int64) * sqh + t[:, None] * sqt + d[None, :],
                     mask=mok[:, None], other=0.0)
        return b, jh, t, hq, mok, qq

    globals()["group_rows"] = group_rows

    @triton.jit
    def scores(q, k, out, lo_p, hi_p, sqb, sqh, sqt, skb, skh, skn, HQ, HKV, T, N, GT, scale,
               G: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
        # program (b * HKV + kv head, block of MR of the G*T query rows, block of BN keys)
        b, jh, t, hq, mok, qq = group_rows(q, sqb, sqh, sqt, HKV, T, GT, G, MR, D)
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        lo = tl.load(lo_p + b * T + t, mask=mok, other=N).to(tl.int32)
        hi = tl.load(hi_p + b * T + t, mask=mok, other=0).to(tl.int32)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        kin = (n >= tl.min(lo, 0)) & (n < tl.max(hi, 0))  # keys some row ranks: nothing else is read
        kk = tl.load(k + b64 * skb + jh.to(tl.int64) * skh + n[:, None].to(tl.int64) * skn + d[None, :],
                     mask=kin[:, None], other=0.0)
        s = dot_qk(qq, kk, IEEE) * scale
        ok = (n[None, :] >= lo[:, None]) & (n[None, :] < hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        row = ((b * HQ + hq) * T + t).to(tl.int64)
        tl.store(out + row[:, None] * N + n[None, :], s, mask=mok[:, None] & (n < N)[None, :])

    @triton.jit
    def pages(q, pg, out, lo_p, hi_p, end_p, sqb, sqh, sqt, spb, sph, spp, HQ, HKV, T, NP, GT, PAGE, scale,
              G: tl.constexpr, MR: tl.constexpr, D: tl.constexpr, BP: tl.constexpr, IEEE: tl.constexpr):
        # Quest's bound scale * (q+ . max + q- . min) of each page (methods.quest.page_bounds), -inf
        # where the page ranks not (no key in [lo, hi), or the row's last page); program (b * Hkv +
        # kv head, block of MR of the G*T query rows, block of BP pages). As one product:
        # max(q m, q M) = min(q, 0) m + max(q, 0) M, so with the bounds interleaved (m_0, M_0, m_1,
        # ...) a page's bound is w . (its 2D bounds), w = (min(q_0, 0), max(q_0, 0), ...): the G
        # query rows (M dim, padded to 16) against BP pages in one tl.dot (bf16 products are exact
        # in its f32 sums). H200, 64 pages a program: B=1 32K 10.8 -> 6.1 us, B=8 128K 177.5 ->
        # 76.2 (3.5 TB/s) against a sum term by term of 16 pages a program.
        bj = tl.program_id(0)
        b = bj // HKV
        jh = bj % HKV
        b64 = b.to(tl.int64)
        m = tl.program_id(1) * MR + tl.arange(0, MR)
        mok = m < GT
        t = m % T
        hq = jh * G + m // T
        e = tl.arange(0, 2 * D)
        qe = tl.load(q + b64 * sqb + hq[:, None].to(tl.int64) * sqh + t[:, None] * sqt + (e // 2)[None, :],
                     mask=mok[:, None], other=0.0)
        w = tl.where((e % 2 == 1)[None, :], tl.maximum(qe, 0.0), tl.minimum(qe, 0.0))
        p = tl.program_id(2) * BP + tl.arange(0, BP)
        pin = p < NP
        pair = tl.load(pg + b64 * spb + jh.to(tl.int64) * sph + p[:, None].to(tl.int64) * spp + e[None, :],
                       mask=pin[:, None], other=0.0)
        if IEEE:  # (f32 either side, or q and bounds of two dtypes: both to f32)
            u = dot_qk(w, pair, IEEE) * scale
        else:
            u = dot_qk(w.to(pair.dtype), pair, IEEE) * scale
        lo = tl.load(lo_p + b * T + t, mask=mok, other=0).to(tl.int32)
        hi = tl.load(hi_p + b * T + t, mask=mok, other=0).to(tl.int32)
        last = tl.maximum(tl.load(end_p + b * T + t, mask=mok, other=1).to(tl.int32) - 1, 0) // PAGE
        first = p * PAGE
        ranks = (tl.maximum(first[None, :], lo[:, None]) < tl.minimum(first[None, :] + PAGE, hi[:, None])) & \
            (p[None, :] != last[:, None])
        row = ((b * HQ + hq) * T + t).to(tl.int64)
        tl.store(out + row[:, None] * NP + p[None, :], tl.where(ranks, u, float("-inf")),
                 mask=mok[:, None] & pin[None, :])

    @triton.jit
    def row_source(s, N, CH, cv, clen, C, CHC, r64, CAND: tl.constexpr):
        # (values, their length, chunk) a row's select reads: its candidate list where it has one
        # (clen >= 0), else its whole score row
        if CAND:
            ln = tl.load(clen + r64)
            own = ln >= 0
            return tl.where(own, cv + r64 * C, s + r64 * N), tl.where(own, ln, N), tl.where(own, CHC, CH), own
        return s + r64 * N, N, CH, False

    globals()["row_source"] = row_source

    @triton.jit
    def page_edges(s, r, r64, N, HT, T, lo_p, hi_p, PAGE, key, eq_take, eq_all):
        # pages: only the first and the last candidate page can hold fewer than PAGE keys in [lo, hi);
        # every page outside them is no candidate, so their ranks among equals are 0 and eq_all - 1.
        # (their pages, key counts, and whether each is taken, given the threshold key and eq_take)
        bt = (r // HT) * T + r % T
        lo = tl.load(lo_p + bt).to(tl.int32)
        hi = tl.load(hi_p + bt).to(tl.int32)
        plo = lo // PAGE
        phi = tl.maximum(hi - 1, 0) // PAGE
        clo = tl.minimum(plo * PAGE + PAGE, hi) - lo
        chi = hi - tl.maximum(phi * PAGE, lo)
        some = (lo < hi) & (PAGE > 1)
        ulo = _ukey(tl.load(s + r64 * N + plo, mask=some, other=float("-inf")))
        uhi = _ukey(tl.load(s + r64 * N + phi, mask=some, other=float("-inf")))
        tlo = some & ((ulo > key) | ((ulo == key) & (eq_take > 0)))
        thi = some & (phi != plo) & ((uhi > key) | ((uhi == key) & (eq_all - 1 < eq_take)))
        return plo, phi, clo, chi, tlo, thi

    @triton.jit
    def write_offsets(offs, r64, P, ii, iok, gt_i, eq_i, tb, eb, eq_take, CH, PAGE, plo, phi, clo, chi, tlo, thi):
        # chunks ii (entries above the threshold gt_i and equal to it eq_i in each): the output
        # entries (keys, for pages) and the entries equal to the threshold before each chunk, for
        # emit; returns the running totals past them
        eb_i = eb + tl.cumsum(eq_i, 0) - eq_i
        took = gt_i + tl.minimum(tl.maximum(eq_take - eb_i, 0), eq_i)
        c0 = ii * CH
        short = tl.where(tlo & (plo >= c0) & (plo < c0 + CH), PAGE - clo, 0) + \
            tl.where(thi & (phi >= c0) & (phi < c0 + CH), PAGE - chi, 0)
        w = took * PAGE - short
        tb_i = tb + tl.cumsum(w, 0) - w
        tl.store(offs + (r64 * P + ii) * 2, tb_i, mask=iok)
        tl.store(offs + (r64 * P + ii) * 2 + 1, eb_i, mask=iok)
        return tb + tl.sum(w, 0), eb + tl.sum(eq_i, 0)

    globals().update(page_edges=page_edges, write_offsets=write_offsets)

    @triton.jit
    def radix(s, N, kr, HT, T, KMAX, hist, above, state, offs, ctr, CH, P, lo_p, hi_p, PAGE, cv, clen, C, CHC,
              SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
              NBIN: tl.constexpr, BLK: tl.constexpr, PB: tl.constexpr, CAND: tl.constexpr, LEV: tl.constexpr):
        # One digit of the radix select; state [R, 4] int32: (key: the prefix found, as uint32 bits;
        # rem: the rank still wanted within it (eq_take after the last pass); done; k_r). LEV > 0:
        # every finite entry is an integer in [0, LEV) (bit agreements): the only pass (FIRST and
        # LAST), its bins the values themselves, key the image of the threshold value.
        r = tl.program_id(0)
        j = tl.program_id(1)
        r64 = r.to(tl.int64)
        srow, ln, ch, _ = row_source(s, N, CH, cv, clen, C, CHC, r64, CAND)
        start = j * ch
        stop = tl.minimum(start + ch, ln)
        if FIRST:
            key = tl.zeros([], tl.uint32)
            done = tl.zeros([], tl.int32)
            pre = key
        else:
            key = tl.load(state + r64 * 4).to(tl.uint32, bitcast=True)
            done = tl.load(state + r64 * 4 + 2)
            pre = key >> (SHIFT + BITS)
            if not LAST:
                stop = tl.where(done != 0, start, stop)  # a finished row skips the middle passes
        h = tl.zeros([NBIN], tl.int32)
        ab = tl.zeros([], tl.int32)
        for n0 in range(start, stop, BLK):
            n = n0 + tl.arange(0, BLK)
            if LEV > 0:  # the values themselves (SHIFT 0)
                x = tl.load(srow + n, mask=n < stop, other=float("-inf"))
                u = tl.where(x > float("-inf"), x, 0.0).to(tl.uint32)
                m = x > float("-inf")
            else:
                u = keys_at(srow, n, stop)
                if FIRST:
                    m = u != 0
                else:
                    top = u >> (SHIFT + BITS)
                    m = top == pre
                    ab += tl.sum((top > pre).to(tl.int32), 0)
            h += tl.histogram(((u >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32), NBIN, mask=m)
        v = tl.arange(0, NBIN)
        slot = r64 * P + j
        tl.store(hist + slot * NBIN + v, h)
        tl.store(above + slot, ab)
        tl.debug_barrier()
        arrived = tl.atomic_add(ctr + r, 1, sem="acq_rel")
        if arrived == P - 1:  # the row's last program: resolve the digit
            # the programs' histograms PB at a time: one load round trip per PB programs, not per program
            tot = tl.zeros([NBIN], tl.int32)
            for i0 in range(0, P, PB):
                ii = i0 + tl.arange(0, PB)
                tot += tl.sum(tl.load(hist + (r64 * P + ii)[:, None] * NBIN + v[None, :], mask=(ii < P)[:, None],
                                      other=0, volatile=True), 0)
            if FIRST:
                cand = tl.sum(tot, 0)
                kk = tl.minimum(row_k(kr, r, HT, T, KMAX), cand)
                done = ((kk == 0) | (kk == cand)).to(tl.int32)
                # k_r = 0: thr = max (nothing above it); every candidate: thr = 0 (all above it)
                key = tl.where(kk == 0, tl.full([], 0xFFFFFFFF, tl.uint32), tl.zeros([], tl.uint32))
                rem = tl.where(done != 0, 0, kk)
                tl.store(state + r64 * 4 + 3, kk)
            else:
                rem = tl.load(state + r64 * 4 + 1)
            dig, above_d = top_digit(tot, rem)
            live = done == 0
            if LEV > 0:
                key = tl.where(live, _ukey(dig.to(tl.float32)), key)
            else:
                key = tl.where(live, key | (dig.to(tl.uint32) << SHIFT), key)
            rem = tl.where(live, rem - above_d, rem)
            tl.store(state + r64 * 4, key.to(tl.int32, bitcast=True))
            tl.store(state + r64 * 4 + 1, rem)
            tl.store(state + r64 * 4 + 2, done)
            if LAST:
                if LEV > 0:  # a done row takes every candidate (key 0: all above -1) or none
                    dd = tl.where(live, dig, tl.where(key == 0, -1, NBIN))
                else:
                    dd = (key & ((1 << BITS) - 1)).to(tl.int32)
                eq_take = rem
                eq_all = tl.sum(tl.where(v == dd, tot, 0), 0)
                plo, phi, clo, chi, tlo, thi = page_edges(s, r, r64, N, HT, T, lo_p, hi_p, PAGE, key, eq_take, eq_all)
                tb = tl.zeros([], tl.int32)
                eb = tl.zeros([], tl.int32)
                for i0 in range(0, P, PB):  # chunks PB at a time; a chunk past P counts nothing
                    ii = i0 + tl.arange(0, PB)
                    iok = ii < P
                    hi_i = tl.load(hist + (r64 * P + ii)[:, None] * NBIN + v[None, :], mask=iok[:, None], other=0,
                                   volatile=True)
                    gt_i = tl.load(above + r64 * P + ii, mask=iok, other=0, volatile=True) + \
                        tl.sum(tl.where(v[None, :] > dd, hi_i, 0), 1)
                    eq_i = tl.sum(tl.where(v[None, :] == dd, hi_i, 0), 1)
                    tb, eb = write_offsets(offs, r64, P, ii, iok, gt_i, eq_i, tb, eb, eq_take, CH, PAGE,
                                           plo, phi, clo, chi, tlo, thi)
                tl.store(state + r64 * 4 + 3, tb)  # entries (keys, for pages) the row writes
            tl.store(ctr + r, 0)  # every program has counted: zero again for the next launch

    @triton.jit
    def emit(s, N, state, offs, CH, P, out, cnt, W, PW, HT, T, fidx, fcnt, W1, lo_p, hi_p, end_p, start_p,
             cv, cp, clen, C, CHC, FRONT: tl.constexpr, LASTPAGE: tl.constexpr, PAGE: tl.constexpr,
             SP: tl.constexpr, BLK: tl.constexpr, FB: tl.constexpr, CAND: tl.constexpr):
        # the Selection row: front keys, the last page's keys (Quest), the taken entries in position
        # order (a page: its keys in [lo, hi)), -1 padding; count
        r = tl.program_id(0)
        j = tl.program_id(1)
        r64 = r.to(tl.int64)
        bt = (r // HT) * T + r % T
        key = tl.load(state + r64 * 4).to(tl.uint32, bitcast=True)
        eq_take = tl.load(state + r64 * 4 + 1)
        total = tl.load(state + r64 * 4 + 3)
        orow = out + r64 * W
        base = tl.zeros([], tl.int32)
        if FRONT:
            base = tl.load(fcnt + bt).to(tl.int32)
            for w0 in range(j * FB, W1, P * FB):  # the front's keys, spread over the row's programs
                w = w0 + tl.arange(0, FB)
                tl.store(orow + w, tl.load(fidx + bt.to(tl.int64) * W1 + w, mask=w < base).to(tl.int32),
                         mask=w < base)
        lo = tl.load(lo_p + bt).to(tl.int32)
        hi = tl.load(hi_p + bt).to(tl.int32)
        if LASTPAGE:  # the row's last page: its keys in [lo, hi), when the row has keys
            e = tl.load(end_p + bt).to(tl.int32)
            lp = tl.maximum(e - 1, 0) // PAGE
            a = tl.maximum(lp * PAGE, lo)
            nl = tl.where(e > tl.load(start_p + r // HT).to(tl.int32),
                          tl.maximum(tl.minimum(lp * PAGE + PAGE, hi) - a, 0), 0)
            if j == 0:
                o = tl.arange(0, SP)
                tl.store(orow + base + o, a + o, mask=o < nl)
            base += nl
        off = tl.load(offs + (r64 * P + j) * 2)
        eqb = tl.load(offs + (r64 * P + j) * 2 + 1)
        srow, ln, ch, own = row_source(s, N, CH, cv, clen, C, CHC, r64, CAND)
        start = j * ch
        stop = tl.minimum(start + ch, ln)
        for n0 in range(start, stop, BLK):
            n = n0 + tl.arange(0, BLK)
            u = keys_at(srow, n, stop)
            eq = (u == key).to(tl.int32)
            take = (u > key) | ((eq != 0) & (eqb + tl.cumsum(eq, 0) - 1 < eq_take))
            if PAGE == 1:
                ti = take.to(tl.int32)
                if CAND:  # a candidate list holds its entries' positions
                    n = tl.where(own, tl.load(cp + r64 * C + n, mask=take & (n < C), other=0), n)
                tl.store(orow + base + off + tl.cumsum(ti, 0) - 1, n, mask=take)
                off += tl.sum(ti, 0)
            else:  # (names not used above: a name the loop reassigns with another type is loop-carried)
                pa = tl.maximum(n * PAGE, lo)
                c = tl.where(take, tl.maximum(tl.minimum(n * PAGE + PAGE, hi) - pa, 0), 0)
                dst = base + off + tl.cumsum(c, 0) - c
                ko = tl.arange(0, SP)
                tl.store(orow + dst[:, None] + ko[None, :], pa[:, None] + ko[None, :], mask=ko[None, :] < c[:, None])
                off += tl.sum(c, 0)
            eqb += tl.sum(eq, 0)
        full = base + total
        if j == 0:
            tl.store(cnt + r, full)
        for w0 in range(tl.maximum(j * PW, full), tl.minimum(j * PW + PW, W), FB):  # padding
            w = w0 + tl.arange(0, FB)
            tl.store(orow + w, tl.full([FB], -1, tl.int32), mask=w < tl.minimum(j * PW + PW, W))

    @triton.jit
    def bisect(s, N, kr, HT, T, KMAX, state, offs, CH, P, lo_p, hi_p, PAGE, cv, clen, C, CHC, grp, HQ,
               RB: tl.constexpr, PR: tl.constexpr, PB: tl.constexpr, CAND: tl.constexpr, G: tl.constexpr,
               GP: tl.constexpr):
        # One program a row, in place of the four radix passes where rows are short (a candidate
        # list, Quest's pages): the k_r-th largest key image by bisection, each round one count
        # over the row. A row of at most RB entries stays in registers (emit chunks of RB // PR
        # entries); a longer one (a top-k row without its list) is streamed every round (chunks
        # of CH). Writes state (thr, eq_take, 0, entries written) and offs, as the radix passes do
        # (the emit stays a launch of its own: written by this one program it took longer, H200,
        # quest B=1 128K 86.7 -> 108.6 us, share='kv' B=8 128K 218.9 -> 237.9). G > 1: row
        # r is a KV head's shared row, built here from its G query heads' rows of s by
        # group_scores_ref's rule and stored in grp (what emit reads), rows of at most RB entries.
        r = tl.program_id(0)
        r64 = r.to(tl.int64)
        if G > 1:
            i = tl.arange(0, RB)
            h = tl.arange(0, GP)
            bb = r // HT
            rows = ((bb * HQ + ((r % HT) // T) * G + h) * T + r % T).to(tl.int64)
            ok = (h < G)[:, None] & (i < N)[None, :]
            x = tl.load(s + rows[:, None] * N + i[None, :], mask=ok, other=float("-inf"))
            fin = (x > float("-inf")) & (x < float("inf"))
            mh = tl.max(tl.where(fin, x, float("-inf")), 1)
            x = tl.where(x == x, x, float("-inf")) - tl.where(mh > float("-inf"), mh, 0.0)[:, None]
            tl.store(grp + r64 * N + i, tl.max(tl.where(ok, x, float("-inf")), 0), mask=i < N)
            tl.debug_barrier()  # the row is read back below (other threads' stores)
            src = grp
        else:
            src = s
        srow, ln, ch, _ = row_source(src, N, CH, cv, clen, C, CHC, r64, CAND)
        want = row_k(kr, r, HT, T, KMAX)
        top = tl.full([], 0xFFFFFFFF, tl.uint32)
        if ln <= RB:
            i = tl.arange(0, RB)
            u = keys_at(srow, i, ln)
            cand = tl.sum((u != 0).to(tl.int32), 0)
            lo = tl.min(tl.where(u != 0, u, top), 0)
            hi = tl.max(u, 0)
        else:
            u = tl.zeros([RB], tl.uint32)  # (defined on both sides: the register path reads it below)
            cand = tl.zeros([], tl.int32)
            lo = top
            hi = tl.zeros([], tl.uint32)
            for n0 in range(0, ln, RB):
                n = n0 + tl.arange(0, RB)
                ub = keys_at(srow, n, ln)
                cand += tl.sum((ub != 0).to(tl.int32), 0)
                lo = tl.minimum(lo, tl.min(tl.where(ub != 0, ub, top), 0))
                hi = tl.maximum(hi, tl.max(ub, 0))
        kk = tl.minimum(want, cand)
        # invariant: at least kk entries >= lo, fewer than kk >= hi + 1; a count of exactly kk at mid ends it
        go = (kk > 0) & (kk < cand)
        hit = tl.zeros([], tl.int32)
        while go:
            mid = lo + (hi - lo + 1) // 2
            if ln <= RB:
                c = tl.sum((u >= mid).to(tl.int32), 0)
            else:
                c = tl.zeros([], tl.int32)
                for n0 in range(0, ln, RB):
                    n = n0 + tl.arange(0, RB)
                    c += tl.sum((keys_at(srow, n, ln) >= mid).to(tl.int32), 0)
            lo = tl.where(c >= kk, mid, lo)
            hi = tl.where(c >= kk, hi, mid - 1)
            hit = (c == kk).to(tl.int32)
            go = (lo < hi) & (hit == 0)
        # thr: the kk-th largest (0 takes every candidate, the top image none)
        thr = tl.where(kk == 0, top, tl.where(kk == cand, tl.zeros([], tl.uint32), lo))
        if ln <= RB:
            if hit != 0:
                thr = tl.min(tl.where(u >= lo, u, top), 0)
            above = tl.sum((u > thr).to(tl.int32), 0)
            eq_all = tl.sum((u == thr).to(tl.int32), 0)
        else:
            low = top
            above = tl.zeros([], tl.int32)
            eq_all = tl.zeros([], tl.int32)
            for n0 in range(0, ln, RB):
                n = n0 + tl.arange(0, RB)
                ub = keys_at(srow, n, ln)
                low = tl.minimum(low, tl.min(tl.where(ub >= lo, ub, top), 0))
            if hit != 0:
                thr = low
            for n0 in range(0, ln, RB):
                n = n0 + tl.arange(0, RB)
                ub = keys_at(srow, n, ln)
                above += tl.sum((ub > thr).to(tl.int32), 0)
                eq_all += tl.sum((ub == thr).to(tl.int32), 0)
        eq_take = kk - above
        plo, phi, clo, chi, tlo, thi = page_edges(src, r, r64, N, HT, T, lo_p, hi_p, PAGE, thr, eq_take, eq_all)
        tb = tl.zeros([], tl.int32)
        eb = tl.zeros([], tl.int32)
        if ln <= RB:
            u2 = tl.reshape(u, (PR, RB // PR))
            ii = tl.arange(0, PR)
            gt_i = tl.sum((u2 > thr).to(tl.int32), 1)
            eq_i = tl.sum((u2 == thr).to(tl.int32), 1)
            tb, eb = write_offsets(offs, r64, P, ii, ii < P, gt_i, eq_i, tb, eb, eq_take, RB // PR, PAGE,
                                   plo, phi, clo, chi, tlo, thi)
        else:
            for i0 in range(0, P, PB):  # chunks PB at a time, each counted by streaming it
                ii = i0 + tl.arange(0, PB)
                gt_i = tl.zeros([PB], tl.int32)
                eq_i = tl.zeros([PB], tl.int32)
                for j in range(i0, tl.minimum(i0 + PB, P)):
                    g = tl.zeros([], tl.int32)
                    e = tl.zeros([], tl.int32)
                    for n0 in range(j * ch, tl.minimum(j * ch + ch, ln), RB):
                        n = n0 + tl.arange(0, RB)
                        ub = keys_at(srow, n, tl.minimum(j * ch + ch, ln))
                        g += tl.sum((ub > thr).to(tl.int32), 0)
                        e += tl.sum((ub == thr).to(tl.int32), 0)
                    gt_i = tl.where(ii == j, g, gt_i)
                    eq_i = tl.where(ii == j, e, eq_i)
                tb, eb = write_offsets(offs, r64, P, ii, ii < P, gt_i, eq_i, tb, eb, eq_take, ch, PAGE,
                                       plo, phi, clo, chi, tlo, thi)
        tl.store(state + r64 * 4, thr.to(tl.int32, bitcast=True))
        tl.store(state + r64 * 4 + 1, eq_take)
        tl.store(state + r64 * 4 + 2, 0)
        tl.store(state + r64 * 4 + 3, tb)

    @triton.jit
    def floor(s, N, kr, KMAX, HT, T, fl_p, Z, S: tl.constexpr):
        # program r: a key image at or below row r's k_r-th largest entry with high probability,
        # the 16-bit prefix of the w-th largest of S entries at the midpoints of S equal strata (two
        # 8-bit histograms, no sort); w (w_floor) puts the k_r-th about Z standard deviations of
        # the count above it below; 1 (every candidate) when the sample runs out
        r = tl.program_id(0)
        r64 = r.to(tl.int64)
        i = tl.arange(0, S)
        u = _ukey(tl.load(s + r64 * N + (i.to(tl.int64) * 2 + 1) * N // (2 * S)))
        m = row_k(kr, r, HT, T, KMAX).to(tl.float32) * S / N
        root = 0.5 * (Z + tl.sqrt(Z * Z + 4.0 * m))
        want = tl.ceil(root * root).to(tl.int32) + 1
        b1, above = top_digit(tl.histogram((u >> 24).to(tl.int32), 256), want)
        b2, _ = top_digit(tl.histogram(((u >> 16) & 255).to(tl.int32), 256, mask=(u >> 24) == b1.to(tl.uint32)),
                          want - above)  # the rank left within top byte b1
        fl = tl.maximum((b1.to(tl.uint32) << 24) | (b2.to(tl.uint32) << 16), 1)
        tl.store(fl_p + r64, fl.to(tl.int32, bitcast=True))

    @triton.jit
    def count(s, N, fl_p, cnt, CH, P, BLK: tl.constexpr):
        # program (row, j): the entries of its chunk at or above the row's floor
        r = tl.program_id(0)
        j = tl.program_id(1)
        r64 = r.to(tl.int64)
        fl = tl.load(fl_p + r64).to(tl.uint32, bitcast=True)
        c = tl.zeros([], tl.int32)
        for n0 in range(j * CH, tl.minimum(j * CH + CH, N), BLK):
            n = n0 + tl.arange(0, BLK)
            c += tl.sum((keys_at(s + r64 * N, n, N) >= fl).to(tl.int32), 0)
        tl.store(cnt + r64 * P + j, c)

    @triton.jit
    def compact(s, N, kr, KMAX, HT, T, fl_p, cnt, CH, P, cv, cp, clen, C, PP: tl.constexpr, BLK: tl.constexpr):
        # program (row, j): its chunk's entries at or above the floor, values and positions, into the
        # row's candidate list in position order, when the list holds them all and at least k_r
        # entries or every candidate (then the row's select is the list's); clen = the list's
        # length, or -1 (the row's select reads its whole score row)
        r = tl.program_id(0)
        j = tl.program_id(1)
        r64 = r.to(tl.int64)
        fl = tl.load(fl_p + r64).to(tl.uint32, bitcast=True)
        kq = row_k(kr, r, HT, T, KMAX)
        i = tl.arange(0, PP)
        c = tl.load(cnt + r64 * P + i, mask=i < P, other=0)
        total = tl.sum(c, 0)
        own = ((total >= kq) | (fl == 1)) & (total <= C)
        if j == 0:
            tl.store(clen + r64, tl.where(own, total, -1))
        if own:
            off = tl.sum(tl.where(i < j, c, 0), 0)
            for n0 in range(j * CH, tl.minimum(j * CH + CH, N), BLK):
                n = n0 + tl.arange(0, BLK)
                x = tl.load(s + r64 * N + n, mask=n < N, other=float("-inf"))
                take = _ukey(x) >= fl
                dst = r64 * C + off + tl.cumsum(take.to(tl.int32), 0) - 1
                tl.store(cv + dst, x, mask=take)
                tl.store(cp + dst, n, mask=take)
                off += tl.sum(take.to(tl.int32), 0)

    return scores, pages, radix, emit, floor, count, compact, bisect


# -- launchers -----------------------------------------------------------------------------
def _rows_bt(x, b: int, t: int, name: str) -> torch.Tensor:
    """A per-(batch row, query row) int tensor [B, T], contiguous."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (b, t) or x.dtype not in (torch.int32, torch.int64):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise VattnError(f"{name} must be an int32/int64 tensor [B, T] = {(b, t)}, got {got}")
    return x.contiguous()


def _check_qk(q, k):
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4:
            raise VattnError(f"{name} must be 4-D, got shape {tuple(x.shape)}")
        check_dtype(name, x, FLOATS)
        if x.stride(-1) != 1:
            raise VattnError(f"{name} must have last-dim stride 1 (strides {tuple(x.stride())})")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] == 0 or hq % k.shape[1]:
        raise VattnError(f"k [B, Hkv, N, D] = {tuple(k.shape)} does not match q [B, Hq, T, D] = {tuple(q.shape)} "
                         "(Hq must be a multiple of Hkv)")
    if q.dtype != k.dtype:
        raise VattnError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if d not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {d}")


def _row_blocks(g: int, t: int) -> int:
    return max(16, min(64, next_pow2(g * t)))


def attn_scores(q, k, lo, hi, scale: float, *, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """f32 [B, Hq, T, N]: scale * q.k of every query row and key in [lo[b, t], hi[b, t]), -inf
    elsewhere. q [B, Hq, T, D], k [B, Hkv, N, D] (fp16/bf16/fp32, read in place, only in [lo, hi)
    of some row); lo, hi int [B, T]."""
    _check_qk(q, k)
    check_runnable(q, k)
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    lo, hi = _rows_bt(lo, b, t, "lo"), _rows_bt(hi, b, t, "hi")
    out = torch.empty((b, hq, t, n), dtype=torch.float32, device=q.device)
    g = hq // hkv
    mr = _row_blocks(g, t)
    if out.numel():
        _kernels()[0][(b * hkv, -(-g * t // mr), -(-n // block_n))](
            q, k, out, lo, hi, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            hq, hkv, t, n, g * t, float(scale), G=g, MR=mr, D=d, BN=block_n, IEEE=use_ieee(q.dtype),
            num_warps=num_warps)
    return out


def page_scores(q, pages, lo, hi, ends, scale: float, page: int, n_pages: int, *, block_p: int = 64,
                num_warps: int = 4) -> torch.Tensor:
    """f32 [B, Hq, T, n_pages]: Quest's bound of each page (methods.quest.page_bounds) where the
    page holds a key in [lo, hi) and is not the row's last page ((ends - 1) // page), else -inf.
    pages [B, Hkv, >= n_pages, D, 2] (min, max of each page's keys), f32 or the keys' dtype."""
    check_dtype("q", q, FLOATS)
    b, hq, t, d = q.shape
    if pages.dim() != 5 or pages.shape[0] != b or pages.shape[3] != d or pages.shape[4] != 2 or \
            pages.shape[2] < n_pages or pages.shape[1] == 0 or hq % pages.shape[1]:
        raise VattnError(f"pages must be [B, Hkv, >= {n_pages}, D, 2] for q {tuple(q.shape)}, "
                         f"got {tuple(pages.shape)}")
    check_dtype("pages", pages, FLOATS)
    if pages.stride(4) != 1 or pages.stride(3) != 2 or q.stride(-1) != 1:
        raise VattnError("pages must have contiguous (D, 2) dims and q a contiguous head dim")
    if d not in (16, 32, 64, 128, 256):
        raise VattnError(f"head dim must be a power of two in 16..256, got {d}")
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise VattnError(f"page must be a positive int, got {page!r}")
    check_runnable(q, pages)
    lo, hi, ends = _rows_bt(lo, b, t, "lo"), _rows_bt(hi, b, t, "hi"), _rows_bt(ends, b, t, "ends")
    hkv = pages.shape[1]
    g = hq // hkv
    mr = _row_blocks(g, t)
    out = torch.empty((b, hq, t, n_pages), dtype=torch.float32, device=q.device)
    if out.numel():
        _kernels()[1][(b * hkv, -(-g * t // mr), -(-n_pages // block_p))](
            q, pages, out, lo, hi, ends, q.stride(0), q.stride(1), q.stride(2), pages.stride(0), pages.stride(1),
            pages.stride(2), hq, hkv, t, n_pages, g * t, page, float(scale), G=g, MR=mr, D=d, BP=block_p,
            IEEE=use_ieee(pages.dtype) or q.dtype != pages.dtype, num_warps=num_warps)
    return out


def select_programs(rows: int, n: int, device, block: int, splits: int | None = None) -> tuple[int, int]:
    """(P, CH): programs per row and the chunk (a whole number of blocks) each walks; about 8
    programs per SM in all (splits overrides), at most 64 per row."""
    want = splits or math.ceil(4 * target_programs(device) / max(rows, 1))
    want = max(1, min(want, 64, math.ceil(n / block)))
    ch = math.ceil(math.ceil(n / want) / block) * block
    return math.ceil(n / ch), ch


def select_top(scores, k, kmax: int, *, width: int | None = None, front=None, page: int = 1, lo=None, hi=None,
               ends=None, starts=None, splits: int | None = None, block: int | None = None, emit_block: int | None = None,
               sample: int | None = None, z: float | None = None, num_warps: int = 4, group: int = 1,
               levels: int = 0):
    """Each row (b, h, t) of scores f32 [B, H, T, N] keeps its min(k[b, t], kmax) largest entries
    that are not -inf/NaN, ties at the threshold to the lowest positions (module docstring).
    Returns (idx int32 [B, H, T, width], count int32 [B, H, T]): valid entries first (the front's,
    the last page's, then the taken ones in position order), -1 padding.

    width: the output width (default kmax); it must hold every row's entries (not checked: no
    sync). front: (idx int [B, T, W1] (-1 padding), count int [B, T]) written first. page > 1 or
    ends given: entries are Quest pages of `page` keys; a taken page writes its keys in
    [lo, hi) (int [B, T]), and with ends (int [B, T]) and starts (int [B]) the row's last page
    ((ends - 1) // page, when ends > starts) comes first, with its keys in [lo, hi). Positions
    are int32. group g > 1: one row per KV head, from the g query heads' rows of scores
    (group_scores_ref's rule; H is then Hq and the output's heads H / g). levels L > 0: every
    entry that is not -inf is an integer in [0, L) (bit agreements; not checked): one counting
    pass over the row replaces the lists and the bisection / radix passes (L <= 4096)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise VattnError(f"scores must be a 4-D tensor [B, H, T, N], got {getattr(scores, 'shape', scores)!r}")
    check_dtype("scores", scores, (torch.float32,))
    for name, x in (("kmax", kmax), ("page", page), ("width", width if width is not None else 0)):
        if isinstance(x, bool) or not isinstance(x, int) or x < (1 if name == "page" else 0):
            raise VattnError(f"{name} must be a {'positive' if name == 'page' else 'non-negative'} int, got {x!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or scores.shape[1] % group:
        raise VattnError(f"group must be a positive int dividing the {scores.shape[1]} heads, got {group!r}")
    if group > 1 and next_pow2(scores.shape[3]) > ROW_MAX:  # rows too long for one program: its torch rule first
        scores, group = group_scores_ref(scores, group), 1
    hq = scores.shape[1]
    b, h, t, n = scores.shape[0], hq // group, scores.shape[2], scores.shape[3]
    width = kmax if width is None else width
    k = _rows_bt(k, b, t, "k")
    pages = page > 1 or ends is not None
    if pages and (lo is None or hi is None):
        raise VattnError("select_top over pages needs lo and hi (the keys a page may give)")
    if ends is not None:
        if starts is None or tuple(starts.shape) != (b,):
            raise VattnError("select_top with ends (the row's last page) needs starts [B]")
        ends, starts = _rows_bt(ends, b, t, "ends"), starts.contiguous()
    lo = _rows_bt(lo, b, t, "lo") if lo is not None else torch.zeros((b, t), dtype=torch.int64, device=scores.device)
    hi = _rows_bt(hi, b, t, "hi") if hi is not None else torch.full((b, t), n, dtype=torch.int64,
                                                                     device=scores.device)
    if front is not None:
        fidx, fcnt = front
        if fidx.dim() != 3 or tuple(fidx.shape[:2]) != (b, t):
            raise VattnError(f"front idx must be [B, T, W1] with (B, T) = {(b, t)}, got {tuple(fidx.shape)}")
        fidx, fcnt = fidx.contiguous(), _rows_bt(fcnt, b, t, "front count")
    else:
        fidx = fcnt = k
    check_runnable(scores, k)
    scores = scores.contiguous()
    rows = b * h * t
    out = torch.empty((b, h, t, width), dtype=torch.int32, device=scores.device)
    cnt = torch.empty((b, h, t), dtype=torch.int32, device=scores.device)
    if rows == 0:
        return out, cnt
    if n == 0:
        out.fill_(-1)
        cnt.zero_()  # (no front or last page without keys)
        return out, cnt
    dev = scores.device
    block = block or BLOCK
    sample, z = SAMPLE if sample is None else sample, Z if z is None else z
    if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= 4096 or \
            (levels and (pages or group > 1)):
        raise VattnError(f"levels must be an int in 0..4096 (and 0 with pages or groups), got {levels!r}")
    cw = 0 if pages or group > 1 or levels else candidate_width(n, kmax, sample, z)
    rb = next_pow2(cw or n)
    if cw:  # the select reads the rows' candidate lists (a row without one: its score row)
        cv, cp, clen = candidates(scores, k, kmax, cw, sample, z, splits=splits, block=block, num_warps=num_warps)
    else:
        cv = cp = clen = scores
    state = torch.empty((rows, 4), dtype=torch.int32, device=dev)
    if levels:  # small integers: their counts are the histogram (one pass, then the emit)
        p, ch = select_programs(rows, n, dev, block, splits)
        chc, nbin = 0, max(2, next_pow2(levels))
        hist = torch.empty((rows * p * nbin,), dtype=torch.int32, device=dev)
        above = torch.empty((rows * p,), dtype=torch.int32, device=dev)
        offs = torch.empty((rows * p, 2), dtype=torch.int32, device=dev)
        _kernels()[2][(rows, p)](scores, n, k, h * t, t, kmax, hist, above, state, offs, zeroed_counters(rows, dev),
                                 ch, p, lo, hi, page, cv, clen, cw, chc, SHIFT=0, BITS=nbin.bit_length() - 1,
                                 FIRST=True, LAST=True, NBIN=nbin, BLK=block, PB=RESOLVE_TILE, CAND=False,
                                 LEV=levels, num_warps=num_warps)
    elif rb <= ROW_MAX:  # short rows: one bisection program a row; emit chunks of rb // p entries
        want = splits or math.ceil(4 * target_programs(dev) / rows)
        p = 1 << (min(want, 64, max(1, rb // 64)).bit_length() - 1)
        chc = rb // p if cw else 0
        ch = rb // p if n <= rb else math.ceil(math.ceil(n / p) / block) * block
        offs = torch.empty((rows * p, 2), dtype=torch.int32, device=dev)
        grp = torch.empty((rows, n), dtype=torch.float32, device=dev) if group > 1 else scores
        _kernels()[7][(rows,)](scores, n, k, h * t, t, kmax, state, offs, ch, p, lo, hi, page, cv, clen, cw, chc,
                               grp, hq, RB=rb, PR=p, PB=RESOLVE_TILE, CAND=cw > 0, G=group, GP=next_pow2(group),
                               num_warps=min(16, max(4, rb * next_pow2(group) // 1024)))  # ~32 entries a thread
        scores = grp  # (the emit reads the grouped rows)
    else:
        if cw:
            p, chc = select_programs(rows, cw, dev, block, splits)
            ch = math.ceil(math.ceil(n / p) / block) * block
        else:
            p, ch = select_programs(rows, n, dev, block, splits)
            chc = 0
        hist = torch.empty((rows * p * NB,), dtype=torch.int32, device=dev)
        above = torch.empty((rows * p,), dtype=torch.int32, device=dev)
        offs = torch.empty((rows * p, 2), dtype=torch.int32, device=dev)
        ctr = zeroed_counters(rows, dev)
        radix = _kernels()[2]
        for i, (shift, bits) in enumerate(PASSES):
            radix[(rows, p)](scores, n, k, h * t, t, kmax, hist, above, state, offs, ctr, ch, p, lo, hi, page,
                             cv, clen, cw, chc, SHIFT=shift, BITS=bits, FIRST=i == 0, LAST=i == len(PASSES) - 1,
                             NBIN=NB, BLK=block, PB=RESOLVE_TILE, CAND=cw > 0, LEV=0, num_warps=num_warps)
    sp = next_pow2(page)
    eb = emit_block or min(block if page == 1 else max(2, min(block, 4096 // sp)), next_pow2(chc or ch))
    w1 = fidx.shape[2] if front is not None else 0
    _kernels()[3][(rows, p)](scores, n, state, offs, ch, p, out, cnt, width, -(-width // p), h * t, t, fidx, fcnt,
                             w1, lo, hi, ends if ends is not None else lo, starts if starts is not None else lo,
                             cv, cp, clen, cw, chc, FRONT=front is not None, LASTPAGE=ends is not None, PAGE=page,
                             SP=sp, BLK=eb, FB=256, CAND=cw > 0, num_warps=num_warps)
    return out, cnt


def w_floor(m: float, z: float) -> int:
    """The sample rank w of a row's floor when m of its sampled entries are expected among its
    k_r largest: w - z sqrt(w) = m, so the count above the floor falls short of k_r only at z
    standard deviations (about sqrt(w) strata)."""
    root = 0.5 * (z + math.sqrt(z * z + 4 * m))
    return math.ceil(root * root) + 1


def candidate_width(n: int, kmax: int, sample: int = SAMPLE, z: float = Z) -> int:
    """The candidate lists' width for rows of n entries keeping up to kmax: the count above the
    floor (w_floor strata), z standard deviations of it and two strata for the floor's 16-bit
    rounding, or 0 where lists do not pay (wider than half a row, or rows shorter than two
    samples)."""
    if sample < 1 or n < 2 * sample:
        return 0
    h = n / sample  # entries per stratum
    w = w_floor(kmax / h, max(z, 0.0))
    cw = math.ceil((w + max(z, 0.0) * math.sqrt(w) + 2) * h)
    return cw if 2 * cw <= n else 0


def candidates(scores, k, kmax: int, cw: int, sample: int = SAMPLE, z: float = Z, *, splits=None, block=None,
               num_warps: int = 4):
    """Each row's candidate list: its entries whose key image is at or above the row's floor (at
    most the w_floor-th largest of `sample` stratified entries), values (f32 [R, cw]) and
    positions (int32 [R, cw]) in position order, and the list's length (int32 [R]), or -1 where
    the list would hold more than cw entries, or fewer than k_r and not every candidate. A row
    with a list keeps the same entries as its whole row: every entry at or above its k_r-th
    largest is listed, in the same order."""
    b, h, t, n = scores.shape
    rows, dev = b * h * t, scores.device
    block = block or BLOCK
    # count and compact stream the rows: 4x the select's programs (H200: 155 against 172 us at B=8 128K)
    p, ch = select_programs(rows, n, dev, block, splits or 4 * select_programs(rows, n, dev, block)[0])
    fl = torch.empty((rows,), dtype=torch.int32, device=dev)
    cnt = torch.empty((rows * p,), dtype=torch.int32, device=dev)
    cv = torch.empty((rows, cw), dtype=torch.float32, device=dev)
    cp = torch.empty((rows, cw), dtype=torch.int32, device=dev)
    clen = torch.empty((rows,), dtype=torch.int32, device=dev)
    floor, count, compact = _kernels()[4:7]
    floor[(rows,)](scores, n, k, kmax, h * t, t, fl, float(z), S=sample, num_warps=num_warps)
    count[(rows, p)](scores, n, fl, cnt, ch, p, BLK=block, num_warps=num_warps)
    compact[(rows, p)](scores, n, k, kmax, h * t, t, fl, cnt, ch, p, cv, cp, clen, cw, PP=next_pow2(p), BLK=block,
                       num_warps=num_warps)
    return cv, cp, clen
