"""Specs: parsing, presets, files, and clear errors for every mistake."""
import json

import pytest
import torch

import vattn
from vattn import VattnError, parse
from vattn.attend import attend
from helpers import rand_qkv


def test_parse_chain_and_presets():
    s = parse("sink(128)+window(128)+topk(0.05)+verified(eps=0.05,delta=0.05)")
    assert [p.name for p in s.parts] == ["sink", "window", "topk", "verified"]
    assert s.parts[2].k == 0.05 and s.parts[0].n == 128
    for name in vattn.PRESETS:
        assert parse(name).parts
    assert parse("dense").is_dense


def test_spec_files(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("parts:\n  - sink: 64\n  - window: 64\n  - topk: 0.05\n  - verified: {eps: 0.1, delta: 0.1}\n")
    s = parse(str(y))
    assert [p.name for p in s.parts] == ["sink", "window", "topk", "verified"]
    assert s.parts[3].eps == 0.1
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"spec": "streaming"}))
    assert parse(str(j)).parts[0].name == "sink"


@pytest.mark.parametrize("text, words", [
    ("topk(1.5)", ["topk", "k", "(0, 1]"]),
    ("topk(-3)", ["topk", "k", ">= 0"]),
    ("verified(eps=1.5)", ["verified", "eps", "[0.0, 1.0)"]),
    ("verified(delta=0)", ["verified", "delta", "(0.0, 1.0)"]),
    ("verified(mode='both')", ["verified", "mode", "output"]),
    ("topp(p=2)", ["topp", "p"]),
    ("sink(128)+wndow(128)", ["unknown part", "wndow", "window"]),
    ("sink(foo=1)", ["sink", "unknown parameter", "foo"]),
    ("sink(1,2)", ["sink", "at most 1"]),
    ("sink(128)++window(1)", ["empty part"]),
    ("dense+topk(0.1)", ["dense"]),
    ("", ["non-empty"]),
    ("missing.yaml", ["does not exist"]),
])
def test_invalid_specs_name_part_and_range(text, words):
    with pytest.raises(VattnError) as e:
        parse(text)
    for w in words:
        assert w in str(e.value)


def test_shape_and_dtype_errors():
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=16)
    with pytest.raises(VattnError, match="4 dims"):
        vattn.sparse_attention(q[0], k, v, "dense")
    with pytest.raises(VattnError, match="multiple of KV heads"):
        vattn.sparse_attention(q[:, :3], k, v, "dense")
    with pytest.raises(VattnError, match="same shape"):
        vattn.sparse_attention(q, k, v[:, :, :8], "dense")
    with pytest.raises(VattnError, match="float32, float16 or bfloat16"):
        vattn.sparse_attention(q.long(), k, v, "dense")
    with pytest.raises(VattnError, match="lengths"):
        vattn.sparse_attention(q, k, v, "dense", lengths=torch.tensor([16, 17]))
    with pytest.raises(VattnError, match="one entry per batch row"):
        vattn.sparse_attention(q, k, v, "dense", lengths=torch.tensor([16]))
    _, sel = vattn.sparse_attention(q, k, v, "dense")
    with pytest.raises(VattnError, match="does not match"):
        attend(q[:, :2], k[:, :1], v[:, :1], sel)
