"""`vattn verify` on the scan algorithm (draws='iid'): coverage rows through the plan that
runs (the float64 twin on CPU, the kernels on CUDA or in the Triton interpreter), and
clear errors for combinations that are not the scan chain."""
import json
import os

import pytest
import torch
from typer.testing import CliRunner

if not torch.cuda.is_available():  # triton.jit reads it at import: as tests/test_kernels_scan.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vattn import verify as V
from vattn.errors import VattnError
from vattn.plan import compile as compile_plan
from vattn.verify import Inputs, measure, synthetic_groups, verified_spec, verify

SCAN = "sink(16)+window(64)+hashtopk(0.05,bits=128,cut='sample')"
runner = CliRunner()


def test_verify_measures_the_scan_chain_on_cpu():
    groups = synthetic_groups(["peaked", "flat"], rows=48, n=1024, seed=3)
    spec = verified_spec(SCAN, 0.1, 0.1, "denominator", draws="iid")
    assert compile_plan(spec, "cpu").path == "scan-reference"  # the kernels' twin: one algorithm
    rows = verify(groups, SCAN, [0.05, 0.2], [0.1], ["denominator"], draws="iid")
    assert [r["group"] for r in rows] == ["peaked", "flat", "all"] * 2
    for r in rows:
        assert "draws='iid'" in r["spec"] and r["mode"] == "denominator"
        assert 0 < r["density"] < 0.5, r  # sinks + window + ~5% top-k + pilot and draws, not all keys
        assert r["rows"] == (96 if r["group"] == "all" else 48)
        assert 0 < r["mean_error"] < 0.2, r  # a sample (not exact), and a sound one
        assert r["coverage"] >= r["target"] - r["tolerance"], r
    flat = {r["eps"]: r for r in rows if r["group"] == "flat"}
    assert flat[0.05]["density"] > flat[0.2]["density"]  # the budget grows as eps falls
    assert flat[0.05]["mean_error"] < flat[0.2]["mean_error"]


def test_scan_measure_is_the_twins_choices():
    """The denominator errors are of the keys the twin chose, not a recomputation: against
    metrics on the Selection the plan returned, and the row's own exact denominator."""
    g = synthetic_groups(["heavy"], rows=8, n=512, seed=5)[0]
    spec = verified_spec("sink(4)+window(8)+hashtopk(0.05,bits=64,cut='sample')", 0.3, 0.3, "denominator",
                         draws="iid")
    m = measure(g, spec, "denominator")
    plan = compile_plan(spec, "cpu")
    starts = torch.zeros(8, dtype=torch.long)
    ctx = plan.context(starts, torch.full((8, 1), 512, dtype=torch.long), g.scale)
    plan.append(0, g.k, g.v, ctx)
    _, sel = plan.run(0, g.q, g.k, g.v, ctx)
    s = (g.q.double() @ g.k.double().transpose(-1, -2) * g.scale)[:, :, 0]  # [8, 1, 512]
    idx, lw, ok = sel.per_query_head(1)
    picked = torch.gather(s, -1, idx[:, :, 0].long().clamp(min=0)) + lw[:, :, 0].double()
    d_hat = (torch.exp(picked) * ok[:, :, 0]).sum(-1)
    want = (d_hat / torch.exp(s).sum(-1) - 1).abs().reshape(-1).float()
    assert torch.allclose(m["errors"], want, atol=1e-5)
    assert m["density"] == pytest.approx(float(sel.count.sum()) / (8 * 512))


@pytest.mark.parametrize("base,mode,needle", [
    ("sink(16)+topp(0.9)", "denominator", "hashtopk(k, cut='sample')"),  # not an iid front
    ("sink(16)+hashtopk(0.05)+topk(8)", "denominator", "hashtopk(k, ..)"),  # two fronts
    ("", "denominator", "hashtopk(k, cut='sample')"),
])
def test_iid_draws_need_the_scan_chain(base, mode, needle):
    with pytest.raises(VattnError, match="draws='iid'") as e:
        verified_spec(base, 0.1, 0.1, mode, draws="iid")
    assert needle in str(e.value)
    assert "draws='iid'" in verified_spec("sink(16)+hashtopk(0.05)", 0.1, 0.1, mode, draws="iid")  # an exact front


def test_a_scan_front_with_residual_draws_points_to_iid():
    with pytest.raises(VattnError, match="--draws iid"):
        verified_spec(SCAN, 0.1, 0.1, "denominator", draws="residual")
    with pytest.raises(VattnError, match="draws must be"):
        verified_spec(SCAN, 0.1, 0.1, "denominator", draws="uniform")
    assert "share='none'" in verified_spec(None, 0.1, 0.1, "output")  # the residual default is unchanged


def test_cli_verify_draws_iid(tmp_path):
    from vattn.cli import app
    out = tmp_path / "scan.json"
    r = runner.invoke(app, ["verify", "--draws", "iid", "--families", "flat", "--rows", "16", "--n", "512",
                            "--eps", "0.2", "--delta", "0.2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())  # --mode both: the scan algorithm in both modes
    assert [x["mode"] for x in rows] == ["output", "denominator"]
    assert all("draws='iid'" in x["spec"] and x["spec"].startswith(V.SCAN_BASE) for x in rows)
    # flat rows average values to ~0: output mode (relative to ||o||) attends them whole, honestly
    assert rows[0]["density"] <= 1 and 0 < rows[1]["density"] < 1


def test_cli_verify_bad_scan_combination_fails_before_measuring(monkeypatch):
    from vattn.cli import app

    def no_measure(*a, **k):
        raise AssertionError("measured before checking the spec")
    monkeypatch.setattr(V, "synthetic_groups", no_measure)
    r = runner.invoke(app, ["verify", "--draws", "iid", "--base", "sink(16)+topp(0.9)"])
    assert r.exit_code == 2 and "hashtopk(k, cut='sample')" in r.output, r.output


SLOW_SCAN = pytest.mark.skipif(os.environ.get("VATTN_SLOW") != "1" and not torch.cuda.is_available(),
                               reason="the scan kernels in the Triton interpreter take ~10 s: VATTN_SLOW=1 (always "
                                      "run on CUDA)")
IID = [pytest.param("sink(8)+window(16)+hashtopk(0.05,bits=32,cut='sample')+verified(eps=0.2,delta=0.2,draws='iid',"
                    "mode='denominator',min_pilot=32)", "scan-kernel", 0.0, marks=SLOW_SCAN),
       ("sink(8)+window(16)+topk(0.05)+verified(eps=0.3,delta=0.2,draws='iid',mode='denominator',min_pilot=16)",
        "sampled-kernel", 1.0)]


@pytest.mark.parametrize("spec,path,shift", IID)
def test_iid_kernel_measure_equals_the_twin(spec, path, shift):
    """On CUDA (or in the interpreter) measure runs the kernels row by row and takes the
    denominators from the twin replaying the kernels' choices (cuts, sample sizes, the front):
    the same numbers as the twin's own plan, and the kernels' outputs next to the twin's."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 2, 64, generator=g), torch.randn(2, 2, 640, 64, generator=g), \
        torch.randn(2, 2, 640, 64, generator=g) + shift
    inp = Inputs("x", q, k, v, 0.125, torch.tensor([640, 500]), None, 3)
    assert compile_plan(spec, dev, fused=True).path == path
    a = measure(inp, spec, "denominator", fused=True, device=dev)
    b = measure(inp, spec, "denominator", fused=False)
    assert a["kernel_vs_twin"] < 1e-4
    assert a["errors"].shape == b["errors"].shape == (16,)
    # in the interpreter the kernels' choices are the twin's; on a GPU float32 rounding may move a
    # tie cut or the sample size by a unit (tests/test_kernels_scan.py), so a row may differ a little
    tol = 1e-4 if dev == "cpu" else 0.05
    assert torch.allclose(a["errors"].cpu(), b["errors"], atol=tol)
    assert a["density"] == pytest.approx(b["density"], rel=tol) and a["density"] < 1
