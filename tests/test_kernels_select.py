"""kernels/select.py (scores, page bounds, the radix top-k select and the Selection it writes)
in the Triton interpreter: against torch and a sort, and, wired into vattn.plan's topk and quest
kernel paths (plan_select), against the reference methods key for key."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from helpers import rand_qkv
from vattn.errors import VattnError
from vattn.kernels import select as ks
from vattn.kernels.select import (attn_scores, group_scores_ref, page_scores, select_top, select_top_ref,
                                  topk_ref)
from vattn.methods.base import exact_scores
from vattn.methods.quest import page_bounds
from helpers import kernel_env

pytestmark, DEV = kernel_env()
# CPU tensors, or plans compiled for the CPU with the kernels forced on: the interpreter's tests
interpreter_only = pytest.mark.skipif(DEV != "cpu", reason="CPU tensors under TRITON_INTERPRET=1")
NEG = float("-inf")


def ranges(b, t, n, seed):
    """[lo, hi) per (batch row, query row): ragged, one empty."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, n // 3, (b, t), generator=g)
    hi = (n - torch.randint(0, n // 3, (b, t), generator=g)).clamp(min=lo)
    hi[0, 0] = lo[0, 0]  # a row without keys to rank
    return lo, hi


def masked(s, lo, hi):
    pos = torch.arange(s.shape[-1])
    return s.masked_fill(~((pos >= lo[:, None, :, None]) & (pos < hi[:, None, :, None])), NEG)


@pytest.mark.parametrize("dtype,t", [(torch.float32, 1), (torch.bfloat16, 2), (torch.float16, 1)])
def test_scores_equal_the_torch_product(dtype, t):
    g = torch.Generator().manual_seed(t)
    b, hkv, gq, n, d = 2, 2, 2, 150, 32
    q = torch.randn(b, hkv * gq, t, d, generator=g).to(dtype)
    big = torch.randn(b, hkv, n + 5, 2 * d, generator=g).to(dtype)
    k = big[:, :, 3:n + 3, :d]  # a strided view, read in place
    lo, hi = ranges(b, t, n, seed=t)
    got = attn_scores(q.to(DEV), k.to(DEV), lo.to(DEV), hi.to(DEV), 0.3).cpu()
    want = masked(exact_scores(q, k, 0.3), lo, hi)
    assert torch.equal(got == NEG, want == NEG)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,dtype", [(1, torch.float32), (2, torch.float32), (1, torch.bfloat16)])
def test_page_scores_equal_the_reference_bound(t, dtype):
    g = torch.Generator().manual_seed(t)
    b, hkv, hq, d, page, n = 2, 2, 4, 16, 4, 70
    npg = -(-n // page)
    q = torch.randn(b, hq, t, d, generator=g)
    a, c = torch.randn(2, b, hkv, npg + 3, d, generator=g)
    pages = torch.stack([torch.minimum(a, c), torch.maximum(a, c)], -1).to(dtype)  # spare pages past n_pages
    # (bounds in a bf16 cache's dtype: the plan keeps them so)
    lo, hi = ranges(b, t, n, seed=t)
    ends = (hi + torch.randint(0, 6, (b, t), generator=g)).clamp(max=n)
    got = page_scores(q.to(DEV), pages.to(DEV), lo.to(DEV), hi.to(DEV), ends.to(DEV), 0.25, page, npg).cpu()
    u = page_bounds(q, pages[:, :, :npg, :, 0].float(), pages[:, :, :npg, :, 1].float(), 0.25)
    first = torch.arange(npg) * page
    ranks = torch.maximum(first, lo[:, None, :, None]) < torch.minimum(first + page, hi[:, None, :, None])
    last = ((ends - 1).clamp(min=0) // page)[:, None, :, None]
    want = u.masked_fill(~ranks | (torch.arange(npg) == last), NEG)
    assert torch.equal(got == NEG, want == NEG)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["bisect", "radix"])
def select_path(request, monkeypatch):
    """Both ways to a row's threshold: one bisection program a row (short rows, the default
    here) and the four radix passes (rows past ROW_MAX)."""
    if request.param == "radix":
        monkeypatch.setattr(ks, "ROW_MAX", 0)
    return request.param


def hard_rows(n=300, seed=0):
    """scores [2, 4, 2, n]: per head a kind of row (random; many ties; -inf, NaN, +inf, +-0 and
    ties; 5 finite entries), and an all -inf row."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 4, 2, n, generator=g)
    s[:, 1] = torch.randint(0, 4, (2, 2, n), generator=g).float()  # four values, ~n/4 of each
    x = torch.randint(-3, 4, (2, 2, n), generator=g).float()
    x[..., ::7] = NEG
    x[..., 3::11] = float("nan")
    x[..., 5::13] = float("inf")
    x[..., 1::5] = -0.0
    s[:, 2] = x
    s[:, 3] = NEG
    s[:, 3, :, 40:45] = torch.tensor([1.0, -1.0, 1.0, 2.0, 0.0])
    s[1, 0, 1] = NEG  # all -inf
    return s


@pytest.mark.parametrize("splits,kmax,block", [(1, 64, 64), (4, 64, 64), (3, 300, 64), (37, 64, 8)])
def test_select_is_the_stable_sort(select_path, splits, kmax, block):
    """The kernel's set is a stable descending sort's first k: ties to the lowest positions,
    -inf/NaN never, k = 0, k beyond the finite entries, k beyond kmax (clamped); 19 programs a
    row: more than one RESOLVE_TILE of histograms."""
    s = hard_rows()
    k = torch.tensor([[0, 7], [40, 400]])
    idx, cnt = select_top(s.to(DEV), k.to(DEV), kmax, splits=splits, block=block)
    want_idx, want_cnt = select_top_ref(s, k, kmax)
    assert torch.equal(cnt.cpu(), want_cnt) and torch.equal(idx.cpu(), want_idx)
    assert want_cnt[1, 3, 1] == 5 and want_cnt[1, 0, 1] == 0  # 5 finite (ties), all -inf


@pytest.mark.parametrize("levels,splits,block", [(33, 1, 64), (33, 5, 16), (4, 37, 8), (257, 3, 64)])
def test_select_over_levels_is_the_stable_sort(levels, splits, block):
    """Integer scores in [0, levels) or -inf (bit agreements: hashtopk): the one counting pass
    keeps a stable descending sort's first k too: ties to the lowest positions, k = 0, k beyond
    the finite entries; values at 0 and at levels - 1."""
    g = torch.Generator().manual_seed(levels)
    s = torch.randint(0, levels, (2, 3, 2, 300), generator=g).float()
    s[..., ::7] = NEG
    s[0, 1] = NEG
    s[0, 1, :, 50:53] = torch.tensor([0.0, levels - 1.0, 0.0])
    s[1, 2, :, :100] = levels - 1.0
    k = torch.tensor([[0, 7], [40, 400]])
    idx, cnt = select_top(s.to(DEV), k.to(DEV), 64, splits=splits, block=block, levels=levels)
    want_idx, want_cnt = select_top_ref(s, k, 64)
    assert torch.equal(cnt.cpu(), want_cnt) and torch.equal(idx.cpu(), want_idx)
    assert want_cnt[0, 1, 1] == 3 and want_cnt[0, 0, 0] == 0 and want_cnt[1, 0, 1] == 64


@pytest.mark.parametrize("z,cw", [(4.0, None), (-3.0, None), (4.0, 40)])
def test_candidate_lists_keep_the_same_keys(monkeypatch, select_path, z, cw):
    """Rows select from their candidate lists (entries at or above a floor drawn from a
    stratified sample) where a list holds them, else from the whole row: the same keys as the
    stable sort either way. z = -3 puts floors above the k-th entry, a width of 40 overflows
    lists: both make rows fall back (and leave others their lists); the bisection then streams
    such a row, in several blocks."""
    s = hard_rows(n=4096)
    k = torch.tensor([[0, 7], [150, 300]])
    if cw is not None:
        monkeypatch.setattr(ks, "candidate_width", lambda *a: cw)
    idx, cnt = select_top(s.to(DEV), k.to(DEV), 200, sample=256, z=z, splits=3, block=256)
    want_idx, want_cnt = select_top_ref(s, k, 200)
    assert torch.equal(cnt.cpu(), want_cnt) and torch.equal(idx.cpu(), want_idx)
    width = ks.candidate_width(4096, 200, 256, z)
    cv, cp, clen = ks.candidates(s.to(DEV), k.to(DEV), 200, width, 256, z, splits=3, block=256)
    clen = clen.cpu()
    assert (clen >= 0).any() and (clen < 0).any()  # at z = 4 the row of ties overflows its list
    flat = s.reshape(-1, 4096)
    for r in torch.nonzero(clen >= 0).flatten().tolist():  # a list: its entries, in position order
        pos = cp[r, :clen[r]].cpu().long()
        assert torch.equal(pos, pos.sort().values) and torch.equal(cv[r, :clen[r]].cpu(), flat[r, pos])


def test_group_scores_follow_their_rule():
    """share='kv' rows (the rule the bisection program builds in registers): each head shifted
    to its best finite entry, the largest over the group; NaN as -inf, +inf kept, an all -inf
    head unshifted; against a loop over heads and entries."""
    s = hard_rows(n=300)
    s[:, 0] += 100.0
    got = group_scores_ref(s, 2)
    assert got.shape == (2, 2, 2, 300)
    for b, j, t in [(0, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 0)]:
        want = []
        for n in range(300):
            best = float("-inf")
            for h in (2 * j, 2 * j + 1):
                row = [x for x in s[b, h, t].tolist() if x == x]
                fin = [x for x in row if abs(x) != float("inf")]
                x = s[b, h, t, n].item()
                x = float("-inf") if x != x else x
                best = max(best, x - (max(fin) if fin else 0.0))
            want.append(best)
        assert got[b, j, t].tolist() == want, (b, j, t)


def test_select_over_a_group_is_the_sort_of_its_rows(select_path):
    """select_top(group=g) keeps what a sort of group_scores_ref's rows keeps (grouped in the
    bisection program, or by the torch rule first when rows are too long for it)."""
    s = hard_rows(n=300)
    s[:, 0] += 100.0
    k = torch.tensor([[0, 7], [40, 400]])
    idx, cnt = select_top(s.to(DEV), k.to(DEV), 64, group=2, splits=4, block=64)
    want_idx, want_cnt = select_top_ref(group_scores_ref(s, 2), k, 64)
    assert idx.shape[1] == 2 and torch.equal(cnt.cpu(), want_cnt) and torch.equal(idx.cpu(), want_idx)


def test_a_shared_row_keeps_each_heads_best_key():
    """A head whose scores all sit 50 above its group's (the same softmax) does not take the
    group's keys: the other head's favourite stays in the top 2."""
    s = torch.zeros(1, 2, 1, 20)
    s[0, 0, 0] = 50.0 + torch.arange(20) * 0.01  # head 0: the last keys, by a little
    s[0, 1, 0, 7] = 5.0  # head 1: key 7, by a lot
    top = set(topk_ref(group_scores_ref(s, 2)[0, 0, 0], 2)[1].tolist())
    assert top == {7, 19}
    assert set(topk_ref(s.reshape(1, 1, 2, 1, 20).amax(2)[0, 0, 0], 2)[1].tolist()) == {18, 19}  # unshifted


def test_topk_ref_breaks_ties_by_position():
    x = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 2.0, 3.0, -0.0, 0.0]])
    v, i = topk_ref(x, 8)
    assert i.tolist() == [[1, 2, 5, 4, 0, 6, 7, 3]]  # NaN ranks as -inf
    assert topk_ref(torch.tensor([[0.0, -0.0, 0.0]]), 2)[1].tolist() == [[0, 1]]


@pytest.mark.parametrize("kind", ["normal", "ties", "mostly -inf", "nan and zeros"])
def test_topk_ref_on_the_cpu_equals_the_stable_sort(kind):
    # below a quarter of the row the CPU takes torch.topk (and the sort only when a row leaves
    # out an entry equal to its k-th): the same values, positions, order and signs of zero
    g = torch.Generator().manual_seed(len(kind))
    for _ in range(200):
        n = int(torch.randint(8, 400, (1,), generator=g))
        k = int(torch.randint(1, n // 4 + 1, (1,), generator=g))
        x = torch.randn(2, 3, 1, n, generator=g)
        if kind == "ties":
            x = torch.randint(0, 6, x.shape, generator=g).float()
        elif kind == "mostly -inf":
            x[torch.rand(x.shape, generator=g) < 0.9] = float("-inf")
        elif kind == "nan and zeros":
            x[torch.rand(x.shape, generator=g) < 0.05] = float("nan")
            x[..., ::7], x[..., 3::11] = 0.0, -0.0
        v, i = topk_ref(x, k)
        wv, wi = torch.sort(torch.where(torch.isnan(x), float("-inf"), x), dim=-1, descending=True, stable=True)
        assert torch.equal(i, wi[..., :k]) and torch.equal(v, wv[..., :k])
        assert torch.equal(torch.signbit(v), torch.signbit(wv[..., :k]))


@interpreter_only
def test_select_writes_the_front_then_the_pages(select_path):
    """select_top with a front and pages (Quest): the front's keys, the last page's keys in
    [lo, hi), then each taken page's keys in [lo, hi) (partial first and last candidate pages
    in other programs' chunks), -1 padding."""
    page, npg = 4, 40
    s = torch.randn(1, 2, 1, npg, generator=torch.Generator().manual_seed(3))
    lo, hi, ends, starts = torch.tensor([[6]]), torch.tensor([[150]]), torch.tensor([[157]]), torch.tensor([0])
    first = torch.arange(npg) * page
    s = s.masked_fill((torch.maximum(first, lo) >= torch.minimum(first + page, hi)) | (torch.arange(npg) == 39), NEG)
    s[0, 0, 0, 1] = 9.0  # the partial first candidate page (keys 6, 7) and the partial last one (148, 149)
    s[0, 0, 0, 37] = 8.0
    fidx = torch.tensor([[[0, 1, 2, 156, 155, 154, 153, 152, 151, 150, -1]]])
    fcnt = torch.tensor([[10]])
    for splits, block in ((1, 8), (4, 8), (20, 2)):  # 20 programs: more than one RESOLVE_TILE
        idx, cnt = select_top(s, torch.tensor([[5]]), 6, width=60, front=(fidx, fcnt), page=page, lo=lo, hi=hi,
                              ends=ends, starts=starts, splits=splits, block=block)
        for h in range(2):
            top = sorted(topk_ref(s[0, h, 0], 5)[1].tolist())
            keys = [x for p in top for x in range(p * page, p * page + page) if 6 <= x < 150]
            want = fidx[0, 0, :10].tolist() + [] + keys  # the last page (156..159) lies past hi
            assert idx[0, h, 0, :cnt[0, h, 0]].tolist() == want, (splits, h)
            assert (idx[0, h, 0, cnt[0, h, 0]:] == -1).all()
        assert {1, 37} <= set(topk_ref(s[0, 0, 0], 5)[1].tolist())


@interpreter_only
def test_bad_inputs_are_named():
    s = torch.zeros(1, 2, 1, 8)
    k = torch.ones(1, 1, dtype=torch.long)
    with pytest.raises(VattnError, match="scores has dtype"):
        select_top(s.half(), k, 2)
    with pytest.raises(VattnError, match="4-D"):
        select_top(s[0], k, 2)
    with pytest.raises(VattnError, match="kmax"):
        select_top(s, k, -1)
    with pytest.raises(VattnError, match=r"k must be .*\[B, T\]"):
        select_top(s, torch.ones(2, 1, dtype=torch.long), 2)
    with pytest.raises(VattnError, match="lo and hi"):
        select_top(s, k, 2, page=4)
    q, kk, _ = rand_qkv(b=1, hq=4, hkv=2, n=8)
    lo, hi = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 8)
    with pytest.raises(VattnError, match="share a dtype"):
        attn_scores(q, kk.half(), lo, hi, 1.0)
    with pytest.raises(VattnError, match="head dim"):
        attn_scores(q[..., :8], kk[..., :8], lo, hi, 1.0)
    with pytest.raises(VattnError, match=r"k \[B, Hkv, N, D\]"):
        attn_scores(q, kk[:, :, :, :8], lo, hi, 1.0)
    with pytest.raises(VattnError, match="lo must be"):
        attn_scores(q, kk, lo[0], hi, 1.0)
    with pytest.raises(VattnError, match="pages must be"):
        page_scores(q, torch.zeros(1, 2, 3, 16), lo, hi, hi, 1.0, 4, 2)


# -- the plan paths with the kernels: tests/test_plan_paths.py (CPU, interpreter), and here on a GPU --
@pytest.mark.skipif(DEV != "cuda", reason="a GPU: the plans compiled for CUDA (the interpreter runs the tests above)")
@pytest.mark.parametrize("spec", ["sink(3)+window(4)+topk(0.1)", "topk(5)", "sink(2)+window(3)+quest(0.2,page=8)",
                                  "window(3)+quest(10,page=1)", "sink(3)+window(4)+quest(20,page=4,dense_layers=1)",
                                  "sink(2)+window(3)+quest(0.2,page=8,share='kv')",
                                  "sink(2)+window(3)+hashtopk(0.1,bits=64)",
                                  "sink(2)+window(3)+hashtopk(0.1,bits=64,share='kv')"])
def test_kernel_paths_on_the_gpu_choose_the_reference_keys(spec):
    from test_plan_paths import bounds, check_equal
    q, k, v = (x.cuda() for x in rand_qkv(b=3, hq=4, hkv=2, t=1, n=300, seed=2))
    starts, ends = (x.cuda() for x in bounds(t=1, n=300, seed=2))
    check_equal(spec, q, k, v, starts, ends, layers=(0, 1), device="cuda")
