"""A plain-torch decoder for the Llama family, built from a transformers config and state dict.

    cfg = Arch.from_hf(hf_config)                    # what differs between the families
    model = Decoder(cfg, state_dict, device, dtype, max_len)  # weights fused per layer (qkv, gate|up)
    h = model.forward(tokens [B, T], pos [B, T], attend, cache)  # attend(layer, q, k, v) -> o
    logits = model.logits(h)                         # float32 [..., V]

Shapes: q [B, Hq, T, D], k/v [B, Hkv, T, D] (this call's new keys, RoPE applied), o [B, Hq, T, D].
The attention itself (masks, sparse plans) is the caller's. Its KV cache is the caller's too; given
`cache`, the model writes each layer's new k/v there (rows, positions) before `attend`, which then
gets k = v = None. On CUDA the norms (with the residual adds), q/k norm + RoPE + the KV write, and
the gated activation run as Triton kernels (vattn/kernels/layer_ops.py, one launch each); on the
CPU the same math runs as torch ops (`fused=`: the rule, decided once at build). Families: Llama 2/3/3.1 (and SmolLM2), Qwen2/2.5 (qkv bias), Qwen3
(q/k RMSNorm), Mistral (sliding window), Gemma 3 text (sandwich norms, sliding+global layers).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vattn.errors import VattnError
from vattn.kernels.gemv import glu_linear, linear, rms_linear
from vattn.kernels.layer_ops import (ACTS, add_rms_norm, add_rms_norm_ref, glu, heads_rope_ref, qkv_rope,
                                     place_q, rms_norm_ref, rope_at, write_kv_ref)

log = logging.getLogger(__name__)

# config.model_type -> family; every other architecture is served by vattn.patch (hf.py).
SUPPORTED = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
             "gemma3_text": "gemma3"}
GEMV_ROWS = 1  # token rows of a forward that takes the gemv path: at M = 16 a layer's GEMMs ran 1.2-1.8x cuBLAS's time
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


class UnsupportedModel(VattnError):
    """The engine does not run this architecture (vattn.patch may)."""


def unsupported(model_type) -> UnsupportedModel:
    return UnsupportedModel(f"the vattn engine runs {', '.join(SUPPORTED)} models; this one is {model_type!r}. "
                      "Serve it through transformers with vattn.patch(model, spec) (`vattn generate` "
                      "falls back to that path by itself)")


@dataclass(frozen=True)
class Arch:
    """What the engine needs from a HF config (one text decoder)."""
    family: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    eps: float
    act: str
    scale: float                    # attention score scale
    windows: tuple                  # per layer: sliding window (keys incl. self) or None
    layer_types: tuple              # per layer: rope table name ("full_attention" unless Gemma's sliding)
    max_positions: int | None
    gemma: bool = False             # (1 + w) norms, sandwich norms, scaled embeddings
    final_softcap: float | None = None

    @classmethod
    def from_hf(cls, config) -> "Arch":
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        mt = getattr(cfg, "model_type", None)
        if mt not in SUPPORTED:
            raise unsupported(mt)
        family = SUPPORTED[mt]
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        n = cfg.num_hidden_layers
        types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
        win = getattr(cfg, "sliding_window", None)
        if family == "mistral":  # Mistral: one window for every layer when set
            windows = [win] * n
        else:
            windows = [win if (t == "sliding_attention" and win) else None for t in types]
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise VattnError("attention logit soft-capping is not supported by the engine; use vattn.patch")
        gemma = family == "gemma3"
        for params in _rope_params(cfg).values():
            rt = (params or {}).get("rope_type", "default")
            if rt not in ROPE_TYPES:
                raise VattnError(f"rope type {rt!r} is not supported by the engine (it runs {', '.join(ROPE_TYPES)}); "
                                 "use vattn.patch for this model")
        return cls(
            family=family, vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=n, heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
            inter=cfg.intermediate_size, eps=cfg.rms_norm_eps,
            act=getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"),
            scale=(cfg.query_pre_attn_scalar ** -0.5) if gemma else head_dim ** -0.5,
            windows=tuple(windows), layer_types=tuple(t if gemma else "full_attention" for t in types),
            max_positions=getattr(cfg, "max_position_embeddings", None), gemma=gemma,
            final_softcap=getattr(cfg, "final_logit_softcapping", None))


def _rope_params(cfg) -> dict:
    """{layer type: rope parameters} (Gemma 3 keeps one per layer type)."""
    p = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if "full_attention" in p or "sliding_attention" in p:
        return dict(p)
    return {"full_attention": p}


def rope_tables(config, arch: Arch, max_len: int, device) -> dict:
    """{layer type: (cos, sin) float32 [max_len, D]}, computed by the model's own HF rotary
    class (every rope type it knows, attention scaling included), once for all positions."""
    import importlib
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for params in _rope_params(cfg).values():
        if (params or {}).get("rope_type") == "dynamic":
            orig = (params or {}).get("original_max_position_embeddings") or arch.max_positions
            if orig is not None and max_len > orig:
                raise VattnError(f"dynamic rope scaling changes every position's angle with the sequence length; "
                                 f"the engine keeps one table, so max_len must be <= {orig}, got {max_len}")
    mt = cfg.model_type
    mod = importlib.import_module(f"transformers.models.{mt.split('_')[0]}.modeling_{mt.split('_')[0]}")
    name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
            "gemma3": "Gemma3"}[arch.family] + "RotaryEmbedding"
    rot = getattr(mod, name)(cfg, device=device) if arch.gemma else getattr(mod, name)(cfg)
    rot = rot.to(device)
    pos = torch.arange(max_len, device=device)[None]
    x = torch.empty(1, device=device, dtype=torch.float32)
    out = {}
    for t in sorted(set(arch.layer_types)):
        cos, sin = rot(x, pos, t) if arch.gemma else rot(x, pos)
        out[t] = (cos[0].float(), sin[0].float())
    return out


class Decoder:
    """Weights per layer: wqkv [(Hq+2Hkv)D, H] (+bqkv), wo, wgu [2I, H], wdown, norms.

    fused: run the layer ops as Triton kernels (None: on CUDA; True on the CPU needs
    TRITON_INTERPRET=1, for tests). `self.fused` names the ops that do; see use_fused."""

    def __init__(self, config, state: dict, device, dtype, max_len: int, fused: bool | None = None):
        self.arch = a = Arch.from_hf(config)
        self.device, self.dtype = torch.device(device), dtype
        pre = _prefix(state)

        def get(name, required=True):
            t = state.get(pre + name)
            if t is None:
                if required:
                    raise VattnError(f"the checkpoint has no weight {pre + name!r}; is it a {a.family} model?")
                return None
            return t.to(device=self.device, dtype=dtype)

        def norm(name):
            w = get(name)
            return (1.0 + w.float()) if a.gemma else w  # Gemma: (1 + w), applied in float32

        def cat(*names, required=True):
            ts = [get(n, required) for n in names]
            return None if any(t is None for t in ts) else torch.cat(ts, 0)

        self.embed = get("model.embed_tokens.weight")
        self.norm = norm("model.norm.weight")
        head = state.get("lm_head.weight")
        self.head = self.embed if head is None else head.to(device=self.device, dtype=dtype)
        self.layers = []
        for i in range(a.layers):
            p = f"model.layers.{i}."
            s = p + "self_attn."
            L = dict(wqkv=cat(s + "q_proj.weight", s + "k_proj.weight", s + "v_proj.weight"),
                     bqkv=cat(s + "q_proj.bias", s + "k_proj.bias", s + "v_proj.bias", required=False),
                     wo=get(s + "o_proj.weight"), bo=get(s + "o_proj.bias", False),
                     wgu=cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                     wdown=get(p + "mlp.down_proj.weight"),
                     ln_in=norm(p + "input_layernorm.weight"))
            if pre + s + "q_norm.weight" in state:
                L["qn"], L["kn"] = norm(s + "q_norm.weight"), norm(s + "k_norm.weight")
            if a.gemma:  # sandwich: norms after attention and around the MLP
                L["ln_attn_out"] = norm(p + "post_attention_layernorm.weight")
                L["ln_mlp"] = norm(p + "pre_feedforward_layernorm.weight")
                L["ln_mlp_out"] = norm(p + "post_feedforward_layernorm.weight")
            else:
                L["ln_mlp"] = norm(p + "post_attention_layernorm.weight")
            self.layers.append(L)
        from transformers.activations import ACT2FN
        self.act = ACT2FN[a.act]
        self.embed_scale = torch.tensor(a.hidden ** 0.5, dtype=dtype).item() if a.gemma else None
        self.rope = rope_tables(config, a, max_len, self.device)
        self.max_len = max_len
        self.use_fused(fused)

    def use_fused(self, on: bool | None = None) -> frozenset:
        """Decide once which layer ops run as Triton kernels: "norm" (residual add + RMSNorm),
        "rope" (q/k norm + RoPE + KV write), "glu" (act(gate) * up), "gemv" (decode steps of at
        most GEMV_ROWS rows: the GEMMs with the norms and the activation folded in, kernels/gemv.py;
        needs the glu kernel's activations). on None: all on CUDA, none
        elsewhere; True: all the kernels can take (the activation: silu or gelu-tanh; others stay
        torch, logged); the kernels raise on inputs they cannot take rather than fall back."""
        from vattn.kernels.common import interpret, triton_available
        on = self.device.type == "cuda" if on is None else bool(on)
        ops = frozenset()
        if on:
            if not triton_available():
                raise VattnError("fused layer ops need triton (`pip install triton`); build the Decoder "
                                 "with fused=False to run them as torch ops")
            if self.device.type != "cuda" and not interpret():
                raise VattnError(f"fused layer ops run on CUDA (or on the CPU under TRITON_INTERPRET=1), "
                                 f"not on {self.device}; build the Decoder with fused=None or False")
            ops = frozenset(("norm", "rope", "glu", "gemv"))
            if self.arch.act not in ACTS:
                ops -= {"glu", "gemv"}
                log.info("activation %r has no fused kernel (%s): act(gate) * up runs as torch ops",
                         self.arch.act, ", ".join(sorted(ACTS)))
        if ops:
            log.info("fused layer ops on %s: %s", self.device, ", ".join(sorted(ops)))
        self.fused = ops
        return ops

    def weight_bytes(self) -> int:
        """Bytes one decode step reads: every layer weight, the final norm and the LM head."""
        seen, total = set(), 0
        for t in [self.norm, self.head] + [v for L in self.layers for v in L.values() if v is not None]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    def rms(self, x, w):
        return rms_norm_ref(x, w, self.arch.eps, self.arch.gemma)

    def add_norm(self, x, delta, w_delta, w):
        """(rms(x', w), x') with x' = x + delta (delta first normed by w_delta: Gemma's sandwich)."""
        f = add_rms_norm if "norm" in self.fused else add_rms_norm_ref
        return f(x, delta, w, self.arch.eps, self.arch.gemma, w_delta)

    def forward(self, tokens, pos, attend, cache=None):
        """tokens, pos int64 [B, T] -> final hidden states [B, T, H] (normed).

        attend(layer, q, k, v) -> o [B, Hq, T, D]. cache: None, or layer -> (K, V, rows) with
        K, V [S, Hkv, N, D] and rows int64 [B]: the layer's k, v are written at K[rows[b], :,
        pos[b, t]] before attend, which then gets k = v = None; (K, V, rows, Q): q is written at
        Q[rows[b]] too (Q [S, Hq, T, D]) and attend gets Q.

        Each residual add is fused with the norm after it (the MLP's output with the next layer's
        input norm, or the final one); steps of at most GEMV_ROWS rows fold those norms and the
        gated activation into the GEMMs (kernels/gemv.py)."""
        a = self.arch
        b, t = tokens.shape
        x = F.embedding(tokens, self.embed)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        fused_rope = "rope" in self.fused
        ropes = None if fused_rope else {name: rope_at(c, s, pos, self.dtype)  # [B, 1, T, D] once per step
                                         for name, (c, s) in self.rope.items()}
        gemv = "gemv" in self.fused and b * t <= GEMV_ROWS
        delta = w_delta = None  # the previous layer's MLP output (and Gemma's norm of it), added at the next norm
        for i, L in enumerate(self.layers):
            kv = None if cache is None else cache(i)
            if gemv and fused_rope and kv is not None and "qn" not in L:
                # one launch: the norm, the qkv GEMM, RoPE, q placed, k and v written into the cache
                x, q = rms_linear(x, delta, L["ln_in"], L["wqkv"], a.eps, a.gemma, w_delta=w_delta, bias=L["bqkv"],
                                  rope=(pos, *self.rope[a.layer_types[i]], a.heads, a.kv_heads, kv))
                k = v = None
            else:
                x, qkv = self._norm_linear(x, delta, w_delta, L["ln_in"], L["wqkv"], L["bqkv"], gemv)
                q, k, v = self._heads(i, L, qkv, pos, kv, ropes)
            o = attend(i, q, k, v).transpose(1, 2).reshape(b, t, a.heads * a.head_dim)
            o = linear(o, L["wo"], bias=L["bo"]) if gemv else F.linear(o, L["wo"], L["bo"])
            x, gu = self._norm_linear(x, o, L.get("ln_attn_out"), L["ln_mlp"], L["wgu"], None, gemv)
            delta, w_delta = self._glu_linear(gu, L["wdown"], gemv), L.get("ln_mlp_out")
        return self.add_norm(x, delta, w_delta, self.norm)[0]

    def _heads(self, i, L, qkv, pos, kv, ropes):
        """q, k, v of the qkv output: split into heads, [q/k norm], RoPE; with kv = (K, V, rows[, Q])
        k and v are written there and returned as None (q placed in Q)."""
        a = self.arch
        if ropes is None:  # fused: one launch
            cos, sin = self.rope[a.layer_types[i]]
            return qkv_rope(qkv, pos, cos, sin, a.heads, a.kv_heads, qn=L.get("qn"), kn=L.get("kn"),
                            eps=a.eps, gemma=a.gemma, cache=kv)
        q, k, v = heads_rope_ref(qkv, ropes[a.layer_types[i]], a.heads, a.kv_heads, L.get("qn"), L.get("kn"),
                                 a.eps, a.gemma)
        if kv is None:
            return q, k, v
        write_kv_ref(kv, pos, k, v)
        return place_q(kv, q), None, None

    def _norm_linear(self, x, delta, w_delta, norm_w, w, bias, gemv: bool):
        """(x', y): the residual x' = x + delta (delta normed by w_delta first: Gemma's sandwich)
        and y = rms(x', norm_w) @ w.T (+ bias); gemv: one kernels/gemv.py launch (the norm
        folded into the GEMM, its first weight tile read before the previous kernel ends)."""
        if gemv:
            return rms_linear(x, delta, norm_w, w, self.arch.eps, self.arch.gemma, w_delta=w_delta, bias=bias)
        h, x = self.add_norm(x, delta, w_delta, norm_w)
        return x, F.linear(h, w, bias)

    def _glu_linear(self, gu, w, gemv: bool):
        """(act(gate) * up) @ w.T of the fused gate|up output; gemv: the activation in the GEMM's prologue."""
        if gemv:
            return glu_linear(gu, self.arch.act, w)
        if "glu" in self.fused:
            gu = glu(gu, self.arch.act)
        else:
            g, u = gu.chunk(2, -1)
            gu = self.act(g) * u
        return F.linear(gu, w)

    def logits(self, h):
        out = F.linear(h, self.head).float()
        cap = self.arch.final_softcap
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out


def _prefix(state: dict) -> str:
    """The key prefix of the decoder weights ('' for a CausalLM state dict)."""
    if "model.embed_tokens.weight" in state:
        return ""
    raise VattnError("the state dict has no model.embed_tokens.weight: the engine loads decoder-only "
                     "causal LMs (AutoModelForCausalLM checkpoints)")
