"""`vattn report RUN_DIR`: a Markdown report with tables and PNG plots of a run."""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

from vattn.errors import VattnError
from vattn.eval.runner import read_results, summarize


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _label(row: dict) -> str:
    return row["spec"] if row.get("target_density") is None else f"{row['spec']} @{row['target_density']:g}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by one with lower-or-equal density and higher-or-equal score, by density."""
    front, best = [], -math.inf
    for d, s in sorted(points, key=lambda p: (p[0], -p[1])):
        if s > best:
            front.append((d, s))
            best = s
    return front


def spread(xs: list[float], ys: list[float], dex: float = 0.035, tol: float = 0.02) -> list[float]:
    """x positions with coinciding points (same score, densities within `tol` decades) fanned
    out side by side, `dex` decades apart on the log axis, so that no point hides another
    (calibrated specs all land near the same density). Deterministic."""
    groups: dict[int, list[int]] = {}
    anchors: list[tuple[float, float, int]] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        lx = math.log10(max(x, 1e-9))
        for ax, ay, g in anchors:
            if abs(lx - ax) <= tol and abs(y - ay) <= 0.02:
                groups[g].append(i)
                break
        else:
            anchors.append((lx, y, len(anchors)))
            groups[len(anchors) - 1] = [i]
    out = list(xs)
    for members in groups.values():
        k = len(members)
        for j, i in enumerate(members):
            out[i] = xs[i] * 10 ** ((j - (k - 1) / 2) * dex)
    return out


def plot_title(out: Path, config: dict, rows: list[dict]) -> str:
    """Which run and model a plot shows."""
    model = config.get("model") or (rows[0].get("model") if rows else None) or "embedded SmolLM2-135M"
    bits = [f"run {out.resolve().name}", f"model {model}"]
    if config.get("match_density"):
        bits.append(f"specs calibrated to density {config['match_density']:g}")
    return ", ".join(bits)


def _plots(summary: dict, rows: list[dict], out: Path, title: str = "") -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    files = []
    labels = list(dict.fromkeys(_label(r) for r in summary["by_task"]))
    color = {lb: f"C{i % 10}" for i, lb in enumerate(labels)}  # one color per spec in every plot
    lengths = sorted({r["length"] for r in summary["by_task"]})
    marker = {n: "osD^v<>p*h"[i % 10] for i, n in enumerate(lengths)}
    tasks = sorted({r["task"] for r in summary["by_task"]})
    if tasks:
        cols = min(3, len(tasks))
        nrows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            pts = [r for r in summary["by_task"] if r["task"] == task and r["density"] is not None]
            xs = spread([r["density"] for r in pts], [r["score"] for r in pts])
            for r, x in zip(pts, xs):
                ax.scatter(x, r["score"], s=36, color=color[_label(r)], marker=marker[r["length"]],
                           alpha=0.8, edgecolors="black", linewidths=0.4)
            front = pareto([(r["density"], r["score"]) for r in pts])
            if len(front) > 1:
                ax.step(*zip(*front), where="post", color="gray", lw=1, alpha=0.6)
            ax.set(title=task, xlabel="measured density", ylabel="score", ylim=(-0.05, 1.05))
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.1, 0.2, 1: not 2x10^-1
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        handles = [plt.Line2D([], [], color=color[lb], marker="o", ls="", label=lb) for lb in labels]
        if len(lengths) > 1:
            handles += [plt.Line2D([], [], color="gray", marker=marker[n], ls="", label=f"{n} tokens") for n in lengths]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
        if title:
            fig.suptitle(f"{title}\n(points at one density are drawn side by side)", fontsize=9)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 6), 1, 1))
        for ax in list(axes.flat)[len(tasks):]:
            ax.axis("off")
        fig.savefig(out / "score_vs_density.png", dpi=110)
        plt.close(fig)
        files.append("score_vs_density.png")

    cells = [r for r in rows if r.get("density") is not None and r.get("error") is not None and r["spec"] != "dense"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label in [lb for lb in labels if any(_label(r) == lb for r in cells)]:
        rs = [r for r in cells if _label(r) == label]
        ax.scatter([r["density"] for r in rs], [r["error"] for r in rs], s=14, alpha=0.7, label=label,
                   color=color[label])
    ax.set(xlabel="measured density", ylabel="mean layer relative error",
           title="error against density" + (f"\n{title}" if title else ""))
    ax.title.set_fontsize(9)
    if cells:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_vs_density.png", dpi=110)
    plt.close(fig)
    files.append("error_vs_density.png")
    return files


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (+ PNGs) from results.jsonl; returns the report's path."""
    out = Path(run_dir)
    rows = read_results(out / "results.jsonl")
    if not rows:
        raise VattnError(f"{out} has no results.jsonl rows: run `vattn eval --out {out}` first")
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}

    md = [f"# vattn eval report: {out.name}", "",
          f"{len(rows)} cells; written {datetime.now().isoformat(timespec='seconds')}.", ""]
    if config:
        md += ["Run: " + ", ".join(f"{k}={config[k]}" for k in
                                   ("model", "tasks", "lengths", "seeds", "max_new_tokens", "match_density")
                                   if k in config), ""]
    md += ["## Per spec", "",
           "Score ± its standard error (sample std / sqrt(n), as lm-eval-harness reports it). "
           "Retention = score / dense score on the same samples. Density and error are measured "
           "over the sparse attention calls (question, answer prefix and decoded tokens).", "",
           table(["spec", "n", "score", "± se", "retention", "density", "error", "spec run"],
                 [[_label(s), s["n"], s["score"], s.get("stderr"), s["retention"], s["density"], s["error"],
                   "<br>".join(f"`{x}`" for x in s["run_specs"])
                   + (f" **vacuous bound (eps={s['eps']:.2f})**" if s.get("vacuous") else "")]
                  for s in summary["specs"]]), ""]
    labels = list(dict.fromkeys(_label(s) for s in summary["specs"]))
    keys = sorted({(r["task"], r["length"]) for r in summary["by_task"]})
    score = {(r["task"], r["length"], _label(r)): r["score"] for r in summary["by_task"]}
    md += ["## Score per task", "",
           table(["task", "length"] + labels, [[t, n] + [score.get((t, n, lb)) for lb in labels] for t, n in keys]), ""]
    md += ["## Plots", ""] + [f"![{f}]({f})" for f in _plots(summary, rows, out, plot_title(out, config, rows))] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
