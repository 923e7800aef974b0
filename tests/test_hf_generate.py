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
    assert "sparse calls 15 (reference path)" in lines[-2]  # 3 layers x 5 decode steps
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


@pytest.mark.parametrize("spec,cache", [("dense", "vmem"), ("oracle-topk", "vmem"), ("dense", "static"),
                                        ("oracle-topk", "static"), ("streaming", "static")])
def test_generate_on_another_cache_matches_dynamic(tiny_dir, spec, cache):
    base = [PROMPT, "--model", str(tiny_dir), "--spec", spec, "-n", "6", "--engine", "off"]  # (the engine: vmem)
    a = runner.invoke(app, base)
    b = runner.invoke(app, base + ["--cache", cache])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert "transformers + vattn.patch" in b.output
    assert a.output.splitlines()[0] == b.output.splitlines()[0]  # same generated text
    density = [o.split("mean density")[1].split()[0] for o in (a.output, b.output)]
    assert density[0] == density[1], density  # the same keys attended
    bad = runner.invoke(app, base + ["--cache", "paged"])
    assert bad.exit_code == 2 and "--cache must be dynamic, vmem or static" in bad.output


def _no_load(monkeypatch):
    import vattn.models

    def fail(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(vattn.models, "load_model", fail)


def test_generate_reads_stdin(tiny_dir):
    a = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "-n", "4"])
    b = runner.invoke(app, ["-", "--model", str(tiny_dir), "-n", "4"], input=PROMPT)
    c = runner.invoke(app, ["--model", str(tiny_dir), "-n", "4"], input=PROMPT)  # piped, no argument
    assert a.exit_code == b.exit_code == c.exit_code == 0, (a.output, b.output, c.output)
    assert a.output.splitlines()[0] == b.output.splitlines()[0] == c.output.splitlines()[0]


def test_generate_batch_file_and_json(tiny_dir, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text(f"{PROMPT}\n\nw1 w2 w3 w4 w5 w6\n")
    r = runner.invoke(app, ["--batch", str(f), "--model", str(tiny_dir), "-n", "4", "--json", "--spec", "oracle-topk"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in r.output.splitlines()]
    assert [x["prompt"] for x in recs] == [PROMPT, "w1 w2 w3 w4 w5 w6"]
    assert all(x["new_tokens"] == 4 and x["spec"] == "oracle-topk" and "density" in x["summary"] for x in recs)
    single = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "-n", "4", "--spec", "oracle-topk"])
    assert recs[0]["text"] == single.output.splitlines()[0]  # a batch line runs as the prompt alone would


def test_generate_streams_the_same_text(tiny_dir):
    a = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "-n", "6"])
    b = runner.invoke(app, [PROMPT, "--model", str(tiny_dir), "-n", "6", "--stream"])
    assert a.exit_code == b.exit_code == 0, b.output
    assert b.output.splitlines()[0] == a.output.splitlines()[0] and "tok/s" in b.output


def test_generate_samples_with_a_seed(tiny_dir):
    base = [PROMPT, "--model", str(tiny_dir), "-n", "8", "--json"]
    greedy = json.loads(runner.invoke(app, base).output)["text"]
    s0 = [json.loads(runner.invoke(app, base + ["--temperature", "5", "--seed", str(s)]).output)["text"]
          for s in (0, 0, 1)]
    assert s0[0] == s0[1]  # same seed, same text
    assert len({greedy, s0[0], s0[2]}) > 1  # a hot random model's samples differ from greedy or each other
    nucleus = runner.invoke(app, base + ["--temperature", "1", "--top-p", "0.5"])
    assert nucleus.exit_code == 0, nucleus.output


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0.5"], "needs --temperature > 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0", "--temperature", "1"], "--top-p must be in (0, 1]"),
    (["--stream", "--json"], "do not mix"),
    (["--batch", "/nonexistent/prompts.txt"], "does not exist"),
])
def test_generate_option_errors_come_before_the_load(monkeypatch, args, message):
    _no_load(monkeypatch)
    r = runner.invoke(app, (["hi"] if "--batch" not in args else []) + args)
    assert r.exit_code == 2 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_generate_metrics_out_under_a_file_fails_before_the_load(monkeypatch, tmp_path):
    _no_load(monkeypatch)
    f = tmp_path / "file"
    f.write_text("x")
    r = runner.invoke(app, ["hi", "--metrics-out", str(f / "m.jsonl")])
    assert r.exit_code == 2 and "is a file, not a directory" in r.output, r.output
    r = runner.invoke(app, ["hi", "--metrics-out", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output


def test_attn_implementation_vattn_needs_a_patch(tiny_dir):
    """from_pretrained(attn_implementation="vattn") resolves once vattn.hf is imported; an
    unpatched model says to patch it instead of silently running SDPA."""
    import transformers

    import vattn
    import vattn.hf  # noqa: F401
    from vattn.errors import VattnError
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), attn_implementation="vattn")
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(VattnError, match=r"vattn.patch\(model, spec\)"):
        model(ids)
    p = vattn.patch(model, "dense")
    try:
        with torch.no_grad():
            assert model(ids).logits.shape[:2] == (1, 4)
    finally:
        p.undo()
