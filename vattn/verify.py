"""Check the (eps, delta) guarantee empirically: coverage = fraction of rows within eps.

Works on any attention inputs: the synthetic score families, or Q/K/V captured from a
model (vattn.capture). The guaranteed quantity depends on the mode: the relative L2
error of the output (mode="output") or of the softmax denominator ("denominator").

Two samplers (draws=): "residual" appends verified(eps, delta, mode, share) to any front;
"iid" appends verified(eps, delta, draws='iid', mode=...) to the scan chain's front
[sink(n)+][window(n)+]hashtopk(k, cut='sample') (plan paths "scan-kernel" / "scan-reference")
or to an exact one, [sink(n)+][window(n)+][topk | quest | hashtopk] ("sampled-kernel" /
"sampled-reference"), either mode. Everything is measured through a plan, so the coverage
is of what runs: on CUDA the fused kernels, elsewhere their float64 twins.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vattn import metrics
from vattn.attend import dense_attend, row_bounds
from vattn.errors import VattnError
from vattn.plan import compile as compile_plan

RESIDUAL_BASE = "sink(16)+window(16)+topk(0.02)"  # the default front of draws="residual"
SCAN_BASE = "sink(16)+window(64)+hashtopk(0.05,bits=128,cut='sample')"  # ... and of draws="iid"


@dataclass
class Inputs:
    """One group of attention rows: q [B, Hq, T, D], k/v [B, Hkv, N, D]."""
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    lengths: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    layer: int = 0  # a model layer's index: per-layer method state (e.g. hashtopk's projection)


def tolerance(delta: float, rows: int) -> float:
    """Three binomial standard deviations of a coverage estimate over `rows` rows."""
    return 3.0 * math.sqrt(delta * (1 - delta) / max(rows, 1))


def measure(inp: Inputs, spec: str, mode: str, seed: int = 0, fused: bool | None = None, device=None) -> dict:
    """Per-row errors and the measured density of one spec on one group (moved to `device`
    first when given). The fused iid kernels list no keys: their denominator errors come from
    the float64 twin replaying the kernels' own choices (_measure_iid_kernel)."""
    if device is not None:
        inp = _to(inp, torch.device(device))
    q, k, v = inp.q, inp.k, inp.v
    b, hq, t = q.shape[:3]
    starts, ends = row_bounds(b, t, k.shape[2], inp.lengths, inp.starts, q.device)
    plan = compile_plan(spec, q.device, seed=seed, fused=fused)
    if plan.path in ("scan-kernel", "sampled-kernel"):
        return _measure_iid_kernel(inp, spec, mode, seed, fused, starts, ends)
    ctx = plan.context(starts, ends, inp.scale)
    plan.append(inp.layer, k, v, ctx)
    out, sel = plan.run(inp.layer, q, k, v, ctx)  # what runs
    ref = dense_attend(q, k, v, lengths=inp.lengths, starts=inp.starts, scale=inp.scale)
    live = (ends > starts[:, None])[:, None].expand(b, hq, t)  # rows with at least one key
    out_err = metrics.relative_error(out, ref)[live]
    den_err = metrics.denominator_error(q, k, sel, starts, ends, inp.scale)[live]
    return {
        "errors": out_err if mode == "output" else den_err,
        "output_errors": out_err,
        "density": metrics.density(sel, starts, ends, hq),
    }


def _to(inp: Inputs, dev: torch.device) -> Inputs:
    move = (lambda x: None if x is None else x.to(dev))
    return Inputs(inp.name, inp.q.to(dev), inp.k.to(dev), inp.v.to(dev), inp.scale, move(inp.lengths),
                  move(inp.starts), inp.layer)


def _measure_iid_kernel(inp: Inputs, spec: str, mode: str, seed, fused, starts, ends) -> dict:
    """The scan or sampled kernels on CUDA, one query row at a time (as decode runs them).
    Per row: plan.run gives the output, the keys attended per selection row (density) and,
    kept in plan.stats, the kernels' cuts and sample sizes; the float64 twin then replays
    those choices (tau, thu, total, exact; the sampled path's front) and gives D_hat and D."""
    q, k, v, layer = inp.q, inp.k, inp.v, inp.layer
    b, hq, t = q.shape[:3]
    outs, dens, counts, twin_gap = [], [], [], 0.0
    for r in range(t):
        plan = compile_plan(spec, q.device, seed=seed, fused=fused)  # fresh: signatures of this row's keys only
        plan.keep_stats = True
        ctx = plan.context(starts, ends[:, r:r + 1], inp.scale)
        qr = q[:, :, r:r + 1]
        plan.append(layer, k, v, ctx)
        out, sel = plan.run(layer, qr, k, v, ctx)
        ref, rs = _twin_replay(plan, layer, qr, k, v, ctx)
        twin_gap = max(twin_gap, float(metrics.relative_error(out, ref).max()))
        outs.append(out)
        dens.append((rs["d_hat"] / rs["d"] - 1).abs().float())  # [B, Hq]
        counts.append(sel.count.reshape(b, -1).double() * (hq // sel.count.shape[1]))  # per query head
    out = torch.cat(outs, 2)
    ref = dense_attend(q, k, v, lengths=inp.lengths, starts=inp.starts, scale=inp.scale)
    live = (ends > starts[:, None])[:, None].expand(b, hq, t).cpu()
    out_err = metrics.relative_error(out, ref).cpu()[live]
    den_err = torch.stack(dens, 2)[live]
    allowed = float((ends - starts[:, None]).clamp(min=0).sum()) * hq
    return {
        "errors": out_err if mode == "output" else den_err,
        "output_errors": out_err,
        "density": float(sum(c.sum() for c in counts)) / max(allowed, 1.0),
        "kernel_vs_twin": twin_gap,  # largest output distance of the kernels to the twin on their own cuts
    }


def _twin_replay(plan, layer, q, k, v, ctx):
    """The float64 twin of what the plan's kernels just ran, on their own choices (plan.stats)."""
    c = plan.stats["rows"].cpu()
    kw = dict(seed=plan.scan_seed(layer), scale=ctx.scale, total=c[:, 1].long(), exact=c[:, 4] > 0)
    if plan.recipe is not None:
        from vattn.kernels.scan import scan_decode_ref
        st = plan.states[layer]
        return scan_decode_ref(q, k, v, st["sig"], st["proj"], ctx.lengths(), tau=c[:, 5].long(), thu=c[:, 6].long(),
                               **kw, **plan.recipe.kwargs())
    from vattn.kernels.sampled import sampled_decode_ref
    sel = plan.front_selection(layer, q, k, ctx)  # what the kernels attended exactly (deterministic)
    return sampled_decode_ref(q, k, v, sel, ctx.lengths(), starts=ctx.starts.to(torch.int32), **kw,
                              **plan.sampled.kwargs())


def verified_spec(base: str | None, eps, delta, mode: str, share: str = "none", draws: str = "residual") -> str:
    """base + verified(...): with draws="residual" any front and mode; with draws="iid" the
    front must be the scan chain's or an exact one (spec.SCAN_FORM, SAMPLED_FORM), either mode
    (one sample per KV head, always). base None: the draws' default front. Checked here
    (parsed), so a bad combination fails before measuring."""
    from vattn.spec import SAMPLED_FORM, SCAN_FORM, parse
    if draws == "iid":
        base = SCAN_BASE if base is None else base
        part = f"verified(eps={eps},delta={delta},draws='iid',mode='{mode}')"
    elif draws == "residual":
        base = RESIDUAL_BASE if base is None else base
        part = f"verified(eps={eps},delta={delta},mode='{mode}',share='{share}')"
    else:
        raise VattnError(f"draws must be 'residual' or 'iid', got {draws!r}")
    spec = f"{base}+{part}" if base else part
    try:
        parse(spec)
    except VattnError as e:
        if draws == "iid":
            raise VattnError(f"draws='iid' measures {SCAN_FORM} or {SAMPLED_FORM}: the base must be "
                             f"[sink(n)+][window(n)+]hashtopk(k, cut='sample') (e.g. {SCAN_BASE}) or "
                             f"[sink(n)+][window(n)+][topk(k) | quest(..)]; got base {base!r} ({e})") from None
        if "cut='sample'" in str(e) or "draws='iid'" in str(e):
            raise VattnError(f"base {base!r} is the scan algorithm's front (hashtopk(cut='sample')): measure it "
                             f"with draws='iid' (--draws iid) ({e})") from None
        raise
    return spec


def verify(groups: list[Inputs], base: str | None, eps_list, delta_list, modes, share="none", seed=0,
           draws: str = "residual", device=None):
    """Rows of the coverage table: one per (group name, mode, eps, delta), plus 'all'.

    Inputs that share a name (e.g. one layer over several prompts) are pooled. draws and
    base: verified_spec. device: where the inputs are measured (default: where they are).
    """
    rows = []
    names = list(dict.fromkeys(g.name for g in groups))
    specs = {(m, e, d): verified_spec(base, e, d, m, share, draws)  # every spec checked before measuring
             for m in modes for e in eps_list for d in delta_list}
    for mode in modes:
        for eps in eps_list:
            for delta in delta_list:
                spec = specs[(mode, eps, delta)]
                errs = {name: [] for name in names}
                pairs = {name: [] for name in names}  # (density, rows) per input
                gap = {name: [] for name in names}  # the scan kernels' distance to their twin (CUDA)
                for g in groups:
                    m = measure(g, spec, mode, seed, device=device)
                    errs[g.name].append(m["errors"])
                    pairs[g.name].append((m["density"], m["errors"].numel()))
                    if "kernel_vs_twin" in m:
                        gap[g.name].append(m["kernel_vs_twin"])
                new = []
                for name in names:
                    new.append(_row(name, mode, eps, delta, torch.cat(errs[name]), _mean(pairs[name]), spec))
                    if gap[name]:
                        new[-1]["kernel_vs_twin"] = max(gap[name])
                if len(names) > 1:
                    every = [p for name in names for p in pairs[name]]
                    new.append(_row("all", mode, eps, delta, torch.cat([e for name in names for e in errs[name]]),
                                    _mean(every), spec))
                    if any(gap.values()):
                        new[-1]["kernel_vs_twin"] = max(x for v in gap.values() for x in v)
                rows += new
    return rows


def _mean(pairs):
    """Row-weighted mean density."""
    total = sum(w for _, w in pairs)
    return sum(d * w for d, w in pairs) / max(total, 1)


def _row(name, mode, eps, delta, errors, density, spec):
    n = errors.numel()
    cov = metrics.coverage(errors, eps)
    tol = tolerance(delta, n)
    return {
        "group": name, "mode": mode, "eps": eps, "delta": delta, "rows": n,
        "density": round(density, 4), "coverage": round(cov, 4), "target": round(1 - delta, 4),
        "tolerance": round(tol, 4), "ok": bool(cov >= 1 - delta - tol),
        "mean_error": round(float(errors.mean()), 5) if n else float("nan"), "spec": spec,
    }


def synthetic_groups(families, rows=256, n=2048, d=64, seed=0) -> list[Inputs]:
    from vattn.synthetic import make_inputs
    out = []
    for fam in families:
        q, k, v, scale = make_inputs(fam, rows=rows, n=n, d=d, seed=seed)
        out.append(Inputs(fam, q, k, v, scale))
    return out


def model_groups(model_path=None, tokens: int = 2048, seed: int = 0, n_queries: int = 16) -> list[Inputs]:
    """Q/K/V of decode-phase queries of a model on prose and passkey prompts, named by layer.

    Prompts of about tokens/2 and tokens tokens (each prose and passkey) are captured.
    """
    from vattn.capture import capture_qkv, default_prompts
    from vattn.models import load_model
    model, tok = load_model(model_path)
    lengths = sorted({max(256, tokens // 2), tokens})
    caps = capture_qkv(model, tok, default_prompts(tok, lengths), n_queries=n_queries)
    return [Inputs(f"layer {c['layer']:02d}", c["q"], c["k"], c["v"], c["scale"], c["lengths"], c["starts"],
                   c["layer"])
            for c in caps]
