"""`vattn eval` and `vattn report`: plain typer-compatible functions (wired in vattn/cli.py).

With no arguments `vattn eval` runs the default suite on the embedded model:
4 tasks at ~4K tokens, 2 samples, dense / streaming / oracle-topk / vattention
calibrated to ~10% measured density (the calibrations ship with vattn: nothing is
measured before the sweep). At 2K the same target drove vattention to eps=0.95, a
vacuous bound; at 4K the preset's eps=0.2 already lands at 9.6%.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from vattn.errors import VattnError

DEFAULT_TASKS = ["passkey", "niah_single_1", "niah_single_2", "niah_multivalue"]
DEFAULT_SPECS = ["dense", "streaming", "oracle-topk", "vattention"]
DEFAULT_DENSITY = 0.1  # applies when --specs is not given
DEFAULT_LENGTH = 4096
DEFAULT_SAMPLES = 2
VACUOUS = 0.5  # calibrate.VACUOUS_EPS, repeated so that --help imports nothing heavy

console = Console(width=None if Console().is_terminal else 160)


def _split(values: Optional[List[str]], sep: str) -> list[str]:
    return [x.strip() for v in values or [] for x in v.split(sep) if x.strip()]


def _length(text: str) -> int:
    t = text.strip().lower()
    try:
        return int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
    except ValueError:
        raise VattnError(f"--lengths takes token counts like 2048 or 4k, got {text!r}") from None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _score(x, se) -> str:
    return _fmt(x) if se is None or x is None else f"{x:.3f} ± {se:.3f}"


def ran(s: dict) -> str:
    """The spec(s) that ran for a summary row, short, with a vacuous bound flagged."""
    from vattn.eval.calibrate import short_spec
    text = "; ".join(short_spec(x) for x in s.get("run_specs") or [s["spec"]])
    if s.get("vacuous"):
        text += f" [bold red](vacuous bound: eps={s['eps']:.2f})[/]"
    return text


def print_summary(summary: dict):
    t = Table(title="per spec (score ± standard error over samples)")
    for col in ("spec", "n", "score", "retention", "density", "error", "spec that ran"):
        t.add_column(col, justify="left" if col in ("spec", "spec that ran") else "right",
                     overflow="fold" if col == "spec that ran" else None)
    for s in summary["specs"]:
        label = s["spec"] if s["target_density"] is None else f"{s['spec']} @{s['target_density']:g}"
        t.add_row(label, str(s["n"]), _score(s["score"], s.get("stderr")), _fmt(s["retention"]),
                  _fmt(s["density"]), _fmt(s["error"]), ran(s))
    console.print(t)
    specs = list(dict.fromkeys(s["spec"] for s in summary["specs"]))
    keys = sorted({(r["task"], r["length"]) for r in summary["by_task"]})
    score = {(r["task"], r["length"], r["spec"]): (r["score"], r.get("stderr")) for r in summary["by_task"]}
    t = Table(title="score per task (± standard error)")
    t.add_column("task")
    t.add_column("length", justify="right")
    for sp in specs:
        t.add_column(sp, justify="right")
    for task, n in keys:
        t.add_row(task, str(n), *[_score(*score.get((task, n, sp), (None, None))) for sp in specs])
    console.print(t)
    if any(s.get("vacuous") for s in summary["specs"]):
        console.print(f"[bold red]note:[/] a spec marked vacuous ran with a verified bound of relative error "
                      f">= {VACUOUS:g}: its guarantee says little at this density; calibrate at a longer "
                      "--lengths or a higher --match-density")


DTYPE_HELP = "float32 (fp32), float16 (fp16) or bfloat16 (bf16); default: the model's (float32 for GGUF)."


def eval_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model dir or .gguf (default: embedded SmolLM2-135M)."),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", "-t", help="Comma-separated task names (repeatable)."),
    lengths: Optional[List[str]] = typer.Option(None, "--lengths", "-l", help=f"Target lengths in tokens, e.g. 2048,4k (default {DEFAULT_LENGTH})."),
    specs: Optional[List[str]] = typer.Option(None, "--specs", "-s", help="Method specs; repeat or separate with ';'."),
    samples: int = typer.Option(DEFAULT_SAMPLES, "--samples", "-n", help="Samples (seeds) per task and length."),
    seed: int = typer.Option(0, "--seed", help="First seed; samples use seed, seed+1, ..."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Greedy tokens decoded per cell (default: sized per sample from its answers, as RULER sizes it per task)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run dir (default runs/eval-<hash of the arguments>: rerun resumes)."),
    match_density: Optional[float] = typer.Option(None, "--match-density", help=f"Calibrate specs to this measured density (0 = off; default {DEFAULT_DENSITY} without --specs)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="Measure the calibration even where a shipped or cached one matches."),
    ray: bool = typer.Option(False, "--ray", help="Run samples as Ray tasks on a local cluster."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=DTYPE_HELP),
    jsonl_tasks: Optional[List[Path]] = typer.Option(None, "--jsonl-tasks", help="Your own samples (JSONL); see docs/eval.md."),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Wrap samples in the tokenizer's chat template."),
    task_list: bool = typer.Option(False, "--list-tasks", help="List the built-in tasks and exit."),
):
    """Long-context accuracy of sparse attention: RULER-style tasks, dense prefill, sparse decode."""
    from vattn.eval.tasks import TASKS
    if task_list:
        console.print("\n".join(TASKS))
        return
    try:
        from vattn.eval.runner import EvalConfig, check, run, write_summary
        from vattn.models import resolve_dtype
        resolve_dtype(dtype)
        task_names = _split(tasks, ",") or ([] if jsonl_tasks else DEFAULT_TASKS)
        spec_list = _split(specs, ";") or DEFAULT_SPECS
        if match_density is None and not specs:
            match_density = DEFAULT_DENSITY
        if match_density is not None and not 0 <= match_density <= 1:
            raise VattnError(f"--match-density must be in (0, 1], got {match_density}")
        if samples < 1:
            raise VattnError(f"--samples must be >= 1, got {samples}")
        cfg = EvalConfig(model=model, tasks=task_names,
                         lengths=[_length(x) for x in _split(lengths, ",")] or [DEFAULT_LENGTH],
                         specs=spec_list, seeds=list(range(seed, seed + samples)), max_new_tokens=max_new_tokens,
                         out=str(out) if out else None, match_density=match_density or None,
                         device=device, dtype=dtype,
                         jsonl_tasks=[str(p) for p in jsonl_tasks or []], chat=chat, recalibrate=recalibrate)
        check(cfg)  # before the model load and before any directory is made
        if ray or ray_address:
            from vattn.eval.ray_runner import RayRuntime
            runtime = RayRuntime(ray_address)
        else:
            runtime = None
    except VattnError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    from vattn.console import quiet_warnings
    quiet_warnings()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    console.print(f"[bold]vattn eval[/] -> {cfg.run_dir()}")
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                      console=console) as progress:
            bar = progress.add_task("cells", total=None, visible=False)
            calib: dict = {}

            def on_start(total, done):
                progress.update(bar, total=total, completed=done, visible=True)

            def on_row(row):
                progress.update(bar, advance=1,
                                description=f"{row['task']} {row['length']} s{row['seed']} {row['spec']}: {row['score']:.2f}")

            def on_calibrate(ev):
                from vattn.eval.calibrate import short_spec
                name = f"calibrate {ev['spec']} @{ev['length']}"
                if ev["kind"] == "found":
                    progress.console.print(f"calibration of {ev['spec']} at {ev['length']} tokens: {ev['source']} "
                                           f"({short_spec(ev['run_spec'])}, density {ev['density']:.3f}); "
                                           "--recalibrate measures it again")
                elif ev["kind"] == "start":
                    calib[name] = progress.add_task(name, total=ev["total"])
                elif ev["kind"] == "probe":
                    progress.update(calib[name], completed=ev["i"],
                                    description=f"{name}: probe {ev['i']} density {ev['density']:.3f}")
                elif ev["kind"] == "done":
                    progress.update(calib[name], completed=progress.tasks[calib[name]].total,
                                    description=f"{name}: {short_spec(ev['run_spec'])} density {ev['density']:.3f}")
            run_dir = run(cfg, on_row=on_row, on_start=on_start, runtime=runtime, on_calibrate=on_calibrate)
    except VattnError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted; rerun the same command to resume[/]")
        raise typer.Exit(130)
    finally:
        if runtime is not None:
            runtime.shutdown()
    print_summary(write_summary(run_dir))
    console.print(f"results: {run_dir / 'results.jsonl'}\nreport:  vattn report {run_dir}")


def report_command(run_dir: Path = typer.Argument(..., help="A directory written by `vattn eval`.")):
    """Write RUN_DIR/report.md with tables and PNG plots (score and error against density)."""
    from vattn.eval.report import write_report
    try:
        path = write_report(run_dir)
    except VattnError as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2)
    console.print(f"wrote {path}")
