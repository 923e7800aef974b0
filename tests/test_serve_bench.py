"""`vattn bench serve`: the load generator against a test server (fake runner), both arrival
modes, and the side-by-side comparison of admission modes at equal memory."""
import pytest

from conftest import tiny_tokenizer
from test_scheduler import FakeRunner
from test_serve import SlowRunner
from vattn.bench.serve import Load, compare, make_requests, parse_range, percentile, run_load, split_specs
from vattn.errors import VattnError
from vattn.serve.app import Engine, ServerThread, build_app


def test_helpers():
    assert parse_range("7", "x") == (7, 7) and parse_range("3:9", "x") == (3, 9)
    for bad in ("0", "9:3", "a", "1:2:3"):
        with pytest.raises(VattnError):
            parse_range(bad, "--prompt-len")
    assert split_specs("dense, sink(4)+verified(eps=0.1,delta=0.1)") == ["dense", "sink(4)+verified(eps=0.1,delta=0.1)"]
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None
    reqs = make_requests(Load(num_requests=5, prompt_len=(3, 9), output_len=(2, 4), rate=10.0), 128, 64)
    assert reqs == make_requests(Load(num_requests=5, prompt_len=(3, 9), output_len=(2, 4), rate=10.0), 128, 64)
    assert all(3 <= len(p) <= 9 and 2 <= n <= 4 and all(32 <= t < 128 for t in p) for p, n, _ in reqs)
    assert [a for *_, a in reqs] == sorted(a for *_, a in reqs) and reqs[-1][2] > 0


def test_summary_counts_concurrency_while_requests_wait():
    from vattn.bench.serve import summarize
    samples = [{"vattn_requests_running": r, "vattn_requests_waiting": w} for r, w in
               [(2, 5), (6, 3), (7, 1), (4, 0), (1, 0)]]
    res = [{"ok": True, "ttft": 0.1, "tpot": 0.01, "tokens": 3, "error": None}]
    row = summarize(res, 2.0, samples, {"id": "toy"})
    assert row["running_mean"] == 4 and row["running_max"] == 7 and row["running_queued_mean"] == 5
    assert summarize(res, 2.0, samples[3:], {"id": "toy"})["running_queued_mean"] is None


@pytest.mark.parametrize("mode", [dict(concurrency=4), dict(concurrency=None, rate=200.0)])
def test_load_against_server(mode):
    runner = FakeRunner(max_len=32, max_batch=4, budget_tokens=80, tokenizer=tiny_tokenizer())
    engine = Engine(runner, model_name="toy")
    with ServerThread(build_app(engine)) as srv:
        load = Load(num_requests=12, prompt_len=(3, 12), output_len=(2, 6), **mode)
        row = run_load(srv.url, load, warmup=2)
    want = sum(n for _, n, _ in make_requests(load, 128, 32))
    assert row["requests"] == 12 and row["failed"] == 0, row["errors"]
    assert row["output_tok_per_s"] * row["duration_s"] == pytest.approx(want)
    assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["tpot_p50_ms"] > 0
    assert engine.scheduler.metrics()["finished"] == 14  # and the 2 warm-up requests


def test_compare_admission_at_equal_memory():
    # 96 tokens of KV, max_len 32: static reserves 32 a request (3 at once), vmem admits by actual length.
    # Steps take 5 ms, so the engine, not the client, sets the pace.
    runner = SlowRunner(max_len=32, max_batch=8, budget_tokens=96, tokenizer=tiny_tokenizer(), delay=0.005)
    load = Load(num_requests=16, concurrency=8, prompt_len=(4, 8), output_len=(2, 4))
    rows = compare(runner, load, ["dense", "sink(2)+window(2)"], ["vmem", "static"], model_name="toy", child=True)
    assert [(r["admission"], r["spec"]) for r in rows] == [
        ("vmem", "dense"), ("vmem", "sink(2)+window(2)"), ("static", "dense"), ("static", "sink(2)+window(2)")]
    assert all(r["failed"] == 0 and r["requests"] == 16 for r in rows), [r["errors"] for r in rows]
    assert rows[2]["capacity"] == 3 and rows[0]["capacity"] == 8
    assert all(r["running_max"] <= 3 and r["max_running"] == 3 for r in rows[2:])
    assert all(r["max_running"] >= 6 for r in rows[:2])  # memory follows lengths: twice the requests
    mean = [r["running_mean"] for r in rows]  # from the server's request-seconds counter
    # over the whole run (ramp and drain included, timing-dependent on a busy CPU): more, not 2x
    assert all(0 < m <= 3.01 for m in mean[2:]) and min(mean[:2]) > max(mean[2:]), mean
    assert runner.kv.stats().slots_in_use == 0


def test_cli(tmp_path):
    import json

    from typer.testing import CliRunner

    from vattn.cli import app
    args = ["bench", "serve", "--random", "tiny", "--device", "cpu", "--specs", "dense,sink(2)+window(4)",
            "--max-len", "128", "--max-batch", "4", "--num-requests", "4", "--prompt-len", "8:16",
            "--output-len", "2:4", "--warmup", "1"]
    bad = CliRunner().invoke(app, args + ["--admission", "vmem,static"])
    assert bad.exit_code == 2 and "needs --budget-gb" in bad.output
    out = CliRunner().invoke(app, args + ["--json", str(tmp_path / "b.json"), "--kv-layout", "bnhd"])
    assert out.exit_code == 0, out.output
    assert "(bnhd)" in out.output  # the token-major cache served the rows
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["spec"], r["failed"], r["requests"]) for r in rows] == [("dense", 0, 4), ("sink(2)+window(4)", 0, 4)]


def test_serve_kv_layout_is_checked():
    from vattn.errors import VattnError
    from vattn.serve.cli import engine_kwargs
    kw = engine_kwargs(None, "dense", "cpu", None, 64, 2, None, 0, None, "vmem", 8, 16, None, "bnhd")
    assert kw["kv_layout"] == "bnhd"
    with pytest.raises(VattnError, match="--kv-layout must be bhnd or bnhd"):
        engine_kwargs(None, "dense", "cpu", None, 64, 2, None, 0, None, "vmem", 8, 16, None, "nhbd")
