"""Sampling parts: estimate the residual R (keys no earlier part chose) from a sample.

A uniform sample of size b from R, drawn without replacement, gives each sampled key
the weight n_r / b; numerator and denominator estimates are then unbiased. `verified`
sizes b per row from a pilot sample so the error meets (eps, delta); see
docs/guarantee.md for the derivation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import VattnError
from vattn.methods.base import Builder, DecodeContext, check_range, check_size, register, resolve_size
from vattn.stats import budget_from_b0, chi2_quantile, heavy_threshold, var_inflation, z_two_sided

__all__ = ["Uniform", "Verified", "budget_from_b0", "chi2_quantile", "z_two_sided"]  # stats re-exported


def residual_keys(ctx: DecodeContext, out: Builder):
    """A uniform random order of each row's residual R, as random keys.

    Returns u f32 [B, H, T, N] (2.0 outside R) and n_r int64 [B, H, T]. The m smallest
    keys of u (`first`) are a uniform sample of R without replacement, and a smaller
    prefix (the pilot) is part of any larger one, so the pilot grows into the final
    sample without losing uniformity.
    """
    allowed = ctx.allowed()
    if out.shared:
        allowed = allowed.expand(ctx.k.shape[0], ctx.k.shape[1], -1, -1)
    resid = allowed & ~out.chosen
    u = torch.rand(resid.shape, generator=ctx.generator, device=resid.device)
    return u.masked_fill(~resid, 2.0), resid.sum(-1)


def first(u: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [..., m]: positions of the m smallest random keys, in order."""
    m = min(m, u.shape[-1])
    return torch.topk(u, m, dim=-1, largest=False, sorted=True).indices


def add_sample(out: Builder, idx: torch.Tensor, b: torch.Tensor, n_r: torch.Tensor):
    """Add the first b[row] entries of idx with weight n_r / b."""
    ok = torch.arange(idx.shape[-1], device=idx.device) < b[..., None]
    lw = torch.log(n_r.double() / b.clamp(min=1).double()).float()[..., None]
    out.add(idx, lw, ok)


@register("uniform")
@dataclass
class Uniform:
    """A uniform sample of the residual: rate is a count or a fraction of the row length."""
    estimates = True  # weighted keys stand for the residual: no part may follow (base.estimates)
    rate: int | float = 0.05

    def __post_init__(self):
        check_size("uniform", "rate", self.rate)

    def select(self, ctx: DecodeContext, out: Builder):
        n = ctx.lengths().expand(*out.chosen.shape[:3])
        want = resolve_size(self.rate, n)
        u, n_r = residual_keys(ctx, out)
        idx = first(u, int(want.max()) if want.numel() else 0)
        add_sample(out, idx, torch.minimum(want, n_r), n_r)


@register("verified")
@dataclass
class Verified:
    """Sample R with a budget sized so the error is <= eps with probability >= 1 - delta.

    mode="output": relative L2 error of the attention output; mode="denominator": relative
    error of the softmax denominator (the paper's relaxation). share="kv": one sample per
    KV head, sized for the neediest query head of its group.
    """
    estimates = True
    eps: float = 0.05
    delta: float = 0.05
    base_rate: float = 0.02
    mode: str = "output"
    share: str | None = None  # "none", or "kv" (the default with draws="iid")
    min_pilot: int = 64
    var_conf: float = -1.0  # confidence of the pilot variance's upper bound; -1: 1 - delta/2, 0: plug-in
    weights: str = "pooled"  # "pooled": n_r / (pilot + ext) on every sampled key; "two-phase": unbiased
    # Residual keys with attention probability above stats.heavy_threshold(..., c=heavy) are
    # taken exactly (read from the exact scores); 0 turns the cut off (the bound then needs a
    # front that catches the heavy keys: docs/guarantee.md).
    heavy: float | None = None  # 0.25; 0 (no cut) with draws="iid"
    # "residual": without replacement from the keys no earlier part chose (above). "iid": the
    # fused scan algorithm (kernels/scan.py): min_pilot + M independent uniform draws over
    # the middle (between sinks and window), chosen keys counting 0, one sample per KV head,
    # either mode; it runs behind hashtopk(cut='sample') only (spec.check_parts).
    draws: str = "residual"

    def __post_init__(self):
        if self.draws not in ("residual", "iid"):
            raise VattnError(f"verified: draws must be 'residual' or 'iid', got {self.draws!r}")
        iid = self.draws == "iid"
        self.share = ("kv" if iid else "none") if self.share is None else self.share
        self.heavy = (0.0 if iid else 0.25) if self.heavy is None else self.heavy
        if iid:
            what = {"share": (self.share, "kv"), "heavy": (self.heavy, 0.0),
                    "weights": (self.weights, "pooled"), "base_rate": (self.base_rate, 0.02)}
            bad = [f"{k}={v!r} (needs {w!r})" for k, (v, w) in what.items() if v != w]
            if bad:
                raise VattnError("verified(draws='iid') is the fused scan algorithm: one sample per KV head, no "
                                 "heavy-key cut, a pilot of min_pilot draws; it does not take "
                                 f"{', '.join(bad)}: drop those arguments or use draws='residual'")
        check_range("verified", "eps", self.eps, 0.0, 1.0, hi_open=True)
        check_range("verified", "delta", self.delta, 0.0, 1.0, lo_open=True, hi_open=True)
        check_range("verified", "base_rate", self.base_rate, 0.0, 1.0, lo_open=True)
        if self.mode not in ("output", "denominator"):
            raise VattnError(f"verified: mode must be 'output' or 'denominator', got {self.mode!r}")
        if self.weights not in ("pooled", "two-phase"):
            raise VattnError(f"verified: weights must be 'pooled' or 'two-phase', got {self.weights!r}")
        if self.share not in ("none", "kv"):
            raise VattnError(f"verified: share must be 'none' or 'kv', got {self.share!r}")
        if self.var_conf != -1.0:
            check_range("verified", "var_conf", self.var_conf, 0.0, 1.0, hi_open=True)
        if isinstance(self.min_pilot, bool) or not isinstance(self.min_pilot, int) or self.min_pilot < 2:
            raise VattnError(f"verified: min_pilot must be an integer >= 2, got {self.min_pilot!r}")
        check_range("verified", "heavy", self.heavy, 0.0, 1e6)

    def select(self, ctx: DecodeContext, out: Builder):
        if self.draws == "iid":
            raise VattnError("verified(draws='iid') runs with the parts before it as one algorithm: call it "
                             "through a plan (vattn.plan.compile(spec, device).run(...), as every vattn entry "
                             "point does), not part by part")
        if self.share == "kv":
            out.share()
        n = ctx.lengths().expand(*out.chosen.shape[:3])
        # A pilot too small misses the rare heavy keys and underestimates the variance:
        # on real models 2% of 2K keys covered 0.87 of rows at a 0.95 target.
        m0 = torch.minimum(torch.ceil(self.base_rate * n.double()).long().clamp(min=self.min_pilot), n)
        if self.heavy > 0 and self.eps > 0:
            take_heavy(ctx, out, m0, self.eps, self.delta, self.heavy)
        u, n_r = residual_keys(ctx, out)
        m0 = torch.minimum(m0, n_r)
        pilot_idx = first(u, int(m0.max()) if m0.numel() else 0)
        ext = self.budget(ctx, out, pilot_idx, m0, n_r)
        idx = first(u, int((m0 + ext).max()) if m0.numel() else 0)
        if self.weights == "pooled":
            # One weight for pilot and extension: the pilot's keys also estimate the rest.
            # Slightly biased (ext grows with what the pilot saw), but with a small ext the
            # two-phase weight (n_r - m0) / ext on a few keys is far noisier: see guarantee.md.
            add_sample(out, idx, m0 + ext, n_r)
            return
        # Two-phase: the pilot keys count exactly; the extension, a uniform sample of the
        # keys the pilot did not draw, stands for all of them. Its size depends on the pilot,
        # yet given the pilot it is uniform, so both sums stay unbiased.
        pos = torch.arange(idx.shape[-1], device=idx.device)
        in_pilot = pos < m0[..., None]
        rest = (n_r - m0).double()
        lw = torch.log(rest / ext.clamp(min=1).double()).float()[..., None]
        out.add(idx, torch.where(in_pilot, 0.0, lw), pos < (m0 + ext)[..., None])

    def _inflate(self, cnt):
        """Factor from the pilot's variance to its upper confidence bound (normal theory).

        A small pilot of skewed exp-scores underestimates the variance more often than not.
        The heavy-key cut removes the worst case (a key the pilot never sees); the bound is
        the margin for the skew of the rest (plug-in covered 0.88 at a 0.90 target on a
        lognormal bulk behind sink+window): docs/guarantee.md.
        """
        conf = 1.0 - self.delta / 2 if self.var_conf < 0 else self.var_conf
        return var_inflation(cnt, conf)

    def budget(self, ctx, out, pilot_idx, m0, n_r) -> torch.Tensor:
        """Per-row size of the extension beyond the pilot: [B, H, T] (H = Hkv when shared)."""
        if self.eps == 0.0:
            return n_r - m0
        z = z_two_sided(self.delta)
        fixed, pilot = fixed_and_pilot(ctx, out, pilot_idx, m0)  # per query head
        g = ctx.group if out.shared else 1
        nr = n_r.repeat_interleave(g, 1).double()
        m0q = m0.repeat_interleave(g, 1)
        x, xv, ok = pilot  # x: [B, Hq, T, m] exp-scores (shifted), xv: x * v
        cnt = m0q.double().clamp(min=1)
        # The sample stands for all of R (pooled: pilot + ext) or for R minus the pilot (two-phase, ext only).
        span = nr if self.weights == "pooled" else nr - cnt
        mean_x = (x * ok).sum(-1) / cnt
        d_hat = fixed[0] + nr * mean_x
        if self.mode == "denominator":
            var = ((x - mean_x[..., None]) ** 2 * ok).sum(-1) / (cnt - 1).clamp(min=1)
            var = var * self._inflate(cnt)
            b0 = z * z * span ** 2 * var / (self.eps ** 2 * d_hat ** 2)
        else:
            n_hat = fixed[1] + nr[..., None] * (xv * ok[..., None]).sum(-2) / cnt[..., None]
            o = n_hat / d_hat[..., None]
            y = xv - x[..., None] * o[..., None, :]  # x_j (v_j - o)
            yc = (y - (y * ok[..., None]).sum(-2, keepdim=True) / cnt[..., None, None]) * ok[..., None]
            gram = yc @ yc.transpose(-1, -2)  # [.., m, m]: the pilot's spread of x_j (v_j - o)
            tr = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
            var = tr / (cnt - 1).clamp(min=1) * self._inflate(cnt)
            # ||e||^2 is a weighted sum of chi-squares; match it to chi2_k / k with k the
            # effective dimension (tr S)^2 / tr(S^2). Few pilot keys bias k low: conservative.
            k_eff = (tr * tr / (gram * gram).sum((-2, -1)).clamp(min=1e-300)).clamp(min=1.0)
            # Output mode spends delta/2 on the pilot's bound of ||o|| and delta/2 on the sample.
            q = chi2_quantile(k_eff, 1.0 - self.delta / 2) / k_eff
            # ||o|| comes from the pilot too, and noise inflates it (badly so on flat rows,
            # where ||o|| is small): use the lower bound ||o_pilot|| - sqrt(q tr Var(o_pilot)).
            # 0 (so: exact) when the pilot cannot tell.
            fpc = ((nr - cnt) / (nr - 1).clamp(min=1)).clamp(min=0)
            pilot_sd = torch.sqrt(nr * nr * var * fpc / (cnt * d_hat ** 2))
            o_low = ((o * o).sum(-1).sqrt() - torch.sqrt(q) * pilot_sd).clamp(min=0)
            b0 = q * span ** 2 * var / (self.eps ** 2 * d_hat ** 2 * o_low ** 2)
        b0 = b0.nan_to_num(nan=float("inf"), posinf=float("inf"))  # a zero norm output: nothing to trust, be exact
        rest = n_r - m0
        if self.weights == "pooled":  # a sample of R of size b, of which the pilot is the first m0
            b = budget_from_b0(b0, nr.long()) - m0q
        else:
            b = budget_from_b0(b0, rest.repeat_interleave(g, 1))
        if g > 1:
            bsz, hq, t = b.shape
            b = b.reshape(bsz, hq // g, g, t).amax(2)
        # Two-phase needs at least one extension key while any key is left (the pilot
        # stands for itself only); pooled, the pilot already stands for all of R.
        return torch.minimum(b.clamp(min=0 if self.weights == "pooled" else 1), rest)


def take_heavy(ctx: DecodeContext, out: Builder, m0: torch.Tensor, eps: float, delta: float, c: float):
    """Add, exactly, every residual key whose attention probability exceeds
    stats.heavy_threshold: a uniform sample (and its pilot) cannot be trusted with them.

    Reads the exact scores of every allowed key (ctx.scores(), as topk does); the
    probability uses the row's exact softmax denominator. m0: the pilot size [B, H, T].
    With share="kv" a key heavy for any head of the group is taken for the group.
    """
    s = ctx.scores()  # [B, Hq, T, N], cached
    b, hq, t, n = s.shape
    g = ctx.group if out.shared else 1
    allowed = ctx.allowed()
    s = s.double().masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True).clamp(min=-1e300)
    p = torch.exp(s - lse)
    resid = allowed & ~out.chosen.repeat_interleave(g, 1)
    n_r = resid.sum(-1)
    gamma = heavy_threshold(eps, delta, m0.repeat_interleave(g, 1), n_r, c)
    heavy = resid & (p > gamma[..., None])
    if g > 1:
        heavy = heavy.reshape(b, hq // g, g, t, n).any(2)
    cnt = heavy.sum(-1)
    kmax = int(cnt.max()) if cnt.numel() else 0
    if kmax == 0:
        return
    idx = torch.topk(heavy.to(torch.float32), kmax, dim=-1, sorted=True).indices
    ok = torch.arange(kmax, device=idx.device) < cnt[..., None]
    out.add(idx, None, ok)


def fixed_and_pilot(ctx: DecodeContext, out: Builder, pilot_idx: torch.Tensor, m0: torch.Tensor):
    """Exact sums over the chosen keys and the pilot's exp-scores, per query head.

    All exponentials share one shift (the max score over chosen and pilot keys), which
    cancels in every ratio the budget uses. Returns ((D_F [B,Hq,T], N_F [B,Hq,T,D]),
    (x [B,Hq,T,m], x*v [B,Hq,T,m,D], ok [B,Hq,T,m])).
    """
    from vattn.attend import dense_is_cheaper, gather_kv, weighted_values
    sel = out.selection()
    g = ctx.group if out.shared else 1
    b, hq, t, _ = ctx.q.shape
    hkv = ctx.k.shape[1]

    def per_q(x):  # a shared selection is repeated over its group
        return x.repeat_interleave(g, 1)

    def exp_terms(idx, ok, lw):  # scores and V rows of a small set, by gathering
        kk, vv = gather_kv(ctx.k, ctx.v, idx, ctx.group)
        s = (ctx.q.float().unsqueeze(-2) * kk).sum(-1) * ctx.scale + lw
        return s.masked_fill(~ok, float("-inf")), vv

    # Earlier sampling parts (uniform, magicpig) carry weights: their keys count weighted.
    idx_f, ok_f, lw_f = per_q(sel.indices.long()).clamp(min=0), per_q(sel.valid()), per_q(sel.log_weights)
    scattered = dense_is_cheaper(hq, idx_f.shape[-1], hkv, ctx.k.shape[2], ctx.q.device)
    if scattered:  # a large set on CPU: the exact scores (often cached by an oracle part)
        s_f = (torch.gather(ctx.scores(), -1, idx_f) + lw_f).masked_fill(~ok_f, float("-inf"))
    else:
        s_f, v_f = exp_terms(idx_f, ok_f, lw_f)
    idx_p = per_q(pilot_idx)
    ok_p = per_q(torch.arange(pilot_idx.shape[-1], device=pilot_idx.device) < m0[..., None])
    s_p, v_p = exp_terms(idx_p, ok_p, 0.0)
    floor = torch.full((*s_p.shape[:-1], 1), -1e30, device=s_p.device)
    shift = torch.cat([s_f, s_p, floor], -1).amax(-1)
    x_f = torch.exp(s_f - shift[..., None]).nan_to_num(0.0)
    x_p = torch.exp(s_p - shift[..., None]).nan_to_num(0.0)
    if scattered:
        n_f = weighted_values(x_f.reshape(b, hkv, hq // hkv, t, -1), idx_f.reshape(b, hkv, hq // hkv, t, -1),
                              ctx.v).reshape(b, hq, t, -1)
    else:
        n_f = (x_f[..., None] * v_f).sum(-2)
    fixed = (x_f.sum(-1).double(), n_f.double())
    return fixed, (x_p.double(), (x_p[..., None] * v_p).double(), ok_p)
