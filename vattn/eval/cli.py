"""`vattn eval` and `vattn report`: plain typer-compatible functions (wired in vattn/cli.py).

With no arguments `vattn eval` runs the default suite on the embedded model:
4 tasks at ~2K tokens, 2 samples, dense / streaming / oracle-topk / vattention
calibrated to ~10% measured density.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from vattn.errors import VattnError

DEFAULT_TASKS = ["passkey", "niah_single_1", "niah_single_2", "niah_multivalue"]
DEFAULT_SPECS = ["dense", "streaming", "oracle-topk", "vattention"]
DEFAULT_DENSITY = 0.1  # applies when --specs is not given

console = Console()


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


def print_summary(summary: dict):
    t = Table(title="per spec")
    for col in ("spec", "n", "score", "retention", "density", "error"):
        t.add_column(col, justify="left" if col == "spec" else "right")
    for s in summary["specs"]:
        label = s["spec"] if s["target_density"] is None else f"{s['spec']} @{s['target_density']:g}"
        t.add_row(label, str(s["n"]), _fmt(s["score"]), _fmt(s["retention"]), _fmt(s["density"]), _fmt(s["error"]))
    console.print(t)
    specs = list(dict.fromkeys(s["spec"] for s in summary["specs"]))
    keys = sorted({(r["task"], r["length"]) for r in summary["by_task"]})
    score = {(r["task"], r["length"], r["spec"]): r["score"] for r in summary["by_task"]}
    t = Table(title="score per task")
    t.add_column("task")
    t.add_column("length", justify="right")
    for sp in specs:
        t.add_column(sp, justify="right")
    for task, n in keys:
        t.add_row(task, str(n), *[_fmt(score.get((task, n, sp))) for sp in specs])
    console.print(t)


def eval_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model dir or .gguf (default: embedded SmolLM2-135M)."),
    tasks: Optional[List[str]] = typer.Option(None, "--tasks", "-t", help="Comma-separated task names (repeatable)."),
    lengths: Optional[List[str]] = typer.Option(None, "--lengths", "-l", help="Target lengths in tokens, e.g. 2048,4k."),
    specs: Optional[List[str]] = typer.Option(None, "--specs", "-s", help="Method specs; repeat or separate with ';'."),
    samples: int = typer.Option(2, "--samples", "-n", help="Samples (seeds) per task and length."),
    seed: int = typer.Option(0, "--seed", help="First seed; samples use seed, seed+1, ..."),
    max_new_tokens: int = typer.Option(12, "--max-new-tokens", help="Greedy tokens decoded per cell."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run dir (default runs/eval-<hash of the arguments>: rerun resumes)."),
    match_density: Optional[float] = typer.Option(None, "--match-density", help="Calibrate specs to this measured density (0 = off)."),
    ray: bool = typer.Option(False, "--ray", help="Run samples as Ray tasks on a local cluster."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster instead."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, or auto."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16."),
    jsonl_tasks: Optional[List[Path]] = typer.Option(None, "--jsonl-tasks", help="Your own samples (JSONL); see docs/eval.md."),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Wrap samples in the tokenizer's chat template."),
    task_list: bool = typer.Option(False, "--list-tasks", help="List the built-in tasks and exit."),
):
    """Long-context accuracy of sparse attention: RULER-style tasks, dense prefill, sparse decode."""
    from vattn.eval.tasks import TASKS
    if task_list:
        console.print("\n".join(TASKS))
        return
    from vattn.eval.runner import EvalConfig, run, write_summary
    from vattn.eval.ray_runner import RayRuntime
    try:
        task_names = _split(tasks, ",") or ([] if jsonl_tasks else DEFAULT_TASKS)
        for t in task_names:
            if t not in TASKS:
                raise VattnError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        spec_list = _split(specs, ";") or DEFAULT_SPECS
        if match_density is None and not specs:
            match_density = DEFAULT_DENSITY
        if match_density is not None and not 0 <= match_density <= 1:
            raise VattnError(f"--match-density must be in (0, 1], got {match_density}")
        cfg = EvalConfig(model=model, tasks=task_names, lengths=[_length(x) for x in _split(lengths, ",")] or [2048],
                         specs=spec_list, seeds=list(range(seed, seed + samples)), max_new_tokens=max_new_tokens,
                         out=str(out) if out else None, match_density=match_density or None,
                         device=device, dtype=dtype,
                         jsonl_tasks=[str(p) for p in jsonl_tasks or []], chat=chat)
        logging.basicConfig(level=logging.WARNING, format="%(message)s",
                            handlers=[RichHandler(console=console, show_path=False)])
        logging.getLogger("vattn.eval").setLevel(logging.INFO)
        console.print(f"[bold]vattn eval[/] -> {cfg.run_dir()}")
        runtime = RayRuntime(ray_address) if (ray or ray_address) else None
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as progress:
                bar = progress.add_task("cells", total=None)

                def on_start(total, done):
                    progress.update(bar, total=total, completed=done)

                def on_row(row):
                    progress.update(bar, advance=1,
                                    description=f"{row['task']} {row['length']} s{row['seed']} {row['spec']}: {row['score']:.2f}")
                run_dir = run(cfg, on_row=on_row, on_start=on_start, runtime=runtime)
        finally:
            if runtime is not None:
                runtime.shutdown()
    except VattnError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    print_summary(write_summary(run_dir))
    console.print(f"results: {run_dir / 'results.jsonl'}\nreport:  vattn report {run_dir}")


def report_command(run_dir: Path = typer.Argument(..., help="A directory written by `vattn eval`.")):
    """Write RUN_DIR/report.md with tables and PNG plots (score and error against density)."""
    from vattn.eval.report import write_report
    try:
        path = write_report(run_dir)
    except VattnError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    console.print(f"wrote {path}")
