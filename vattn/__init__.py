"""vattn: verified sparse attention for long-context decoding.

    out, sel = vattn.sparse_attention(q, k, v, "vattention")
"""
import sys as _sys
import types as _types

from vattn.errors import VattnError

__version__ = "0.1.0"

# Torch-using names load on first use, so `vattn --help` and `import vattn.cli` stay fast.
_LAZY = {"dense_attend": "vattn.attend", "Selection": "vattn.selection",
         "PRESETS": "vattn.spec", "Spec": "vattn.spec", "context": "vattn.spec", "parse": "vattn.spec",
         "select": "vattn.spec", "LLM": "vattn.engine.llm", "SamplingParams": "vattn.engine.sampling"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vattn' has no attribute {name!r}")


class _Package(_types.ModuleType):
    """`vattn.attend` stays the function after the submodule vattn.attend is imported
    (the import system sets each submodule as an attribute of its package)."""

    @property
    def attend(self):
        from vattn.attend import attend
        return attend

    @attend.setter
    def attend(self, value):
        pass


_sys.modules[__name__].__class__ = _Package


def sparse_attention(q, k, v, spec, lengths=None, seed=None, starts=None, scale=None):
    """Select keys with `spec` and attend them: returns (output [B, Hq, T, D], Selection).
    It runs the spec's plan (vattn.plan): on CUDA the fused kernels where the spec has them.

    q [B, Hq, T, D]; k, v [B, Hkv, N, D] (float32/16, bfloat16 or float64; Hq a multiple
    of Hkv). lengths, starts: int tensors [B] with 0 <= starts <= lengths <= N (default N
    and 0); scale: a positive finite number (default 1/sqrt(D)); seed: an int. B, T or N
    may be 0: the output is then empty or zeros. Bad input raises VattnError.

    Non-finite inputs are not checked (a check costs a host sync on GPU); they propagate
    as in exact attention: a row with keys whose q holds NaN/inf gives NaN, and so does a
    row that attends a non-finite key or value (on the CPU reference path; the CUDA sparse
    kernel was seen to skip an attended NaN key on an H200). A non-finite key the
    selection leaves out does not reach the output (exact attention would give NaN
    there). A row with no keys gives zeros.
    """
    import torch

    from vattn.plan import compile as compile_plan
    from vattn.spec import context
    ctx = context(q, k, v, lengths=lengths, starts=starts, scale=scale, seed=seed)  # checks the arguments
    if seed is None:  # a fresh seed from torch's global generator: reproducible under torch.manual_seed
        seed = int(torch.randint(0, 2**62, ()))
    plan = compile_plan(spec, q.device, seed=seed)  # what vattn.patch and the engine run
    step = plan.context(ctx.starts, ctx.ends, ctx.scale)
    plan.append(0, k, v, step)
    out, sel = plan.run(0, q, k, v, step)
    # A part may choose no key for a non-finite query row (its scores rank nothing);
    # exact attention gives NaN there, so do we. No host sync: elementwise only.
    live = (ctx.ends > ctx.starts[:, None])[:, None, :, None]  # [B, 1, T, 1]
    bad = ~torch.isfinite(q).all(-1, keepdim=True) & live
    return out.masked_fill(bad, float("nan")), sel


def patch(model, spec, **kwargs):
    """Route a transformers model's attention through vattn (see vattn.hf.patch)."""
    from vattn.hf import patch as _patch
    return _patch(model, spec, **kwargs)


def load_model(name_or_path=None, **kwargs):
    """(model, tokenizer) for the embedded SmolLM2, a HF directory or a .gguf file."""
    from vattn.models import load_model as _load
    return _load(name_or_path, **kwargs)


__all__ = ["attend", "dense_attend", "sparse_attention", "select", "parse", "Spec", "Selection",
           "VattnError", "PRESETS", "patch", "load_model", "LLM", "SamplingParams"]
