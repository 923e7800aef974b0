"""Fuzzing kept in the suite: the parser and sparse_attention take anything and either
work or raise VattnError, never another exception (issue 16).

Deterministic (derandomize=True: the same examples on every run) and bounded
(max_examples) so each test stays well under 30 s on 2 CPU cores.
"""
from dataclasses import fields

import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import vattn
from vattn import VattnError
from vattn.methods.base import PARTS
from vattn.spec import _load_methods, from_data

_load_methods()

# Every registered part, small enough for CPU tests; test_every_part_is_fuzzed keeps it complete.
EVERY_PART = [
    "dense", "sink(3)", "window(0.3)", "topk(0.2)", "topp(0.8)", "uniform(0.3)",
    "verified(eps=0.2,delta=0.2,min_pilot=4)",
    "sink(2)+window(2)+verified(eps=0.1,delta=0.1,share='kv',mode='denominator',min_pilot=4)",
    "sink(2)+verified(eps=0.2,weights='two-phase',min_pilot=4)",
    "quest(0.3,page=4)", "magicpig(K=2,L=6)", "sink(2)+magicpig(K=2,L=5,dense_layers=0)",
    "hashtopk(0.3,bits=8)", "heads(full='0',sink=2,window=3)",
    "doublesparse(0.3,channels=2)", "squeezed(0.3,clusters=3,iters=2)",
]
SPECS = EVERY_PART + list(vattn.PRESETS)

FIELDS = sorted({f.name for cls in PARTS.values() for f in fields(cls)})
NAMES = sorted(PARTS) + list(vattn.PRESETS) + ["", "x", "Topk", "top-k", "1abc", "a_b"]
PUNCT = ["(", ")", ",", "=", "+", "'", '"', " ", "((", "))", "=,", "+)"]


def _number(draw):
    return draw(st.one_of(
        st.integers(-3, 300).map(str),
        st.integers(2**31 - 3, 2**31 + 3).map(str),
        st.integers(-10**30, 10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.floats(0.0, 1.5).map(lambda x: f"{x:.3f}"),
        st.sampled_from(["1e400", "-0.0", "nan", "inf", "1_000", "0x10", "1.", ".5", "True", "false"]),
    ))


@st.composite
def values(draw, depth=0):
    kind = draw(st.integers(0, 9 if depth < 2 else 8))
    if kind <= 4:
        return _number(draw)
    if kind <= 6:
        word = draw(st.sampled_from(["output", "denominator", "kv", "none", "pooled", "two-phase",
                                     "random", "0 1", "1.0", "", "x)", "a,b", "3 7 12.0"]))
        quote = draw(st.sampled_from(["'", "'", '"', "", "'\""]))
        return f"{quote}{word}{quote[::-1]}"
    if kind == 7:
        return draw(st.text(alphabet="abkn01.,()=+'\" -", max_size=8))
    if kind == 8:
        return draw(st.sampled_from(PUNCT))
    return draw(terms(depth + 1))  # nesting: a part as an argument


@st.composite
def terms(draw, depth=0):
    name = draw(st.one_of(st.sampled_from(sorted(PARTS)), st.sampled_from(NAMES)))
    if draw(st.integers(0, 3)) == 0:
        return name
    own = [f.name for f in fields(PARTS[name])] if name in PARTS else []
    args = []
    for _ in range(draw(st.integers(0, 3))):
        val = draw(values(depth))
        if draw(st.booleans()):
            pool = own if own and draw(st.integers(0, 3)) else FIELDS + ["foo", "", " k", "eps "]
            args.append(f"{draw(st.sampled_from(pool))}={val}")
        else:
            args.append(val)
    close = draw(st.sampled_from([")"] * 6 + ["", "))"]))
    return f"{name}({','.join(args)}{close}"


NUMBERS = ["0", "1", "2", "3", "0.5", "1.0", "0.05", "64", "2147483647", "2147483648", "99999999999",
           "100000000000000000000", "-1", "1e-9", "0.0"]
WORDS = ["'output'", "'denominator'", "'kv'", "'none'", "'pooled'", "'two-phase'", "'random'", "''", "'0 1'"]


@st.composite
def wellformed_terms(draw):
    """A registered part with its own parameters and plausible (or edge) values."""
    name = draw(st.sampled_from(sorted(PARTS)))
    args = []
    for f in fields(PARTS[name]):
        if draw(st.integers(0, 2)) == 0:
            pool = WORDS if isinstance(f.default, str) else NUMBERS
            args.append(f"{f.name}={draw(st.sampled_from(pool))}")
    return f"{name}({','.join(args)})" if args else name


@st.composite
def spec_texts(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(alphabet="abdeiknoprstuvw()+,=.'\"0123456789 -_", max_size=40))
    if kind <= 4:
        return "+".join(draw(st.lists(wellformed_terms(), min_size=1, max_size=3)))
    parts = draw(st.lists(terms(), min_size=1, max_size=4))
    return draw(st.sampled_from(["+", " + ", "++", "+"])).join(parts)


_g = torch.Generator().manual_seed(0)
TINY = (torch.randn(2, 4, 2, 8, generator=_g), torch.randn(2, 2, 12, 8, generator=_g),
        torch.randn(2, 2, 12, 8, generator=_g))


def typed(spec):
    """The parts with every field's type: 1 and 1.0 differ in a spec (count vs fraction)."""
    return [(p.name, [(f.name, type(getattr(p, f.name)), getattr(p, f.name)) for f in fields(p)])
            for p in spec.parts]


def test_every_part_is_fuzzed():
    used = {t.split("(")[0] for s in EVERY_PART for t in s.split("+")}
    assert used == set(PARTS), f"add the new parts to EVERY_PART: {set(PARTS) - used}"


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(text=spec_texts())
def test_parser_fuzz(text):
    try:
        spec = vattn.parse(text)
    except VattnError:
        event("refused")
        return
    event("parsed")
    assert isinstance(spec, vattn.Spec) and spec.parts
    again = vattn.parse(str(spec))
    assert again == spec and typed(again) == typed(spec)
    # The file/list form: every field written out re-parses to the same parts.
    data = [{p.name: {f.name: getattr(p, f.name) for f in fields(p)}} for p in spec.parts]
    via_data = from_data(data, "<fuzz>")
    assert typed(via_data) == typed(spec)
    assert typed(vattn.parse(str(via_data))) == typed(spec)
    # What parses runs (or refuses the input with a VattnError, e.g. a head that does not exist).
    try:
        out, _ = vattn.sparse_attention(*TINY, spec, seed=0)
    except VattnError:
        return
    assert out.shape == TINY[0].shape and bool(torch.isfinite(out).all())


BROKEN = [None] * 8 + ["dtype", "heads", "dim", "lengths", "starts", "scale", "seed"]


@st.composite
def bounds(draw, b, n, lo=0, broken=False):
    """lengths/starts: None or an int tensor [B] in [lo, n]; broken: something wrong."""
    if not broken:
        if draw(st.integers(0, 2)) == 0:
            return None
        return torch.tensor(draw(st.lists(st.integers(lo, n), min_size=b, max_size=b)), dtype=torch.long)
    bad = draw(st.sampled_from(["float", "2d", "range", "short", "str", "bool", "negative"]))
    return {"float": lambda: torch.full((b,), float(n)), "2d": lambda: torch.full((b, 1), n, dtype=torch.long),
            "range": lambda: torch.full((max(b, 1),), n + 1, dtype=torch.long)[:b] if b else torch.zeros(1),
            "short": lambda: torch.zeros(b + 1, dtype=torch.long), "str": lambda: "12",
            "bool": lambda: torch.ones(b, dtype=torch.bool),
            "negative": lambda: torch.full((b,), -1, dtype=torch.long) if b else [0]}[bad]()


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_sparse_attention_fuzz(data):
    spec = data.draw(st.sampled_from(SPECS), "spec")
    broken = data.draw(st.sampled_from(BROKEN), "broken")
    b, hkv = data.draw(st.integers(0, 3), "B"), data.draw(st.integers(1, 2), "Hkv")
    g = data.draw(st.integers(0, 3) if broken == "heads" else st.integers(1, 3), "G")
    t, n = data.draw(st.integers(0, 3), "T"), data.draw(st.integers(0, 24), "N")
    d = data.draw(st.sampled_from([0] if broken == "dim" else [1, 4, 16]), "D")
    dtype = data.draw(st.sampled_from([torch.int32, torch.int64, torch.bool] if broken == "dtype" else
                                      [torch.float32, torch.float16, torch.bfloat16, torch.float64]), "dtype")
    lengths = data.draw(bounds(b, n, broken=broken == "lengths"), "lengths")
    hi = n if lengths is None or not isinstance(lengths, torch.Tensor) or lengths.numel() == 0 else int(lengths.min())
    starts = data.draw(bounds(b, max(hi, 0), broken=broken == "starts"), "starts")
    scale = data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1", True] if broken == "scale"
                                      else [None, 0.3, 2]), "scale")
    seed = data.draw(st.sampled_from([-1, 1.5, "7", True] if broken == "seed" else [None, 0, 12345]), "seed")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), "data seed"))
    q = (torch.randn(b, hkv * g, t, d, generator=gen) * 2).to(dtype)
    k = (torch.randn(b, hkv, n, d, generator=gen) * 2).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    # Some breakages cannot happen at these sizes (g = 0 drawn as 1..3, a wrong [0]-tensor at B = 0).
    valid = broken is None or (broken == "heads" and g >= 1)
    if broken in ("lengths", "starts") and b == 0 and isinstance(lengths if broken == "lengths" else starts,
                                                                 torch.Tensor):
        x = lengths if broken == "lengths" else starts
        valid = x.dim() == 1 and x.shape[0] == 0 and not x.dtype.is_floating_point and x.dtype != torch.bool
    try:
        out, sel = vattn.sparse_attention(q, k, v, spec, lengths=lengths, starts=starts, scale=scale, seed=seed)
    except VattnError as e:
        assert not valid, f"valid input refused: {e}"
        event(f"refused ({broken})")
        return
    event("ran")
    assert valid, f"broken input ({broken}) accepted"
    assert out.shape == q.shape and out.dtype == q.dtype
    assert bool(torch.isfinite(out).all())
    assert sel.indices.shape[0] == b and sel.indices.shape[2] == t
