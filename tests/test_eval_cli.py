"""`vattn eval` up front: mistakes are one line, before the model load and before any run
directory; the default suite is calibrated, shipped and meaningful; tables flag vacuous bounds."""
import json

import pytest
import typer
from typer.testing import CliRunner


cli = CliRunner()


@pytest.fixture
def app(monkeypatch):
    """The eval command on a throwaway app, with the model load made fatal: every check
    here must answer before it."""
    from vattn.eval import runner
    from vattn.eval.cli import eval_command

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(runner, "load", no_load)
    a = typer.Typer()
    a.command("eval")(eval_command)
    a.command("other")(lambda: None)
    return a


def _eval(app, *args):
    r = cli.invoke(app, ["eval", *args])
    assert "Traceback" not in r.output and "AssertionError" not in repr(r.exception), r.output
    return r


def test_out_under_a_file(app, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = _eval(app, "--specs", "dense", "--tasks", "passkey", "--out", str(f / "run"))
    assert r.exit_code == 2 and "is a file, not a directory" in r.output


def test_missing_and_empty_jsonl(app, tmp_path):
    r = _eval(app, "--specs", "dense", "--jsonl-tasks", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a"))
    assert r.exit_code == 2 and "does not exist" in r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    r = _eval(app, "--specs", "dense", "--jsonl-tasks", str(empty), "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "holds no samples" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "answers": ["a"], "metric": "exact"}) + "\n")
    r = _eval(app, "--specs", "dense", "--jsonl-tasks", str(bad), "--out", str(tmp_path / "c"))
    assert r.exit_code == 2 and "unknown metric" in r.output
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.parametrize("args, message", [
    (["--specs", "nosuch(1)"], "unknown part"),
    (["--tasks", "nope"], "unknown task"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--match-density", "2"], "--match-density"),
])
def test_a_failed_validation_leaves_no_run_directory(app, tmp_path, args, message):
    out = tmp_path / "run"
    r = _eval(app, "--tasks", "passkey", "--out", str(out), *args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()


def test_default_suite_is_calibrated_shipped_and_meaningful():
    """The shipped file holds every sparse default spec for the default suite on the
    embedded model, under the key the run computes, and none is vacuous: the default
    `vattn eval` measures no calibration."""
    pytest.importorskip("vattn.spec")
    from vattn.eval import cli as C
    from vattn.eval.calibrate import SHIPPED, Store, calibration_key, vacuous
    from vattn.eval.runner import EvalConfig, model_identity
    ident = model_identity(None)
    if ":" not in ident:  # the bare name: no GGUF found
        pytest.skip("embedded model not installed")
    cfg = EvalConfig(tasks=C.DEFAULT_TASKS, lengths=[C.DEFAULT_LENGTH], specs=C.DEFAULT_SPECS,
                     seeds=list(range(C.DEFAULT_SAMPLES)), match_density=C.DEFAULT_DENSITY)
    shipped = json.loads(SHIPPED.read_text())["done"]
    for spec in C.DEFAULT_SPECS:
        if spec == "dense":
            continue
        key = calibration_key(cfg, ident, spec, C.DEFAULT_LENGTH)
        assert key in shipped, key
        entry = shipped[key]
        assert entry["density"] <= C.DEFAULT_DENSITY and not vacuous(entry["spec"]), entry
    # Another model, suite or target is another key: it calibrates instead.
    other = calibration_key(EvalConfig(tasks=["vt"], match_density=0.1), ident, "vattention", C.DEFAULT_LENGTH)
    assert other not in shipped
    assert calibration_key(cfg, "/some/model:abc", "vattention", C.DEFAULT_LENGTH) not in shipped
    assert Store  # noqa (imported for the public surface)


def test_summary_table_shows_the_spec_that_ran_and_flags_vacuous_bounds():
    from rich.console import Console
    from vattn.eval import cli as C
    from vattn.eval.runner import summarize
    base = {"model": "m", "task": "passkey", "length": 100, "max_new_tokens": 4}
    rows = []
    for seed, sc in ((0, 1.0), (1, 0.0)):
        rows += [{**base, "seed": seed, "spec": "dense", "target_density": None, "score": 1.0, "density": 1.0,
                  "error": 0.0, "run_spec": "dense"},
                 {**base, "seed": seed, "spec": "vattention", "target_density": 0.1, "score": sc, "density": 0.1,
                  "error": 0.1, "run_spec": "sink(n=11)+window(n=45)+topk(k=0.035)+verified(eps=0.95,delta=0.2)"},
                 {**base, "seed": seed, "spec": "v2", "target_density": 0.1, "score": sc, "density": 0.1,
                  "error": 0.1, "run_spec": "vattention"}]
    s = summarize(rows)
    by = {x["spec"]: x for x in s["specs"]}
    assert by["vattention"]["vacuous"] and by["vattention"]["eps"] == 0.95
    assert not by["v2"]["vacuous"] and by["v2"]["eps"] == 0.2 and not by["dense"]["vacuous"]
    assert by["vattention"]["stderr"] == pytest.approx(0.5)  # std [1, 0] (n - 1) = 0.707, / sqrt(2)
    assert by["dense"]["stderr"] == 0.0
    console = Console(width=250, record=True)
    old, C.console = C.console, console
    try:
        C.print_summary(s)
    finally:
        C.console = old
    text = console.export_text()
    assert "vacuous bound: eps=0.95" in text and "0.500 ± 0.500" in text
    assert "verified(eps=0.2,delta=0.2,draws='iid')" in text  # the preset, expanded, next to its row
