"""Load the engine's Decoder from what a user has: nothing (the embedded SmolLM2), a HF model
directory, a .gguf file (both through vattn.models), or a transformers model object."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vattn.engine.model import SUPPORTED, Decoder, unsupported
from vattn.errors import VattnError

log = logging.getLogger(__name__)


def check_supported(model) -> None:
    """Fail before loading weights when a HF directory's config names another architecture."""
    if model is None or isinstance(model, (torch.nn.Module, Decoder)):
        return
    cfg = Path(str(model)).expanduser() / "config.json"
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise VattnError(f"cannot read {cfg}: {e}") from None
        mt = data.get("model_type")
        text = data.get("text_config") or {}
        if mt not in SUPPORTED and text.get("model_type") not in SUPPORTED:
            raise unsupported(mt)


def supported(model) -> bool:
    """Whether the engine runs this model (a path, None, or a transformers model)."""
    try:
        if isinstance(model, torch.nn.Module):
            from vattn.engine.model import Arch
            Arch.from_hf(model.config)
        else:
            check_supported(model)
    except VattnError:
        return False
    return True


def eos_ids(tokenizer, generation_config) -> frozenset:
    """Token ids that end a generation: the tokenizer's eos and the generation config's."""
    out = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            out.add(src)
        elif isinstance(src, (list, tuple)):
            out.update(int(x) for x in src)
    return frozenset(out)


def load(model, device: torch.device, dtype: torch.dtype, max_len: int, tokenizer=None):
    """(Decoder, tokenizer or None, eos ids). model: None | path | transformers PreTrainedModel |
    an engine Decoder (its weights shared, e.g. by several Runners in a benchmark)."""
    if isinstance(model, Decoder):
        if model.device != device or model.dtype != dtype or model.max_len < max_len:
            raise VattnError(f"this Decoder is {model.dtype} on {model.device} with positions up to {model.max_len}; "
                             f"the Runner asks for {dtype} on {device} up to max_len={max_len}")
        return model, tokenizer, frozenset()
    if isinstance(model, torch.nn.Module):
        hf, tok = model, tokenizer
    else:
        from vattn.models import load_model
        check_supported(model)
        # The HF model stays on the CPU: the Decoder copies (and fuses) its weights onto
        # `device`. Only CPU loads are kept in vattn.models' process cache (shared tensors).
        on_cpu = device.type == "cpu"
        hf, tok = load_model(model, device="cpu", dtype=dtype, cache=on_cpu)
        tokenizer = tokenizer or tok
        tok = tokenizer
    if getattr(hf, "config", None) is None:
        raise VattnError(f"{type(hf).__name__} has no .config: give a transformers causal LM, a path or None")
    dec = Decoder(hf.config, hf.state_dict(), device, dtype, max_len)
    return dec, tok, eos_ids(tok, getattr(hf, "generation_config", None))
