"""Small shared builders for tests."""
import torch


def rand_qkv(b=2, hq=4, hkv=2, t=1, n=64, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    return q, k, v


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())
