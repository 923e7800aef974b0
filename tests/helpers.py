"""Small shared builders for tests."""
import os

import pytest
import torch


def kernel_env():
    """(skip mark, device) of a kernel test module, read when it calls this (after its own
    TRITON_INTERPRET default): on CUDA, or on the CPU in the Triton interpreter."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    mark = pytest.mark.skipif(not interp and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1")
    return mark, "cpu" if interp else "cuda"


def rand_qkv(b=2, hq=4, hkv=2, t=1, n=64, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_parse_error(spec, words):
    """Parsing `spec` raises a VattnError whose message names every one of `words`."""
    import pytest
    import vattn
    with pytest.raises(vattn.VattnError) as e:
        vattn.parse(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


def assert_full_budget_is_dense(spec, q, k, v, lengths=None, starts=None):
    import vattn
    from vattn.attend import dense_attend
    out, _ = vattn.sparse_attention(q, k, v, spec, lengths=lengths, starts=starts)
    assert torch.allclose(out, dense_attend(q, k, v, lengths=lengths, starts=starts), atol=2e-6, rtol=1e-5)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    # every torch.empty the kernels take comes back full of NaN: unwritten outputs fail
    real = torch.empty

    def poisoned(*a, **kw):
        t = real(*a, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-7)
        return t
    monkeypatch.setattr(torch, "empty", poisoned)
