"""The hashtopk-kernel path's scores (kernels/bits.hash_scores) against the reference method's
agreement (methods/hashing.py), in the Triton interpreter: signatures of 1-2 words, bits that
leave part of a word unused, rows of unequal [lo, hi), a signature buffer longer than the keys."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import kernel_env
from vattn.errors import VattnError
from vattn.kernels.bits import hash_scores, sign_bits
from vattn.methods.hashing import agreement, random_proj, signatures, simhash_proj

pytestmark, DEV = kernel_env()


@pytest.mark.parametrize("bits,t,dtype", [(32, 1, torch.float32), (48, 2, torch.bfloat16), (64, 1, torch.float16)])
def test_hash_scores_are_the_reference_agreement(bits, t, dtype):
    g = torch.Generator().manual_seed(bits)
    b, hq, hkv, n, d = 2, 6, 2, 700, 32
    q = torch.randn(b, hq, t, d, generator=g).to(dtype).to(DEV)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype).to(DEV)
    w = -(-bits // 32)
    proj = torch.nn.functional.pad(simhash_proj(d, bits, 3, 1, DEV), (0, 32 * w - bits))  # [D, 32 W]
    sig = torch.zeros(b, hkv, n + 100, w, dtype=torch.int32, device=DEV)  # room past the keys, junk there
    sig[:, :, :n] = sign_bits(k, proj)
    sig[:, :, n:] = 12345
    lo = torch.tensor([[5] * t, [0] * t], device=DEV)
    hi = torch.tensor([[n] * t, [n - 1 - 40 * i for i in range(t)]], device=DEV)
    got = hash_scores(q, sig, proj, lo, hi, n, bits, block_n=128)
    pk = random_proj(hkv, d, bits, 3, 1, DEV)  # the reference's parameters (HashTopK.params)
    want = agreement(signatures(q, {"w": pk["w"].repeat_interleave(hq // hkv, 0)}, bits),
                     signatures(k, pk, bits), bits).float()
    pos = torch.arange(n, device=DEV)
    inr = (pos >= lo[:, None, :, None]) & (pos < hi[:, None, :, None])
    want = torch.where(inr, want, float("-inf"))
    assert torch.equal(got, want)
    assert got[torch.isfinite(got)].max() <= bits and got[torch.isfinite(got)].min() >= 0
    shared = hash_scores(q, sig, proj, lo, hi, n, bits, block_n=128, shared=True)  # share='kv': the group's sum
    assert torch.equal(shared, want.view(b, hkv, hq // hkv, t, n).sum(2))


def test_hash_scores_bad_inputs():
    q = torch.zeros(1, 4, 1, 32, device=DEV)
    sig = torch.zeros(1, 2, 64, 1, dtype=torch.int32, device=DEV)
    lo, hi = torch.zeros(1, 1, dtype=torch.long, device=DEV), torch.full((1, 1), 64, device=DEV)
    with pytest.raises(VattnError, match="proj"):
        hash_scores(q, sig, torch.zeros(32, 64, device=DEV), lo, hi, 64, 32)
    with pytest.raises(VattnError, match=">= 65"):
        hash_scores(q, sig, torch.zeros(32, 32, device=DEV), lo, hi, 65, 32)
    with pytest.raises(VattnError, match="int32"):
        hash_scores(q, sig.long(), torch.zeros(32, 32, device=DEV), lo, hi, 64, 32)


def test_hash_scores_sign_the_newest_key():
    """sign=(k, lengths): each row's newest key signed in place (the decode step's key, in the
    window), the other signatures and the scores untouched."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, n, d = 3, 4, 2, 200, 32
    q = torch.randn(b, hq, 1, d, generator=g).to(DEV)
    k = torch.randn(b, hkv, n, d, generator=g).to(DEV)
    proj = torch.randn(d, 64, generator=g).to(DEV)
    sig = torch.randint(-2**31, 2**31 - 1, (b, hkv, n + 8, 2), generator=g, dtype=torch.int32).to(DEV)
    before = sig.clone()
    lengths = torch.tensor([200, 57, 0], dtype=torch.int32, device=DEV)
    lo = torch.zeros(b, 1, dtype=torch.long, device=DEV)
    hi = (lengths.long() - 5).clamp(min=0)[:, None]
    plain = hash_scores(q, sig.clone(), proj, lo, hi, n, 64)
    got = hash_scores(q, sig, proj, lo, hi, n, 64, sign=(k, lengths))
    assert torch.equal(got, plain)
    want = before.clone()
    for i, ln in enumerate(lengths.tolist()):
        if ln:
            want[i, :, ln - 1] = sign_bits(k[i, :, ln - 1], proj)
    assert torch.equal(sig, want)
    assert not torch.equal(sig, before)
