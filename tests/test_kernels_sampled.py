"""The exact front + iid verified sample (kernels/sampled.py, plan path "sampled-kernel") against
its float64 twin and the reference path, in the Triton interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from helpers import rel
from vattn.errors import VattnError
from vattn.kernels.decode import dense_decode_ref
from vattn.kernels.sampled import sampled_decode, sampled_decode_ref
from vattn.kernels.select import topk_ref
from vattn.plan import compile
from vattn.selection import Selection
from helpers import kernel_env

pytestmark, DEV = kernel_env()
SINK, WINDOW = 4, 8


def inputs(seed, B=2, Hq=4, Hkv=2, D=32, N=1500, dtype=torch.float32, peak=0.0, shift=1.0):
    """Random rows; peak > 0 plants a few keys each query head favours (a top-k to find); values
    shifted by `shift` (an output far from 0, so output mode need not attend every key)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, Hq, 1, D), (B, Hkv, N, D), (B, Hkv, N, D)))
    if peak:
        hot = torch.randint(SINK, N // 2, (B, Hkv, 8), generator=g)
        lead = q.view(B, Hkv, -1, D)[:, :, :1].expand(B, Hkv, 8, D)  # each group's first query head
        k.scatter_add_(2, hot[..., None].expand(B, Hkv, 8, D), peak * lead)
    return (x.to(dtype).to(DEV) for x in (q, k, v + shift))


def topk_rows(q, k, L, kk, shared=False):
    """sink + window + the kk best middle keys of each query head (or of each KV head's first head)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    s = (q.float() @ k.float().repeat_interleave(G, 1).transpose(-1, -2))[:, :, 0].cpu()
    H = Hkv if shared else Hq
    W = SINK + WINDOW + kk
    idx = torch.full((B, H, 1, W), -1, dtype=torch.int32)
    cnt = torch.zeros((B, H, 1), dtype=torch.int32)
    for b in range(B):
        n = int(L[b])
        for h in range(H):
            _, t = topk_ref(s[b, h * G if shared else h, SINK:n - WINDOW], kk)
            row = torch.cat([torch.arange(SINK), torch.arange(n - WINDOW, n), SINK + t])
            idx[b, h, 0, :len(row)], cnt[b, h, 0] = row.int(), len(row)
    return Selection(idx.to(DEV), torch.zeros(idx.shape, device=DEV), cnt.to(DEV), shared=shared)


@pytest.mark.parametrize("dtype,mode,shared,seed", [(torch.float32, "denominator", False, 0),
                                                    (torch.float32, "output", True, 1),
                                                    (torch.bfloat16, "denominator", True, 2),
                                                    (torch.float32, "output", False, 3)])
def test_sampled_decode_matches_float64_twin(dtype, mode, shared, seed):
    q, k, v = inputs(seed, dtype=dtype, peak=4.0)
    L = torch.tensor([1500, 1100], dtype=torch.int32, device=DEV)
    sel = topk_rows(q, k, L, 40, shared)
    kw = dict(sink=SINK, window=WINDOW, m0=32, eps=0.3, delta=0.2, seed=seed, mode=mode)
    out, st = sampled_decode(q, k, v, sel, L, stats=True, splits=(2, 3), **kw)
    _, rs = sampled_decode_ref(q, k, v, sel, L, **kw)
    got, want = st["rows"].cpu().double(), rs["rows"]
    assert torch.equal(got[:, [0, 2, 4]], want[:, [0, 2, 4]])  # pilot, n_mid, exact
    assert ((got[:, 1] - want[:, 1]).abs() <= torch.clamp(want[:, 1] * 2e-3, min=1)).all()  # sample size
    assert (got[:, 4] == 0).any(), "no row sampled: the test would not see the draws"
    ref, rs = sampled_decode_ref(q, k, v, sel, L, total=got[:, 1].long(), exact=got[:, 4] > 0, **kw)
    assert torch.equal(st["keys"].cpu(), rs["keys"])  # listed + sampled keys per selection row
    assert rel(out, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    density = (st["keys"].float().cpu() / L.float().cpu().repeat_interleave(sel.indices.shape[1])).mean()
    assert 0 < density < 1


def test_sampled_decode_exact_fallback_equals_dense():
    q, k, v = inputs(4, N=300)
    L = torch.tensor([300, 120], dtype=torch.int32, device=DEV)
    sel = topk_rows(q, k, L, 10)
    out, st = sampled_decode(q, k, v, sel, L, sink=SINK, window=WINDOW, m0=16, eps=0.01, delta=0.01, stats=True)
    assert (st["rows"][:, 4] == 1).all()  # exact: every key once
    assert torch.equal(st["keys"].cpu(), L.cpu().repeat_interleave(4))
    assert rel(out, dense_decode_ref(q, k, v, L)) < 1e-5


def test_sampled_estimator_is_unbiased_for_a_fixed_sample_size():
    """Over seeds, D_hat / D averages 1 (a drawn listed key counts 0; weight n_mid / total)."""
    q, k, v = inputs(5, B=1, N=800, peak=3.0)
    L = torch.tensor([800], dtype=torch.int32, device=DEV)
    sel = topk_rows(q, k, L, 20)
    ratios = []
    for seed in range(300):
        _, rs = sampled_decode_ref(q, k, v, sel, L, sink=SINK, window=WINDOW, m0=8, seed=seed,
                                   total=torch.full((2,), 24), exact=torch.zeros(2, dtype=torch.bool))
        ratios.append(rs["d_hat"] / rs["d"])
    r = torch.stack(ratios)  # [seeds, 1, Hq]
    se = r.std(0) / len(ratios) ** 0.5
    assert ((r.mean(0) - 1).abs() < 4 * se + 1e-9).all(), (r.mean(0), se)
    assert (r.std(0) > 1e-2).any()  # the draws did vary (heads whose planted keys hold the mass barely do)


def test_sampled_decode_bad_inputs():
    q, k, v = inputs(6, N=100)
    L = torch.tensor([100, 100], dtype=torch.int32, device=DEV)
    sel = topk_rows(q, k, L, 5)
    kw = dict(sink=SINK, window=WINDOW, m0=16)
    with pytest.raises(VattnError, match="one query row"):
        sampled_decode(q.expand(2, 4, 2, 32), k, v, Selection(*(x.expand(2, 4, 2, *x.shape[3:]) for x in
                                                               (sel.indices, sel.log_weights)),
                                                              sel.count.expand(2, 4, 2)), L, **kw)
    with pytest.raises(VattnError, match="lengths must be int32"):
        sampled_decode(q, k, v, sel, L.long(), **kw)
    with pytest.raises(VattnError, match="m0 >= 2"):
        sampled_decode(q, k, v, sel, L, sink=SINK, window=WINDOW, m0=1)
    with pytest.raises(VattnError, match="mode must be"):
        sampled_decode(q, k, v, sel, L, mode="both", **kw)
    with pytest.raises(VattnError, match="do not pass scratch"):
        sampled_decode(q, k, v, sel, L, stats=True, scratch={}, **kw)


SPECS = ["sink(4)+window(8)+topk(0.05)+verified(eps=0.3,delta=0.2,draws='iid',min_pilot=16,mode='denominator')",
         "sink(4)+window(8)+quest(0.1,page=16)+verified(eps=0.3,delta=0.2,draws='iid',min_pilot=16)",
         "window(8)+verified(eps=0.4,delta=0.2,draws='iid',min_pilot=16,mode='denominator')",
         "sink(2)+window(4)+quest(0.2,page=8,dense_layers=1)+verified(eps=0.3,draws='iid',min_pilot=8,"
         "mode='denominator')",
         "sink(4)+window(8)+quest(0.1,page=16,share='kv')+verified(eps=0.3,delta=0.2,draws='iid',min_pilot=16)",
         "sink(4)+window(8)+hashtopk(0.1,bits=32)+verified(eps=0.3,delta=0.2,draws='iid',min_pilot=16)",
         "sink(4)+hashtopk(0.1,bits=64,share='kv')+verified(eps=0.3,draws='iid',min_pilot=16,mode='denominator')"]


@pytest.mark.parametrize("t", [1, 2])
@pytest.mark.parametrize("spec", SPECS)
def test_kernel_path_equals_the_reference_path(spec, t):
    """plan path sampled-kernel (Triton) makes the reference path's (the twin's) choices: the same
    keys attended per row, the same output; layer 0 of the dense_layers spec attends everything."""
    q, k, v = inputs(7, N=1200, peak=3.0)
    q = q.expand(2, 4, t, 32).contiguous()
    starts = torch.zeros(2, dtype=torch.long, device=DEV)
    ends = (torch.tensor([[1200], [900]]) - (t - 1) + torch.arange(t)).to(DEV)
    outs = []
    for fused in (True, False):
        plan = compile(spec, DEV, fused=fused)
        assert plan.path == ("sampled-kernel" if fused else "sampled-reference")
        got = []
        for layer in (0, 1):
            ctx = plan.context(starts, ends, 32 ** -0.5, zero_starts=True)
            plan.append(layer, k, v, ctx)
            out, sel = plan.run(layer, q, k, v, ctx)
            hq = q.shape[1]
            got.append((out, sel.count.sum(1) * (hq // sel.count.shape[1])))  # keys per row, over query heads
        outs.append(got)
        assert plan.path == ("sampled-kernel" if fused else "sampled-reference")  # no fallback
    for (o1, c1), (o2, c2) in zip(*outs):
        assert torch.equal(c1.cpu(), c2.cpu()), spec
        assert rel(o1, o2) < 1e-5
    dense = "dense_layers" in spec
    assert (outs[0][0][1].cpu() == ends.cpu() * 4).all() == dense  # layer 0: every key iff dense


@pytest.mark.parametrize("spec", SPECS[:2])
def test_left_padding_and_empty_rows_match_the_reference(spec):
    """Rows that start past key 0 (left padding) draw from [start + sink, L - window); a row with
    no keys gives zeros on both paths."""
    q, k, v = inputs(9, B=3, N=900, peak=3.0)
    starts = torch.tensor([0, 250, 900], device=DEV)
    ends = torch.tensor([[900], [900], [900]], device=DEV)
    outs = []
    for fused in (True, False):
        plan = compile(spec, DEV, fused=fused)
        ctx = plan.context(starts, ends, 32 ** -0.5)
        plan.append(0, k, v, ctx)
        out, sel = plan.run(0, q, k, v, ctx)
        outs.append((out, sel.count.sum(1).view(-1) * (4 // sel.count.shape[1])))
    (o1, c1), (o2, c2) = outs
    assert torch.equal(c1.cpu(), c2.cpu()) and c1[2] == 0 and 0 < c1[1] < 4 * 650
    assert rel(o1[:2], o2[:2]) < 1e-5 and not o1[2].any() and not o2[2].any()


def test_left_padded_rows_run_exact_equal_dense_over_their_keys():
    """A bound no sample meets attends [start, L) whole: dense attention over the row's own keys."""
    from vattn.attend import dense_attend
    q, k, v = inputs(10, B=2, N=400)
    starts = torch.tensor([0, 120], device=DEV)
    ends = torch.tensor([[400], [400]], device=DEV)
    plan = compile("sink(4)+window(8)+topk(0.05)+verified(eps=0.001,delta=0.01,draws='iid',min_pilot=16)", DEV,
                   fused=True)
    ctx = plan.context(starts, ends, 32 ** -0.5)
    plan.append(0, k, v, ctx)
    out, sel = plan.run(0, q, k, v, ctx)
    want = dense_attend(q, k, v, lengths=ends[:, 0], starts=starts, scale=32 ** -0.5)
    assert rel(out, want) < 1e-5
    assert torch.equal(sel.count.view(2, -1).cpu(), (ends - starts[:, None]).cpu().expand(2, 4).int())


def test_sample_programs_fill_the_gpu_whatever_the_draws(monkeypatch):
    """Rows that run exact attend their whole middle in the sample launch: its programs per KV
    row follow the GPU's room (one wave of 264 programs, capped at 16), not the expected draws."""
    import vattn.kernels.sampled as sm
    monkeypatch.setattr(sm, "target_programs", lambda dev: 264)
    got = [sm.sample_programs(r, "cuda") for r in (8, 32, 64, 128, 1024)]
    assert got == [16, 8, 4, 2, 1]
    assert all(r * p <= 264 for r, p in zip((32, 64, 128), got[1:4]))  # no second wave
