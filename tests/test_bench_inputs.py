"""The peaked-score inputs `vattn bench` times output against denominator mode on (attn_core.peaked_sets)."""
import pytest
import torch

from vattn.bench.attn_core import SHAPE, peaked_sets


def test_peaked_sets_give_every_head_of_a_group_the_family_scores():
    hq, hkv, d = SHAPE["hq"], SHAPE["hkv"], SHAPE["d"]
    g = torch.Generator().manual_seed(0)
    (q, k, v), = peaked_sets(2, hkv, 4096, 1, torch.float32, g, device="cpu")
    assert q.shape == (2, hq, 1, d) and k.shape == v.shape == (2, hkv, 4096, d)
    G = hq // hkv
    s = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k.repeat_interleave(G, 1)) * d ** -0.5  # scaled scores
    hot = s > 3.5
    assert 0.007 < hot.float().mean() < 0.014  # ~1% of the keys 6 above unit-normal scores
    cold = s[~hot]
    assert abs(cold.mean()) < 0.05 and 0.95 < cold.std() < 1.15  # unit normal plus ~0.3 of each head's noise
    hg = hot.view(2, hkv, G, -1)
    both = (hg[:, :, :1] & hg[:, :, 1:]).sum() / (hg[:, :, :1].sum() * (G - 1))
    assert both > 0.9  # the heads of a group find the same keys hot (one direction per group)
    assert (v.mean(2).norm(dim=-1) > 0.3 * d ** 0.5).all()  # values share a mean direction per KV head


def test_front_specs_compile_to_fused_paths():
    """vattn bench's exact-front rows time fused plans, never the reference (a user's spec text)."""
    from vattn.bench.attn_core import front_specs, scan_params
    from vattn.kernels.common import triton_available
    from vattn.plan import compile
    if not triton_available():
        pytest.skip("needs triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (the CPU under TRITON_INTERPRET=1)
    paths = {n: compile(s, dev, fused=True).path for n, s in front_specs(scan_params(32768)).items()}
    assert paths == {"topk": "topk-kernel", "hashtopk": "hashtopk-kernel", "quest": "quest-kernel", "quest_kv": "quest-kernel",
                     "topk_verified": "sampled-kernel", "quest_verified": "sampled-kernel"}
