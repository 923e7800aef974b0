"""Plans: a spec compiled for a device, and what every caller runs per layer.

    plan = compile(spec, device)                 # once: decides how the spec runs
    ctx = plan.context(starts, ends, scale)      # once per forward / decode step
    plan.append(layer, k, v, ctx)                # the step's keys are in k/v: per-layer state follows
    out, sel = plan.run(layer, q, k, v, ctx)     # per layer
    plan.reset()                                 # a new sequence: method state, seed

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, N, D] (views of a longer cache are fine); starts
int64 [B] (first valid key); ends int64 [B, T] (one past the last key each row sees; the
row's own key is at ends - 1). `sel` is the Selection that ran (its count gives density);
fused kernels that list no keys return `Selection.counted(...)`, which metrics refuse.

Paths (`plan.path`):
  "streaming-kernel"  sink/window only, on CUDA: index ranges built on the GPU, the Triton
                      sparse kernel attends them; no host sync.
  "topk-kernel"       [sink+][window+]topk(k), on CUDA: exact scores (K read in place), a
                      top-k select per query head over the keys sink/window left, a Selection of fixed
                      width (a host number, -1 padding) written on the GPU (kernels/select.py),
                      the sparse kernel attends it; no host sync.
  "hashtopk-kernel"   [sink+][window+]hashtopk(k, bits, proj='random'), on CUDA: as topk-kernel with
                      the bit agreement of signatures for scores (kernels/bits.hash_scores): key
                      signatures kept per layer in the plan (signed in append), the query's signed
                      in the scores kernel; no host sync.
  "quest-kernel"      [sink+][window+]quest(budget[, page, dense_layers, share]), on CUDA: page key
                      bounds kept per layer in the plan (append rebuilds only the pages new keys
                      and each row's first page touch), the last page plus the top pages by bound
                      (the same select; share='kv': per KV head), expanded to keys on the GPU, the
                      sparse kernel; no host sync.
  "scan-kernel"       sink+window+hashtopk(cut='sample')+verified(draws='iid', either mode), on CUDA, one
                      query row per sequence: the fused scan kernels (kernels/scan.py); key
                      signatures live in the plan, signed in append (no host sync).
  "scan-reference"    the same spec on the CPU, or with several query rows: the kernels'
                      float64 twin, which makes every choice the kernels make.
  "sampled-kernel"    [sink(n)+][window(n)+][topk | quest | hashtopk]+verified(draws='iid', either mode), on
                      CUDA: the front's Selection from the kernels above, attended exactly, and the
                      scan chain's iid estimate of the rest of the middle (kernels/sampled.py); one
                      query row at a time, no host sync.
  "sampled-reference" the same spec on the CPU: the front's reference methods and the float64 twin
                      (sampled_decode_ref).
  "reference"         any other spec: parts -> Selection -> attend (said once in the log on CUDA).
The kernel paths' selections are built in plan_select.py.

The kernel paths make the reference's choices key for key (tests/test_plan_paths.py); on the
CPU the reference runs unless fused=True (tests: the Triton interpreter). GRAPHABLE_PATHS are
the paths whose run/append never wait for the device and read each row's keys below its end
only, so a decode step over every slot row can be captured in a CUDA graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vattn.attend import attend, kernel_misfit
from vattn.errors import VattnError
from vattn.methods.base import DecodeContext
from vattn.selection import Selection
from vattn.spec import POSITION_FRONTS, Spec, parse
from vattn.plan_select import (bound_pages, front_ranges, front_sizes, hashtopk_selection, page_shape,
                               page_update, quest_selection, step_front, streaming_selection, topk_selection)

log = logging.getLogger(__name__)
_SAID: set = set()

# Paths whose append and run never wait for the device, size every tensor from host numbers
# (shapes, the spec) and read each row's keys below its end only: a decode step over every
# slot row of a cache can be captured in a CUDA graph (the engine's batched steps).
GRAPHABLE_PATHS = ("streaming-kernel", "scan-kernel", "topk-kernel", "hashtopk-kernel", "quest-kernel",
                   "sampled-kernel")
# The specs with a fused GPU path, as compile's errors name them.
FUSED_FORMS = ("[sink(n)+]window(n) | sink(n); [sink(n)+][window(n)+]topk(k); "
               "[sink(n)+][window(n)+]hashtopk(k[, bits=..][, seed=..]) (proj='random'); "
               "[sink(n)+][window(n)+]quest(budget[, page=..][, dense_layers=..][, share=..]); the scan chain "
               "[sink(count)+][window(count)+]hashtopk(k, cut='sample')+verified(..., draws='iid'); and "
               "[sink(count)+][window(count)+][topk(k) | quest(..) | hashtopk(k, ..)]+verified(..., draws='iid')")
KERNEL_PATHS = {"streaming": "streaming-kernel", "topk": "topk-kernel", "hashtopk": "hashtopk-kernel",
                "quest": "quest-kernel"}


def _say_once(msg: str, *args):
    if (msg, args) not in _SAID:
        _SAID.add((msg, args))
        log.warning(msg, *args)


@dataclass
class StepContext:
    """Row bounds of one forward, built once and shared by every layer.

    zero_starts: a host fact, True when every row starts at key 0 (no left padding);
    None when the caller does not know (the scan path then checks, once per step).
    pick: int64 [b] on the device, or None: run returns out[pick] (rows in a decoder's batch
    order; the kernels' merge writes them so, no gather); the Selection keeps every row."""
    starts: torch.Tensor
    ends: torch.Tensor
    scale: float
    zero_starts: bool | None = None
    pick: torch.Tensor | None = None

    def __post_init__(self):
        self._lengths = None
        self.memo: dict = {}  # what plans derive from the bounds alone, once per step

    @property
    def rows(self) -> int:
        return self.ends.shape[1]

    def lengths(self) -> torch.Tensor:
        """int32 [B]: keys the last query row of each sequence sees."""
        if self._lengths is None:
            self._lengths = self.ends[:, -1].to(torch.int32).contiguous()
        return self._lengths

    def check_zero_starts(self, why: str):
        if self.zero_starts is None:
            self.zero_starts = bool((self.starts == 0).all())
        if not self.zero_starts:
            raise VattnError(f"{why} needs every sequence to start at key 0 (no left padding): generate "
                             "prompts one at a time, or use the vattn engine (no padding)")


@dataclass
class SampledRecipe:
    """The iid draws' arguments (kernels/sampled.py), read from verified(draws='iid') and the front."""
    sink: int
    window: int
    m0: int
    eps: float
    delta: float
    var_conf: float
    mode: str

    def kwargs(self) -> dict:
        return dict(sink=self.sink, window=self.window, m0=self.m0, eps=self.eps, delta=self.delta,
                    var_conf=self.var_conf, mode=self.mode)


@dataclass
class ScanRecipe(SampledRecipe):
    """The scan kernels' arguments (spec.SCAN_FORM): the draws' and the signature cut's."""
    topk: int | float = 0
    bits: int = 32
    proj_seed: int = 0

    def kwargs(self) -> dict:
        return super().kwargs() | dict(topk=self.topk)


class Plan:
    def __init__(self, spec: Spec, device: torch.device, path: str, seed: int = 0, recipe: ScanRecipe | None = None,
                 sampled: SampledRecipe | None = None):
        self.spec, self.device, self.path, self.seed, self.recipe = spec, device, path, int(seed), recipe
        self.sampled = sampled
        # the parts that choose keys exactly (all of them but a sampled chain's verified)
        self.front = Spec(spec.parts[:-1], f"{spec.text} (front)") if sampled else spec
        self.states: dict[int, dict] = {}  # per layer: what methods keep across steps
        self._gen = None
        self.insist = False  # compile(fused=True): a fused path that cannot run is an error
        self._scratch: dict = {}  # the kernels' work buffers, shared by layers (they run one after another)
        self.capacity = 0  # keys the signature buffers hold from the start (reserve)
        self.keep_stats = False  # scan kernels: keep each run's cuts and sample sizes in .stats (vattn verify)
        self.stats: dict | None = None

    def reset(self):
        """A new sequence: method state and the sampling generator start afresh. The graphable
        paths keep their buffers (signatures, page bounds) where they are, since a captured
        graph points at them, but count nothing as signed or bounded: the next call signs /
        bounds every key below each row's end again (a prefill that skipped the plan, as the
        patch's dense prompt does, would otherwise leave the last sequence's signatures)."""
        if self.path not in GRAPHABLE_PATHS and self.recipe is None:
            self.states.clear()
        for st in self.states.values():
            for mark in ("signed", "built"):
                if mark in st:
                    st[mark] = 0
        self._gen = None

    def generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._gen

    def reserve(self, keys: int) -> "Plan":
        """Size per-layer buffers for `keys` keys up front, so they never move: a CUDA graph
        captured at one cache length must find them where it left them at every other."""
        self.capacity = int(keys)
        return self

    @staticmethod
    def context(starts, ends, scale: float, zero_starts: bool | None = None, pick=None) -> StepContext:
        return StepContext(starts, ends, float(scale), zero_starts, pick)

    def append(self, layer: int, k, v, ctx: StepContext):
        """Keys at positions ends - 1 were written (or the buffer grew): per-layer state follows.
        The scan paths sign keys and the quest kernel path bounds pages here; the reference
        methods extend their state in run."""
        if k.shape[0] * k.shape[2] * ctx.ends.numel() == 0:
            return
        if self.recipe is not None or self._hash_front():
            self._signatures(layer, k, ctx, own=not self._kernel_signs(ctx))
        elif self.path in ("quest-kernel", "sampled-kernel") and self.front.parts[-1].name == "quest" \
                and layer >= self.front.parts[-1].dense_layers:
            self._pages(layer, k, ctx)

    def run(self, layer: int, q, k, v, ctx: StepContext) -> tuple[torch.Tensor, Selection]:
        """Attention of q's rows with the spec: (out [B, Hq, T, D] in q.dtype, or out[ctx.pick], Selection)."""
        if self.path in (*KERNEL_PATHS.values(), "sampled-kernel"):
            why = kernel_misfit(q, k, v)
            if why is None:
                return self._kernel(layer, q, k, v, ctx) if self.sampled is None else self._sampled(layer, q, k, v, ctx)
            if self.insist:
                raise VattnError(f"spec {self.spec}: the fused {self.path} path cannot take these inputs ({why})")
            log.warning("spec %s: the fused %s path cannot take these inputs (%s); the reference path runs",
                        self.spec, self.path, why)
            self.path = "reference" if self.sampled is None else "sampled-reference"  # what runs from now on
        if self.recipe is not None:
            return self._scan(layer, q, k, v, ctx)
        if self.sampled is not None:
            return self._sampled(layer, q, k, v, ctx)
        dctx = DecodeContext(q, k, v, ctx.starts, ctx.ends, ctx.scale, self.generator(),
                             self.states.setdefault(layer, {}), layer)
        sel = self.spec.select(dctx)
        return _picked(attend(q, k, v, sel, scale=ctx.scale), ctx), sel

    # -- the selection kernel paths (streaming, topk, quest) ------------------------------
    def _kernel(self, layer, q, k, v, ctx: StepContext):
        """A Selection of fixed width built on the device, attended by the sparse kernel."""
        from vattn.kernels.sparse import sparse_decode
        sel = self.front_selection(layer, q, k, ctx)
        if q.shape[0] * q.shape[2] == 0 or k.shape[2] == 0:  # no rows or no keys: zeros, as attend gives
            return _picked(torch.zeros_like(q), ctx), sel
        return sparse_decode(q, k, v, sel.indices, sel.log_weights, sel.count, sel.shared, ctx.scale,
                             pick=ctx.pick), sel

    def front_selection(self, layer, q, k, ctx: StepContext) -> Selection:
        """The front's Selection (self.front: streaming, topk or quest), built on the device."""
        b, hq, t, _ = q.shape
        form = kernel_form(self.front)
        if b * t == 0 or k.shape[2] == 0:
            shared = form == "streaming" or self.front.shared
            return Selection.empty(b, k.shape[1] if shared else hq, t, q.device, shared)
        if form == "streaming":
            key = ("streaming", str(self.front), tuple(k.shape))  # the same for every layer of the step
            return ctx.memo.get(key) or ctx.memo.setdefault(key, streaming_selection(self.front, k, ctx.starts,
                                                                                     ctx.ends))
        if form == "topk":
            return topk_selection(self.front, q, k, ctx.starts, ctx.ends, ctx.scale, step_front(self.front, k, ctx))
        if form == "hashtopk":
            st = self._signed(layer, k, ctx)
            return hashtopk_selection(self.front, q, k, st["sig"], st["proj"], step_front(self.front, k, ctx),
                                      ctx.lengths() if self._kernel_signs(ctx) else None)
        if self.dense_layer(layer):
            key = ("dense", tuple(k.shape))
            return ctx.memo.get(key) or ctx.memo.setdefault(key, front_ranges(0, 1.0, k, ctx.starts,
                                                                              ctx.ends).selection(k))
        st = self.states.get(layer)
        if st is None or "pages" not in st or st["shape"] != page_shape(k) or st["built"] < k.shape[2]:
            self._pages(layer, k, ctx)  # no append came: bound the pages now
            st = self.states[layer]
        return quest_selection(self.front, q, k, ctx.starts, ctx.ends, ctx.scale, st["pages"],
                               step_front(self.front, k, ctx))

    def dense_layer(self, layer: int) -> bool:
        """A quest front's first dense_layers layers attend every key."""
        part = self.front.parts[-1]
        return part.name == "quest" and layer < part.dense_layers

    # -- exact front + iid verified sample (kernels/sampled.py) ----------------------------
    def _sampled(self, layer, q, k, v, ctx: StepContext):
        """The front's keys exactly and the iid estimate of the rest, one query row at a time:
        sampled_decode on the kernel path, its float64 twin on the reference path."""
        from vattn.kernels.sampled import sampled_decode, sampled_decode_ref
        from vattn.kernels.sparse import sparse_decode
        b, hq, t, _ = q.shape
        if b * t == 0 or k.shape[2] == 0:
            return _picked(torch.zeros_like(q), ctx), Selection.empty(b, hq, t, q.device)
        kernel = self.path == "sampled-kernel"
        sel = self.front_selection(layer, q, k, ctx) if kernel else self._front_reference(layer, q, k, v, ctx)
        if kernel and self.dense_layer(layer):  # every key listed: nothing to sample
            return sparse_decode(q, k, v, sel.indices, sel.log_weights, sel.count, sel.shared, ctx.scale,
                                 pick=ctx.pick), sel
        seed, kw = self.scan_seed(layer), self.sampled.kwargs()
        starts = ctx.memo.get("starts32")  # once per step: the layers share it
        if starts is None:
            starts = ctx.memo["starts32"] = ctx.starts.to(torch.int32).contiguous()
        outs, sels = [], []
        for r in range(t):
            srow = sel.row(r)
            lengths = ctx.ends[:, r].to(torch.int32) if t > 1 else ctx.lengths()
            if kernel:
                scratch = None if self.keep_stats else self._scratch
                o, got = sampled_decode(q[:, :, r:r + 1], k, v, srow, lengths, seed=seed, scale=ctx.scale,
                                        starts=starts, count=not self.keep_stats, stats=self.keep_stats,
                                        scratch=scratch, pick=ctx.pick if t == 1 else None, **kw)
                if self.keep_stats:
                    self.stats, got = got, got["keys"]
                sels.append(Selection.counted(got.view(b, srow.indices.shape[1], 1), shared=srow.shared))
            else:
                o, info = sampled_decode_ref(q[:, :, r:r + 1], k, v, srow, lengths, seed=seed, scale=ctx.scale,
                                             starts=starts, **kw)
                o = o.to(q.dtype)
                sels.append(info["selection"])
            outs.append(o)
        out = outs[0] if kernel and t == 1 else _picked(torch.cat(outs, 2), ctx)  # (the kernel picked)
        return out, Selection.cat_rows(sels)

    def _front_reference(self, layer, q, k, v, ctx: StepContext) -> Selection:
        """The front's Selection from its reference methods (method state per layer)."""
        dctx = DecodeContext(q, k, v, ctx.starts, ctx.ends, ctx.scale, self.generator(),
                             self.states.setdefault(layer, {}), layer)
        return self.front.select(dctx)

    def _pages(self, layer: int, k, ctx: StepContext):
        """Quest's page bounds of a layer: [B, Hkv, P + 1, D, 2] in the keys' dtype (min, max of
        each page's visible keys; the last page is scratch for writes that must not land).

        Rebuilt, for rows with keys in this step: pages past what was bounded (N, a host
        number, grew: a prefill or a first call), the pages holding each row's newest keys
        (the last T positions below its end) and each row's first page (its start may move,
        as under a sliding window). A page is bounded over the positions in [start, end) of
        its row, as the reference's pages are (methods/quest.py); only keys below each row's
        end are read; nothing waits for the device."""
        s = self.front.parts[-1].page
        b, hkv, n, d = k.shape
        st = self.states.setdefault(layer, {})
        need = -(-n // s)
        if "pages" not in st or st["shape"] != page_shape(k):
            st.update(pages=torch.zeros((b, hkv, -(-self.capacity // s) + 1, d, 2), dtype=k.dtype,
                                        device=k.device), built=0, shape=page_shape(k))
        cap = st["pages"].shape[2] - 1
        pages = st["pages"] = self._room(layer, st["pages"], need, n, keep=cap, spare=1)
        cap = pages.shape[2] - 1
        key = ("pages", s, n, st["built"], cap, b)  # the layers of a step share the pages they bound
        if key not in ctx.memo:
            end = ctx.ends.amax(-1)  # [B]: what the rows of this step see
            last = (end - 1).clamp(min=0) // s
            touched = last[:, None] - torch.arange(-(-(ctx.rows - 1) // s) + 1, device=k.device)
            pid = [touched, (ctx.starts // s)[:, None]]
            lo = st["built"] // s
            if need > lo and n > st["built"]:
                pid.insert(0, torch.arange(lo, need, device=k.device).expand(b, need - lo))
            pid = torch.cat(pid, 1)  # [B, J]
            ok = (end > ctx.starts)[:, None] & (pid >= (ctx.starts // s)[:, None]) & (pid * s < end[:, None])
            ctx.memo[key] = page_update(pid, ok & (pid < cap), ctx.starts, end, s, cap)
        bound_pages(pages, k, ctx.memo[key])
        st["built"] = max(st["built"], n)

    def _room(self, layer: int, buf, need: int, keys: int, keep: int, spare: int = 0):
        """buf [B, Hkv, size + spare, ...] with room for `need` entries along dim 2. A reserved
        plan refuses to grow (a captured graph holds buf's address); others double the size
        (a copy of entries [:keep] now and then, not per step)."""
        if need <= buf.shape[2] - spare:
            return buf
        if self.capacity:
            raise VattnError(f"layer {layer} has {keys} keys, more than the {self.capacity} this plan reserved "
                             "(Plan.reserve): reserve the cache's full length")
        grown = buf.new_zeros((*buf.shape[:2], max(need, 2 * (buf.shape[2] - spare)) + spare, *buf.shape[3:]))
        grown[:, :, :keep] = buf[:, :, :keep]
        return grown

    # -- the scan paths ---------------------------------------------------------------
    def scan_seed(self, layer: int) -> int:
        """The kernels' seed for a layer (each step's length varies the draws within it)."""
        return (self.seed * 1_000_003 + layer) & 0xFFFFFFFF

    def _kernel_signs(self, ctx: StepContext) -> bool:
        """The scan kernels (update_sig) and the hashtopk scores kernel sign each row's own key
        themselves when it lies in the window: no launch of the step reads it before (torch's
        signing, _sign_at, is about 20 small launches a layer)."""
        if ctx.rows != 1:
            return False
        if self.path == "scan-kernel":
            return self.recipe.window >= 1
        win = front_sizes(self.front)[1]
        return self._hash_front() and isinstance(win, int) and win >= 1

    def _hash_front(self) -> bool:
        """The front is hashtopk on a kernel path (alone, or before the iid verified sample): the
        plan keeps its key signatures."""
        return self.path in ("hashtopk-kernel", "sampled-kernel") and kernel_form(self.front) == "hashtopk"

    def _signed(self, layer: int, k, ctx: StepContext) -> dict:
        """The layer's state with its key signatures (sig, proj) up to k's length: signed now
        when no append came (the scan chain and the hashtopk kernel paths)."""
        st = self.states.get(layer, {})
        if "sig" not in st or st["sig"].shape[:2] != k.shape[:2] or st["signed"] < k.shape[2]:
            self._signatures(layer, k, ctx, own=not self._kernel_signs(ctx))
            st = self.states[layer]
        return st

    def _signatures(self, layer: int, k, ctx: StepContext, own: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(key signatures int32 [B, Hkv, cap >= N, W], projection [D, 32 W]) of a layer: the scan
        chain's, or the hashtopk kernel path's (bits not a multiple of 32: zero columns added,
        whose bits are 0 in every signature).

        Keys at positions past what was signed (N is known on the host) are signed at once, and
        each row's own keys (ends - 1 of each query row) every call: that covers caches of
        fixed length, batches of unequal rows and a slot that a new sequence reuses (its
        prefill appends its keys). Only keys below each row's end are read (a row of a paged
        cache may have nothing mapped past it); nothing waits for the GPU."""
        from vattn.methods.hashing import simhash_proj
        b, hkv, n, d = k.shape
        st = self.states.setdefault(layer, {})
        sig = st.get("sig")
        if sig is None or sig.shape[:2] != (b, hkv) or st["proj"].shape[0] != d:
            part = self.front.parts[-1] if self.recipe is None else None  # (hashtopk-kernel)
            bits, seed = (self.recipe.bits, self.recipe.proj_seed) if part is None else (part.bits, part.seed)
            w = -(-bits // 32)
            proj = torch.nn.functional.pad(simhash_proj(d, bits, seed, layer, k.device), (0, 32 * w - bits))
            sig = torch.zeros((b, hkv, self.capacity, w), dtype=torch.int32, device=k.device)
            st.update(sig=sig, proj=proj, signed=0)
        proj = st["proj"]
        sig = st["sig"] = self._room(layer, sig, n, n, keep=st["signed"])
        end = ctx.ends[:, -1]
        lo = st["signed"]
        if n > lo and not (n == lo + 1 and not own):  # (the kernels sign a step's one new key)
            pos = torch.arange(lo, n, device=k.device).expand(b, n - lo)
            _sign_at(sig, k, proj, pos, pos < end[:, None], end)
        st["signed"] = max(lo, n)
        if own:
            pos = ctx.ends - 1  # [B, T]
            _sign_at(sig, k, proj, pos.clamp(min=0), pos >= 0, end)
        return sig, proj

    def _scan(self, layer, q, k, v, ctx: StepContext):
        from vattn.kernels.scan import scan_decode_ref, vattention_scan_decode
        if q.shape[0] * q.shape[2] == 0 or k.shape[2] == 0:  # no rows or no keys: zeros, as attend gives
            return _picked(torch.zeros_like(q), ctx), Selection.empty(q.shape[0], k.shape[1], q.shape[2], q.device,
                                                                     shared=True)
        ctx.check_zero_starts(f"spec {self.spec} (the scan algorithm)")
        st = self._signed(layer, k, ctx)
        sig, proj = st["sig"], st["proj"]
        seed = self.scan_seed(layer)
        kw = self.recipe.kwargs()
        if self.path == "scan-kernel" and ctx.rows == 1:
            out, got = vattention_scan_decode(q, k, v, sig, proj, ctx.lengths(), seed=seed, scale=ctx.scale,
                                              count=not self.keep_stats, stats=self.keep_stats,
                                              update_sig=self._kernel_signs(ctx), pick=ctx.pick,
                                              scratch=None if self.keep_stats else self._scratch, **kw)
            if self.keep_stats:
                self.stats, got = got, got["exact_keys"] + got["sample_keys"]
            return out, Selection.counted(got.view(q.shape[0], k.shape[1], 1), shared=True)
        if self.path == "scan-kernel":
            _say_once("spec %s: %d query rows per sequence run the scan kernels' float64 twin (the kernels "
                      "take one row)", str(self.spec), ctx.rows)
        outs, sels = [], []
        for t in range(ctx.rows):  # the twin takes one query row per sequence
            o, info = scan_decode_ref(q[:, :, t:t + 1], k, v, sig, proj, ctx.ends[:, t].to(torch.int32), seed=seed,
                                      scale=ctx.scale, **kw)
            outs.append(o.to(q.dtype))
            sels.append(info["selection"])
        return _picked(torch.cat(outs, 2), ctx), Selection.cat_rows(sels)


def _picked(out, ctx: StepContext):
    """out[ctx.pick] (the batch order a decoder asked for), or out when it asked for every row."""
    return out if ctx.pick is None else out[ctx.pick]


def _sign_at(sig, k, proj, pos, ok, end):
    """sig[b, :, pos[b, j]] = signature of k[b, :, pos[b, j]] where ok[b, j]; reads only keys
    below each row's end (rows without keys read the row with the most)."""
    from vattn.kernels.bits import sign_bits
    b = k.shape[0]
    src = torch.where(end > 0, torch.arange(b, device=k.device), end.argmax())  # [B]
    safe = torch.minimum(pos, (end[src] - 1).clamp(min=0)[:, None])  # [B, P]
    keys = k[src[:, None], :, safe].permute(0, 2, 1, 3)  # [B, Hkv, P, D]
    new = sign_bits(keys, proj)
    idx = pos[:, None, :, None].expand(b, k.shape[1], pos.shape[1], sig.shape[3])
    sig.scatter_(2, idx, torch.where(ok[:, None, :, None], new, torch.gather(sig, 2, idx)))


def compile(spec, device, seed: int = 0, fused: bool | None = None) -> Plan:
    """The plan for `spec` on `device`. fused: None = the fused path where one exists on
    CUDA; True = insist on it (an error if the spec has none); False = the reference."""
    spec = parse(spec)
    device = torch.device(device)
    recipe, sampled = scan_recipe(spec), sampled_recipe(spec)
    form = kernel_form(spec)
    front = Spec(spec.parts[:-1], spec.text) if sampled is not None else None
    # a sampled chain fuses behind a front with a kernel path (not a learned hashtopk projection)
    fusable = form is not None or recipe is not None or (sampled is not None and kernel_form(front) is not None)
    insist = fused is True
    if fused is None:
        fused = fusable and device.type == "cuda"
    if fused and not fusable:
        raise VattnError(f"spec {spec} has no fused GPU path (fused: {FUSED_FORMS}); use fused=None to run "
                         "the reference path")
    if fused and device.type != "cuda" and not _interpreting():
        raise VattnError(f"fused=True needs a CUDA device (or TRITON_INTERPRET=1 for tests), got {device}")
    if recipe is not None:  # one algorithm on every device: the twin where the kernels do not run
        path = "scan-kernel" if fused else "scan-reference"
    elif sampled is not None:
        path = "sampled-kernel" if fused else "sampled-reference"
    else:
        path = KERNEL_PATHS[form] if fused else "reference"
    if device.type == "cuda" and not fused:
        _say_once("spec %s runs the %s path on CUDA, not a fused plan", str(spec), path)
    if sampled is not None and spec.parts[-2].name in ("quest", "hashtopk"):
        _say_once("spec %s: the iid draws have no heavy-key cut, so the bound needs a front that takes the heavy "
                  "keys; an approximate front can miss them (Quest's pages on peaked rows: coverage 0.2-0.66, "
                  "docs/guarantee.md): check yours with `vattn verify --draws iid --base ...`", str(spec))
    plan = Plan(spec, device, path, seed, recipe, sampled)
    plan.insist = insist
    return plan


def _interpreting() -> bool:
    from vattn.kernels.common import interpret
    return interpret()


def scan_recipe(spec: Spec) -> ScanRecipe | None:
    """The scan kernels' arguments when `spec` is the scan chain (spec.check_parts vouches for
    its form), else None."""
    parts = spec.parts
    if len(parts) < 2 or getattr(parts[-1], "draws", None) != "iid" or getattr(parts[-2], "cut", None) != "sample":
        return None
    ht, vf = parts[-2], parts[-1]
    fixed = {p.name: p.n for p in parts[:-2]}
    return ScanRecipe(sink=fixed.get("sink", 0), window=fixed.get("window", 0), topk=ht.k, bits=ht.bits,
                      proj_seed=ht.seed, m0=vf.min_pilot, eps=vf.eps, delta=vf.delta, var_conf=vf.var_conf,
                      mode=vf.mode)


def sampled_recipe(spec: Spec) -> SampledRecipe | None:
    """kernels/sampled.py's arguments when `spec` is an exact front + verified(draws='iid')
    (spec.check_parts vouches for its form), else None."""
    parts = spec.parts
    if len(parts) < 2 or getattr(parts[-1], "draws", None) != "iid" or getattr(parts[-2], "cut", None) == "sample":
        return None
    vf, fixed = parts[-1], {p.name: p.n for p in parts[:-1] if p.name in ("sink", "window")}
    return SampledRecipe(sink=fixed.get("sink", 0), window=fixed.get("window", 0), m0=vf.min_pilot, eps=vf.eps,
                         delta=vf.delta, var_conf=vf.var_conf, mode=vf.mode)


def window_runs_exact(spec: Spec) -> bool:
    """Whether a sliding-window layer attends its window exactly under `spec` instead: the scan
    chain and the iid draws draw from key 0 on (their sinks), which a window cuts off."""
    return scan_recipe(spec) is not None or sampled_recipe(spec) is not None


def is_streaming(spec: Spec) -> bool:
    """sink and/or window, each at most once, sink first: positions only."""
    return [p.name for p in spec.parts] in POSITION_FRONTS


def kernel_form(spec: Spec) -> str | None:
    """"streaming", "topk", "hashtopk" or "quest" when `spec` has a selection-kernel path, else
    None (hashtopk: with the seeded projection; a learned one runs the reference)."""
    names = [p.name for p in spec.parts]
    if names in POSITION_FRONTS:
        return "streaming"
    last = spec.parts[-1]
    if names[:-1] not in ([], *POSITION_FRONTS):
        return None
    if names[-1] in ("topk", "quest") or (names[-1] == "hashtopk" and last.proj == "random" and last.cut == "exact"):
        return names[-1]
    return None
