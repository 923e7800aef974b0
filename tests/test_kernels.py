"""Kernel correctness against the torch references, under TRITON_INTERPRET=1 on CPU.

Small sizes, fresh random inputs, ragged lengths, poisoned outputs (the kernels allocate
their outputs with torch.empty, so a stale NaN there would show). Skipped without triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from vattn.errors import VattnError
from vattn.kernels.bits import bit_scores_ref, bit_topk, bit_topk_ref, sign_bits
from vattn.kernels.decode import dense_decode, dense_decode_ref
from vattn.kernels.pages import page_bounds, quest_scores, quest_scores_ref
from vattn.kernels.sample import (_feistel_ref, capped_rows, perm_sample, perm_sample_ref, sample_log_weights_ref,
                                  var_inflation, verified_ext_ref)
from vattn.kernels.select import attended, vattention_hash_decode, vattention_hash_select
from vattn.kernels.sparse import sparse_decode, sparse_decode_ref
from vattn.selection import Selection

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def on(*xs):
    return [x.to(DEV) for x in xs]


def cpu(sel):
    return Selection(sel.indices.cpu(), sel.log_weights.cpu(), sel.count.cpu(), sel.shared)


@pytest.mark.parametrize("dtype,T,G", [(torch.float32, 1, 4), (torch.bfloat16, 1, 4),
                                       (torch.float16, 3, 2), (torch.float32, 8, 1)])
def test_dense_decode(dtype, T, G):
    g = torch.Generator().manual_seed(T * 10 + G)
    B, Hkv, N, D = 3, 2, 150, 32
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(dtype).to(DEV)
    big = torch.randn(B, Hkv, N + 9, 2 * D, generator=g).to(dtype).to(DEV)
    k, v = big[:, :, :N, :D], big[:, :, 5:N + 5, D:]  # strided views into one buffer
    lengths = torch.tensor([N, 40, T + 3], dtype=torch.int32, device=DEV)
    out = dense_decode(q, k, v, lengths, block_n=16, splits=2)  # the 40-key row: an empty split
    ref = dense_decode_ref(q, k, v, lengths)
    assert torch.isfinite(out).all()
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode(shared, dtype):
    g = torch.Generator().manual_seed(int(shared) + 7)
    B, Hq, Hkv, T, N, D, K = 2, 8, 2, 2, 120, 16, 70
    H = Hkv if shared else Hq
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    count = torch.randint(1, K + 1, (B, H, T), generator=g, dtype=torch.int32)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * H * T)]).view(B, H, T, K)
    idx = torch.where(torch.arange(K) < count[..., None], idx, -1).to(torch.int32)
    lw = torch.randn(B, H, T, K, generator=g)
    args = on(q, k, v, idx, lw, count)
    out = sparse_decode(*args, shared, block_n=16)
    ref = sparse_decode_ref(*args, shared)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_sparse_full_selection_equals_dense():
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D = 1, 4, 2, 64, 16
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, 1), (Hkv, N), (Hkv, N)))
    idx = torch.randperm(N, generator=g).int().view(1, 1, 1, N).expand(B, Hkv, 1, N).contiguous()
    out = sparse_decode(*on(q, k, v, idx, torch.zeros(B, Hkv, 1, N), torch.full((B, Hkv, 1), N, dtype=torch.int32)),
                        True).cpu()
    assert rel(out, dense_decode_ref(q, k, v)) < 1e-5


@pytest.mark.parametrize("shared,W,cache,Hq,most", [(True, 1, True, 4, 32), (False, 2, False, 4, 32),
                                                    (False, 1, True, 4, 3), (True, 1, True, 6, 32)])
def test_bit_topk(shared, W, cache, Hq, most):
    """Exact top-k in a deterministic order: keys above the threshold in position order, then
    the first ties; also with few programs per row (most=3) and a top score that is not a power
    of two (Hq=6: three heads per group, full-width histogram)."""
    g = torch.Generator().manual_seed(W + Hq)
    B, Hkv, T, N, D, k = 2, 2, 1, 400, 16, 33
    proj = torch.randn(D, 32 * W, generator=g)
    qs = sign_bits(torch.randn(B, Hq, T, D, generator=g), proj)
    ks = sign_bits(torch.randn(B, Hkv, N, D, generator=g), proj)
    lo, hi = 4, torch.tensor([390, 30], dtype=torch.int32)
    ks[:, 0, 5:9] = qs[:, 0, 0:1]  # keys at the top score (all bits agree with head 0)
    idx, cnt, member = (x.cpu() for x in bit_topk(*on(qs, ks), k, lo, hi.to(DEV), shared, block_n=128, cache=cache,
                                                   most=most))
    ridx, rcnt = bit_topk_ref(qs, ks, k, lo, hi, shared)
    s = bit_scores_ref(qs, ks, shared).view(-1, N)
    assert torch.equal(cnt, rcnt)
    H = s.shape[0] // B
    for r in range(s.shape[0]):
        a = idx.view(-1, k)[r]
        c = int(cnt.view(-1)[r])
        assert (a[c:] == -1).all()
        sr = s[r][lo:int(hi[r // H])]
        tau = sr.sort(descending=True).values[c - 1] if c == k else sr.min() - 1  # short row: every key
        gt, eq = (sr > tau).nonzero().flatten() + lo, (sr == tau).nonzero().flatten() + lo
        assert torch.equal(a[:c].long(), torch.cat([gt, eq[:c - len(gt)]]))
        assert torch.equal(member.view(-1, N)[r].nonzero().flatten(), a[:c].long().sort().values)


def test_perm_sample_matches_ref_and_is_without_replacement():
    member = (torch.rand(2, 2, 1, 500, generator=torch.Generator().manual_seed(1)) < 0.3).to(torch.uint8)
    hi = torch.tensor([480, 77], dtype=torch.int32)
    idx, acc = (x.cpu() for x in perm_sample(member.to(DEV), 10, hi.to(DEV), 300, seed=99, block=128))
    ridx, racc = perm_sample_ref(member, 10, hi, 300, seed=99)
    assert torch.equal(idx, ridx) and torch.equal(acc, racc)
    for r in range(4):
        v = idx.view(4, -1)[r]
        v = v[v >= 0]
        assert len(set(v.tolist())) == len(v) and v.min() >= 10 and v.max() < hi[r // 2]
        a = acc.view(4, -1)[r].bool()
        assert not member.view(4, -1)[r][idx.view(4, -1)[r][a].long()].any()


def test_quest_scores_bound():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 2, 32, generator=g), torch.randn(2, 2, 100, 32, generator=g)
    lengths = torch.tensor([100, 37], dtype=torch.int32)
    pmin, pmax = page_bounds(k, lengths, 16)
    u = quest_scores(*on(q, pmin, pmax), block_p=16).cpu()
    assert rel(u, quest_scores_ref(q, pmin, pmax)) < 1e-5
    s = torch.einsum("bhtd,bhnd->bhtn", q, k.repeat_interleave(2, 1))[0, ..., :96].reshape(4, 2, 6, 16)
    assert (s.amax(-1) <= u[0, ..., :6] + 1e-4).all()


def test_vattention_hash_select_pipeline():
    g = torch.Generator().manual_seed(11)
    B, Hq, Hkv, N, D = 2, 4, 2, 1500, 32
    q = torch.randn(B, Hq, 1, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g) + 1
    proj = torch.randn(D, 32, generator=g)
    lengths = torch.tensor([1500, 1100], dtype=torch.int32)
    sel = cpu(vattention_hash_select(*on(q, k, sign_bits(k, proj), proj, lengths), sink=16, window=16, topk=64,
                                     cap=512, m0=32, eps=0.1, delta=0.1))
    ok = sel.valid() & (sel.indices >= 0)
    assert (sel.indices[ok] < lengths.view(B, 1, 1, 1).expand_as(sel.indices)[ok]).all()
    live = ok & torch.isfinite(sel.log_weights)  # rejected sample slots carry -inf weight
    for row, m in zip(sel.indices.view(-1, sel.indices.shape[-1]), live.view(-1, live.shape[-1])):
        row = row[m]
        assert len(set(row.tolist())) == len(row)  # no key counted twice
    assert (attended(sel) >= 16 + 16 + 64 + 32).all()
    args = on(q, k, v, sel.indices, sel.log_weights, sel.count)
    out = sparse_decode(*args, True)
    assert rel(out, sparse_decode_ref(*args, True)) < 1e-5
    assert rel(out.cpu(), dense_decode_ref(q, k, v, lengths)) < 0.3


def check_sample_weights(lw, F0, top_n, m, ext, n_r, weights):
    """Exact slots 0, then the pilot and extension weights of `weights`."""
    wp, we = sample_log_weights_ref(n_r, m, ext, weights)
    assert (lw[:F0 + top_n] == 0).all()
    assert torch.allclose(lw[F0 + top_n:F0 + top_n + m], torch.tensor(wp).float(), atol=1e-5)
    assert torch.allclose(lw[F0 + top_n + m:F0 + top_n + m + ext], torch.tensor(we).float(), atol=1e-5)


@pytest.mark.parametrize("dtype,eps,weights", [(torch.float32, 0.3, "pooled"), (torch.float32, 0.3, "two-phase"),
                                               (torch.bfloat16, 0.15, "pooled")])
def test_fused_select_rows_match_references(dtype, eps, weights):
    """Fused selection: layout, exact count, top-k scores (fused query signature), the sample
    weights and the extension size against the float64 budget reference, ragged lengths."""
    g = torch.Generator().manual_seed(int(eps * 100))
    B, Hq, Hkv, N, D = 2, 8, 2, 700, 32
    sink, window, topk, cap, m0 = 8, 8, 40, 512, 16
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    proj = torch.randn(D, 32, generator=g)
    lengths = torch.tensor([N, 90], dtype=torch.int32)  # row 2: residual smaller than the budget
    ksig = sign_bits(k, proj)
    sel, st = vattention_hash_select(*on(q, k, ksig, proj, lengths), sink=sink, window=window, topk=topk, cap=cap,
                                     m0=m0, eps=eps, delta=0.1, seed=3, stats=True, block_n=128, weights=weights)
    sel, st = cpu(sel), st.cpu()
    hi = lengths - window
    s = bit_scores_ref(sign_bits(q, proj), ksig, True).view(B * Hkv, N)
    F0 = sink + window
    saw_partial = False
    for r in range(B * Hkv):
        b, L, h = r // Hkv, int(lengths[r // Hkv]), int(hi[r // Hkv])
        idx, lw, c = sel.indices.view(B * Hkv, -1)[r], sel.log_weights.view(B * Hkv, -1)[r], int(sel.count.view(-1)[r])
        assert (idx[c:] == -1).all() and torch.isinf(lw[c:]).all() and (lw[c:] < 0).all()
        live = idx[:c].long()
        assert (live >= 0).all() and (live < L).all() and len(set(live.tolist())) == c  # exact count
        assert torch.equal(live[:F0], torch.cat([torch.arange(sink), torch.arange(h, L)]))
        n_mid = h - sink
        top_n = min(topk, n_mid)
        top = live[F0:F0 + top_n]
        assert ((top >= sink) & (top < h)).all()
        ref = torch.topk(s[r][sink:h].float(), top_n).values
        assert torch.equal(s[r][top].sort().values.float(), ref.sort().values)
        m, ext, n_r = (int(x) for x in st[r, :3])
        assert n_r == n_mid - top_n and m == min(m0, n_r) and c == F0 + top_n + m + ext
        samp = live[F0 + top_n:]
        assert ((samp >= sink) & (samp < h)).all() and not set(samp.tolist()) & set(top.tolist())
        check_sample_weights(lw, F0, top_n, m, ext, n_r, weights)
        grp = q.view(B, Hkv, -1, D)[b, r % Hkv, :].float()
        ref_ext, ref_b = verified_ext_ref(grp, k[b, r % Hkv].float(), live[:F0], samp[:m], n_r, eps, 0.1,
                                          weights=weights, m0=m0)
        assert abs(ext - ref_ext) <= max(1, 0.002 * ref_ext), (r, ext, ref_ext)
        assert abs(float(st[r, 3]) - ref_b) <= max(1, 0.002 * ref_b)
        saw_partial |= 1 < ext < n_r - m
    assert saw_partial  # the budget was not trivially 1 or exact everywhere
    args = on(q, k, k, sel.indices, sel.log_weights, sel.count)
    out = sparse_decode(*args, True)
    assert rel(out, sparse_decode_ref(*args, True)) < 1e-2


@pytest.mark.parametrize("dtype,eps,seed,weights,var_conf", [(torch.float32, 0.3, 5, "pooled", -1.0),
                                                             (torch.float32, 0.3, 5, "two-phase", 0.9),
                                                             (torch.bfloat16, 0.08, 9, "pooled", 0.0)])
def test_hash_decode_two_pass_includes_topk_mass(dtype, eps, seed, weights, var_conf):
    """Two-pass decode with the fused sample + budget: D_hat has the exact mass of sinks + window +
    top-k (read from the pass-1 partials), the extension equals the float64 reference budget with
    fixed = all of them on every row (no slot cap), the sample is the same keyed permutation as
    perm_sample, and the output equals the reference attention over the returned selection."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, N, D = 2, 8, 2, 900, 32
    sink, window, topk, m0 = 8, 8, 48, 16
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, N, D, generator=g) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    proj = torch.randn(D, 32, generator=g)
    lengths = torch.tensor([N, 130], dtype=torch.int32)  # ragged; row 2: residual below the budget
    ksig = sign_bits(k, proj)
    kw = dict(sink=sink, window=window, topk=topk, m0=m0, eps=eps, delta=0.1, seed=seed, block_n=128,
              weights=weights, var_conf=var_conf)
    qd, kd, vd, sd, pd, ld = on(q, k, v, ksig, proj, lengths)
    out, sel, st = vattention_hash_decode(qd, kd, vd, sd, pd, ld, stats=True, selection=True, attn_block=16, **kw)
    out, sel, st = out.cpu(), cpu(sel), st.cpu()
    hi = lengths - window
    F0 = sink + window
    assert not capped_rows(st, weights).any()
    saw_partial = False
    for r in range(B * Hkv):
        b, L, h = r // Hkv, int(lengths[r // Hkv]), int(hi[r // Hkv])
        idx, lw, c = sel.indices.view(B * Hkv, -1)[r], sel.log_weights.view(B * Hkv, -1)[r], int(sel.count.view(-1)[r])
        live = idx[:c].long()
        assert (idx[c:] == -1).all() and torch.isinf(lw[c:]).all() and (lw[c:] < 0).all()
        assert (live >= 0).all() and (live < L).all() and len(set(live.tolist())) == c
        assert torch.equal(live[:F0], torch.cat([torch.arange(sink), torch.arange(h, L)]))
        top_n = min(topk, h - sink)
        m, ext, n_r = (int(x) for x in st[r, :3])
        assert n_r == h - sink - top_n and m == min(m0, n_r)
        assert c == F0 + top_n + m + ext
        check_sample_weights(lw, F0, top_n, m, ext, n_r, weights)
        samp = live[F0 + top_n:]
        assert ((samp >= sink) & (samp < h)).all() and not set(samp.tolist()) & set(live[F0:F0 + top_n].tolist())
        # the sample is the accepted prefix of the keyed Feistel permutation of [0, 4^hb) restricted
        # to [0, n_mid) (no cycle walk), skipping top-k keys
        n_mid = h - sink
        hb = ((n_mid - 1).bit_length() + 1) // 2
        key = (seed ^ ((r * 0x1B873593) & 0xFFFFFFFF)) & 0xFFFFFFFF
        y = _feistel_ref(torch.arange(4 ** hb), hb, (1 << hb) - 1, key)
        y = y[y < n_mid] + sink
        top_set = torch.zeros(N, dtype=torch.bool)
        top_set[live[F0:F0 + top_n]] = True
        pref = y[~top_set[y]][:m + ext]
        grp = q.view(B, Hkv, -1, D)[b, r % Hkv].float()
        ref_ext, ref_b = verified_ext_ref(grp, k[b, r % Hkv].float(), live[:F0 + top_n],
                                          live[F0 + top_n:F0 + top_n + m], n_r, eps, 0.1, weights=weights,
                                          var_conf=var_conf, m0=m0)
        assert abs(float(st[r, 3]) - ref_b) <= max(1, 0.002 * ref_b), (r, float(st[r, 3]), ref_b)
        assert abs(ext - ref_ext) <= max(1, 0.002 * ref_ext)
        saw_partial |= 1 < ext < n_r - m
        assert torch.equal(samp, pref.long())
    assert saw_partial
    ref = sparse_decode_ref(q, k, v, sel.indices, sel.log_weights, sel.count, True)
    assert torch.isfinite(out).all() and rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(out, vattention_hash_decode(qd, kd, vd, sd, pd, ld, attn_block=16, **kw).cpu())  # no pad
    # the multi-program sample (block counts + prefix scatter) equals the serial draw, also when the
    # counted blocks fall short (margin 0: the last counted block draws on serially); poisoned outputs
    variants = (dict(par=False), dict(block_p=16, margin=0.0, extra=0), dict(block_p=16, programs=3)) \
        if (dtype, weights) == (torch.float32, "pooled") else (dict(block_p=32, margin=0.5, extra=1, programs=2),)
    for skw in variants:
        o2, sel2, st2 = vattention_hash_decode(qd, kd, vd, sd, pd, ld, stats=True, selection=True,
                                               attn_block=16, sample_kw=skw, **kw)
        o2, sel2, st2 = o2.cpu(), cpu(sel2), st2.cpu()
        assert torch.equal(sel2.count, sel.count) and torch.equal(st2, st), skw
        for r in range(B * Hkv):
            c = int(sel.count.view(-1)[r])
            assert torch.equal(sel2.indices.view(B * Hkv, -1)[r, :c], sel.indices.view(B * Hkv, -1)[r, :c]), skw
            assert torch.equal(sel2.log_weights.view(B * Hkv, -1)[r, :c], sel.log_weights.view(B * Hkv, -1)[r, :c])
        assert torch.equal(o2, out), skw
    # merge folded into pass 2 (last program per row, atomic counter) vs the separate merge kernel
    o3 = vattention_hash_decode(qd, kd, vd, sd, pd, ld, attn_block=16, fuse_merge=True, **kw).cpu()
    assert rel(o3, out) < 1e-6 and torch.isfinite(o3).all()
    # its counters live on the shared zeroed buffer: the last program leaves them zero for the next call
    assert torch.equal(vattention_hash_decode(qd, kd, vd, sd, pd, ld, attn_block=16, fuse_merge=True, **kw).cpu(), o3)
    # D_F with top-k is larger than with sinks + window only: the budget can only shrink
    _, st_old = vattention_hash_select(qd, kd, sd, pd, ld, cap=N, stats=True, **kw)
    st_old = st_old.cpu()
    assert (st[:, 3] <= st_old[:, 3] + 1).all() and (st[:, 3] < st_old[:, 3]).any()
    if var_conf != 0.0:  # the variance bound only raises the budget
        _, _, st_off = vattention_hash_decode(qd, kd, vd, sd, pd, ld, stats=True, selection=True,
                                              attn_block=16, **dict(kw, var_conf=0.0))
        st_off = st_off.cpu()
        assert (st[:, 3] >= st_off[:, 3]).all() and (st[:, 3] > st_off[:, 3]).any()


def test_var_inflation_matches_cpu_verified():
    """The GPU budget's variance factor is the CPU verified part's, and it falls as the pilot
    grows (so a smaller pilot may not borrow the configured size's factor)."""
    from vattn.methods.sampling import Verified
    for m0, delta, vc in ((128, 0.05, -1.0), (16, 0.1, 0.9), (64, 0.2, 0.0)):
        cpu = float(Verified(delta=delta, var_conf=vc)._inflate(torch.tensor([m0], dtype=torch.float64)))
        assert abs(var_inflation(m0, delta, vc) - cpu) < 1e-9 * cpu
    f = [var_inflation(m, 0.05) for m in (8, 16, 64, 128, 1024)]
    assert all(a > b > 1 for a, b in zip(f, f[1:]))
    with pytest.raises(VattnError, match="var_conf"):
        var_inflation(128, 0.05, 1.5)


def test_short_pilot_asks_for_the_whole_residual():
    """Sample slots fewer than the pilot (cap < m0): the row's pilot is short, its budget is the
    whole residual (infinite variance factor), and the row is reported capped; = the reference."""
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, N, D = 1, 4, 2, 400, 32
    q, k = torch.randn(B, Hq, 1, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    proj = torch.randn(D, 32, generator=g)
    ksig = sign_bits(k, proj)
    sel, st = vattention_hash_select(*on(q, k, ksig, proj), None, sink=8, window=8, topk=32, cap=12, m0=16, eps=0.3,
                                     delta=0.1, stats=True, block_n=128)
    sel, st = cpu(sel), st.cpu()
    assert capped_rows(st).all()
    for r in range(Hkv):
        m, ext, n_r = (int(x) for x in st[r, :3])
        live = sel.indices[0, r, 0, :int(sel.count[0, r, 0])].long()
        assert m < 16 and ext == 0
        ref_ext, ref_b = verified_ext_ref(q[0, 2 * r:2 * r + 2, 0], k[0, r], live[:16], live[48:48 + m], n_r,
                                          0.3, 0.1, m0=16)
        assert ref_b == float(st[r, 3]) == n_r - m


def test_bad_inputs_raise_vattn_error():
    q, k = torch.randn(1, 4, 1, 32), torch.randn(1, 3, 10, 32)
    with pytest.raises(VattnError, match="multiple"):
        dense_decode(q, k, k)
    with pytest.raises(VattnError, match="1 to 8"):
        dense_decode(torch.randn(1, 3, 9, 32), k, k)
    with pytest.raises(VattnError, match="int32"):
        dense_decode(torch.randn(1, 3, 1, 32), k, k, torch.tensor([10]))
    if os.environ.get("TRITON_INTERPRET") == "1":  # programmatic dependent launch: Hopper GPUs only
        with pytest.raises(VattnError, match="pdl=True"):
            dense_decode(torch.randn(1, 3, 1, 32), k, k, pdl=True)
    with pytest.raises(VattnError, match="indices"):
        sparse_decode(torch.randn(1, 3, 1, 32), k, k, torch.zeros(1, 2, 1, 4, dtype=torch.int32),
                      torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, dtype=torch.int32), False)
    with pytest.raises(VattnError, match="int32"):
        bit_topk(torch.zeros(1, 4, 1, 1), torch.zeros(1, 2, 8, 1, dtype=torch.int32), 2, 0,
                 torch.tensor([8], dtype=torch.int32), True)
    with pytest.raises(VattnError, match="pooled"):
        vattention_hash_decode(torch.zeros(1, 4, 1, 32), k, k, torch.zeros(1, 3, 10, 1, dtype=torch.int32),
                               torch.zeros(32, 32), None, weights="pool")


def test_interpreter_compat_squeezes_loop_bounds(monkeypatch):
    # triton < 3.7's interpreter turns a tensor loop bound into int(array of shape (1,)), which
    # NumPy 2.4 refuses; the shim gives tensors an __index__ that squeezes first
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as ti
    from vattn.kernels import _common
    seen = {}

    class Scope:
        def set_attr(self, obj, name, value):
            seen[name] = (obj, value)

    monkeypatch.setattr(ti, "_patch_lang", lambda fn: Scope())
    _common._interpreter_compat.__wrapped__()
    ti._patch_lang(None)
    obj, index = seen["__index__"]
    bound = type("Bound", (), {"handle": type("Handle", (), {"data": np.array([7], dtype=np.int32)})()})()
    assert obj is tl.core.tensor and index(bound) == 7
