"""`vattn ...` commands. Library code logs; only this module (and the command
functions it wires in) prints.

Commands whose modules import torch load on first use (LAZY): `vattn --help` lists them
from their one-line help here, and `vattn CMD --help` imports only CMD's module; torch
and transformers load inside the commands.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from vattn import __version__
from vattn.console import console, fail, quiet_warnings
from vattn.errors import VattnError

# name -> (module, function, one-line help); "bench" is the bench_app group.
LAZY = {
    "generate": ("vattn.generate", "generate_command", "Generate text with sparse attention on the generated tokens."),
    "eval": ("vattn.eval.cli", "eval_command", "Long-context accuracy of sparse attention: RULER-style tasks."),
    "report": ("vattn.eval.cli", "report_command", "Write RUN_DIR/report.md with tables and PNG plots."),
    "train-hash": ("vattn.train_hash", "train_hash_command", "Learn bit-signature projections for hashtopk."),
    "bench": ("vattn.bench.app", "bench_app", "Speed benchmarks (ratios against a baseline measured in the same run)."),
    "serve": ("vattn.serve.cli", "serve_command", "Serve a model over an OpenAI-compatible HTTP API."),
}


class LazyGroup(TyperGroup):
    """A typer group whose LAZY commands are imported when invoked, not when listed."""

    def list_commands(self, ctx):
        return list(dict.fromkeys([*super().list_commands(ctx), *LAZY]))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY:
            return cmd
        module, func, _ = LAZY[name]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            return None
        if name == "bench":
            for sub in ("vattn.bench.attention", "vattn.bench.cache", "vattn.bench.serve",
                        "vattn.bench.e2e"):  # they register on bench_app
                try:
                    importlib.import_module(sub)
                except ModuleNotFoundError as e:
                    if e.name != sub:
                        raise
            cmd = typer.main.get_command(mod.bench_app)
        else:
            sub = typer.Typer(pretty_exceptions_enable=False)
            sub.command(name)(getattr(mod, func))
            cmd = typer.main.get_command(sub)
        cmd.name = name
        self.add_command(cmd, name)
        return cmd

    def format_commands(self, ctx, formatter):
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY and name not in self.commands:
                rows.append((name, LAZY[name][2]))
            else:
                cmd = self.commands.get(name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise typer.Exit(130)


def _version(value: bool):
    if value:
        typer.echo(f"vattn {__version__}")
        raise typer.Exit()


app = typer.Typer(cls=LazyGroup, help="vattn: verified sparse attention for long-context decoding.",
                  no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    quiet_warnings()


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise VattnError(f"{what} must be comma-separated numbers like 0.05,0.1, got {text!r}") from None


@app.command()
def verify(
    families: str = typer.Option("peaked,heavy,flat", help="Synthetic score families (comma-separated)."),
    model: bool = typer.Option(False, "--model", help="Use Q/K/V captured from the embedded model instead."),
    model_path: str = typer.Option(None, help="A HF model dir or .gguf for --model (default: embedded)."),
    eps: str = typer.Option("0.05,0.1,0.2", help="Error targets."),
    delta: str = typer.Option("0.05,0.1,0.2", help="Failure probabilities."),
    mode: str = typer.Option("both", help="output, denominator or both."),
    base: str = typer.Option(None, help="Parts before verified(...) (default: sink(16)+window(16)+topk(0.02); "
                             "with --draws iid sink(16)+window(64)+hashtopk(0.05,bits=128,cut='sample'))."),
    share: str = typer.Option("none", help="none, or kv: one sample per KV head (--draws residual; iid: always kv)."),
    draws: str = typer.Option("residual", help="residual: verified(...) after any base; iid: independent draws "
                              "behind hashtopk(..., cut='sample') (the scan) or an exact front "
                              "([sink(n)+][window(n)+][topk | quest | hashtopk]); either mode; the kernels on CUDA."),
    device: str = typer.Option("cpu", help="Where to measure: cpu, or cuda (fused kernels where the spec has them)."),
    pairs: bool = typer.Option(True, help="Pair eps[i] with delta[i] (else the full grid)."),
    rows: int = typer.Option(256, help="Synthetic rows per family."),
    n: int = typer.Option(2048, help="Synthetic keys per row."),
    tokens: int = typer.Option(2048, help="--model: prompt length in tokens."),
    seed: int = 0,
    json_out: Path = typer.Option(None, "--json", help="Also write the table as JSON here."),
):
    """Measure coverage of the (eps, delta) guarantee: fraction of rows with error <= eps."""
    from vattn import verify as V
    from vattn.paths import check_writable_file
    try:
        if json_out is not None:  # before the measurement, not after it
            check_writable_file(json_out, "--json")
        eps_l, delta_l = _floats(eps, "--eps"), _floats(delta, "--delta")
        modes = ["output", "denominator"] if mode == "both" else [mode]
        if any(m not in ("output", "denominator") for m in modes):
            raise VattnError(f"--mode must be output, denominator or both, got {mode!r}")
        from vattn.models import resolve_device
        dev = resolve_device(device)
        for m in modes:  # a bad --base/--draws/--mode combination fails before any capture
            V.verified_spec(base, eps_l[0], delta_l[0], m, share, draws)
        if model:
            groups = V.model_groups(model_path, tokens=tokens, seed=seed)
        else:
            groups = V.synthetic_groups([f.strip() for f in families.split(",")], rows=rows, n=n, seed=seed)
        if pairs:
            if len(eps_l) != len(delta_l):
                raise VattnError("with --pairs, --eps and --delta need the same number of values")
            table = []
            for e, d in zip(eps_l, delta_l):
                table += V.verify(groups, base, [e], [d], modes, share, seed, draws, dev)
        else:
            table = V.verify(groups, base, eps_l, delta_l, modes, share, seed, draws, dev)
    except VattnError as e:
        fail(e)
    front = table[0]["spec"].rsplit("verified(", 1)[0] if table else ""
    t = Table(title=f"vattn verify ({draws} draws): {front}verified(...)")
    for col in ("group", "mode", "eps", "delta", "density", "coverage", "target", "ok", "mean_error", "rows"):
        t.add_column(col, justify="right" if col not in ("group", "mode") else "left")
    for r in table:
        ok = "[green]yes[/green]" if r["ok"] else f"[red]no (tol {r['tolerance']})[/red]"
        t.add_row(r["group"], r["mode"], f"{r['eps']:g}", f"{r['delta']:g}", f"{r['density']:.3f}",
                  f"{r['coverage']:.3f}", f"{r['target']:.2f}", ok, f"{r['mean_error']:.4f}", str(r["rows"]))
    console.print(t)
    gaps = [r["kernel_vs_twin"] for r in table if "kernel_vs_twin" in r]
    if gaps:  # the fused iid kernels ran: their outputs next to the float64 twin replaying their choices
        console.print(f"fused kernels vs their float64 twin on the kernels' own choices: max relative error "
                      f"{max(gaps):.2e}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(table, indent=1))
        console.print(f"wrote {json_out}")


def main():
    app()


if __name__ == "__main__":
    main()
