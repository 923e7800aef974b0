"""Learn per-layer, per-head bit projections for `hashtopk` (HashAttention / Spotlight style).

For each layer, query head h and key head h // G get projections to `bits` outputs;
signs of the outputs are the signatures. Training replaces sign(z) by tanh(z), so the
soft agreement a = sum_j tanh(zq_j) tanh(zk_j) is differentiable, and asks the true top
keys of each query row (exact q.k) to outscore the others:

    loss="rank": Bradley-Terry (Spotlight): softplus((a_neg - a_pos) / sqrt(bits)) over
                 pairs of a top key and a sampled other key.
    loss="bce":  weighted binary cross-entropy (HashAttention): a learned affine map of
                 a / bits is the logit of "is a top key", positives and negatives weighted
                 to count equally.

Projections start from the random SimHash ones (so training starts at random's recall).
The result is a small torch.save file that `hashtopk(..., proj="hash.pt")` loads.
"""
from __future__ import annotations

import logging
import math

import torch

from vattn.attend import row_bounds
from vattn.errors import VattnError
from vattn.methods.hashing import FORMAT, project, random_proj

log = logging.getLogger(__name__)


def rows(rec: dict):
    """One record's training rows: q [Hq, T, D], k [Hkv, N, D], allowed bool [T, N], scores [Hq, T, N]."""
    q, k = rec["q"][0].float(), rec["k"][0].float()
    t, n = q.shape[1], k.shape[1]
    starts, ends = row_bounds(1, t, n, rec.get("lengths"), rec.get("starts"))
    pos = torch.arange(n)
    allowed = (pos >= starts[0]) & (pos < ends[0][:, None])
    g = q.shape[0] // k.shape[0]
    s = torch.einsum("htd,hnd->htn", q, k.repeat_interleave(g, 0)) * rec["scale"]
    return q, k, allowed, s.masked_fill(~allowed, float("-inf"))


def init_params(hq: int, hkv: int, d: int, bits: int, kind: str, hidden: int, seed: int, layer: int):
    """Query- and key-side parameters, starting from the seeded SimHash projection."""
    w = random_proj(hkv, d, bits, seed, layer, "cpu")["w"] / math.sqrt(d)
    g = torch.Generator().manual_seed(seed + 17 * layer + 1)

    def side(wh):
        p = {"w": wh.clone(), "b": torch.zeros(wh.shape[0], bits)}
        if kind == "mlp":
            p["w1"] = torch.randn(wh.shape[0], d, hidden, generator=g) / math.sqrt(d)
            p["b1"] = torch.zeros(wh.shape[0], hidden)
            p["w2"] = torch.zeros(wh.shape[0], hidden, bits)  # starts as the linear map
        return {n: x.requires_grad_() for n, x in p.items()}

    return side(w.repeat_interleave(hq // hkv, 0)), side(w)


def soft_agreement(pq, pk, q, k, keys_idx):
    """a [Hq, T, M]: soft agreement of each row with the keys keys_idx [Hq, T, M]."""
    zq = torch.tanh(project(q[None], pq)[0])  # [Hq, T, bits]
    zk = torch.tanh(project(k[None], pk)[0])  # [Hkv, N, bits]
    full = zq.reshape(k.shape[0], -1, zq.shape[-1]) @ zk.transpose(-1, -2)  # all keys: one matmul
    return torch.gather(full.reshape(q.shape[0], q.shape[1], -1), -1, keys_idx)


def sample_rows(s, top: int, negatives: int, g: torch.Generator):
    """Indices [Hq, T, top] of each row's top keys and [Hq, T, negatives] of other allowed keys."""
    pos = torch.topk(s, top, dim=-1).indices
    other = torch.rand(s.shape, generator=g).masked_fill(~torch.isfinite(s), 2.0)
    other.scatter_(-1, pos, 2.0)
    neg = torch.topk(other, negatives, dim=-1, largest=False).indices
    return pos, neg


def train_layer(recs: list[dict], bits=64, kind="linear", loss="rank", steps=150, top=32,
                negatives=64, lr=0.02, hidden=64, seed=0, layer=0):
    """Train one layer's projections on its records; returns ({"q": ..., "k": ...}, final loss)."""
    data = [rows(r) for r in recs]
    hq, _, d = data[0][0].shape
    hkv = data[0][1].shape[0]
    min_keys = min(int(a.sum(-1).min()) for _, _, a, _ in data)
    top_ = min(top, max(1, min_keys // 4))
    neg_ = min(negatives, max(1, min_keys - top_))
    pq, pk = init_params(hq, hkv, d, bits, kind, hidden, seed, layer)
    affine = torch.tensor([4.0, 0.0], requires_grad=True)  # bce: logit = w * a / bits + c
    opt = torch.optim.Adam([*pq.values(), *pk.values(), affine], lr=lr)
    g = torch.Generator().manual_seed(seed + layer)
    value = float("nan")
    for step in range(steps):
        q, k, _, s = data[step % len(data)]
        pos, neg = sample_rows(s, top_, neg_, g)
        a = soft_agreement(pq, pk, q, k, torch.cat([pos, neg], -1))
        a_pos, a_neg = a[..., :top_], a[..., top_:]
        if loss == "rank":
            diff = (a_neg[..., None, :] - a_pos[..., :, None]) / math.sqrt(bits)
            obj = torch.nn.functional.softplus(diff).mean()
        else:
            logit = affine[0] * a / bits + affine[1]
            target = torch.zeros_like(a)
            target[..., :top_] = 1.0
            weight = torch.where(target > 0, 0.5 / top_, 0.5 / neg_)
            obj = (torch.nn.functional.binary_cross_entropy_with_logits(logit, target, reduction="none")
                   * weight).sum(-1).mean()
        opt.zero_grad()
        obj.backward()
        opt.step()
        value = float(obj.detach())
    detach = lambda p: {n: x.detach().clone() for n, x in p.items()}  # noqa: E731
    return {"q": detach(pq), "k": detach(pk)}, value


def recall(params: dict | None, rec: dict, bits: int, frac=0.05, top=8, seed=0) -> float:
    """Share of each row's `top` true top keys among its frac * n best by hash agreement
    (params None: the random SimHash projection of `seed`)."""
    from vattn.methods.hashing import agreement, signatures
    q, k, allowed, s = rows(rec)
    if params is None:
        pk = random_proj(k.shape[0], k.shape[-1], bits, seed, rec["layer"], "cpu")
        pq = {"w": pk["w"].repeat_interleave(q.shape[0] // k.shape[0], 0)}
    else:
        pq, pk = params["q"], params["k"]
    agree = agreement(signatures(q[None], pq, bits), signatures(k[None], pk, bits), bits)[0].float()
    agree = agree.masked_fill(~allowed, -1)
    n = int(allowed.sum(-1).min())
    kk, tt = max(1, int(frac * n)), min(top, n)
    got = torch.zeros_like(agree, dtype=torch.bool).scatter_(-1, torch.topk(agree, kk, dim=-1).indices, True)
    want = torch.topk(s, tt, dim=-1).indices
    return float(torch.gather(got, -1, want).float().mean())


def train_hash(records: list[dict], bits=64, kind="linear", loss="rank", steps=150, top=32,
               negatives=64, lr=0.02, hidden=64, seed=0) -> dict:
    """Projections for every layer in `records` (from vattn.capture.capture_qkv or
    `synthetic_records`): the content of a projection file."""
    if kind not in ("linear", "mlp"):
        raise VattnError(f"train-hash: kind must be 'linear' or 'mlp', got {kind!r}")
    if loss not in ("rank", "bce"):
        raise VattnError(f"train-hash: loss must be 'rank' or 'bce', got {loss!r}")
    if not 1 <= bits <= 256:
        raise VattnError(f"train-hash: bits must be in [1, 256], got {bits}")
    if not records:
        raise VattnError("train-hash: no Q/K records to train on")
    by_layer: dict[int, list] = {}
    for r in records:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    layers, losses = {}, {}
    for layer in sorted(by_layer):
        layers[layer], losses[layer] = train_layer(by_layer[layer], bits, kind, loss, steps, top,
                                                   negatives, lr, hidden, seed, layer)
        log.info("train-hash layer %d: loss %.4f", layer, losses[layer])
    return {"format": FORMAT, "bits": bits, "kind": kind, "loss": loss, "seed": seed,
            "layers": layers, "final_loss": losses}


def synthetic_records(layers=2, hq=4, hkv=2, n=256, t=8, d=16, seed=0, draw=0) -> list[dict]:
    """Q/K records where the score is not the cosine: keys share a large offset and have
    varied norms (as real keys do), so a random SimHash ranks them poorly. `seed` fixes
    the structure (the offsets), `draw` the samples: other draws are held-out data."""
    out = []
    for layer in range(layers):
        offset = 3.0 * torch.randn(hkv, 1, d, generator=torch.Generator().manual_seed(seed * 1000 + layer))
        g = torch.Generator().manual_seed(seed * 1000 + layer + 7919 * (draw + 1))
        norms = torch.exp(0.7 * torch.randn(hkv, n, 1, generator=g))
        k = (offset + norms * torch.randn(hkv, n, d, generator=g))[None]
        q = torch.randn(1, hq, t, d, generator=g)
        out.append({"layer": layer, "q": q, "k": k, "v": torch.randn_like(k), "scale": d ** -0.5,
                    "lengths": torch.tensor([n]), "starts": torch.zeros(1, dtype=torch.long)})
    return out
