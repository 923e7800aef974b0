"""Top-k by bit signatures, in the style of HashAttention and Spotlight.

Queries and keys are mapped to `bits` sign bits, packed into int32 words (kernels/bits.py's format); a key's
score is the number of bits it shares with the query (bits - popcount(q XOR k)),
and the row keeps the k keys with the most agreement. The projection is random
(SimHash: agreement estimates the angle between q and k, training-free) or learned
per layer and head by `vattn train-hash` (vattn/methods/train_hash.py) and loaded
from the file the spec names: `hashtopk(0.05, bits=64, proj="hash.pt")`.

A key costs bits/8 bytes of metadata (64 bits = 1/32 of a bf16 d=128 key).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vattn.errors import VattnError
from vattn.kernels.bits import bit_scores_ref
from vattn.methods.base import Builder, DecodeContext, check_size, load_part_file, register, resolve_size
from vattn.methods.quest import block_state, check_int

FORMAT = "vattn-hash/1"


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., nbits] -> int32 [..., ceil(nbits/32)]; bit j of word w is bit 32*w + j: the
    one signature format, the scan kernels' (kernels.bits.sign_bits)."""
    nbits = bits.shape[-1]
    words = -(-nbits // 32)
    b = torch.nn.functional.pad(bits.long(), (0, words * 32 - nbits)).reshape(*bits.shape[:-1], words, 32)
    word = (b << torch.arange(32, device=bits.device)).sum(-1)  # distinct powers of two: a bitwise or
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def agreement(qsig: torch.Tensor, ksig: torch.Tensor, nbits: int) -> torch.Tensor:
    """Bits shared by query and key signatures: int32 [B, Hq, T, N].

    qsig int32 [B, Hq, T, W]; ksig int32 [B, Hkv, N, W] (query head h uses KV head h // G).
    The 32 W - nbits unused high bits are 0 in both: they are taken off again.
    """
    return bit_scores_ref(qsig, ksig, False) - (32 * qsig.shape[-1] - nbits)


def project(x: torch.Tensor, p: dict) -> torch.Tensor:
    """x [B, H, M, D] -> [B, H, M, bits] with per-head parameters p (leading dim H).

    Linear: x @ w + b. With w1, b1, w2 (Spotlight-style residual MLP) adds silu(x @ w1 + b1) @ w2.
    """
    y = x @ p["w"]
    if "b" in p:
        y = y + p["b"][:, None]
    if "w1" in p:
        y = y + torch.nn.functional.silu(x @ p["w1"] + p["b1"][:, None]) @ p["w2"]
    return y


def simhash_proj(d: int, bits: int, seed: int, layer: int, device) -> torch.Tensor:
    """SimHash hyperplanes [D, bits] of a layer, fixed by (seed, layer): one set for every
    head, so the scan kernels (one projection per layer) sign keys as this part does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.randn(d, bits, generator=g).to(device)


def random_proj(hkv: int, d: int, bits: int, seed: int, layer: int, device) -> dict:
    """simhash_proj as per-head parameters [Hkv, D, bits]."""
    return {"w": simhash_proj(d, bits, seed, layer, device).expand(hkv, d, bits)}


def load_proj(path: str) -> dict:
    """A learned projection file (cached)."""
    return load_part_file("hashtopk", path, FORMAT, "projection file from `vattn train-hash`")


def signatures(x: torch.Tensor, p: dict, nbits: int) -> torch.Tensor:
    """Packed signs of the projection: int32 [B, H, M, W]."""
    return pack_bits(project(x.float(), p)[..., :nbits] > 0)


@register("hashtopk")
@dataclass
class HashTopK:
    """The k keys whose bit signatures agree most with the query's.

    k: count or fraction of the row length. bits: signature length (1-256).
    proj: "random" (seeded SimHash) or the path of a file from `vattn train-hash`.
    share: "none" (keys per query head) or "kv" (one set per KV head, ranked by the group's
    summed agreement, as the scan kernels' cut ranks: the sparse attention gathers each key once
    for the group, not once per query head).
    """
    k: int | float = 0.05
    bits: int = 64
    proj: str = "random"
    seed: int = 0
    # "exact": the k best agreements per query head. "sample": the scan kernels' cut (one per KV
    # head on the group's summed agreement, its threshold read from a subsample of the middle,
    # ties at random): about k keys; only before verified(draws='iid') (spec.check_parts).
    cut: str = "exact"
    share: str = "none"

    def __post_init__(self):
        check_size("hashtopk", "k", self.k)
        if self.cut not in ("exact", "sample"):
            raise VattnError(f"hashtopk: cut must be 'exact' or 'sample', got {self.cut!r}")
        if self.cut == "sample" and (self.proj != "random" or self.bits % 32 or self.bits > 256):
            raise VattnError(f"hashtopk(cut='sample') signs keys with the layer's SimHash projection in 32-bit "
                             f"words: it needs proj='random' and bits in 32, 64, ..., 256, got "
                             f"proj={self.proj!r}, bits={self.bits}")
        if self.share not in ("none", "kv"):
            raise VattnError(f"hashtopk: share must be 'none' (keys per query head) or 'kv' (per KV head), "
                             f"got {self.share!r}")
        if self.share == "kv" and self.cut == "sample":
            raise VattnError("hashtopk: cut='sample' already cuts once per KV head on the group's summed "
                             "agreement; drop share='kv'")
        check_int("hashtopk", "bits", self.bits, 1, 256)
        check_int("hashtopk", "seed", self.seed, 0, 2**31 - 1)
        if not isinstance(self.proj, str) or (self.proj != "random" and not Path(self.proj).is_file()):
            raise VattnError(f"hashtopk: proj must be 'random' or an existing file from "
                             f"`vattn train-hash`, got {self.proj!r}")
        if self.proj != "random":
            nb = load_proj(self.proj)["bits"]
            if nb != self.bits:
                raise VattnError(f"hashtopk: {self.proj} holds {nb}-bit projections; write bits={nb}")

    def params(self, ctx: DecodeContext):
        """(query-side, key-side) projection parameters, leading dims Hq and Hkv."""
        b, hkv, n, d = ctx.k.shape
        if self.proj == "random":
            p = random_proj(hkv, d, self.bits, self.seed, ctx.layer, ctx.k.device)
            return {"w": p["w"].repeat_interleave(ctx.group, 0)}, p
        layers = load_proj(self.proj)["layers"]
        if ctx.layer not in layers:
            raise VattnError(f"hashtopk: {self.proj} has no projection for layer {ctx.layer} "
                             f"(it has {sorted(layers)})")
        pq, pk = layers[ctx.layer]["q"], layers[ctx.layer]["k"]
        if pq["w"].shape[:2] != (ctx.q.shape[1], d) or pk["w"].shape[:2] != (hkv, d):
            raise VattnError(f"hashtopk: {self.proj} layer {ctx.layer} is for "
                             f"{pq['w'].shape[0]} query / {pk['w'].shape[0]} KV heads of dim "
                             f"{pk['w'].shape[1]}, the model has {ctx.q.shape[1]} / {hkv} of dim {d}")
        dev = ctx.k.device
        return ({n_: t.to(dev) for n_, t in pq.items()}, {n_: t.to(dev) for n_, t in pk.items()})

    def key_signatures(self, ctx: DecodeContext, pk: dict) -> torch.Tensor:
        """int32 [B, Hkv, N, W], kept across calls and extended as keys are appended."""
        def build(lo, n):
            return signatures(ctx.k[:, :, lo:n], pk, self.bits)

        return block_state(ctx, f"hashtopk/{self.bits}/{self.proj}/{self.seed}", 1, build)

    def scores(self, ctx: DecodeContext) -> torch.Tensor:
        """Bit agreement of every key with every query row: int32 [B, Hq, T, N]."""
        pq, pk = self.params(ctx)
        return agreement(signatures(ctx.q, pq, self.bits), self.key_signatures(ctx, pk), self.bits)

    def select(self, ctx: DecodeContext, out: Builder):
        if self.cut == "sample":
            raise VattnError("hashtopk(cut='sample') runs with verified(draws='iid') as one algorithm: call it "
                             "through a plan (vattn.plan.compile(spec, device).run(...)), not part by part")
        s = self.scores(ctx)
        if self.share == "kv":
            out.share()
            b, hq, t, n = s.shape
            s = s.view(b, hq // ctx.group, ctx.group, t, n).sum(2)  # [B, Hkv, T, N]
        s = s.masked_fill(~ctx.allowed() | out.chosen, -1)
        k = resolve_size(self.k, ctx.lengths())
        n = s.shape[-1]
        kmax = min(int(k.max()) if k.numel() else 0, n)
        # ties (agreements are small integers) to the lowest positions, as the kernel path's select
        # (kernels.select.topk_ref's rule): one distinct key per entry, so torch.topk's set is fixed
        rank = s.long() * n + (n - 1 - torch.arange(n, device=s.device))
        top = torch.topk(rank, kmax, dim=-1)
        ok = (torch.arange(kmax, device=s.device) < k[..., None]) & (top.values >= 0)
        out.add(top.indices, None, ok)
