"""kernels/argmax.py (a graphed greedy step's next ids and positions) in the Triton interpreter,
against torch.argmax: first index of the largest, NaN above all, -0.0 equal to 0.0."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from vattn.errors import VattnError
from vattn.kernels.argmax import next_ids, next_ids_ref
from helpers import kernel_env

pytestmark, DEV = kernel_env()


def both(x, src):
    b = src.shape[0]
    pos = torch.arange(b) * 7
    want = [torch.full((b,), -5), pos.clone()]
    next_ids_ref(x, src, *want)
    got = [torch.full((b,), -5, device=DEV), pos.to(DEV)]
    next_ids(x.to(DEV), src.to(DEV), *got)
    return [t.cpu() for t in got], want


@pytest.mark.parametrize("v", [5, 4096, 9000])
def test_next_ids_equal_torch_argmax(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(4, v, generator=g)
    x[1, v // 3] = x[1, -1] = 50.0  # a tie: the first index wins
    x[2] = -1.0
    x[2, v - 1] = 0.0
    x[2, v // 2] = -0.0  # -0.0 == 0.0: the first of them
    x[3] = float("-inf")  # all -inf: index 0
    if v > 5:
        x[0, 7] = float("nan")
        x[0, 3] = float("inf")  # NaN above inf
    src = torch.tensor([0, 1, 2, 3, 0])  # a padding row repeats row 0
    got, want = both(x, src)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[0].tolist() == [7 if v > 5 else x[0].argmax().item(), v // 3, v // 2, 0, want[0][0].item()]


def test_next_ids_bad_input():
    x = torch.zeros(2, 8, dtype=torch.float16, device=DEV)
    s = torch.zeros(2, dtype=torch.long, device=DEV)
    with pytest.raises(VattnError, match="f32"):
        next_ids(x, s, s.clone(), s.clone())
    with pytest.raises(VattnError, match="ids must be contiguous int64"):
        next_ids(x.float(), s, s.int(), s.clone())
