"""Paged decode kernel vs its torch reference (CPU: Triton interpreter at tiny sizes)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vattn.errors import VattnError  # noqa: E402
from vattn.kernels.paged import paged_decode, paged_decode_ref, to_paged  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dense_ref(q, k, v, lengths):
    B, Hq, D = q.shape
    G = Hq // k.shape[1]
    kf, vf = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhnd->bhn", q.double(), kf) * D ** -0.5
    s = s.masked_fill(torch.arange(k.shape[2], device=q.device)[None, None] >= lengths.view(-1, 1, 1), float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(s, -1), vf)


@pytest.mark.parametrize("B,Hq,Hkv,N,D,splits", [(2, 4, 2, 45, 16, None), (3, 8, 2, 70, 32, 3), (1, 2, 2, 16, 16, 1)])
def test_paged_matches_reference(B, Hq, Hkv, N, D, splits):
    g = torch.Generator().manual_seed(B * 100 + N)
    q = torch.randn(B, Hq, D, generator=g).to(DEV)
    k = torch.randn(B, Hkv, N, D, generator=g).to(DEV)
    v = torch.randn(B, Hkv, N, D, generator=g).to(DEV)
    lengths = torch.randint(1, N + 1, (B,), generator=g).int().to(DEV)
    lengths[0] = N
    kp, vp, table = to_paged(k, v, lengths, 16, num_blocks=B * ((N + 15) // 16) + 3, generator=g)
    want = _dense_ref(q, k, v, lengths)
    ref = paged_decode_ref(q, kp, vp, table, lengths)
    assert (ref.double() - want).norm() / want.norm() < 1e-5
    out = paged_decode(q, kp, vp, table, lengths, block_n=32, splits=splits)
    assert torch.isfinite(out).all()
    assert (out.double() - want).norm() / want.norm() < 1e-4


def test_paged_rejects_bad_table():
    q = torch.randn(2, 4, 16)
    kp = torch.randn(4, 2, 16, 16)
    with pytest.raises(VattnError, match="block_table"):
        paged_decode(q, kp, kp, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, dtype=torch.int32))
