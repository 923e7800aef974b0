"""Sampling parts: uniform without replacement, unbiased estimates, budget rules, coverage."""
import math

import pytest
import torch

import vattn
from vattn import metrics
from vattn.attend import row_bounds
from vattn.spec import select
from vattn.synthetic import FAMILIES
from vattn.verify import synthetic_groups, tolerance, verify
from helpers import rand_qkv


@pytest.mark.parametrize("spec", ["sink(4)+window(4)+topk(0.1)+verified(eps=0.2,delta=0.2)",
                                  "sink(4)+window(4)+uniform(0.3)",
                                  "sink(4)+topk(5)+verified(eps=0.1,delta=0.1,share='kv')"])
def test_indices_unique_in_range_and_counted(spec):
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=2, n=120)
    lengths, starts = torch.tensor([120, 80, 33]), torch.tensor([0, 5, 2])
    sel = select(spec, q, k, v, lengths=lengths, starts=starts, seed=3)
    _, ends = row_bounds(3, 2, 120, lengths, starts)
    for b in range(3):
        for h in range(sel.indices.shape[1]):
            for t in range(2):
                c = int(sel.count[b, h, t])
                row = sel.indices[b, h, t]
                got = row[:c].tolist()
                assert len(set(got)) == c, "an index repeats within a row"
                assert all(int(starts[b]) <= i < int(ends[b, t]) for i in got)
                assert (row[c:] == -1).all()


def estimates(q, k, v, spec, seed):
    """Sampled numerator and denominator (shifted by the row max) of one row."""
    sel = select(spec, q, k, v, seed=seed)
    idx, lw = sel.indices[0, 0, 0].long(), sel.log_weights[0, 0, 0]
    c = int(sel.count[0, 0, 0])
    s = (q[0, 0, 0].double() @ k[0, 0].double().T) / math.sqrt(q.shape[-1])
    w = torch.exp(s[idx[:c]] - s.max() + lw[:c].double())
    return (w[:, None] * v[0, 0, idx[:c]].double()).sum(0), w.sum()


@pytest.mark.parametrize("spec", ["sink(3)+window(3)+topk(4)+verified(eps=0.3,delta=0.3,base_rate=0.05,"
                                  "weights='two-phase')", "sink(2)+uniform(10)"])
def test_numerator_and_denominator_are_unbiased(spec):
    q, k, v = rand_qkv(b=1, hq=1, hkv=1, t=1, n=200, seed=5)
    k = k * 2.0  # a spread of scores, so the sample matters
    s = (q[0, 0, 0].double() @ k[0, 0].double().T) / math.sqrt(q.shape[-1])
    w = torch.exp(s - s.max())
    num, den = (w[:, None] * v[0, 0].double()).sum(0), w.sum()
    runs = [estimates(q, k, v, spec, seed) for seed in range(3000)]
    n_hat = torch.stack([r[0] for r in runs])
    d_hat = torch.stack([r[1] for r in runs])
    # The mean converges: within 4 standard errors of the exact values.
    se_d = d_hat.std() / math.sqrt(len(runs))
    assert abs(float(d_hat.mean() - den)) < 4 * float(se_d) + 1e-9
    se_n = n_hat.std(0) / math.sqrt(len(runs))
    assert ((n_hat.mean(0) - num).abs() < 4 * se_n + 1e-9).all()
    # And the sample is not exact (the test would be empty otherwise).
    assert float(d_hat.std()) > 1e-6


def test_pooled_weights_bias_is_small_next_to_the_noise():
    # Pooled weights (n_r / sample size) are biased because the size depends on the pilot;
    # the bias must stay small next to the sampling noise (on real models they cut the
    # error at equal density: docs/guarantee.md).
    q, k, v = rand_qkv(b=1, hq=1, hkv=1, t=1, n=200, seed=5)
    k = k * 2.0
    s = (q[0, 0, 0].double() @ k[0, 0].double().T) / math.sqrt(q.shape[-1])
    den = torch.exp(s - s.max()).sum()
    base = "sink(3)+window(3)+topk(4)+verified(eps=0.3,delta=0.3,base_rate=0.05,min_pilot=4,weights='{}')"
    d = {w: torch.stack([estimates(q, k, v, base.format(w), seed)[1] for seed in range(1500)]) for w in ("pooled", "two-phase")}
    bias = abs(float(d["pooled"].mean() - den)) / float(den)
    sd = {w: float(x.std() / den) for w, x in d.items()}
    print(f"pooled bias {bias:.4f}, sd {sd}")
    assert bias < 0.03 and bias < 0.5 * sd["pooled"]
    # The noise is of the same order: each budget is sized for the same eps.
    assert 0.5 < sd["pooled"] / sd["two-phase"] < 2.0


def test_budget_limits():
    q, k, v = rand_qkv(b=1, hq=2, hkv=1, t=1, n=300)
    # eps -> 0 is exact: the whole residual is taken.
    sel = select("sink(4)+verified(eps=0.0)", q, k, v, seed=0)
    assert sel.count.tolist() == [[[300], [300]]]
    sel = select("sink(4)+verified(eps=1e-6,delta=0.01)", q, k, v, seed=0)
    assert int(sel.count.max()) <= 300
    # Rows shorter than the fixed parts are exact.
    q2, k2, v2 = rand_qkv(b=1, hq=2, hkv=1, t=1, n=10)
    out, sel = vattn.sparse_attention(q2, k2, v2, "sink(8)+window(8)+verified(eps=0.5,delta=0.5)", seed=0)
    assert sel.count.tolist() == [[[10], [10]]]
    assert (sel.log_weights == 0).all()


def test_share_kv_gives_one_selection_per_kv_head():
    q, k, v = rand_qkv(b=2, hq=6, hkv=2, t=1, n=200)
    sel = select("sink(4)+topk(8)+verified(eps=0.1,delta=0.1,share='kv')", q, k, v, seed=0)
    assert sel.shared and sel.indices.shape[1] == 2
    # The union of the group's top-k sets is kept exactly: at least 4 + 8 keys.
    assert int(sel.count.min()) >= 12


@pytest.mark.parametrize("mode", ["output", "denominator"])
def test_sample_grows_with_smaller_eps(mode):
    from vattn.synthetic import make_inputs
    q, k, v, scale = make_inputs("peaked", rows=8, n=2000)
    dens = []
    for eps in (0.4, 0.1, 0.02):
        sel = select(f"sink(4)+window(4)+verified(eps={eps},delta=0.1,mode='{mode}')", q, k, v, scale=scale, seed=0)
        dens.append(float(sel.count.float().mean()))
    assert dens[0] < dens[1] < dens[2] < 2000


@pytest.mark.parametrize("mode", ["output", "denominator"])
@pytest.mark.parametrize("ed", [0.05, 0.1, 0.2])
def test_coverage_meets_target(mode, ed):
    groups = synthetic_groups(FAMILIES, rows=128, n=1024, seed=11)
    rows = verify(groups, "sink(16)+window(16)+topk(0.02)", [ed], [ed], [mode])
    for r in rows:
        assert r["rows"] >= 128
        assert r["tolerance"] == pytest.approx(tolerance(ed, r["rows"]), abs=1e-4)
        assert r["coverage"] >= 1 - ed - r["tolerance"], r
        assert r["density"] < 1.0 or r["group"] == "flat"


def test_chi2_quantile_inverts_the_cdf():
    from vattn.methods.sampling import chi2_quantile
    ks = torch.tensor([1.0, 1.3, 2.0, 5.0, 30.0, 63.0, 500.0])
    for p in (0.0005, 0.025, 0.5, 0.95, 0.9995):
        x = chi2_quantile(ks, p)
        cdf = torch.special.gammainc(ks.double() / 2, x / 2)
        assert ((cdf - p).abs() / p < 2e-3).all(), (p, cdf)
    assert abs(float(chi2_quantile(torch.tensor([1.0]), 0.95)) - 3.8415) < 1e-3


def test_budget_inputs_equal_on_the_gather_and_scatter_paths(monkeypatch):
    # The exact sums over the chosen keys come from gathered K/V rows or, for large sets on
    # CPU, from all scores and one P @ V: both must give the same budget inputs.
    import sys
    import vattn.methods.sampling as sampling
    attend_mod = sys.modules["vattn.attend"]  # the package re-exports attend() under that name
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=3, n=300, seed=7)
    spec = "sink(4)+window(4)+topk(40)+verified(eps=0.2,delta=0.2,min_pilot=8)"
    seen, real = [], sampling.fixed_and_pilot
    monkeypatch.setattr(sampling, "fixed_and_pilot", lambda *a: seen.append(real(*a)) or seen[-1])
    for path in (True, False):
        monkeypatch.setattr(attend_mod, "dense_is_cheaper", lambda *a, path=path: path)
        select(spec, q, k, v, seed=3)
    (d0, n0), pilot0 = seen[0]
    (d1, n1), pilot1 = seen[1]
    assert torch.allclose(d0, d1, rtol=1e-5) and torch.allclose(n0, n1, rtol=1e-4, atol=1e-6)
    assert all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-9) for a, b in zip(pilot0, pilot1))


def one_heavy_inputs(rows=300, n=1024, d=32, seed=0):
    """Rows of Gaussian scores where ONE key in the middle holds 20-50% of the mass."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, n, generator=g, dtype=torch.float64)
    pos = torch.randint(8, n - 8, (rows,), generator=g)
    frac = 0.2 + 0.3 * torch.rand(rows, generator=g, dtype=torch.float64)
    r = torch.arange(rows)
    a[r, pos] = -1e9
    a[r, pos] = torch.logsumexp(a, -1) + torch.log(frac / (1 - frac))
    scale = d ** -0.5
    q = torch.randn(rows, d, generator=g, dtype=torch.float64)
    qn = q / q.norm(dim=-1, keepdim=True)
    noise = torch.randn(rows, n, d, generator=g, dtype=torch.float64)
    noise = noise - (noise @ qn[:, :, None]) * qn[:, None, :]
    k = a[..., None] * (q / q.norm(dim=-1, keepdim=True) ** 2 / scale)[:, None] + noise
    v = 0.5 * torch.randn(rows, 1, d, generator=g, dtype=torch.float64) + torch.randn(rows, n, d, generator=g,
                                                                                      dtype=torch.float64)
    return q[:, None, None].float(), k[:, None].float(), v[:, None].float(), scale


def heavy_coverage(mode, extra="", seed=0, eps=0.1):
    from vattn.attend import attend, dense_attend
    q, k, v, scale = one_heavy_inputs(seed=seed)
    sel = select(f"sink(4)+window(4)+verified(eps={eps},delta={eps},mode='{mode}'{extra})", q, k, v,
                 scale=scale, seed=seed)
    if mode == "output":
        err = metrics.relative_error(attend(q, k, v, sel, scale=scale), dense_attend(q, k, v, scale=scale))
    else:
        starts, ends = torch.zeros(q.shape[0], dtype=torch.long), torch.full((q.shape[0], 1), k.shape[2])
        err = metrics.denominator_error(q, k, sel, starts, ends, scale)
    return metrics.coverage(err, eps), float(sel.count.float().mean()) / k.shape[2]


@pytest.mark.parametrize("mode", ["output", "denominator"])
def test_one_heavy_key_behind_a_weak_front_meets_coverage(mode):
    # Sink and window only: the key holding 20-50% of the mass is in the residual. The
    # pilot (64 of ~1000 keys) misses it 94% of the time; verified must take it exactly.
    need = 0.9 - tolerance(0.1, 300)
    cov, dens = heavy_coverage(mode)
    assert cov >= need, (cov, dens)
    # Without the cut the same rows miss the target (output 0.86, denominator 0.04 when
    # written): the test can fail.
    cov0, _ = heavy_coverage(mode, extra=",heavy=0")
    assert cov0 < 0.9 and cov - cov0 > 0.08, (cov0, cov)


def test_heavy_keys_are_taken_exactly_and_shared_per_kv_head():
    from vattn.stats import heavy_threshold
    q, k, v, scale = one_heavy_inputs(rows=20)
    sel = select("sink(4)+window(4)+verified(eps=0.1,delta=0.1)", q, k, v, scale=scale, seed=0)
    s = (q[:, 0, 0].double()[:, None] @ k[:, 0].double().transpose(-1, -2))[:, 0] * scale
    heavy = s.argmax(-1)
    for r in range(20):
        c = int(sel.count[r, 0, 0])
        idx, lw = sel.indices[r, 0, 0, :c].tolist(), sel.log_weights[r, 0, 0, :c]
        j = idx.index(int(heavy[r]))
        assert float(lw[j]) == 0.0  # exact, not a sampled weight
    # share="kv": a key heavy for one head of the group is taken for the whole group.
    q2, k2, v2 = rand_qkv(b=1, hq=4, hkv=2, t=2, n=600, seed=2)
    k2[0, 0, 300] = 6.0 * q2[0, 1, 0] / q2[0, 1, 0].norm()  # heavy for query head 1 only
    sel = select("sink(4)+window(4)+verified(eps=0.1,delta=0.1,share='kv')", q2, k2, v2, seed=0)
    assert sel.shared
    p = torch.softmax((q2[0, 1, 0] @ k2[0, 0].T) / math.sqrt(q2.shape[-1]), -1)
    n_r = torch.tensor([600 - 8])
    assert float(p[300]) > float(heavy_threshold(0.1, 0.1, torch.tensor([64]), n_r, 0.25))
    for t in range(2):
        c = int(sel.count[0, 0, t])
        idx = sel.indices[0, 0, t, :c].tolist()
        assert 300 in idx and float(sel.log_weights[0, 0, t, idx.index(300)]) == 0.0


def test_verify_runs_each_group_as_its_layer():
    """A captured group carries its layer: per-layer state (hashtopk's random projection)
    differs between layers, as it does in the patched model."""
    from vattn.verify import Inputs, measure
    g = synthetic_groups(["peaked"], rows=8, n=512)[0]
    q, k, v, scale = g.q, g.k, g.v, g.scale
    spec = "sink(4)+window(4)+hashtopk(0.05)"
    a = measure(Inputs("a", q, k, v, scale, layer=0), spec, "output")["output_errors"]
    b = measure(Inputs("b", q, k, v, scale, layer=7), spec, "output")["output_errors"]
    assert not torch.equal(a, b)
