"""vattn: verified sparse attention for long-context decoding.

    out, sel = vattn.sparse_attention(q, k, v, "vattention")
"""
from vattn.attend import attend, dense_attend
from vattn.errors import VattnError
from vattn.selection import Selection
from vattn.spec import PRESETS, Spec, parse, select

__version__ = "0.1.0"


def sparse_attention(q, k, v, spec, lengths=None, seed=None, starts=None, scale=None):
    """Select keys with `spec` and attend them: returns (output [B, Hq, T, D], Selection)."""
    sel = select(spec, q, k, v, lengths=lengths, starts=starts, scale=scale, seed=seed)
    return attend(q, k, v, sel, scale=scale), sel


def patch(model, spec, **kwargs):
    """Route a transformers model's attention through vattn (see vattn.hf.patch)."""
    from vattn.hf import patch as _patch
    return _patch(model, spec, **kwargs)


def load_model(name_or_path=None, **kwargs):
    """(model, tokenizer) for the embedded SmolLM2, a HF directory or a .gguf file."""
    from vattn.models import load_model as _load
    return _load(name_or_path, **kwargs)


__all__ = ["attend", "dense_attend", "sparse_attention", "select", "parse", "Spec", "Selection",
           "VattnError", "PRESETS", "patch", "load_model"]
