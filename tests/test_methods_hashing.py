"""hashtopk: popcount, agreement vs a direct sign comparison, top-k, dense, incremental, errors."""
import math

import pytest
import torch

import vattn
from helpers import assert_parse_error
from vattn.attend import dense_attend, row_bounds
from vattn.methods.base import DecodeContext
from vattn.kernels.bits import popcount
from vattn.methods.hashing import HashTopK, pack_bits, project


def inputs(b=2, hq=4, hkv=2, t=2, n=45, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, n, d, generator=g),
            torch.randn(b, hkv, n, d, generator=g))


def context(q, k, v, lengths=None, starts=None, state=None, layer=0):
    b, _, t, d = q.shape
    s, e = row_bounds(b, t, k.shape[2], lengths, starts)
    return DecodeContext(q, k, v, s, e, 1 / math.sqrt(d), None, {} if state is None else state, layer)


def test_popcount_matches_python():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31, (500,), generator=g)
    x[:3] = torch.tensor([-1, -2**31, 0])
    want = torch.tensor([bin(int(v) & (2**32 - 1)).count("1") for v in x])
    assert torch.equal(popcount(x), want)


def test_pack_bits_round_trip():
    bits = torch.rand(7, 100) > 0.5
    words = pack_bits(bits)
    assert words.shape == (7, 4) and words.dtype == torch.int32
    back = torch.stack([(words[:, j // 32].long() >> (j % 32)) & 1 for j in range(100)], -1).bool()
    assert torch.equal(back, bits)


def test_signatures_are_the_scan_kernels_format():
    """One format: the part's random signatures equal kernels.bits.sign_bits with the layer's projection."""
    from vattn.kernels.bits import sign_bits
    from vattn.methods.hashing import random_proj, signatures, simhash_proj
    k = torch.randn(2, 3, 40, 16)
    got = signatures(k, random_proj(3, 16, 64, 5, 2, "cpu"), 64)
    assert torch.equal(got, sign_bits(k, simhash_proj(16, 64, 5, 2, "cpu")))


@pytest.mark.parametrize("bits", [7, 64, 100, 128])
def test_agreement_equals_direct_sign_comparison(bits):
    q, k, v = inputs(seed=bits)
    part = HashTopK(k=8, bits=bits, seed=3)
    ctx = context(q, k, v, layer=2)
    got = part.scores(ctx)
    pq, pk = part.params(ctx)
    sq = project(q, pq) > 0  # [B, Hq, T, bits]
    sk = project(k, pk) > 0  # [B, Hkv, N, bits]
    for h in range(4):
        same = (sq[:, h, :, None, :] == sk[:, h // 2, None, :, :]).sum(-1)
        assert torch.equal(got[:, h], same.int())


def test_keeps_the_keys_with_most_agreement():
    q, k, v = inputs(seed=1)
    lengths, starts = torch.tensor([45, 30]), torch.tensor([0, 4])
    ctx = context(q, k, v, lengths, starts)
    part = HashTopK(k=10, bits=32)
    agree = part.scores(ctx).float().masked_fill(~ctx.allowed(), -1)
    sel = vattn.select("hashtopk(10, bits=32)", q, k, v, lengths=lengths, starts=starts)
    assert bool((sel.count == 10).all())
    chosen = torch.zeros_like(agree, dtype=torch.bool).scatter_(-1, sel.indices.long(), True)
    assert bool((chosen <= ctx.allowed()).all())
    worst_in = agree.masked_fill(~chosen, 99).amin(-1)
    best_out = agree.masked_fill(chosen | ~ctx.allowed(), -1).amax(-1)
    assert bool((worst_in >= best_out).all())


def test_shared_keys_have_the_groups_most_summed_agreement():
    """share='kv': one set per KV head, the k keys whose agreement summed over the group's query
    heads is largest, ties to the lowest positions (a brute-force sort here)."""
    q, k, v = inputs(seed=4)
    lengths, starts = torch.tensor([45, 30]), torch.tensor([0, 4])
    ctx = context(q, k, v, lengths, starts)
    agree = HashTopK(k=10, bits=8).scores(ctx).view(2, 2, 2, 2, 45).sum(2)  # [B, Hkv, T, N], many ties
    sel = vattn.select("sink(2)+hashtopk(10,bits=8,share='kv')", q, k, v, lengths=lengths, starts=starts)
    assert sel.shared and sel.indices.shape[1] == 2 and bool((sel.count == 12).all())
    for b in range(2):
        for h in range(2):
            for t in range(2):
                pos = torch.arange(starts[b] + 2, ctx.ends[b, t])  # past the sinks, causal
                order = sorted(pos.tolist(), key=lambda p: (-int(agree[b, h, t, p]), p))[:10]
                got = set(sel.indices[b, h, t, :12].tolist())
                assert got == set(order) | {int(starts[b]), int(starts[b]) + 1}


def test_full_k_is_dense():
    q, k, v = inputs(seed=2)
    lengths, starts = torch.tensor([45, 30]), torch.tensor([0, 4])
    out, _ = vattn.sparse_attention(q, k, v, "hashtopk(1.0, bits=16)", lengths=lengths, starts=starts)
    assert torch.allclose(out, dense_attend(q, k, v, lengths=lengths, starts=starts), atol=2e-6, rtol=1e-5)


def test_signatures_update_incrementally():
    q, k, v = inputs(t=1, n=60, seed=3)
    state = {}
    for n in [30, 31, 32, 40, 60]:
        a = vattn.select("window(4)+hashtopk(6)", q, k[:, :, :n], v[:, :, :n], state=state)
        fresh = {}
        b = vattn.select("window(4)+hashtopk(6)", q, k[:, :, :n], v[:, :, :n], state=fresh)
        assert torch.equal(a.indices, b.indices)
        key = "hashtopk/64/random/0"
        assert torch.equal(state[key]["meta"], fresh[key]["meta"])
        assert state[key]["meta"].shape[2] == n


def test_random_projection_depends_on_layer_and_seed():
    q, k, v = inputs()
    a = HashTopK(bits=64).scores(context(q, k, v, layer=0))
    b = HashTopK(bits=64).scores(context(q, k, v, layer=1))
    c = HashTopK(bits=64, seed=1).scores(context(q, k, v, layer=0))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, HashTopK(bits=64).scores(context(q, k, v, layer=0)))


@pytest.mark.parametrize("spec, words", [
    ("hashtopk(bits=0)", ["hashtopk", "bits", "[1, 256]"]),
    ("hashtopk(bits=512)", ["hashtopk", "bits"]),
    ("hashtopk(2.0)", ["hashtopk", "k"]),
    ("hashtopk(0.1, proj='no/such/file.pt')", ["hashtopk", "proj", "no/such/file.pt"]),
    ("hashtopk(0.1, share='q')", ["hashtopk", "share", "'kv'"]),
    ("hashtopk(0.1, cut='sample', share='kv')+verified(draws='iid')", ["hashtopk", "share", "per KV head"]),
])
def test_invalid_parameters(spec, words):
    assert_parse_error(spec, words)
