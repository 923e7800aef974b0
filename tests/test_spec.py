"""Specs: parsing, presets, files, and clear errors for every mistake."""
import json

import pytest
import torch

import vattn
from vattn import VattnError, parse
from vattn.attend import attend
from helpers import assert_parse_error, rand_qkv


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


# ---------------------------------------------------------------- issue 16: fuzzed specs
@pytest.mark.parametrize("text, words", [
    # A sampling part's weights stand for the whole residual: nothing may follow it.
    ("uniform(0.1)+verified(eps=0.01)", ["verified after uniform", "twice", "drop uniform", "topk"]),
    ("sink(4)+magicpig(K=2,L=6)+verified", ["verified after magicpig", "twice", "drop magicpig"]),
    ("verified(eps=0.1)+topk(0.05)", ["topk after verified", "verified must be the last part"]),
    ("sink(4)+verified(share='kv')+window(8)", ["window after verified", "last part"]),
    ("vattention+window(8)", ["window after verified", "last part"]),
    ("verified+verified", ["verified after verified", "use one verified part"]),
    ("uniform(0.1)+topk(0.05)", ["topk after uniform", "move topk before uniform"]),
    ("magicpig(K=2,L=6)+uniform(0.1)", ["uniform after magicpig", "at most one sampling part"]),
])
def test_sampling_part_must_be_last(text, words):
    assert_parse_error(text, words)


def test_sampling_parts_last_are_fine_and_spec_objects_are_checked():
    for text in ["sink(4)+window(4)+magicpig(K=2,L=6)", "sink(4)+uniform(0.1)", "vattention",
                 "sink(4)+topk(0.05)+verified(eps=0.1,share='kv')"]:
        assert parse(text).parts
    parts = parse("verified(eps=0.1)").parts + parse("topk(0.05)").parts
    with pytest.raises(VattnError, match="verified must be the last part"):
        vattn.Spec(parts, "built in code")
    with pytest.raises(VattnError, match="part objects"):
        vattn.Spec(["topk(0.05)"], "topk(0.05)")


def test_estimating_parts_are_exactly_those_with_weights():
    # base.estimates must name every part whose keys carry log-weights (the check above relies on it).
    from vattn.methods.base import PARTS, estimates
    from test_fuzz import EVERY_PART
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=2, n=40)
    for text in EVERY_PART:
        spec = parse(text)
        sel = vattn.select(spec, q, k, v, seed=0)
        weighted = bool((sel.log_weights[sel.valid()] != 0).any())
        if weighted:
            assert estimates(spec.parts[-1]), text
        for p in spec.parts[:-1]:
            assert not estimates(p), text
    assert {n for n, c in PARTS.items() if estimates(c)} == {"uniform", "verified", "magicpig"}


@pytest.mark.parametrize("text, words", [
    ("topk(k=0.05,k=0.9)", ["topk", "'k'", "twice"]),
    ("verified(eps=0.1,delta=0.1,eps=0.2)", ["verified", "'eps'", "twice"]),
    ("topk(0.05,k=0.9)", ["topk", "'k'", "twice", "positionally"]),
    ("verified(0.1,0.2,delta=0.3)", ["verified", "'delta'", "twice"]),
])
def test_a_parameter_given_twice_is_refused(text, words):
    assert_parse_error(text, words)


@pytest.mark.parametrize("text, words", [
    ("topk(99999999999)", ["topk", "k", "2147483647"]),
    ("sink(n=2147483648)", ["sink", "n", "2147483647"]),
    ("verified(min_pilot=99999999999999999999999)", ["verified", "min_pilot", "2147483647", "int32"]),
    ("quest(100000000000000000000000000)", ["quest", "budget", "2147483647"]),
    ("squeezed(0.05, clusters=10000000000)", ["squeezed", "clusters", "2147483647"]),
    ("magicpig(seed=-99999999999)", ["magicpig", "seed"]),
])
def test_huge_integers_are_refused_at_parse_time(text, words):
    assert_parse_error(text, words)


def test_largest_count_is_accepted():
    q, k, v = rand_qkv(b=1, hq=2, hkv=1, t=1, n=20)
    out, sel = vattn.sparse_attention(q, k, v, "window(2147483647)")
    assert int(sel.count.max()) == 20


@pytest.mark.parametrize("text", ["sink(1))", "topk((0.05)", "verified(mode='output)", "sink(4))+window(4)"])
def test_unbalanced_parentheses_and_quotes(text):
    with pytest.raises(VattnError, match="unbalanced|unclosed"):
        parse(text)


# Each bad spec in its string form and its parts-list form (YAML and JSON text; None: from the data).
BAD_IN_EVERY_FORM = [
    ("uniform(0.1)+verified(eps=0.05)", [{"uniform": 0.1}, {"verified": {"eps": 0.05}}], None,
     ["verified after uniform"]),
    ("verified(eps=0.1)+topk(0.05)", [{"verified": {"eps": 0.1}}, {"topk": 0.05}], None,
     ["verified must be the last part"]),
    ("topk(k=0.05,k=0.9)", None, ("parts:\n  - topk: {k: 0.05, k: 0.9}\n",
                                  '{"parts": [{"topk": {"k": 0.05, "k": 0.9}}]}'), ["'k'", "twice"]),
    ("topk(99999999999)", [{"topk": 99999999999}], None, ["2147483647"]),
    ("verified(min_pilot=99999999999)", [{"verified": {"min_pilot": 99999999999}}], None, ["min_pilot", "2147483647"]),
    ("dense+topk(0.1)", ["dense", {"topk": 0.1}], None, ["dense"]),
    ("topk(1.5)", [{"topk": 1.5}], None, ["topk", "k", "(0, 1]"]),
    ("sink(foo=1)", [{"sink": {"foo": 1}}], None, ["sink", "unknown parameter", "foo"]),
    ("sink(1,2)", [{"sink": [1, 2]}], None, ["sink", "at most 1"]),
    ("wndow(3)", [{"wndow": 3}], None, ["unknown part", "wndow"]),
    ("sink(4)+vattention+window(2)", ["sink(4)", "vattention", {"window": 2}], None, ["window after verified"]),
]


@pytest.mark.parametrize("text, data, raw, words", BAD_IN_EVERY_FORM)
def test_files_refuse_what_strings_refuse(tmp_path, text, data, raw, words):
    import yaml
    forms = {"string": text}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"spec": text}))
    (tmp_path / "s.json").write_text(json.dumps({"spec": text}))
    forms.update({"yaml spec": str(tmp_path / "s.yaml"), "json spec": str(tmp_path / "s.json")})
    y, j = raw if raw else (yaml.safe_dump({"parts": data}), json.dumps({"parts": data}))
    (tmp_path / "p.yaml").write_text(y)
    (tmp_path / "p.json").write_text(j)
    forms.update({"yaml parts": str(tmp_path / "p.yaml"), "json parts": str(tmp_path / "p.json")})
    if data is not None:
        forms["list"] = data
    for form, spec in forms.items():
        with pytest.raises(VattnError) as e:
            parse(spec)
        assert all(w in str(e.value) for w in words), (form, str(e.value))


@pytest.mark.parametrize("data, words", [
    ({"parts": [{"topk": {"k": None}}]}, ["topk", "k", "number"]),
    ({"parts": [{"topk": [[0.05]]}]}, ["topk", "k", "number"]),
    ({"parts": [{"verified": {"mode": ["output"]}}]}, ["verified", "mode"]),
    ({"spec": "topk(0.05)", "parts": [{"topk": 0.05}]}, ["exactly one key"]),
    ({"spec": "topk(0.05)", "eps": 0.1}, ["exactly one key", "eps"]),
    ({"spec": 5}, ["must be a string"]),
    ({"parts": []}, ["parts"]),
    ({"parts": [""]}, ["empty"]),
])
def test_file_values_the_string_form_cannot_say(tmp_path, data, words):
    for suffix, dump in ((".json", json.dumps), (".yaml", __import__("yaml").safe_dump)):
        f = tmp_path / f"s{suffix}"
        f.write_text(dump(data))
        with pytest.raises(VattnError) as e:
            parse(str(f))
        assert all(w in str(e.value) for w in words), str(e.value)


def test_duplicate_file_keys_are_refused(tmp_path):
    y = tmp_path / "d.yaml"
    y.write_text("spec: topk(0.05)\nspec: topk(0.9)\n")
    with pytest.raises(VattnError, match="'spec' given twice"):
        parse(str(y))
    j = tmp_path / "d.json"
    j.write_text('{"spec": "topk(0.05)", "spec": "topk(0.9)"}')
    with pytest.raises(VattnError, match="'spec' given twice"):
        parse(str(j))
