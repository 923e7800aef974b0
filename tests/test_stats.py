"""vattn.stats: the guarantee's statistics (z, chi-square quantile, variance bound, budget, heavy cut)."""
import math

import torch

from vattn import stats


def test_z_two_sided():
    assert abs(stats.z_two_sided(0.05) - 1.959964) < 1e-5
    assert abs(stats.z_two_sided(0.2) - 1.281552) < 1e-5


def test_chi2_quantile_inverts_the_cdf():
    ks = torch.tensor([1.0, 2.0, 7.5, 63.0, 400.0])
    for p in (0.01, 0.5, 0.975):
        x = stats.chi2_quantile(ks, p)
        assert ((torch.special.gammainc(ks.double() / 2, x / 2) - p).abs() / p < 2e-3).all()


def test_var_inflation():
    cnt = torch.tensor([64.0])
    assert stats.var_inflation(cnt, 0.0) == 1.0
    f = float(stats.var_inflation(cnt, 0.975))
    # 63 / chi2_63^{-1}(0.025) = 63 / 42.95
    assert abs(f - 63 / 42.95) < 0.01
    assert float(stats.var_inflation(cnt, 0.99)) > f > 1.0


def test_budget_from_b0_solves_the_finite_population_equation():
    b0 = torch.tensor([10.0, 500.0, float("inf"), 0.0])
    n_r = torch.tensor([1000, 1000, 1000, 1000])
    b = stats.budget_from_b0(b0, n_r)
    assert b.tolist()[2:] == [1000, 0]
    for bb, b00 in zip(b.tolist()[:2], b0.tolist()[:2]):
        # smallest b with b0 (n_r - b) / (n_r - 1) <= b
        assert b00 * (1000 - bb) / 999 <= bb + 1e-9
        assert b00 * (1000 - (bb - 1)) / 999 > bb - 1


def test_heavy_threshold_bounds_one_keys_noise():
    eps, delta = 0.1, 0.1
    m0, n_r = torch.tensor([64]), torch.tensor([2048])
    for c in (1.0, 0.25):
        gamma = float(stats.heavy_threshold(eps, delta, m0, n_r, c))
        # A key of probability gamma in a uniform sample of m0 of n_r keys, weight n_r / m0:
        # its own standard deviation on D_hat / D is gamma sqrt(n_r/m0 - 1) = c eps / z.
        sd = gamma * math.sqrt(2048 / 64 - 1)
        assert abs(sd - c * eps / stats.z_two_sided(delta)) < 1e-12
    # Smaller pilot or larger residual: a lower threshold (more keys taken exactly).
    g = stats.heavy_threshold(eps, delta, torch.tensor([64, 32, 64]), torch.tensor([2048, 2048, 4096]))
    assert g[1] < g[0] and g[2] < g[0]
    # A residual no larger than the pilot is sampled whole: nothing is heavy.
    assert torch.isinf(stats.heavy_threshold(eps, delta, torch.tensor([64]), torch.tensor([64]))).all()


def test_sampling_uses_the_one_copy():
    import vattn.methods.sampling as sampling
    assert sampling.chi2_quantile is stats.chi2_quantile
    assert sampling.z_two_sided is stats.z_two_sided
    assert sampling.budget_from_b0 is stats.budget_from_b0


def test_var_inflation_looks_up_whole_counts_as_the_solve_gives_them():
    cnt = torch.tensor([[8.0, 128.0, 128.0], [2.0, 1.0, 128.0]], dtype=torch.float64)
    dof = (cnt - 1).clamp(min=1)
    want = dof / stats.chi2_quantile(dof, 1.0 - 0.95)
    got = stats.var_inflation(cnt, 0.95)
    assert got.shape == cnt.shape and torch.equal(got, want)
    dof = (cnt + 0.5 - 1).clamp(min=1)  # counts that are not whole take the batched solve
    assert torch.equal(stats.var_inflation(cnt + 0.5, 0.95), dof / stats.chi2_quantile(dof, 1.0 - 0.95))
