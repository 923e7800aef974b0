"""transformers integration: route a model's attention through vattn.

    p = vattn.patch(model, "vattention")     # registers the "vattn" attention implementation
    p.sparse = False; model(context)         # prefill: dense (SDPA)
    p.sparse = True;  model.generate(...)    # question + generated tokens: the spec
    p.undo()                                 # back to the previous implementation, exactly

or, for a plain `model.generate` on a whole prompt, `patch(model, spec, sparse_from=n)`:
queries at cache position >= n use the spec, earlier ones are dense.

Each attention call gets q [B, Hq, T, D] and the cache's k, v [B, Hkv, N, D]. The row
bounds come from the 4D boolean mask transformers builds for us (we register the SDPA
mask maker for "vattn"): with left padding a batch row starts at its first unmasked key;
rows are causal; sliding-window layers start at max(start, end - window).
"""
from __future__ import annotations

import itertools
import json
import logging
import weakref
from pathlib import Path

import torch

from vattn import metrics as M
from vattn.attend import dense_attend, kernel_misfit
from vattn.errors import VattnError
from vattn.plan import GRAPHABLE_PATHS
from vattn.plan import compile as compile_plan
from vattn.plan import window_runs_exact
from vattn.spec import parse

log = logging.getLogger(__name__)

NAME = "vattn"
ATTR = "_vattn_patch"  # on each patched attention module: its Patch (a copy of the model gets None)
_NEXT_HANDLE = itertools.count()
_HANDLES: "weakref.WeakValueDictionary[int, Patch]" = weakref.WeakValueDictionary()  # the graph op's handles


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _sdpa(module, q, k, v, mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)[0]


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The function registered as "vattn": returns (out [B, T, Hq, D], None).

    Under torch.compile (generate with a static cache compiles the decode step), a single-row
    call whose layer the last eager forward prepared runs as one opaque op (`vattn::decode`),
    so the whole step is one graph (CUDA graphs under mode reduce-overhead); anything else runs
    the patch's host code between graphs, as in eager mode."""
    p = getattr(module, ATTR, None)
    if p is None:  # attn_implementation="vattn" without a patch (or a copy of a patched model)
        raise VattnError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs with "
                         'attn_implementation="vattn" but is not patched: call vattn.patch(model, spec) '
                         "on this model first (it chooses the spec; a copied model needs its own patch)")
    if torch.compiler.is_compiling() and query.shape[2] == 1 and kwargs.get("sliding_window") is None:
        route = p.routes.get(module.layer_idx)
        if route == "sdpa":
            return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs), None
        if route == "op":
            out = torch.ops.vattn.decode(query, key, value, attention_mask, p.handle, module.layer_idx,
                                         -1.0 if scaling is None else float(scaling))
            return out.transpose(1, 2), None
    return _eager(p, module, query, key, value, attention_mask, dropout, scaling, kwargs), None


@torch.compiler.disable  # host bookkeeping per call: under torch.compile it runs between graphs
def _eager(p, module, query, key, value, attention_mask, dropout, scaling, kwargs):
    return p.forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


@torch.library.custom_op("vattn::decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, handle: int,
               layer: int, scale: float) -> torch.Tensor:
    """One prepared layer's single-row attention (see Patch.graph_call): out [B, Hq, 1, D]."""
    return _HANDLES[handle].graph_call(layer, q, k, v, mask, scale)


@_decode_op.register_fake
def _(q, k, v, mask, handle, layer, scale):
    return q.new_empty(q.shape)


_register()  # from_pretrained(..., attn_implementation="vattn") resolves once vattn.hf is imported


def _attention_modules(model) -> list:
    return [m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and "attention" in type(m).__name__.lower()]


CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.24 says `cache`, earlier ones the latter


def find_cache(args, kwargs):
    """The KV cache a decoder forward was given, under either keyword or as any positional
    Cache argument; None when it has none."""
    for key in CACHE_KEYWORDS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    from transformers.cache_utils import Cache
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)


def cache_keyword(model) -> str:
    """The keyword this model's forward takes its cache by (no deprecation warning)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_KEYWORDS if k in params), "past_key_values")


def output_cache(out):
    """The cache a model's output carries (`cache` or `past_key_values` by version)."""
    for key in CACHE_KEYWORDS:
        c = getattr(out, key, None)
        if c is not None:
            return c
    return None


def _decoder(model):
    """The module that owns the decoder layers (its forward sees past_key_values)."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList):
            return m
    return model


def configs(model) -> list:
    """The model's config and all its sub-configs, each once."""
    out, todo = [], [model.config]
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        todo.extend(s for k in getattr(c, "sub_configs", {}) if (s := getattr(c, k, None)) is not None)
    return out


def _allowed(mask, b: int, t: int, n: int):
    """The mask as bool [B, T, N] (True = may attend)."""
    m = mask[..., :n]
    m = m if m.dtype == torch.bool else m == 0  # additive float masks: 0 = allowed
    return m[:, 0].expand(b, t, n)


def mask_bounds(mask, b: int, t: int, n: int, device=None, window=None):
    """Row bounds for q rows t = 0..T-1 over N keys: (starts [B, T], ends [B, T]) int64, computed
    on the device (no host read: a compiled step can capture it); bounds_from_mask checks them.

    mask: None (SDPA's own rule: is_causal from key 0 for several rows, every key for one) or
    bool/float [B|1, 1, T, N]."""
    dev = device if mask is None else mask.device
    if mask is None:
        # No mask: what SDPA does then. Several rows run is_causal, aligned top-left (row i sees
        # keys 0..i; a static cache's unused tail is never seen); one row sees every key.
        first = torch.zeros(b, dtype=torch.long, device=dev)
        end = torch.full((b,), n if t == 1 else t, dtype=torch.long, device=dev)
    else:
        m = _allowed(mask, b, t, n)
        pos = torch.arange(n, device=dev)
        last = m[:, -1]
        end = torch.where(last.any(-1), (pos * last).amax(-1) + 1, 0)
        anyrow = m.any(1)
        first = torch.where(anyrow.any(-1), torch.where(anyrow, pos, n).amin(-1), 0)
    ends = (end[:, None] - t + 1 + torch.arange(t, device=end.device)).clamp(min=0)
    starts = first[:, None].expand(b, t)
    if window is not None:
        starts = torch.maximum(starts, ends - int(window))
    return starts, ends


def bounds_from_mask(mask, b: int, t: int, n: int, window=None, device=None):
    """mask_bounds, and a check that the mask is "left padding + causal (+ sliding window)",
    the only shape sparse selections can express (raises otherwise; reads the device)."""
    starts, ends = mask_bounds(mask, b, t, n, device, window)
    if mask is not None:
        pos = torch.arange(n, device=mask.device)
        want = (pos >= starts[..., None]) & (pos < ends[..., None])
        live = ends > starts  # rows with no key: transformers may fill them any way
        if not bool((want == _allowed(mask, b, t, n))[live].all()):
            raise VattnError("vattn supports causal attention masks with left padding (and sliding windows); "
                             "this model passed another mask shape (packed sequences or a custom mask?)")
    return starts, ends


class Patch:
    """Handle on a patched model. Attributes:

    sparse: False = every layer dense; True = the spec applies (from `sparse_from` on).
    records: per sparse call, when metrics=True: {"layer", "pos", "rows", "density",
        "error", "recall"} (error: ||o_hat - o||_F / ||o||_F over the call's rows;
        recall: mean exact softmax mass on the chosen keys).
    """

    def __init__(self, model, spec, dense_layers=0, layer_specs=None, metrics=False,
                 sparse_from=None, seed=0):
        if sparse_from not in (None, "auto") and not (isinstance(sparse_from, int) and sparse_from >= 0):
            raise VattnError(f"sparse_from must be 'auto' or a position >= 0, got {sparse_from!r}")
        if not isinstance(dense_layers, int) or dense_layers < 0:
            raise VattnError(f"dense_layers must be an int >= 0, got {dense_layers!r}")
        self.model = model
        self.spec = parse(spec)
        self.layer_specs = {int(k): parse(v) for k, v in (layer_specs or {}).items()}
        self.dense_layers = dense_layers
        self.metrics = metrics
        self.sparse_from = None if sparse_from == "auto" else sparse_from
        self.seed = seed
        self.routes: dict[int, str] = {}  # layer -> "sdpa" | "op": single-row calls under torch.compile (attention)
        self._sparse_on = True
        self.records: list[dict] = []
        self._density: list[torch.Tensor] = []
        self._plans: dict = {}  # (spec text, device) -> Plan: method state and generator live there
        self._offset = None  # cache length before the current forward (set by the hook)
        self._last_offset = -1
        self._checked = False
        self._step_bounds = {}
        self._step_ctx = {}
        self._mask_free = True
        self._zero_starts = None  # no row starts past key 0: read once per eager forward, kept for compiled steps
        self._graph = None  # per compiled forward: what graph_call shares between layers (dropped after the last)
        self._acc = None  # [sum of densities, calls] of graph_call's sparse calls, on the device
        self.handle = next(_NEXT_HANDLE)
        _HANDLES[self.handle] = self
        self.sequences = 0  # sequences started (method state and generator reset at each)
        self._modules = _attention_modules(model)
        if not self._modules:
            raise VattnError(f"{type(model).__name__} has no attention modules with a layer_idx; "
                             "vattn patches decoder-only transformers models")
        self._saved = [(c, c._attn_implementation) for c in configs(model)]
        _register()
        try:
            model.set_attn_implementation(NAME)
        except (ValueError, KeyError, AttributeError) as e:
            raise VattnError(f"{type(model).__name__} cannot switch attention implementation: {e}") from None
        if any(c._attn_implementation != NAME for c, _ in self._saved[:1]):
            raise VattnError(f"{type(model).__name__} does not use transformers' attention interface")
        self._by_layer = {}
        for m in self._modules:
            setattr(m, ATTR, self)
            self._by_layer.setdefault(m.layer_idx, m)
        def pre_hook(module, args, kwargs):  # a function, not a bound method: a deep copy shares it
            self._pre_hook(module, args, kwargs)
        self._hook = _decoder(model).register_forward_pre_hook(pre_hook, with_kwargs=True)

    def __deepcopy__(self, memo):  # a deep copy of the model is not patched (it needs its own patch)
        return None

    @property
    def sparse(self) -> bool:
        return self._sparse_on

    @sparse.setter
    def sparse(self, on: bool):
        self._sparse_on = bool(on)
        self.routes.clear()  # the next eager forward routes the layers again

    # -- public -------------------------------------------------------------------
    def set_spec(self, spec):
        self.spec = parse(spec)
        self.routes.clear()

    def spec_for(self, layer: int):
        """The layer's Spec, or None when the layer stays dense."""
        if layer in self.layer_specs:
            return self.layer_specs[layer]
        return None if layer < self.dense_layers else self.spec

    def reset_metrics(self):
        self.records.clear()
        self._density.clear()
        if self._acc is not None:
            self._acc.zero_()

    def _densities(self) -> tuple[float, int]:
        """(sum of per-call densities, calls): eager calls and compiled steps' (self._acc)."""
        total, calls = sum(float(d) for d in self._density), len(self._density)
        if self._acc is not None:
            a, c = self._acc.tolist()
            total, calls = total + a, calls + int(c)
        return total, calls

    def summary(self) -> dict:
        """Means over sparse calls: density (always), error and recall (metrics=True);
        `never_ran` is None, or why no call since the last reset_metrics() used the spec."""
        total, calls = self._densities()
        out = {"density": total / calls if calls else None, "error": None, "recall": None,
               "calls": calls, "never_ran": None if calls else self._never_ran(),
               "path": self._path()}
        errs = [r["error"] for r in self.records]
        if errs:
            out["error"] = sum(errs) / len(errs)
            out["recall"] = sum(r["recall"] for r in self.records) / len(errs)
        return out

    def check_ran(self):
        """Raise VattnError when no attention call used the spec since the last
        reset_metrics(): a number measured then would be a dense one under a sparse name."""
        if not self._densities()[1]:
            raise VattnError(self._never_ran())

    def _never_ran(self) -> str:
        why = ("p.sparse is False" if not self.sparse else
               f"no query reached sparse_from={self.sparse_from}" if self.sparse_from is not None else
               "the model made no attention call through vattn")
        return (f"the spec never ran: {self.spec} made no sparse attention call ({why}; "
                f"{self.sequences} sequence(s) seen)")

    def write_jsonl(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    def undo(self):
        """Restore the previous attention implementation of every (sub)config, exactly."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        for m in self._modules:
            if getattr(m, ATTR, None) is self:
                delattr(m, ATTR)
        self.routes.clear()
        for c, impl in self._saved:
            c._attn_implementation_internal = impl

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    # -- internals ----------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if torch.compiler.is_compiling():  # traced: no host read of the cache; a layer that
            self._new_forward(None)        # runs eagerly takes the offset from its mask
        else:
            self._before_forward(module, args, kwargs)

    def _before_forward(self, module, args, kwargs):
        cache = find_cache(args, kwargs)
        try:
            offset = int(cache.get_seq_length()) if cache is not None else 0
        except (AttributeError, TypeError):
            offset = None  # a cache we cannot ask: the first attention call tells
        self._new_forward(offset)
        self._zero_starts = None  # (a compiled step keeps what the last eager forward found)
        if offset is not None:
            self._start_forward(offset)

    def _new_forward(self, offset):
        self._offset = offset
        self._checked = False
        self._step_bounds = {}  # per forward: row bounds by mask (see _bounds)
        self._step_ctx = {}  # per forward: plan step contexts (see _context)
        self._mask_free = True  # no attention call of this forward had a padding mask

    def _start_forward(self, offset: int):
        if offset == 0 or offset < self._last_offset:
            for plan in self._plans.values():  # a new sequence: methods start from scratch, reproducibly
                plan.reset()
            self.sequences += 1
        self._last_offset = offset

    def _check_offset(self, q, k, mask, kwargs):
        """Once per forward, at the first full-attention layer: the cache position the hook
        read must be the one the attention call sees (keys before this call's queries).
        A mismatch means we lost track of the cache: sparse_from, method state and the
        sampling seed would all be wrong, so it is an error, not a silent dense run."""
        if self._checked or kwargs.get("sliding_window") is not None:
            return
        self._checked = True
        t, n = q.shape[2], k.shape[2]
        if mask is None:
            seen = n - t if t == 1 else 0  # as bounds_from_mask: one row sees all keys, several run is_causal
        else:
            last = mask[:, 0, -1, :n]
            last = last if last.dtype == torch.bool else last == 0
            pos = torch.arange(n, device=last.device)
            seen = int(torch.where(last, pos + 1, 0).amax()) - t
        if self._offset is None:
            self._offset = seen
            self._start_forward(seen)
        elif seen != self._offset:
            import transformers
            raise VattnError(f"vattn lost track of the cache: the model's cache holds {self._offset} tokens but "
                             f"the attention call sees {seen} earlier keys (transformers {transformers.__version__}); "
                             "pass the cache as `cache=`/`past_key_values=` or report this version")

    def _bounds(self, mask, b, t, n, window, device, check=True):
        """bounds_from_mask once per forward: every layer given the same mask (and window)
        has the same rows, so the mask is read (and checked) once, not once per layer.
        check=False: mask_bounds (a dense layer may take masks no selection can express)."""
        key = (id(mask), b, t, n, window, str(device), check)
        if key not in self._step_bounds:
            bounds = (bounds_from_mask if check else mask_bounds)(mask, b, t, n, window=window, device=device)
            self._step_bounds[key] = (mask, bounds)  # mask kept: id stays valid
        return self._step_bounds[key][1]

    def plan(self, spec, device):
        """The compiled Plan that runs `spec` on `device` (one per spec and device, kept)."""
        key = (str(spec), str(device))
        if key not in self._plans:
            # metrics read the keys each row attended: the reference of the same algorithm lists them
            self._plans[key] = compile_plan(spec, device, seed=self.seed, fused=False if self.metrics else None)
        return self._plans[key]

    def _context(self, plan, rows, starts, ends, scale):
        """The plan's step context, built once per forward for layers with the same rows
        (lengths computed once, whether rows start at key 0 read at most once)."""
        key = (str(plan.spec), rows, scale)
        if key not in self._step_ctx:
            self._step_ctx[key] = plan.context(starts, ends, scale, True if self._mask_free else None)
        return self._step_ctx[key]

    def _path(self):
        """What the main spec's plans ran: 'reference', 'streaming-kernel' (vattn.plan), or None."""
        paths = sorted({p.path for (text, _), p in self._plans.items() if text == str(self.spec)})
        return "+".join(paths) or None

    @property
    def states(self) -> dict:
        """Per-layer method state of the main spec's plan (on the device it last ran on)."""
        plans = [p for (text, _), p in self._plans.items() if text == str(self.spec)]
        return plans[-1].states if plans else {}

    def forward(self, module, q, k, v, mask, dropout, scaling, **kwargs):
        layer = module.layer_idx
        self._check_offset(q, k, mask, kwargs)
        spec = self.spec_for(layer) if self.sparse else None
        b, _, t, d = q.shape
        n = k.shape[2]
        first_sparse = 0
        if spec is not None and self.sparse_from is not None:
            offset = self._offset if self._offset is not None else n - t
            first_sparse = min(max(self.sparse_from - offset, 0), t)
        self._route(layer, spec, q, k, v, mask, scaling, kwargs, first_sparse)
        if spec is None or first_sparse >= t:
            return _sdpa(module, q, k, v, mask, dropout, scaling, **kwargs)
        if kwargs.get("sliding_window") is not None and window_runs_exact(spec):
            spec = parse("dense")
        if spec.is_dense and first_sparse == 0:  # exact, and the same kernel as unpatched
            self._density.append(torch.ones(()))
            if self.metrics:
                self._record(layer, 0, t, 1.0, 0.0, 1.0)
            return _sdpa(module, q, k, v, mask, dropout, scaling, **kwargs)
        if kwargs.get("softcap") is not None:
            raise VattnError("vattn does not support attention logit soft-capping (softcap)")
        scale = scaling if scaling is not None else d ** -0.5
        starts, ends = self._bounds(mask, b, t, n, kwargs.get("sliding_window"), q.device)
        out = []
        if first_sparse > 0:  # rows before the boundary: dense, with the mask they had
            pos = torch.arange(n, device=q.device)
            rows = slice(0, first_sparse)
            allowed = (pos >= starts[:, rows, None]) & (pos < ends[:, rows, None])
            allowed |= ~allowed.any(-1, keepdim=True)  # padding rows: any finite output (no NaN)
            out.append(_sdpa(module, q[:, :, rows], k, v, allowed[:, None], dropout, scaling, **kwargs))
        qs = q[:, :, first_sparse:]
        starts, ends = starts[:, first_sparse:], ends[:, first_sparse:]
        self._mask_free &= mask is None
        rows = (kwargs.get("sliding_window"), first_sparse)  # layers alike in these share row bounds
        out.append(self._sparse(layer, spec, qs, k, v, starts, ends, scale, first_sparse, rows).transpose(1, 2))
        return torch.cat(out, 1) if len(out) > 1 else out[0]

    def _route(self, layer, spec, q, k, v, mask, scaling, kwargs, first_sparse):
        """How this layer's single-row calls run under torch.compile (self.routes), from what
        this eager call shows; and what a captured step cannot do for itself: a sparse layer
        whose call runs dense here (the prompt, before sparse_from) appends its keys to the plan
        (signatures, page bounds), and on CUDA runs the plan once on its last row, so the plan's
        buffers exist outside the CUDA-graph pool before a compiled step is recorded."""
        self.routes.pop(layer, None)
        b, _, t, d = q.shape
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or self.metrics:
            return  # eager, between graphs
        if spec is None:
            self.routes[layer] = "sdpa"
            return
        offset = self._offset if self._offset is not None else k.shape[2] - t
        if self.sparse_from is not None and offset + t < self.sparse_from:
            return  # the next row is still dense: the eager path decides per row
        if self._acc is None or self._acc.device != q.device:
            self._acc = torch.zeros(2, dtype=torch.float64, device=q.device)
        starts, ends = self._bounds(mask, b, t, k.shape[2], None, q.device, check=not spec.is_dense)
        if self._zero_starts is None:  # (no mask: every row starts at key 0, nothing to read)
            self._zero_starts = mask is None or bool((starts == 0).all())
        if spec.is_dense:
            self.routes[layer] = "op"
            return
        plan = self.plan(spec, q.device)
        cuda = q.device.type == "cuda"
        if cuda and plan.path not in GRAPHABLE_PATHS:
            return  # the reference syncs with the host: it runs between graphs
        if first_sparse >= t or (cuda and t > 1):
            scale = scaling if scaling is not None else d ** -0.5
            st = torch.minimum(starts[:, -1], ends[:, -1])  # (no window here: every row starts alike)
            if first_sparse >= t:
                plan.append(layer, k, v, plan.context(st, ends, scale, self._zero_starts))
            if cuda:
                plan.run(layer, q[:, :, -1:], k, v, plan.context(st, ends[:, -1:], scale, self._zero_starts))
        self.routes[layer] = "op"

    def graph_call(self, layer, q, k, v, mask, scale):
        """The op `vattn::decode`: a routed layer's single-row call inside a compiled step. Nothing
        here reads the device from the host, so CUDA graphs capture it: bounds from the mask on
        the device (the eager prefill checked its shape), layers sharing them within the forward
        (they come in order; dropped after the last routed layer so nothing outlives the graph),
        densities summed into self._acc."""
        b, hq, t, d = q.shape
        scale = d ** -0.5 if scale < 0 else scale
        g = self._graph
        if g is None or layer <= g["layer"]:
            starts, ends = mask_bounds(mask, b, t, k.shape[2], q.device)
            g = self._graph = dict(starts=torch.minimum(starts[:, 0], ends[:, -1]), ends=ends, ctx={}, dens=[], dense=0,
                                   allowed=_visible(starts, ends, hq).clamp(min=1))
        g["layer"] = layer
        spec = self.spec_for(layer)
        if spec.is_dense:  # vattn's dense decode kernel where it takes the rows (not an expanded K/V copy)
            if q.device.type == "cuda" and self._zero_starts and kernel_misfit(q, k, v) is None:
                from vattn.kernels.decode import dense_decode
                out = dense_decode(q, k, v, g["ends"][:, -1].to(torch.int32), scale)
            else:
                out = _sdpa(self._by_layer[layer], q, k, v, mask, 0.0, scale).transpose(1, 2)
            g["dense"] += 1
        else:
            plan = self.plan(spec, q.device)
            key = str(plan.spec)
            if key not in g["ctx"]:
                g["ctx"][key] = plan.context(g["starts"], g["ends"], scale, self._zero_starts)
            ctx = g["ctx"][key]
            plan.append(layer, k, v, ctx)
            out, sel = plan.run(layer, q, k, v, ctx)
            g["dens"].append(sel.count)  # summed once per forward: a reduction per layer costs a launch each
        if layer == max(i for i, r in self.routes.items() if r == "op"):  # the forward's last routed layer: account, then let go of the step's tensors
            if self._acc is None or self._acc.device != q.device:
                raise VattnError("vattn's compiled decode step ran before an eager forward prepared it")
            att = sum((_attended(c, hq) for c in _stacked(g["dens"])), g["allowed"].new_zeros(()))
            dens = att.double() / g["allowed"] + g["dense"]  # the calls' densities, summed
            # (full_like, not a tensor from a host value: no host-to-device copy under capture)
            self._acc.add_(torch.stack((dens, torch.full_like(dens, len(g["dens"]) + g["dense"]))))
            self._graph = None
        return out.contiguous()

    def _sparse(self, layer, spec, q, k, v, starts, ends, scale, row0, rows):
        """Sparse rows: q [B, Hq, T, D] with per-row bounds [B, T] -> [B, Hq, T, D]."""
        b, hq, t, _ = q.shape
        allowed = _visible(starts, ends, hq)
        # One select per group of rows that share a start (all rows unless a sliding
        # window cuts in); starts per batch row, causal ends.
        chunks = [(0, t)] if t == 1 or _uniform(starts) else [(i, i + 1) for i in range(t)]
        plan = None if spec.is_dense else self.plan(spec, q.device)
        outs, attended, recall, refs = [], 0, [], []
        for lo, hi in chunks:
            qc, st, en = q[:, :, lo:hi], starts[:, lo], ends[:, hi - 1]
            st = torch.minimum(st, en)  # a row with no keys (left padding) stays empty
            if spec.is_dense:  # rows after a sparse_from boundary inside this call
                sel = None
                o = dense_attend(qc, k, v, en, st, scale)
                attended = attended + _visible(starts[:, lo:hi], ends[:, lo:hi], hq)
            else:
                ctx = self._context(plan, (rows, lo, hi), st, ends[:, lo:hi], scale)
                plan.append(layer, k, v, ctx)
                o, sel = plan.run(layer, qc, k, v, ctx)
                attended = attended + _attended(sel.count, hq)
            outs.append(o)
            if self.metrics:
                refs.append(dense_attend(qc, k, v, en, st, scale))
                recall.append(torch.ones(qc.shape[:3], device=qc.device) if sel is None
                              else M.mass_recall(qc, k, sel, st, ends[:, lo:hi], scale))
        out = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        density = (attended / allowed.clamp(min=1)).detach().float()
        self._density.append(density)
        if self.metrics:
            ref = torch.cat(refs, 2)
            live = (ends > starts)[:, None].expand(b, hq, t)  # rows with keys (not padding)
            rec = torch.cat(recall, 2)[live]
            self._record(layer, row0, t, float(density), M.frobenius_error(out, ref),
                         float(rec.mean()) if rec.numel() else 1.0)
        return out

    def _record(self, layer, row0, rows, density, error, recall):
        pos = None if self._offset is None else self._offset + row0
        self.records.append({"layer": layer, "pos": pos, "rows": rows, "density": density,
                             "error": error, "recall": recall})


def _visible(starts, ends, hq: int) -> torch.Tensor:
    """Keys the rows may attend, summed over rows and query heads (a call's dense count)."""
    return (ends - starts).clamp(min=0).sum() * hq


def _attended(count, hq: int) -> torch.Tensor:
    """Keys a Selection's count [B, H, T] (or [L, B, H, T]) attended, summed over rows and query
    heads (shared rows count G times)."""
    return count.sum() * (hq // count.shape[-2])


def _stacked(counts: list) -> list:
    """Selection counts of several layers, one stacked tensor per head count (shared or not)."""
    by = {}
    for c in counts:
        by.setdefault(tuple(c.shape), []).append(c)
    return [torch.stack(cs) for cs in by.values()]


def _uniform(starts: torch.Tensor) -> bool:
    return bool((starts == starts[:, :1]).all())


def patch(model, spec, dense_layers=0, layer_specs=None, metrics=False, sparse_from=None, seed=0) -> Patch:
    """Route `model`'s attention through vattn with `spec` (a spec string, preset or Spec).

    dense_layers: the first N layers stay dense. layer_specs: {layer: spec} overrides.
    metrics: also compute the dense reference per sparse call (slow) and record error,
    density and mass recall. sparse_from: None/"auto" = sparse whenever p.sparse is True;
    an int n = only queries at cache position >= n are sparse. seed: sampling parts draw
    from a generator reseeded at each new sequence.
    """
    for m in _attention_modules(model):
        if getattr(m, ATTR, None) is not None:
            raise VattnError("this model is already patched; call undo() on the first Patch, or set_spec()")
    return Patch(model, spec, dense_layers, layer_specs, metrics, sparse_from, seed)
