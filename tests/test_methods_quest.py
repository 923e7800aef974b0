"""Quest: bounds, page choice, full budget, incremental metadata, parameter errors."""
import math

import pytest
import torch

import vattn
from vattn.attend import dense_attend, row_bounds
from vattn.methods.base import DecodeContext
from vattn.methods.quest import Quest, page_bounds


def inputs(b=2, hq=4, hkv=2, t=3, n=53, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g)
    return q, k, v


def context(q, k, v, lengths, starts, state=None):
    b, _, t, d = q.shape
    s, e = row_bounds(b, t, k.shape[2], lengths, starts)
    return DecodeContext(q, k, v, s, e, 1 / math.sqrt(d), None, {} if state is None else state, 0)


def brute_bounds(q, k, starts, ends, page, scale):
    """Quest's bound per (b, h, t, page) by loops over the page's visible keys."""
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    pages = -(-n // page)
    out = torch.full((b, hq, t, pages), float("-inf"))
    for bi in range(b):
        end = int(ends[bi].max())
        for p in range(pages):
            lo, hi = max(p * page, int(starts[bi])), min((p + 1) * page, end)
            if lo >= hi:
                continue
            kk = k[bi, :, lo:hi]
            m, M = kk.amin(1), kk.amax(1)  # [Hkv, D]
            for h in range(hq):
                qq = q[bi, h]  # [T, D]
                hk = h // (hq // hkv)
                out[bi, h, :, p] = torch.maximum(qq * m[hk], qq * M[hk]).sum(-1) * scale
    return out


LENGTHS, STARTS = torch.tensor([53, 41]), torch.tensor([0, 5])


def test_bound_covers_every_score_and_matches_brute_force():
    q, k, v = inputs()
    ctx = context(q, k, v, LENGTHS, STARTS)
    part = Quest(budget=16, page=8)
    kmin, kmax = part.metadata(ctx)
    u = page_bounds(q, kmin, kmax, ctx.scale)
    ref = brute_bounds(q, k, ctx.starts, ctx.ends, 8, ctx.scale)
    real = torch.isfinite(ref)
    assert torch.allclose(u[real], ref[real], atol=1e-5)
    s = ctx.scores().masked_fill(~ctx.allowed(), float("-inf"))
    s = torch.nn.functional.pad(s, (0, u.shape[-1] * 8 - s.shape[-1]), value=float("-inf"))
    page_max = s.reshape(*u.shape, 8).amax(-1)
    assert bool((u + 1e-5 >= page_max).all())


def test_chosen_pages_are_last_plus_top_by_bound():
    q, k, v = inputs(seed=1)
    page, budget = 8, 20  # ceil(20 / 8) = 3 pages besides the last
    ctx = context(q, k, v, LENGTHS, STARTS)
    sel = vattn.select(f"quest({budget}, page={page})", q, k, v, lengths=LENGTHS, starts=STARTS)
    ref = brute_bounds(q, k, ctx.starts, ctx.ends, page, ctx.scale)
    for bi in range(2):
        for h in range(4):
            for t in range(3):
                keys = sel.indices[bi, h, t, : sel.count[bi, h, t]].tolist()
                end = int(ctx.ends[bi, t])
                assert all(int(STARTS[bi]) <= x < end for x in keys)
                assert len(set(keys)) == len(keys)
                pages = {x // page for x in keys}
                last = (end - 1) // page
                assert last in pages
                # The other pages: the 3 largest bounds among pages this row can see.
                seen = [p for p in range(ref.shape[-1]) if p != last and p * page < end
                        and (p + 1) * page > int(STARTS[bi])]
                want = sorted(seen, key=lambda p: -float(ref[bi, h, t, p]))[:3]
                got = sorted(pages - {last})
                assert len(got) == 3
                assert min(float(ref[bi, h, t, p]) for p in got) >= float(ref[bi, h, t, want[-1]]) - 1e-5
                # Every key of a chosen page that the row may see is there.
                for p in got:
                    span = range(max(p * page, int(STARTS[bi])), min((p + 1) * page, end))
                    assert set(span) <= set(keys)


def test_shared_pages_are_last_plus_top_by_the_groups_shifted_bound():
    """share='kv': one Selection per KV head; its pages besides the last are the top 3 by the
    largest, over the group's two heads, of a page's bound minus the head's best seen bound."""
    q, k, v = inputs(seed=3)
    page = 8
    ctx = context(q, k, v, LENGTHS, STARTS)
    sel = vattn.select(f"quest(20, page={page}, share='kv')", q, k, v, lengths=LENGTHS, starts=STARTS)
    assert sel.shared and sel.indices.shape[1] == 2
    ref = brute_bounds(q, k, ctx.starts, ctx.ends, page, ctx.scale)
    for bi in range(2):
        for t in range(3):
            end = int(ctx.ends[bi, t])
            last = (end - 1) // page
            seen = [p for p in range(ref.shape[-1]) if p != last and p * page < end
                    and (p + 1) * page > int(STARTS[bi])]
            for j in range(2):
                heads = ref[bi, 2 * j:2 * j + 2, t][:, seen]  # [2, pages seen]
                grp = (heads - heads.amax(1, keepdim=True)).amax(0)
                want = sorted(seen[i] for i in grp.topk(3).indices.tolist())
                keys = sel.indices[bi, j, t, : sel.count[bi, j, t]].tolist()
                assert sorted({x // page for x in keys} - {last}) == want


@pytest.mark.parametrize("page", [1, 8, 16, 64])
def test_full_budget_is_dense(page):
    q, k, v = inputs(seed=2)
    out, _ = vattn.sparse_attention(q, k, v, f"quest(1.0, page={page})", lengths=LENGTHS, starts=STARTS)
    ref = dense_attend(q, k, v, lengths=LENGTHS, starts=STARTS)
    assert torch.allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_dense_layers_attend_everything():
    q, k, v = inputs(seed=3)
    sel = vattn.select("quest(8, page=8, dense_layers=2)", q, k, v, lengths=LENGTHS, starts=STARTS, layer=1)
    out = vattn.attend(q, k, v, sel)
    assert torch.allclose(out, dense_attend(q, k, v, lengths=LENGTHS, starts=STARTS), atol=2e-6)


def test_metadata_updates_incrementally_as_keys_are_appended():
    q, k, v = inputs(b=2, t=1, n=70, seed=4)
    starts = torch.tensor([0, 3])
    state = {}
    spec = "sink(2)+quest(12, page=8)"
    for n in [37, 38, 39, 40, 41, 48, 49, 57, 70]:
        kk, vv = k[:, :, :n], v[:, :, :n]
        lengths = torch.tensor([n, n])
        inc = vattn.select(spec, q, kk, vv, lengths=lengths, starts=starts, state=state)
        fresh_state = {}
        new = vattn.select(spec, q, kk, vv, lengths=lengths, starts=starts, state=fresh_state)
        assert torch.equal(inc.indices, new.indices) and torch.equal(inc.count, new.count)
        assert torch.equal(state["quest/8"]["meta"], fresh_state["quest/8"]["meta"])


def test_new_sequence_in_same_state_rebuilds():
    q, k, v = inputs(t=1, n=40, seed=5)
    state = {}
    vattn.select("quest(8, page=8)", q, k, v, state=state)
    k2 = torch.randn_like(k)[:, :, :20]
    a = vattn.select("quest(8, page=8)", q, k2, v[:, :, :20], state=state)
    b = vattn.select("quest(8, page=8)", q, k2, v[:, :, :20], state={})
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("spec, words", [
    ("quest(page=0)", ["quest", "page", "[1, 4096]"]),
    ("quest(page=2.5)", ["quest", "page"]),
    ("quest(1.5)", ["quest", "budget"]),
    ("quest(-3)", ["quest", "budget"]),
    ("quest(dense_layers=-1)", ["quest", "dense_layers"]),
    ("quest(share='group')", ["quest", "share", "'kv'"]),
])
def test_invalid_parameters(spec, words):
    with pytest.raises(vattn.VattnError) as e:
        vattn.parse(spec)
    assert all(w in str(e.value) for w in words)
