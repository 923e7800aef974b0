"""Method specs: `sink(128)+window(128)+topk(0.05)+verified(eps=0.05,delta=0.05)`.

A spec is a chain of parts joined by '+'. Arguments are positional (in the part's
field order) or key=value, each at most once. Sizes written as integers are counts;
with a decimal point they are fractions of the row's length (`topk(0.05)`,
`window(1.0)` = all). Named presets expand to specs; a path to a .yaml/.yml/.json file
loads one. Every form (string, file, list of part dicts, a Spec built in code) passes
the same checks (`check_parts`): integers at most MAX_INT, `dense` alone, and a
sampling part (uniform, magicpig, verified) only as the last part.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vattn.errors import VattnError
from vattn.methods import base
from vattn.methods.base import MAX_INT, PARTS, Builder, DecodeContext, estimates
from vattn.selection import Selection

PRESETS = {
    "dense": "dense",
    "streaming": "sink(0.02)+window(0.08)",
    "oracle-topk": "sink(0.02)+window(0.02)+topk(0.06)",
    "oracle-topp": "topp(0.9)",
    # the iid draws (docs/guarantee.md): one algorithm, fused on CUDA (kernels/sampled.py), its twin elsewhere
    "vattention": "sink(16)+window(64)+topk(0.05)+verified(eps=0.2,delta=0.2,draws='iid')",
    # the fused GPU pipeline (kernels/scan.py); the same algorithm on the CPU (its float64 twin)
    "vattention-scan": "sink(128)+window(128)+hashtopk(0.05,bits=128,cut='sample')"
                       "+verified(eps=0.05,delta=0.05,draws='iid',mode='denominator',min_pilot=128)",
}

_TERM = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _load_methods():
    # Importing a method module registers its parts.
    import importlib
    for mod in ("fixed", "oracle", "sampling", "quest", "magicpig", "hashing", "extra",
                "doublesparse", "squeezed"):
        try:
            importlib.import_module(f"vattn.methods.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"vattn.methods.{mod}":
                raise


def _value(text: str):
    t = text.strip()
    if not t:
        raise VattnError("empty argument")
    if t[0] in "'\"" and t[-1] == t[0]:
        return t[1:-1]
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        return t


def _split(text: str, sep: str) -> list[str]:
    """Split at sep outside parentheses and quotes; unbalanced ones are an error."""
    out, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise VattnError(f"unbalanced parentheses in {text!r}: a ')' closes nothing")
        if ch == sep and depth == 0 and not quote:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote:
        raise VattnError(f"unclosed quote {quote} in {text!r}")
    if depth:
        raise VattnError(f"unbalanced parentheses in {text!r}: {depth} '(' not closed")
    out.append("".join(cur))
    return out


def check_value(part: str, key: str, val):
    """What a spec string can hold: a bool, an int in [-MAX_INT, MAX_INT], a float or a string
    (files must not pass what the string form cannot say)."""
    if isinstance(val, bool) or isinstance(val, (float, str)):
        return
    if isinstance(val, int):
        if abs(val) > MAX_INT:
            raise VattnError(f"{part}: {key}={val} is too large: integers in a spec are at most "
                             f"{MAX_INT} (2**31 - 1; key positions and counts are int32); "
                             f"for 'all keys' write a fraction such as 1.0")
        return
    raise VattnError(f"{part}: {key} must be a number, true/false or a string, got "
                     f"{type(val).__name__} {val!r}")


def make_part(name: str, args: list, kwargs: dict):
    """Build a part by name; every mistake names the part and what is allowed."""
    _load_methods()
    if not isinstance(name, str) or name not in PARTS:
        raise VattnError(f"unknown part {name!r}; known parts: {', '.join(sorted(PARTS))}; "
                         f"presets: {', '.join(PRESETS)}")
    cls = PARTS[name]
    names = [f.name for f in fields(cls)]
    if len(args) > len(names):
        raise VattnError(f"{name}: takes at most {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    for key in kwargs:
        if key not in names:
            raise VattnError(f"{name}: unknown parameter {key!r}; valid: {', '.join(names) or 'none'}")
    params = dict(zip(names, args))
    for key, val in kwargs.items():
        if key in params:
            raise VattnError(f"{name}: parameter {key!r} given twice (positionally and as {key}=...); "
                             f"give it once")
        params[key] = val
    for key, val in params.items():
        check_value(name, key, val)
    try:
        return cls(**params)
    except TypeError as e:
        raise VattnError(f"{name}: {e}") from None


def parse_term(term: str):
    m = _TERM.match(term)
    if not m:
        raise VattnError(f"cannot read spec part {term.strip()!r}; write name or name(args), e.g. topk(0.05)")
    name, argtext = m.group(1), m.group(2)
    if name in PRESETS and argtext is None and PRESETS[name] != name:
        return parse(PRESETS[name]).parts
    args, kwargs = [], {}
    if argtext and argtext.strip():
        for a in _split(argtext, ","):
            if "=" in a:
                key, val = a.split("=", 1)
                key = key.strip()
                if key in kwargs:
                    raise VattnError(f"{name}: parameter {key!r} given twice; give it once")
                kwargs[key] = _value(val)
            elif kwargs:
                raise VattnError(f"{name}: positional argument {a.strip()!r} after key=value arguments")
            else:
                args.append(_value(a))
    return [make_part(name, args, kwargs)]


def check_parts(parts) -> None:
    """Rules on the chain as a whole, for every way a Spec is made.

    - dense attends every key: alone.
    - A sampling part (uniform, magicpig, verified: `base.estimates`) weights its keys
      so that they stand for every key no earlier part chose; a part after it would
      count those keys a second time (verified after uniform measured a denominator
      1.6-1.75x the exact one), so a sampling part must be the last part.
    """
    _load_methods()
    if not isinstance(parts, (list, tuple)) or not parts:
        raise VattnError(f"a spec needs at least one part, got {parts!r}")
    for p in parts:
        cls = PARTS.get(getattr(p, "name", None))
        if cls is None or not isinstance(p, cls):
            raise VattnError(f"spec parts must be part objects (e.g. from vattn.parse), got {p!r}")
    if any(p.name == "dense" for p in parts) and len(parts) > 1:
        raise VattnError("dense attends every key: it cannot be combined with other parts")
    for p, later in zip(parts, parts[1:]):
        if not estimates(p):
            continue
        why = (f"{later.name} after {p.name}: {p.name} samples the residual (every key no earlier part "
               f"chose) and weights its keys to stand for all of it, so a part after it counts those "
               f"keys twice")
        if later.name == p.name:
            fix = f"use one {p.name} part"
        elif later.name == "verified":
            fix = (f"verified sizes its own sample of the residual for (eps, delta): drop {p.name}, or put "
                   f"parts that choose keys exactly in front (sink, window, topk, quest, hashtopk, "
                   f"doublesparse, squeezed), e.g. sink(16)+window(64)+topk(0.05)+verified(eps=0.05,delta=0.05)")
        elif p.name == "verified":
            fix = f"verified must be the last part: move {later.name} before it"
        else:
            fix = f"a spec has at most one sampling part and it comes last: move {later.name} before {p.name}"
        raise VattnError(f"{why}; {fix}")
    _check_iid_chain(parts)


POSITION_FRONTS = (["sink"], ["window"], ["sink", "window"])  # parts that choose by position alone
SCAN_FORM = ("[sink(count)+][window(count)+]hashtopk(k, bits=32..256, cut='sample')+"
             "verified(eps=..., delta=..., draws='iid'[, mode='denominator'])")
SAMPLED_FORM = ("[sink(count)+][window(count)+][topk(k) | quest(budget, ..) | hashtopk(k, ..)]+"
                "verified(eps=..., delta=..., draws='iid'[, mode=..])")


def _check_iid_chain(parts) -> None:
    """The iid draws are one algorithm with their front: behind the scan's signature cut
    (hashtopk(cut='sample'): the scan kernels) or behind keys chosen exactly (sink, window, topk,
    quest, hashtopk(cut='exact'): kernels/sampled.py). The middle they draw from is [start + sink, L - window): counts."""
    if not any(getattr(p, "cut", None) == "sample" or getattr(p, "draws", None) == "iid" for p in parts):
        return
    names = [p.name for p in parts]
    scan = (len(parts) >= 2 and names[-2:] == ["hashtopk", "verified"] and parts[-2].cut == "sample"
            and parts[-1].draws == "iid" and names[:-2] in ([], *POSITION_FRONTS))
    exact_front = len(parts) >= 2 and (names[-2] in ("topk", "quest") or
                                       (names[-2] == "hashtopk" and parts[-2].cut == "exact"))
    sampled = names[-1] == "verified" and parts[-1].draws == "iid" and len(parts) >= 2 and (
        names[:-1] in POSITION_FRONTS or (exact_front and names[:-2] in ([], *POSITION_FRONTS)))
    if not (scan or sampled):
        raise VattnError(f"hashtopk(cut='sample') and verified(draws='iid') are one algorithm with their front: "
                         f"{SCAN_FORM}, or {SAMPLED_FORM}; got {'+'.join(names)}")
    counts = [p for p in parts if p.name in ("sink", "window")]
    if not all(isinstance(p.n, int) for p in counts):
        got = "+".join(f"{p.name}({p.n})" for p in counts)
        raise VattnError(f"verified(draws='iid') draws from the keys between the sinks and the window: give sink "
                         f"and window as key counts (e.g. sink(16)+window(64)), got {got}")


@dataclass
class Spec:
    """A parsed method: its parts in order, and the text it came from.

    Made by `parse` (or directly from part objects); `check_parts` holds either way.
    """
    parts: list
    text: str

    def __post_init__(self):
        check_parts(self.parts)
        if not isinstance(self.text, str):
            raise VattnError(f"Spec.text must be a string, got {self.text!r}")
        self.parts = list(self.parts)

    @property
    def is_dense(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].name == "dense"

    @property
    def shared(self) -> bool:
        """Whether the Selection is per KV head (a part with share='kv')."""
        return any(getattr(p, "share", "none") == "kv" for p in self.parts)

    def select(self, ctx: DecodeContext) -> Selection:
        b, hq, t, _ = ctx.q.shape
        if ctx.q.numel() == 0 or ctx.k.shape[2] == 0:
            # No query rows or no keys: nothing to choose. Every part would choose nothing;
            # skipping them also skips their per-layer state (nothing to record).
            shared = self.shared
            return Selection.empty(b, ctx.k.shape[1] if shared else hq, t, ctx.k.device, shared)
        out = Builder(ctx)
        for part in self.parts:
            part.select(ctx, out)
        return out.selection()

    def compile(self, device, seed: int = 0, fused: bool | None = None):
        """The Plan that runs this spec on `device` (vattn.plan.compile)."""
        from vattn.plan import compile as compile_plan
        return compile_plan(self, device, seed, fused)

    def __str__(self):
        return self.text


def parse(spec) -> Spec:
    """A Spec from a string, a preset name, a file path, a list of part dicts, or a Spec."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (list, dict)):
        return from_data(spec, "<data>")
    if not isinstance(spec, str) or not spec.strip():
        raise VattnError(f"a spec must be a non-empty string such as 'sink(128)+window(128)+topk(0.05)', got {spec!r}")
    text = spec.strip()
    if text.endswith((".yaml", ".yml", ".json")):
        return load_file(text)
    return Spec(_chain(text), text)


def _chain(text: str) -> list:
    """The parts of 'a(..)+b(..)+...' (presets expanded)."""
    parts = []
    for term in _split(text, "+"):
        if not term.strip():
            raise VattnError(f"empty part in spec {text!r}: check the '+' signs")
        parts.extend(parse_term(term))
    return parts


def from_data(data, where: str) -> Spec:
    """Specs from YAML/JSON: {"spec": "..."} or {"parts": [{"topk": 0.05}, {"verified": {...}}]}."""
    if isinstance(data, dict):
        if len(data) != 1 or not ({"spec", "parts"} & set(data)):
            raise VattnError(f"{where}: expected exactly one key, 'spec: <string>' or 'parts: [...]', "
                             f"got keys {sorted(map(str, data))}")
        if "spec" in data:
            if not isinstance(data["spec"], str):
                raise VattnError(f"{where}: spec must be a string such as 'sink(128)+topk(0.05)', "
                                 f"got {data['spec']!r}")
            return parse(data["spec"])
    items = data.get("parts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise VattnError(f"{where}: expected 'spec: <string>' or 'parts: [...]', a list of parts")
    parts = []
    for item in items:
        if isinstance(item, str):
            if not item.strip():
                raise VattnError(f"{where}: empty part name in parts")
            parts.extend(_chain(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, arg), = item.items()
            if isinstance(arg, dict):
                parts.append(make_part(name, [], arg))
            elif isinstance(arg, list):
                parts.append(make_part(name, arg, {}))
            else:
                parts.append(make_part(name, [] if arg is None else [arg], {}))
        else:
            raise VattnError(f"{where}: each part must be a name or a one-key mapping like {{topk: 0.05}}, got {item!r}")
    text = "+".join(_part_text(p) for p in parts)
    return Spec(parts, text)


def _part_text(part) -> str:
    args = ",".join(f"{f.name}={getattr(part, f.name)!r}" for f in fields(part))
    return f"{part.name}({args})" if args else part.name


def load_file(path: str) -> Spec:
    p = Path(path)
    if not p.is_file():
        raise VattnError(f"spec file {path} does not exist")
    try:
        text = p.read_text()
        data = json.loads(text, object_pairs_hook=_unique_pairs) if p.suffix == ".json" else _yaml(text)
    except VattnError as e:
        raise VattnError(f"spec file {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parse error becomes a user message
        raise VattnError(f"cannot read spec file {path}: {e}") from None
    return from_data(data, path)


def _unique_pairs(pairs):
    """A mapping from (key, value) pairs; a key given twice is an error, not 'the last wins'."""
    out = {}
    for key, val in pairs:
        if key in out:
            raise VattnError(f"key {key!r} given twice; give it once")
        out[key] = val
    return out


def _yaml(text: str):
    """yaml.safe_load, except that a mapping key given twice is an error."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        loader.flatten_mapping(node)
        pairs = [(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                 for k, v in node.value]
        try:
            return _unique_pairs(pairs)
        except TypeError:  # an unhashable key
            raise VattnError(f"mapping keys must be names, got {[k for k, _ in pairs]!r}") from None

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def context(q, k, v, lengths=None, starts=None, scale=None, seed=None, generator=None,
            state=None, layer=0) -> DecodeContext:
    """The checked DecodeContext of one attention call (see `select` for the arguments)."""
    from vattn.attend import check_qkv, check_scale, row_bounds
    b, hq, t, d, hkv, n = check_qkv(q, k, v)
    starts, ends = row_bounds(b, t, n, lengths, starts, q.device)
    scale = check_scale(scale, d)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise VattnError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != q.device.type:
            raise VattnError(f"generator is on {generator.device}, the tensors on {q.device}: "
                             f"make it with torch.Generator(device=q.device)")
    elif seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
            raise VattnError(f"seed must be an int in [0, 2**63), got {seed!r}")
        generator = torch.Generator(device=q.device).manual_seed(int(seed))
    if state is not None and not isinstance(state, dict):
        raise VattnError(f"state must be a dict (a layer's method state) or None, got {type(state).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
        raise VattnError(f"layer must be an int >= 0, got {layer!r}")
    return DecodeContext(q, k, v, starts, ends, scale, generator, state if state is not None else {}, int(layer))


def select(spec, q, k, v, lengths=None, starts=None, scale=None, seed=None, generator=None,
           state=None, layer=0) -> Selection:
    """Run a spec's parts on one attention call and return the Selection.

    q [B, Hq, T, D]; k, v [B, Hkv, N, D]; lengths, starts: int tensors [B] with
    0 <= starts <= lengths <= N (default N and 0); scale: a positive finite number
    (default 1/sqrt(D)); seed: an int (or `generator`, on q's device); state: the
    layer's method state (a dict kept across calls); layer: its index. B, T or N may be
    0 (an empty Selection). Bad input raises VattnError.
    """
    spec = parse(spec)
    return spec.select(context(q, k, v, lengths, starts, scale, seed, generator, state, layer))


__all__ = ["Spec", "parse", "select", "context", "check_parts", "PRESETS", "base"]
