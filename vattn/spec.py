"""Method specs: `sink(128)+window(128)+topk(0.05)+verified(eps=0.05,delta=0.05)`.

A spec is a chain of parts joined by '+'. Arguments are positional (in the part's
field order) or key=value. Sizes written as integers are counts; with a decimal
point they are fractions of the row's length (`topk(0.05)`, `window(1.0)` = all).
Named presets expand to specs; a path to a .yaml/.yml/.json file loads one.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from vattn.errors import VattnError
from vattn.methods import base
from vattn.methods.base import PARTS, Builder, DecodeContext
from vattn.selection import Selection

PRESETS = {
    "dense": "dense",
    "streaming": "sink(0.02)+window(0.08)",
    "oracle-topk": "sink(0.02)+window(0.02)+topk(0.06)",
    "oracle-topp": "topp(0.9)",
    "vattention": "sink(16)+window(64)+topk(0.05)+verified(eps=0.2,delta=0.2)",
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
    """Split at sep outside parentheses and quotes."""
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
        if ch == sep and depth == 0 and not quote:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def make_part(name: str, args: list, kwargs: dict):
    """Build a part by name; every mistake names the part and what is allowed."""
    _load_methods()
    if name not in PARTS:
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
            raise VattnError(f"{name}: parameter {key!r} given twice")
        params[key] = val
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
                kwargs[key.strip()] = _value(val)
            elif kwargs:
                raise VattnError(f"{name}: positional argument {a.strip()!r} after key=value arguments")
            else:
                args.append(_value(a))
    return [make_part(name, args, kwargs)]


@dataclass
class Spec:
    """A parsed method: its parts in order, and the text it came from."""
    parts: list
    text: str

    @property
    def is_dense(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].name == "dense"

    def select(self, ctx: DecodeContext) -> Selection:
        out = Builder(ctx)
        for part in self.parts:
            part.select(ctx, out)
        return out.selection()

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
    parts = []
    for term in _split(text, "+"):
        if not term.strip():
            raise VattnError(f"empty part in spec {text!r}: check the '+' signs")
        parts.extend(parse_term(term))
    if not parts:
        raise VattnError(f"spec {text!r} has no parts")
    if any(p.name == "dense" for p in parts) and len(parts) > 1:
        raise VattnError("dense attends every key: it cannot be combined with other parts")
    return Spec(parts, text)


def from_data(data, where: str) -> Spec:
    """Specs from YAML/JSON: {"spec": "..."} or {"parts": [{"topk": 0.05}, {"verified": {...}}]}."""
    if isinstance(data, dict) and "spec" in data:
        return parse(str(data["spec"]))
    items = data.get("parts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise VattnError(f"{where}: expected 'spec: <string>' or 'parts: [...]', a list of parts")
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.extend(parse_term(item))
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
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a user message
        raise VattnError(f"cannot read spec file {path}: {e}") from None
    return from_data(data, path)


def select(spec, q, k, v, lengths=None, starts=None, scale=None, seed=None, generator=None,
           state=None, layer=0) -> Selection:
    """Run a spec's parts on one attention call and return the Selection."""
    import math
    from vattn.attend import check_qkv, row_bounds
    spec = parse(spec)
    b, hq, t, d, hkv, n = check_qkv(q, k, v)
    starts, ends = row_bounds(b, t, n, lengths, starts, q.device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=q.device).manual_seed(int(seed))
    ctx = DecodeContext(q, k, v, starts, ends, 1.0 / math.sqrt(d) if scale is None else scale,
                        generator, state if state is not None else {}, layer)
    return spec.select(ctx)


__all__ = ["Spec", "parse", "select", "PRESETS", "base"]
