"""MagicPIG: collision rule, inclusion probability (formula and frequency), incremental codes."""
import math

import pytest
import torch

import vattn
from vattn.methods.magicpig import inclusion_prob, planes


def inputs(b=1, hq=2, hkv=1, t=1, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, n, d, generator=g) + 0.5,
            torch.randn(b, hkv, n, d, generator=g))


def stated_prob(q, k, K, L):
    """w = 1 - (1-p)^L - L p (1-p)^(L-1), p = (1 - theta/pi)^K, theta from the centered key."""
    kc = k - k.mean(2, keepdim=True)  # [B, Hkv, N, D]
    cos = torch.nn.functional.cosine_similarity(q[:, :, :, None].double(), kc[:, :, None].double(), dim=-1)
    p = (1 - torch.acos(cos.clamp(-1, 1)) / math.pi) ** K
    return 1 - (1 - p) ** L - L * p * (1 - p) ** (L - 1)  # [B, H, T, N] (Hkv = 1 here)


def chosen_sets(sel):
    return [set(sel.indices[0, h, 0, : sel.count[0, h, 0]].tolist()) for h in range(sel.indices.shape[1])]


def test_inclusion_formula_against_binomial_sum():
    cos = torch.tensor([-0.9, -0.2, 0.0, 0.3, 0.8, 0.999])
    for K, L in [(1, 2), (3, 7), (10, 150)]:
        p = ((1 - torch.acos(cos.double()) / math.pi) ** K)
        want = sum(float(math.comb(L, j)) * p ** j * (1 - p) ** (L - j) for j in range(2, L + 1))
        assert torch.allclose(inclusion_prob(cos, K, L), want, rtol=1e-9, atol=1e-300)
    # Tiny probabilities stay accurate (the closed form cancels to 0 there).
    w = inclusion_prob(torch.tensor([-0.99]), 10, 150)
    p = (1 - math.acos(-0.99) / math.pi) ** 10
    assert math.isclose(float(w), math.comb(150, 2) * p * p, rel_tol=1e-3)


def test_sampled_keys_are_those_colliding_in_two_tables():
    K, L = 3, 8
    q, k, v = inputs(hq=2, n=40, seed=1)
    sel = vattn.select(f"magicpig(K={K}, L={L}, seed=5)", q, k, v, layer=3)
    w = planes(1, 8, K, L, 5, 3, "cpu")[0]  # [D, L*K]
    kc = k[0, 0] - k[0, 0].mean(0)
    for h in range(2):
        qb = (q[0, h, 0] @ w) > 0
        kb = (kc @ w) > 0  # [N, L*K]
        hits = torch.zeros(40, dtype=torch.long)
        for table in range(L):
            cols = slice(table * K, (table + 1) * K)
            hits += (kb[:, cols] == qb[cols]).all(-1).long()
        assert chosen_sets(sel)[h] == set(torch.nonzero(hits >= 2).flatten().tolist())
    # Log-weights are -log of the stated probability.
    want = stated_prob(q, k, K, L)
    got = sel.log_weights[0, :, 0]
    for h in range(2):
        idx = sel.indices[0, h, 0, : sel.count[0, h, 0]].long()
        assert torch.allclose(got[h, : len(idx)].double(), -torch.log(want[0, h, 0, idx]), rtol=1e-4)


def test_inclusion_frequency_matches_stated_probability():
    K, L, draws = 2, 5, 400
    q, k, v = inputs(hq=1, n=8, seed=2)
    hits = torch.zeros(8)
    for s in range(draws):
        sel = vattn.select(f"magicpig(K={K}, L={L}, seed={s})", q, k, v)
        hits[sel.indices[0, 0, 0, : sel.count[0, 0, 0]].long()] += 1
    w = stated_prob(q, k, K, L)[0, 0, 0].float()
    freq = hits / draws
    sigma = torch.sqrt(w * (1 - w) / draws)
    assert bool(((freq - w).abs() <= 4.5 * sigma + 1e-3).all()), (freq, w)
    assert float(w.min()) < 0.3 and float(w.max()) > 0.6  # the test spans low and high odds


def test_after_exact_parts_and_ragged_rows():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 2, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g)
    lengths, starts = torch.tensor([64, 50]), torch.tensor([0, 6])
    sel = vattn.select("sink(4)+window(8)+magicpig(K=2, L=12)", q, k, k, lengths=lengths, starts=starts)
    from vattn.attend import row_bounds
    s, e = row_bounds(2, 2, 64, lengths, starts)
    for b in range(2):
        for t in range(2):
            keys = sel.indices[b, :, t][sel.indices[b, :, t] >= 0]
            assert bool(((keys >= s[b]) & (keys < e[b, t])).all())
    lw = sel.log_weights[sel.valid()]
    assert bool((lw >= 0).all()) and bool((lw > 0).any())  # exact keys 0, sampled -log(w) > 0


def test_codes_update_incrementally():
    q, k, v = inputs(hq=2, n=50, seed=4)
    spec = "magicpig(K=3, L=10)"
    key = "magicpig/3/10/0"
    step = {}
    vattn.select(spec, q, k[:, :, :30], v[:, :, :30], state=step)
    jump = {key: dict(step[key]), key + "/mu": step[key + "/mu"]}
    for n in range(31, 51):
        a = vattn.select(spec, q, k[:, :, :n], v[:, :, :n], state=step)
    b = vattn.select(spec, q, k, v, state=jump)
    assert torch.equal(step[key]["meta"], jump[key]["meta"])
    assert torch.equal(a.indices, b.indices) and torch.equal(a.log_weights, b.log_weights)
    # The codes of appended keys use the prefill's mean, as a rebuild with that mean would.
    from vattn.methods.magicpig import codes
    w = planes(1, 8, 3, 10, 0, 0, "cpu")
    assert torch.equal(step[key]["meta"], codes(k - step[key + "/mu"], w, 3))


@pytest.mark.parametrize("spec, words", [
    ("magicpig(K=0)", ["magicpig", "K", "[1, 62]"]),
    ("magicpig(K=63)", ["magicpig", "K"]),
    ("magicpig(L=1)", ["magicpig", "L", "[2, 4096]"]),
    ("magicpig(seed=-1)", ["magicpig", "seed"]),
    ("magicpig(K=2.5)", ["magicpig", "K"]),
])
def test_invalid_parameters(spec, words):
    with pytest.raises(vattn.VattnError) as e:
        vattn.parse(spec)
    assert all(w in str(e.value) for w in words)
