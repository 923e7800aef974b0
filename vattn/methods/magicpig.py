"""MagicPIG (Chen et al., 2024): sample keys by locality-sensitive hashing, reweight them.

Keys are centered (the mean key mu is subtracted; exact, since every score of a row
moves by the same q.mu and softmax ignores it) and hashed with SimHash: L tables of K
random-hyperplane sign bits each. A key is sampled when its K-bit code equals the
query's in at least 2 of the L tables. With theta the angle between q and the centered
key, one table collides with probability p = (1 - theta/pi)^K, so the key is sampled
with probability w = P(Binomial(L, p) >= 2) = 1 - (1-p)^L - L p (1-p)^(L-1); it enters
the Selection with log-weight -log(w) (an importance-sampling estimate of the residual).

mu is the mean of the visible keys of the first call (the prefill) and is kept for the
keys appended later, so the hash codes of old keys never change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vattn.methods.base import Builder, DecodeContext, register
from vattn.methods.quest import add_all, block_state, check_int, row_ends

CHUNK = 2048  # keys per step when hashing or counting collisions (bounds memory)


def planes(hkv: int, d: int, K: int, L: int, seed: int, layer: int, device) -> torch.Tensor:
    """Random hyperplanes f32 [Hkv, D, L*K], fixed by (seed, layer)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(hkv, d, L * K, generator=g).to(device)


def codes(x: torch.Tensor, w: torch.Tensor, K: int) -> torch.Tensor:
    """x [B, H, M, D], w [H, D, L*K] -> int64 [B, H, M, L]: each table's K sign bits as one code."""
    out = []
    for lo in range(0, x.shape[2], CHUNK):
        bits = (x[:, :, lo:lo + CHUNK].float() @ w) > 0
        bits = bits.reshape(*bits.shape[:-1], -1, K).long()
        out.append((bits << torch.arange(K, device=x.device)).sum(-1))
    return torch.cat(out, 2) if out else torch.zeros(*x.shape[:2], 0, w.shape[-1] // K,
                                                     dtype=torch.long, device=x.device)


def collisions(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
    """Tables in which query and key codes agree: int16 [B, Hq, T, N].

    qc [B, Hq, T, L]; kc [B, Hkv, N, L] (query head h uses KV head h // G).
    """
    b, hq, t, L = qc.shape
    hkv = kc.shape[1]
    q = qc.reshape(b, hkv, hq // hkv * t, 1, L)
    out = [(q == kc[:, :, None, lo:lo + CHUNK]).sum(-1, dtype=torch.int16)
           for lo in range(0, kc.shape[2], CHUNK)]
    return torch.cat(out, -1).reshape(b, hq, t, -1)


def inclusion_prob(cos: torch.Tensor, K: int, L: int) -> torch.Tensor:
    """P(at least 2 of L tables collide) for the cosine between q and a key: f64.

    Summed term by term in log space: 1 - (1-p)^L - L p (1-p)^(L-1) cancels to
    nothing in floating point when L p is small.
    """
    theta = torch.acos(cos.double().clamp(-1.0, 1.0))
    p = ((1.0 - theta / math.pi) ** K).clamp(1e-300, 1.0 - 1e-16)
    j = torch.arange(2, L + 1, dtype=torch.float64, device=cos.device)
    log_c = math.lgamma(L + 1) - torch.lgamma(j + 1) - torch.lgamma(L - j + 1)
    terms = log_c + j * torch.log(p)[..., None] + (L - j) * torch.log1p(-p)[..., None]
    return torch.logsumexp(terms, -1).exp()


@register("magicpig")
@dataclass
class MagicPIG:
    """Keys whose SimHash codes collide with the query's in >= 2 of L tables of K bits,
    each weighted by its inverse inclusion probability. dense_layers: layers below this
    index attend every key (the paper keeps the first two dense)."""
    estimates = True  # weighted keys stand for the residual: no part may follow (base.estimates)
    K: int = 10
    L: int = 150
    seed: int = 0
    dense_layers: int = 0

    def __post_init__(self):
        check_int("magicpig", "K", self.K, 1, 62)
        check_int("magicpig", "L", self.L, 2, 4096)
        check_int("magicpig", "seed", self.seed, 0, 2**31 - 1)
        check_int("magicpig", "dense_layers", self.dense_layers, 0, 10_000)

    def key_codes(self, ctx: DecodeContext, w: torch.Tensor):
        """(codes int64 [B, Hkv, N, L], mu f32 [B, Hkv, 1, D]), kept across calls."""
        key = f"magicpig/{self.K}/{self.L}/{self.seed}"

        def build(lo, n):
            if lo == 0:
                ctx.state[key + "/mu"] = visible_mean(ctx)
            return codes(ctx.k[:, :, lo:n].float() - ctx.state[key + "/mu"], w, self.K)

        c = block_state(ctx, key, 1, build)
        return c, ctx.state[key + "/mu"]

    def select(self, ctx: DecodeContext, out: Builder):
        if ctx.layer < self.dense_layers:
            return add_all(ctx, out)
        b, hkv, n, d = ctx.k.shape
        g = ctx.group
        w = planes(hkv, d, self.K, self.L, self.seed, ctx.layer, ctx.k.device)
        kc, mu = self.key_codes(ctx, w)
        qc = codes(ctx.q, w.repeat_interleave(g, 0), self.K)
        hit = (collisions(qc, kc) >= 2) & ctx.allowed() & ~out.chosen  # [B, Hq, T, N]
        m = int(hit.sum(-1).max()) if hit.numel() else 0
        if m == 0:
            return
        idx = torch.topk(hit.to(torch.uint8), m, dim=-1).indices
        ok = torch.gather(hit, -1, idx)
        # The angle that sets the probability is with the centered key.
        hq, t = ctx.q.shape[1], ctx.q.shape[2]
        bi = torch.arange(b, device=idx.device)[:, None, None, None]
        hi = (torch.arange(hq, device=idx.device) // g)[None, :, None, None]
        kk = ctx.k[bi, hi, idx].float() - mu.repeat_interleave(g, 1)[:, :, None]  # [B, Hq, T, m, D]
        q = ctx.q.float()[..., None, :]
        cos = (q * kk).sum(-1) / (q.norm(dim=-1) * kk.norm(dim=-1)).clamp(min=1e-30)
        lw = -torch.log(inclusion_prob(cos, self.K, self.L)).float()
        out.add(idx, lw, ok)


def visible_mean(ctx: DecodeContext) -> torch.Tensor:
    """Mean of each batch row's visible keys: f32 [B, Hkv, 1, D] (0 for a row with none)."""
    n = ctx.k.shape[2]
    pos = torch.arange(n, device=ctx.k.device)
    vis = ((pos >= ctx.starts[:, None]) & (pos < row_ends(ctx)[:, None])).float()  # [B, N]
    tot = torch.einsum("bn,bhnd->bhd", vis, ctx.k.float())
    return (tot / vis.sum(-1).clamp(min=1)[:, None, None])[:, :, None]
