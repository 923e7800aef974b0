"""`vattn generate` through typer's CliRunner (a throwaway app; the real one is vattn.cli)."""
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from vattn.generate import generate_command

app = typer.Typer()
app.command()(generate_command)
runner = CliRunner()

PROMPT = " ".join(f"w{i % 100}" for i in range(30))


def test_generate_on_a_local_model(tiny_dir, tmp_path):
    out = tmp_path / "m.jsonl"
    r = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "--spec", "oracle-topk", "-n", "6",
                            "--metrics-out", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert "tok/s" in lines[-2] and "prefill 30 tokens" in lines[-2] and "mean density" in lines[-2] and "mean error" in lines[-2]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3 * 5  # 3 layers x 5 sparse decode steps (the first token comes from the prefill)
    assert all(0 < x["density"] < 1 for x in recs)


def test_generate_dense_equals_plain_generate(tiny_dir, tmp_path):
    from vattn.models import load_model
    model, tok = load_model(str(tiny_dir))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    f = tmp_path / "p.txt"
    f.write_text(PROMPT)
    r = runner.invoke(app, ["--file", str(f), "--model", str(tiny_dir), "-n", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert "mean density 1.000" in r.output


@pytest.mark.parametrize("args, message", [
    (["--spec", "nosuch(1)"], "unknown part"),
    (["--spec", "verified(eps=1.5)"], "eps must be in"),
    (["-n", "40"], "context is 64 tokens"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--spec", "oracle-topk", "-n", "1"], "the spec never ran"),
])
def test_generate_errors(tiny_dir, args, message):
    r = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_generate_gpu_unavailable(tiny_dir):
    r = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_generate_needs_a_prompt(tmp_path):
    r = runner.invoke(app, [])
    assert r.exit_code == 2 and "no prompt" in r.output
    r = runner.invoke(app, ["--model", str(tmp_path / "missing"), "hi"])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.parametrize("spec", ["dense", "oracle-topk"])
def test_generate_on_the_vmem_cache_matches_dynamic(tiny_dir, spec):
    base = [PROMPT, "--model", str(tiny_dir), "--spec", spec, "-n", "6"]
    a = runner.invoke(app, base)
    b = runner.invoke(app, base + ["--cache", "vmem"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0]  # same generated text
    bad = runner.invoke(app, base + ["--cache", "paged"])
    assert bad.exit_code == 2 and "--cache must be dynamic or vmem" in bad.output
