"""Double Sparsity (Yang et al., 2024): rank keys by a score over a few heavy channels.

Only a handful of the D channels of q.k carry most of its magnitude, and which ones is
a stable property of each head. A row ranks the keys by the partial score over those
`channels` ("label channels") and attends the k best. The per-layer state is the
label cache: the keys restricted to the label channels, [B, Hkv, N, channels],
extended as keys are appended.

Which channels: by default, per batch row and KV head, those with the largest mean
|k_c| over the keys present at the first call (the prefill), fixed for the sequence;
no file needed. Offline: `calibrate_channels` ranks channels by mean |q_c k_c| on Q/K
captured from a model (vattn.capture) and saves a file the spec names:
`doublesparse(0.05, channels=16, calib="chan.pt")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vattn.errors import VattnError
from vattn.methods.base import Builder, DecodeContext, check_size, load_part_file, register, resolve_size
from vattn.methods.quest import block_state, check_int, row_ends

FORMAT = "vattn-channels/1"
NEG = float("-inf")


def calibrate_channels(records: list[dict], path: str | None = None) -> dict:
    """Rank each KV head's channels by mean |q_c k_c| over captured Q/K.

    records: dicts with "layer", "q" [B, Hq, T, D], "k" [B, Hkv, N, D] (as from
    vattn.capture.capture_qkv). The mean over query rows and keys of |q_c k_c| is
    mean|q_c| * mean|k_c|; a KV head sums it over its query heads, and each record of
    a layer counts once. Returns (and saves to path) {"format", "layers": {layer:
    int64 [Hkv, D] channel order, best first}}.
    """
    if not records:
        raise VattnError("calibrate_channels: no records (capture Q/K with vattn.capture.capture_qkv)")
    total: dict[int, torch.Tensor] = {}
    for r in records:
        q, k = r["q"].float(), r["k"].float()
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        sq = q.abs().mean((0, 2)).reshape(hkv, hq // hkv, d).sum(1)  # [Hkv, D]
        w = sq * k.abs().mean((0, 2))
        total[r["layer"]] = total.get(r["layer"], 0) + w.cpu()
    data = {"format": FORMAT,
            "layers": {layer: torch.argsort(w, -1, descending=True) for layer, w in total.items()}}
    if path is not None:
        torch.save(data, path)
    return data


def load_channels(path: str) -> dict:
    """A channel file from calibrate_channels (cached)."""
    return load_part_file("doublesparse", path, FORMAT, "channel file from calibrate_channels")


def heavy_channels(ctx: DecodeContext, c: int) -> torch.Tensor:
    """int64 [B, Hkv, c]: per batch row and KV head, the c channels of largest mean |k_c|
    over the keys the batch row can see now."""
    k = ctx.k.float().abs()
    pos = torch.arange(k.shape[2], device=k.device)
    vis = (pos >= ctx.starts[:, None]) & (pos < row_ends(ctx)[:, None])  # [B, N]
    mass = (k * vis[:, None, :, None]).sum(2)  # [B, Hkv, D]; the mean's ranking needs no division
    return torch.topk(mass, c, dim=-1).indices


def restrict(x: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
    """x [B, H, M, D], chan [B, H, c] -> x's channels chan: f32 [B, H, M, c]."""
    return torch.gather(x.float(), 3, chan[:, :, None, :].expand(*x.shape[:3], chan.shape[-1]))


@register("doublesparse")
@dataclass
class DoubleSparse:
    """The k keys with the largest score over `channels` heavy channels.

    k: count or fraction of the row length. channels: int in [1, 1024] (the head dim if
    larger: then the score is exact). calib: "" (channels of the prefill keys) or a
    file from calibrate_channels.
    """
    k: int | float = 0.05
    channels: int = 16
    calib: str = ""

    def __post_init__(self):
        check_size("doublesparse", "k", self.k)
        check_int("doublesparse", "channels", self.channels, 1, 1024)
        if not isinstance(self.calib, str) or (self.calib and not Path(self.calib).is_file()):
            raise VattnError(f"doublesparse: calib must be '' (channels from the prefill keys) or an "
                             f"existing file from calibrate_channels, got {self.calib!r}")
        if self.calib:
            load_channels(self.calib)

    def file_channels(self, ctx: DecodeContext, c: int) -> torch.Tensor:
        b, hkv, _, d = ctx.k.shape
        layers = load_channels(self.calib)["layers"]
        if ctx.layer not in layers:
            raise VattnError(f"doublesparse: {self.calib} has no channels for layer {ctx.layer} "
                             f"(it has {sorted(layers)})")
        order = layers[ctx.layer]
        if tuple(order.shape) != (hkv, d):
            raise VattnError(f"doublesparse: {self.calib} layer {ctx.layer} is for {order.shape[0]} KV heads "
                             f"of dim {order.shape[1]}, the model has {hkv} of dim {d}")
        return order[:, :c].to(ctx.k.device).expand(b, hkv, c)

    def label_cache(self, ctx: DecodeContext):
        """(channels int64 [B, Hkv, c], labels f32 [B, Hkv, N, c]), kept across calls.

        The channels are chosen when the cache is (re)built, i.e. at a sequence's first
        call, and stay fixed while keys are appended."""
        c = min(self.channels, ctx.k.shape[-1])
        key = f"doublesparse/{c}/{self.calib}"

        def build(lo, n):
            if lo == 0:
                chan = self.file_channels(ctx, c) if self.calib else heavy_channels(ctx, c)
                ctx.state[key + "/channels"] = chan
            return restrict(ctx.k[:, :, lo:n], ctx.state[key + "/channels"])

        labels = block_state(ctx, key, 1, build)
        return ctx.state[key + "/channels"], labels

    def scores(self, ctx: DecodeContext) -> torch.Tensor:
        """Scaled partial scores over the label channels: f32 [B, Hq, T, N]."""
        chan, labels = self.label_cache(ctx)
        b, hq, t, d = ctx.q.shape
        hkv = labels.shape[1]
        qg = restrict(ctx.q.reshape(b, hkv, hq // hkv * t, d), chan)
        return (qg @ labels.transpose(-1, -2) * ctx.scale).reshape(b, hq, t, -1)

    def select(self, ctx: DecodeContext, out: Builder):
        s = self.scores(ctx).masked_fill(~ctx.allowed() | out.chosen, NEG)
        k = resolve_size(self.k, ctx.lengths())
        kmax = min(int(k.max()) if k.numel() else 0, s.shape[-1])
        top = torch.topk(s, kmax, dim=-1)
        ok = (torch.arange(kmax, device=s.device) < k[..., None]) & (top.values > NEG)
        out.add(top.indices, None, ok)
