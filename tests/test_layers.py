"""The package's layering (DESIGN.md): lower layers never import higher ones, and no module
uses another module's private names. Read from the source with ast, lazy imports included."""
import ast
import pathlib

import vattn

ROOT = pathlib.Path(vattn.__file__).parent

# Units (a top-level module or subpackage of vattn), lowest first; a unit may import its own
# layer and those below. "vattn" is the package's own __init__ (the public API).
LAYERS = [
    {"errors", "paths", "console"},
    {"selection", "stats", "models", "synthetic", "cache"},
    {"kernels"},
    {"attend", "metrics"},
    {"methods"},
    {"spec"},
    {"plan_select", "plan"},
    {"hf", "capture", "vattn"},
    {"engine", "verify", "generate", "train_hash"},
    {"eval", "bench", "serve"},
    {"cli"},
]
# Spec.compile (the issue-17 API) hands the spec to plan.compile, imported when called.
ALLOWED_UP = {("spec", "plan")}


def modules():
    for p in sorted(ROOT.rglob("*.py")):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), p


def unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "vattn"


def imports(path: pathlib.Path, me: str):
    """(imported module, name or None, line, local name) of every vattn import in the file."""
    tree = ast.parse(path.read_text())
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "vattn":
                    yield a.name, None, node.lineno, a.asname or a.name
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != "vattn":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                is_mod = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (ROOT.parent / sub.replace(".", "/")).is_dir()
                yield (sub, None, node.lineno, a.asname or a.name) if is_mod else (mod, a.name, node.lineno, None)


def rank(u: str) -> int:
    for i, layer in enumerate(LAYERS):
        if u in layer:
            return i
    raise AssertionError(f"unit {u!r} is in no layer of tests/test_layers.py: place it")


def test_every_unit_has_a_layer():
    for me, _ in modules():
        rank(unit(me))


def test_no_module_imports_a_higher_layer():
    bad = []
    for me, path in modules():
        for mod, _, line, _ in imports(path, me):
            a, b = unit(me), unit(mod)
            if rank(b) > rank(a) and (a, b) not in ALLOWED_UP:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({a}) imports {mod} ({b})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    """`from m import _x` and `m._x` across modules are refused; a package's private module
    (kernels/_scan_triton.py) may be imported by its siblings, not from outside the package."""
    bad = []
    for me, path in modules():
        aliases = {}
        pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        for mod, name, line, local in imports(path, me):
            if name is None:
                last = mod.rsplit(".", 1)
                if last[-1].startswith("_") and not last[-1].startswith("__") and last[0] != pkg:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports private module {mod}")
                aliases[local] = mod
            elif name.startswith("_") and not name.startswith("__") and mod != me:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {mod}.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
