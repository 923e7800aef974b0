"""`vattn bench e2e --tiny`: the side-by-side pipeline runs on the CPU and writes its JSON."""
import json

from typer.testing import CliRunner

from vattn.cli import app


def test_bench_e2e_tiny(tmp_path):
    out = tmp_path / "e2e.json"
    res = CliRunner().invoke(app, ["bench", "e2e", "--tiny", "--batch", "2", "--steps", "2",
                                   "--specs", "sink(4)+window(8)", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    systems = [r["system"] for r in data["rows"]]
    assert systems == ["transformers eager", "engine dense", "engine sink(4)+window(8)"]
    for r in data["rows"]:
        assert r["B"] == 2 and r["ctx"] == 64 and r["ms_per_step"] > 0 and 0 < r["roofline_frac"]
    dense, sparse = data["rows"][1], data["rows"][2]
    assert dense["density"] == 1.0 and sparse["density"] == 48 / (65 + 66 + 67 + 68)  # 12 keys in each of 4 steps (2 warm-up)
    assert data["info"]["bandwidth_gbs"] > 0 and data["info"]["weight_bytes"] > 0
    assert "engine dense" in res.output and "vs dense" in res.output


def test_bench_e2e_needs_tiny_on_cpu():
    import torch
    if torch.cuda.is_available():
        return
    res = CliRunner().invoke(app, ["bench", "e2e", "--no-hf"])
    assert res.exit_code == 2 and "--tiny" in res.output


def test_bench_e2e_a_failing_spec_is_a_row_and_the_rest_run(tmp_path, monkeypatch):
    import vattn.bench.e2e as e2e
    real = e2e.engine

    def engine(decoder, spec, *a, **k):
        if spec.startswith("window"):
            raise RuntimeError("kernel did not compile")
        return real(decoder, spec, *a, **k)
    monkeypatch.setattr(e2e, "engine", engine)
    out = tmp_path / "e2e.json"
    res = CliRunner().invoke(app, ["bench", "e2e", "--tiny", "--batch", "2", "--steps", "1", "--no-hf",
                                   "--specs", "window(8);sink(4)+window(8)", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["system"] for r in rows] == ["engine dense", "engine window(8)", "engine sink(4)+window(8)"]
    assert "kernel did not compile" in rows[1]["skipped"] and rows[2]["ms_per_step"] > 0
