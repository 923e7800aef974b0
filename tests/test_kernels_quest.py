"""kernels/quest.py (Quest's page bounds updated in place) in the Triton interpreter, against its
torch twin: exact (min and max are exact), pages that must not land written to the scratch page."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from vattn.errors import VattnError
from vattn.kernels.quest import bound_pages, bound_pages_ref
from vattn.plan_select import page_update
from helpers import kernel_env

pytestmark, DEV = kernel_env()


@pytest.mark.parametrize("dtype,s", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float16, 5)])
def test_bounds_equal_the_torch_twin(dtype, s):
    g = torch.Generator().manual_seed(s)
    b, hkv, n, d = 3, 2, 70, 32
    k = torch.randn(b, hkv, n + 9, d, generator=g).to(dtype)[:, :, :n]  # a strided cache view
    cap = -(-n // s)
    starts = torch.tensor([0, 5, 0])
    end = torch.tensor([70, 33, 0])  # a row without keys reads the longest row and lands nowhere
    pid = torch.tensor([[0, 4, cap - 1], [0, 2, 1], [0, 1, 2]])
    ok = (end > starts)[:, None] & (pid >= (starts // s)[:, None]) & (pid * s < end[:, None])
    up = page_update(pid.to(DEV), ok.to(DEV), starts.to(DEV), end.to(DEV), s, cap)
    pages = torch.randn(b, hkv, cap + 1, d, 2, generator=g).to(dtype)  # bounds in the keys' dtype: exact
    want = pages.clone()
    bound_pages_ref(want, k, up.src.cpu(), up.safe.cpu(), up.seen.cpu(), up.where.cpu())
    got = pages.clone().to(DEV)
    bound_pages(got, k.to(DEV), up.src, up.safe, up.seen, up.where)
    assert torch.equal(got.cpu()[:, :, :cap], want[:, :, :cap])  # (the scratch page: any order of writes)
    assert not torch.equal(want, pages)  # the update wrote something
    if s == 16:  # row 1's page 2 holds key 32 (visible) and 33.. (past its end): bounded by key 32 alone
        key = k[1, :, 32].float()
        assert torch.equal(got.cpu()[1, :, 2, :, 0], key) and torch.equal(got.cpu()[1, :, 2, :, 1], key)


def test_bad_shapes_are_named():
    k = torch.zeros(1, 2, 8, 4)
    pages = torch.zeros(1, 2, 3, 4, 2)
    src, safe = torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 4, dtype=torch.long)
    seen, where = torch.ones(1, 1, 4, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(VattnError, match="pages must be torch.float32 .k's dtype."):
        bound_pages(pages.double(), k, src, safe, seen, where)
    with pytest.raises(VattnError, match="must agree"):
        bound_pages(pages, k, src, safe, seen[:, :, :2], where)
