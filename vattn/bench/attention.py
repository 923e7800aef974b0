"""`vattn bench`: per-layer decode attention latency (SDPA, our dense kernel, the vAttention scan
pipeline) and e2e tokens/s."""
from __future__ import annotations

import json
import os

import typer
from rich.console import Console
from rich.table import Table

from vattn.bench.app import bench_app
from vattn.errors import VattnError


@bench_app.callback(invoke_without_command=True)
def attention(ctx: typer.Context,
              batch: str = typer.Option("1,8", "--batch", help="batch sizes, comma separated"),
              lengths: str = typer.Option("8192,32768,131072", "--lengths", help="context lengths N"),
              density: float = typer.Option(0.10, help="target density of the vAttention spec"),
              e2e_layers: int = typer.Option(32, help="decoder layers for the e2e run (0 = skip)"),
              json_path: str = typer.Option(None, "--json", help="write all numbers to this file"),
              quick: bool = typer.Option(False, "--quick", help="B=1, N=32K only, 4-layer e2e")):
    """Decode attention benchmark (runs when no subcommand is given)."""
    if ctx.invoked_subcommand is not None:
        return
    con = Console()
    try:
        _run(con, batch, lengths, density, e2e_layers, json_path, quick)
    except VattnError as e:
        con.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)


def _run(con, batch, lengths, density, e2e_layers, json_path, quick):
    from vattn.bench import attn_core as core
    core.require_cuda()
    try:
        bs = [1] if quick else [int(x) for x in batch.split(",")]
        ns = [32768] if quick else [int(x) for x in lengths.split(",")]
    except ValueError:
        raise VattnError(f"--batch and --lengths take comma-separated integers, got {batch!r} and {lengths!r}") from None
    info = core.device_info()
    copy_gbs, read_gbs = core.hbm_ceiling()
    ceiling = max(copy_gbs, read_gbs)
    rows = []
    result = dict(info=info, hbm_copy_gbs=copy_gbs, hbm_read_gbs=read_gbs, rows=rows)
    for b in bs:
        for n in ns:
            r = core.bench_config(b, n, density)
            r["dense_pct_bw"] = 100 * r["bytes"] / r["dense_us"] / 1e3 / ceiling
            r["sdpa_pct_bw"] = 100 * r["bytes"] / r["sdpa_us"] / 1e3 / ceiling
            rows.append(r)
            _dump(json_path, result)  # row by row: a run cut short keeps what it measured
    t = Table(title=f"decode attention per layer, {info['device']}, {info['date']}, torch {info['torch']}, "
                    f"Hq 32 Hkv 8 d 128 bf16; HBM ceiling {ceiling:.0f} GB/s (copy {copy_gbs:.0f}, "
                    f"read {read_gbs:.0f}); SDPA = its fastest backend here")
    for c in ("B", "N", "SDPA backend", "SDPA us", "dense us", "SDPA/dense", "dense %BW", "scan us", "SDPA/scan",
              "scan density", "output-mode us (density)", "cold L2: SDPA us", "scan us", "SDPA/scan", "err dense", "scan vs twin"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["B"]), str(r["N"]), r["sdpa_backend"], f"{r['sdpa_us']:.1f}", f"{r['dense_us']:.1f}",
                  f"{r['sdpa_us'] / r['dense_us']:.2f}", f"{r['dense_pct_bw']:.0f}%", f"{r['scan_us']:.1f}",
                  f"{r['sdpa_us'] / r['scan_us']:.2f}x", f"{r['scan_density']:.3f}",
                  f"{r['scan_output_us']:.1f} ({r['scan_output_density']:.3f})", f"{r['sdpa_cold_us']:.1f}",
                  f"{r['scan_cold_us']:.1f}", f"{r['sdpa_cold_us'] / r['scan_cold_us']:.2f}x",
                  f"{r.get('dense_err', float('nan')):.1e}", f"{r.get('scan_err_vs_twin', float('nan')):.1e}")
    con.print(t)
    for r in rows:  # verified's default mode beside denominator mode, on inputs closer to a real model's
        con.print(f"B={r['B']} N={r['N']}: output mode {r['scan_output_us']:.1f} us (density "
                  f"{r['scan_output_density']:.3f}); {_modes(r, 'vmean')} with values sharing a mean direction; "
                  f"{_modes(r, 'peaked')} on peaked scores, {core.PEAKED_BITS}-bit front (SDPA / denominator "
                  f"{r['sdpa_us'] / r['peaked_denominator_us']:.2f}x)")
    for r in rows:  # exact fronts (top-k on exact scores, Quest) with the same sizes, fused
        con.print(f"B={r['B']} N={r['N']}, exact fronts (us, density, SDPA/x): " + "; ".join(
            f"{n} {r[f'{n}_us']:.1f} ({r[f'{n}_density']:.3f}, {r['sdpa_us'] / r[f'{n}_us']:.2f}x)"
            for n in ("topk", "hashtopk", "quest", "quest_kv", "topk_verified", "quest_verified")))
    if rows:  # what "scan" ran, so no one reads it as the default output-mode spec
        r = rows[0]
        con.print(f"scan = the plan of `{r['scan_spec']}` (path {r['scan_path']}; at N={r['N']}), what "
                  "vattn.patch and the engine run (denominator mode; the output-mode column runs the same spec with mode='output')\n")
    layers = 4 if quick else e2e_layers
    if layers:  # the engine, as `vattn bench e2e` runs it (B=1, 32K; see that command for the full table)
        from vattn.bench.e2e import run as e2e_run
        e = e2e_run([1], [32768], ["vattention-scan"], layers=layers, hf=False)
        result["e2e"] = e
        by = {r["system"]: r for r in e["rows"] if "tok_s" in r}
        dense, scan = by.get("engine dense"), by.get("engine vattention-scan")
        if dense and scan:
            con.print(f"e2e decode (vattn engine), {layers} layers, hidden 4096, ctx 32768, B=1: dense "
                      f"{dense['tok_s']:.1f} tok/s, vattention-scan {scan['tok_s']:.1f} tok/s "
                      f"({scan['tok_s'] / dense['tok_s']:.2f}x dense); `vattn bench e2e` for the full table")
    _dump(json_path, result)


def _modes(r, name):
    """'output X us (density) against denominator Y us (density): ratio' of both_modes' numbers."""
    o, d = (f"{r[f'{name}_{m}_us']:.1f} us ({r[f'{name}_{m}_density']:.3f})" for m in ("output", "denominator"))
    return f"output {o} against denominator {d}: {r[f'{name}_output_us'] / r[f'{name}_denominator_us']:.2f}x"


def _dump(json_path, result):
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
