"""`vattn generate` on the engine: same text as the transformers path, and it says when it
falls back (metrics, an architecture the engine does not run)."""
import json

import pytest
import typer
from typer.testing import CliRunner

from vattn.generate import generate_command

app = typer.Typer()
app.command()(generate_command)
runner = CliRunner()
PROMPT = " ".join(f"w{i % 100}" for i in range(30))


def gen(*args):
    r = runner.invoke(app, [PROMPT, *args])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.parametrize("spec", ["dense", "sink(2)+window(4)+topk(0.25)"])
def test_engine_text_equals_transformers_path(tiny_dir, spec):
    base = ["--model", str(tiny_dir), "-n", "8", "--spec", spec, "--json"]
    eng = json.loads(gen(*base).output)
    hf = json.loads(gen(*base, "--engine", "off").output)
    assert eng["engine"] is True and hf["engine"] is False and hf["fallback"] == "--engine off"
    assert eng["text"] == hf["text"] and eng["new_tokens"] == hf["new_tokens"] == 8
    if spec != "dense":  # 3 layers x 7 decode steps (the first token comes from the prefill)
        assert eng["summary"]["calls"] == hf["summary"]["calls"] == 21
        assert 0 < eng["summary"]["density"] < 1
    line = gen("--model", str(tiny_dir), "-n", "4", "--spec", spec).output.splitlines()[-1]
    assert "vattn engine" in line


def test_engine_falls_back_and_says_why(tiny_dir, tmp_path):
    r = gen("--model", str(tiny_dir), "-n", "3", "--metrics")
    assert "transformers + vattn.patch (the engine does not measure error and recall" in r.output
    import transformers as tf
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128,
                                     n_positions=64)).save_pretrained(tmp_path / "gpt2")
    from conftest import tiny_tokenizer
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    r = gen("--model", str(tmp_path / "gpt2"), "-n", "3")
    assert "transformers + vattn.patch (the vattn engine runs llama" in r.output
    r = runner.invoke(app, [PROMPT, "--model", str(tmp_path / "gpt2"), "--engine", "on"])
    assert r.exit_code == 2 and "--engine on, but the engine cannot run this" in r.output
