"""The top-level `vattn` CLI: fast help without torch, --version, lean installs, labels,
warnings, Ctrl-C."""
import subprocess
import sys
import warnings

import pytest
from typer.testing import CliRunner

import vattn

runner = CliRunner()


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


HELP = """
import sys
{pre}
sys.argv = ["vattn", *{args!r}]
from vattn.cli import main
try:
    main()
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print("EXIT", code)
print("HEAVY", sorted(m for m in ("torch", "transformers", "triton", "ray") if sys.modules.get(m) is not None))
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["eval", "--help"], ["report", "--help"]])
def test_help_imports_no_torch(args):
    r = _run(HELP.format(pre="", args=args))
    assert "EXIT 0" in r.stdout, r.stdout + r.stderr
    assert "HEAVY []" in r.stdout, r.stdout  # torch alone takes seconds to import
    assert "Usage" in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["eval", "--help"]])
def test_help_without_triton_and_ray(args):
    """A lean install (no gpu or ray extras) still answers --help."""
    r = _run(HELP.format(pre="sys.modules['triton'] = None; sys.modules['ray'] = None", args=args))
    assert "EXIT 0" in r.stdout and "Usage" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_top_help_lists_every_command():
    from vattn.cli import app
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("verify", "generate", "eval", "report", "train-hash", "bench"):
        assert cmd in r.output


def test_version():
    from vattn.cli import app
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"vattn {vattn.__version__}"


def test_unknown_command_is_a_usage_error():
    from vattn.cli import app
    r = runner.invoke(app, ["nosuch"])
    assert r.exit_code == 2 and "No such command" in r.output


@pytest.mark.parametrize("cmd", ["generate", "eval"])
def test_dtype_help_lists_the_aliases(cmd):
    from vattn.cli import app
    r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for alias in ("fp32", "fp16", "bf16", "bfloat16"):
        assert alias in r.output


def test_ctrl_c_in_eval_says_how_to_resume(monkeypatch, tmp_path):
    from vattn.cli import app
    from vattn.eval import runner as R

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(R, "run", interrupted)
    r = runner.invoke(app, ["eval", "--specs", "dense", "--tasks", "passkey", "--out", str(tmp_path / "x")])
    assert r.exit_code == 130, r.output
    assert "interrupted; rerun the same command to resume" in r.output


def test_ctrl_c_elsewhere_exits_130(monkeypatch):
    from vattn import generate as G
    from vattn.cli import app

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(G, "run", interrupted)
    r = runner.invoke(app, ["generate", "hello"])
    assert r.exit_code == 130 and "interrupted" in r.output


def test_quiet_warnings_silences_transformers_future_warnings_only():
    from vattn.cli import quiet_warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_warnings()
        warnings.warn_explicit("`past_key_values` is deprecated for `forward`. Use `cache` instead.",
                               FutureWarning, "deprecation.py", 1, module="transformers.utils.deprecation")
        warnings.warn_explicit("something else", FutureWarning, "mine.py", 1, module="mypkg")
    assert [str(w.message) for w in seen] == ["something else"]


def test_speed_label_reads_one_way():
    from vattn.bench.app import speed_vs
    assert speed_vs(10.0, 10.0) == "same"
    assert speed_vs(161.67, 10.0) == "16.17x slower"  # was printed as "16.167x"
    assert speed_vs(4.0, 10.0) == "2.50x faster"
    assert speed_vs(0.0, 10.0) == "-"


def test_vattn_attend_stays_the_function_after_the_submodule_loads():
    import vattn.attend  # noqa: F401  (the import system sets the submodule on the package)
    assert callable(vattn.attend) and vattn.attend.__name__ == "attend"
    assert vattn.PRESETS["dense"]


def test_verify_json_under_a_file_fails_before_measuring(tmp_path, monkeypatch):
    from vattn import verify as V
    from vattn.cli import app

    def no_measure(*a, **k):
        raise AssertionError("measured before checking --json")
    monkeypatch.setattr(V, "synthetic_groups", no_measure)
    f = tmp_path / "file"
    f.write_text("x")
    r = runner.invoke(app, ["verify", "--json", str(f / "out.json")])
    assert r.exit_code == 2 and "is a file, not a directory" in r.output, r.output
