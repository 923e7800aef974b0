"""End-to-end decode tokens/s for a random-weight Llama-3-8B-shaped decoder (plain torch).

Per layer: RMSNorm, q/k/v projections, RoPE, attention over a pre-filled KV cache (SDPA, our
dense kernel, or the vAttention scan pipeline), o projection, SwiGLU MLP. Weights are
random bf16; the cache holds random keys (prefill is not timed). One decode step per graph replay.
"""
from __future__ import annotations

import torch


def _rope(x, pos, theta=500000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv[None]  # [B, d/2]
    cos, sin = ang.cos()[:, None, None], ang.sin()[:, None, None]
    x1, x2 = x.float()[..., ::2], x.float()[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)


class Decoder:
    def __init__(self, layers=32, hidden=4096, hq=32, hkv=8, inter=14336, vocab=128256, ctx=32768,
                 batch=1, device="cuda", dtype=torch.bfloat16, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        d = hidden // hq
        self.hq, self.hkv, self.d, self.batch = hq, hkv, d, batch

        def w(*shape):
            return (torch.randn(*shape, device=device, dtype=dtype, generator=g) * shape[-1] ** -0.5)
        self.emb = w(vocab, hidden)
        self.head = w(vocab, hidden)
        self.layers = [dict(qkv=w((hq + 2 * hkv) * d, hidden), o=w(hidden, hq * d), gu=w(2 * inter, hidden),
                            dn=w(hidden, inter)) for _ in range(layers)]
        self.k = torch.randn(layers, batch, hkv, ctx + 64, d, device=device, dtype=dtype, generator=g)
        self.v = torch.randn(layers, batch, hkv, ctx + 64, d, device=device, dtype=dtype, generator=g)
        self.length = torch.full((batch,), ctx, dtype=torch.int32, device=device)

    def step(self, tok, attend):
        """tok int64 [B] -> next token [B]; attend(layer, q, k, v, lengths) -> o [B,Hq,1,d]."""
        B = tok.shape[0]
        x = self.emb[tok]
        pos = self.length.long()
        for i, L in enumerate(self.layers):
            h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
            qkv = h @ L["qkv"].T
            q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], -1)
            q = _rope(q.view(B, self.hq, 1, self.d), pos)
            k = _rope(k.view(B, self.hkv, 1, self.d), pos)
            # write the new key/value at position `length` (same slot every replay: fixed shapes)
            bi = torch.arange(B, device=x.device)
            self.k[i, bi, :, pos] = k[:, :, 0]
            self.v[i, bi, :, pos] = v.view(B, self.hkv, self.d)
            o = attend(i, q, self.k[i], self.v[i], self.length + 1)
            x = x + o.reshape(B, -1) @ L["o"].T
            h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
            gu = h @ L["gu"].T
            gt, up = gu.chunk(2, -1)
            x = x + (torch.nn.functional.silu(gt) * up) @ L["dn"].T
        return (torch.nn.functional.rms_norm(x, (x.shape[-1],)) @ self.head.T).argmax(-1)
