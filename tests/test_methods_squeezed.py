"""squeezed: k-means, clusters chosen by centroid score, full budget, appended keys, errors."""
import math

import pytest
import torch

import vattn
from helpers import assert_parse_error, assert_full_budget_is_dense
from vattn.attend import row_bounds

LENGTHS, STARTS = torch.tensor([53, 41]), torch.tensor([0, 5])
KEY = "squeezed/6/{iters}/0"


def inputs(b=2, hq=4, hkv=2, t=3, n=53, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, n, d, generator=g),
            torch.randn(b, hkv, n, d, generator=g))


def keys_of(sel, bi, h, t):
    return set(sel.indices[bi, h, t, : sel.count[bi, h, t]].tolist())


def run(spec, q, k, v, lengths=LENGTHS, starts=STARTS, state=None):
    state = {} if state is None else state
    return vattn.select(spec, q, k, v, lengths=lengths, starts=starts, state=state), state


def test_assignments_are_nearest_centroids_and_centroids_are_member_means():
    q, k, v = inputs()
    _, state = run("squeezed(8, clusters=6, iters=50)", q, k, v)
    cent, assign = state[KEY.format(iters=50) + "/centroids"], state[KEY.format(iters=50)]["meta"]
    assert cent.shape == (2, 2, 6, 8)
    for bi in range(2):
        lo, hi = int(STARTS[bi]), int(LENGTHS[bi])
        assert bool((assign[bi, :, :lo] == -1).all()) and bool((assign[bi, :, hi:] == -1).all())
        for h in range(2):
            for j in range(lo, hi):
                d2 = ((k[bi, h, j] - cent[bi, h]) ** 2).sum(-1)
                assert int(assign[bi, h, j]) == int(d2.argmin())
            # 50 Lloyd steps on 41-53 keys reach a fixed point: each centroid is its members' mean.
            for c in range(6):
                members = [j for j in range(lo, hi) if int(assign[bi, h, j]) == c]
                if members:
                    assert torch.allclose(cent[bi, h, c], k[bi, h, members].mean(0), atol=1e-5)


def test_selected_keys_are_the_members_of_the_best_clusters():
    q, k, v = inputs(seed=1)
    want = 12
    sel, state = run(f"window(2)+squeezed({want}, clusters=6, iters=3)", q, k, v)
    cent, assign = state[KEY.format(iters=3) + "/centroids"], state[KEY.format(iters=3)]["meta"]
    s, e = row_bounds(2, 3, k.shape[2], LENGTHS, STARTS)
    for bi in range(2):
        for h in range(4):
            kv = h // 2
            score = (cent[bi, kv] @ q[bi, h].T).T / math.sqrt(8)  # [T, C]
            for t in range(3):
                end = int(e[bi, t])
                window = {end - 1, end - 2}
                free = [j for j in range(int(s[bi]), end) if j not in window]
                taken, got = [], set(window)
                for c in sorted(range(6), key=lambda c: -float(score[t, c])):
                    members = [j for j in free if int(assign[bi, kv, j]) == c]
                    if members and len(taken) < want:
                        taken += members
                got |= set(taken)
                assert keys_of(sel, bi, h, t) == got
                assert len(taken) >= want


@pytest.mark.parametrize("clusters", [1, 5, 0.2, 1.0, 100])
def test_full_budget_is_dense(clusters):
    q, k, v = inputs(seed=2)
    assert_full_budget_is_dense(f"squeezed(1.0, clusters={clusters})", q, k, v, LENGTHS, STARTS)


def test_deterministic_given_seed():
    q, k, v = inputs(seed=3)
    a = run("squeezed(8, clusters=6, iters=2)", q, k, v)[1][KEY.format(iters=2) + "/centroids"]
    b = run("squeezed(8, clusters=6, iters=2)", q, k, v)[1][KEY.format(iters=2) + "/centroids"]
    c = run("squeezed(8, clusters=6, iters=2, seed=1)", q, k, v)[1]["squeezed/6/2/1/centroids"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_appended_keys_join_their_nearest_centroid():
    q, k, v = inputs(t=1, n=70, seed=4)
    starts, spec, n0 = torch.tensor([0, 3]), "sink(2)+squeezed(9, clusters=5, iters=4)", 37
    key = "squeezed/5/4/0"
    state = {}
    for n in [37, 38, 39, 41, 48, 57, 70]:
        lengths = torch.tensor([n, n - 2])
        inc, _ = run(spec, q, k[:, :, :n], v[:, :, :n], lengths, starts, state)
        # Rebuild: a fresh state from the same prefill, then straight to n keys.
        fresh = {}
        run(spec, q, k[:, :, :n0], v[:, :, :n0], torch.tensor([n0, n0 - 2]), starts, fresh)
        new, _ = run(spec, q, k[:, :, :n], v[:, :, :n], lengths, starts, fresh)
        assert torch.equal(inc.indices, new.indices) and torch.equal(inc.count, new.count)
        cent = state[key + "/centroids"]
        assert torch.equal(cent, fresh[key + "/centroids"])
        assign = state[key]["meta"]
        for bi in range(2):
            for j in range(n0 - 2 * bi, int(lengths[bi])):  # keys after the prefill
                d2 = ((k[bi, :, j, None] - cent[bi]) ** 2).sum(-1)  # [Hkv, C]
                assert assign[bi, :, j].tolist() == d2.argmin(-1).tolist()


def test_new_sequence_in_same_state_reclusters():
    q, k, v = inputs(t=1, n=40, seed=5)
    state = {}
    run("squeezed(8, clusters=4)", q, k, v, None, None, state)
    k2 = torch.randn_like(k)[:, :, :20]
    a, _ = run("squeezed(8, clusters=4)", q, k2, v[:, :, :20], None, None, state)
    b, _ = run("squeezed(8, clusters=4)", q, k2, v[:, :, :20], None, None, {})
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize("spec, words", [
    ("squeezed(1.5)", ["squeezed", "k", "(0, 1]"]),
    ("squeezed(-3)", ["squeezed", "k"]),
    ("squeezed(clusters=0)", ["squeezed", "clusters", ">= 1", "(0, 1]"]),
    ("squeezed(clusters=1.5)", ["squeezed", "clusters"]),
    ("squeezed(clusters='a')", ["squeezed", "clusters"]),
    ("squeezed(iters=101)", ["squeezed", "iters", "[0, 100]"]),
    ("squeezed(seed=-1)", ["squeezed", "seed"]),
])
def test_invalid_parameters(spec, words):
    assert_parse_error(spec, words)
