"""Runner: one model, one vmem KV cache of `max_batch` slots, dense prefill and batched decode.

    r = Runner("path/to/model", spec="vattention", max_len=32768, max_batch=8)
    s = r.alloc()
    logits = r.prefill(s, ids)                      # float32 [V]: the prompt's last token
    logits = r.decode([s], [next_id])               # float32 [1, V]: one new token per slot
    ids = r.decode([s], ids, greedy=True)           # int64 [1] on the device: argmax in the step
    r.density(s); r.free(s)

Decode attends over every slot row of the cache at once ([max_batch, Hkv, N, D] views; rows
not in the step have no keys), so shapes never depend on which slots take part: a CUDA graph
per (spec, batch bucket, key-length bucket) replays the whole step, and a plan's per-layer
state lines up with slot rows from step to step. Padding entries of a bucket repeat the
first entry (same slot, token and position): they rewrite identical K/V and are dropped.
"""
from __future__ import annotations

import logging

import torch

from vattn.cache.kv import KVCache
from vattn.engine.loader import load
from vattn.errors import VattnError
from vattn.plan import GRAPHABLE_PATHS, window_runs_exact

log = logging.getLogger(__name__)


# Plan paths that may see every slot row at once (plan.GRAPHABLE_PATHS: each row's keys below
# its end only, no host sync; a prefill's append brings its slot's state up to date).
BATCHED_PATHS = GRAPHABLE_PATHS


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def length_bucket(n: int, max_len: int) -> int:
    """Keys a graphed step views: n rounded up to 1/8 of its power of two (<= 12.5% idle
    keys for the split-KV kernel), at least 256, at most max_len."""
    step = max(256, next_pow2(n) // 16)
    return min(max_len, -(-n // step) * step)


class Runner:
    def __init__(self, model=None, *, spec="dense", device=None, dtype=None, max_len: int = 4096,
                 max_batch: int = 8, budget_bytes: int | None = None, seed: int = 0, dense_layers=None,
                 tokenizer=None, chunk: int = 4096, graphs: bool | None = None, kv_layout: str = "bhnd"):
        from vattn.models import resolve_device, resolve_dtype
        from vattn.spec import parse
        for name, v in (("max_len", max_len), ("max_batch", max_batch), ("chunk", chunk)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise VattnError(f"{name} must be an int >= 1, got {v!r}")
        self.device = resolve_device(device if device is not None else
                                     ("cuda" if torch.cuda.is_available() else "cpu"))
        dt = resolve_dtype(dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.spec = str(parse(spec))
        self.max_len, self.max_batch, self.seed, self.chunk = max_len, max_batch, int(seed), chunk
        self.model, tok, self.eos_ids = load(model, self.device, dt, max_len, tokenizer)
        self.tokenizer = tok
        self.dtype = dt
        a = self.arch = self.model.arch
        if a.max_positions and max_len > a.max_positions:
            log.info("max_len %d is beyond the model's %d trained positions", max_len, a.max_positions)
        self.dense_layers = _dense_set(dense_layers, a.layers)
        self.kv = KVCache(a.layers, max_batch, max_len, a.kv_heads, a.head_dim, dtype=dt, device=self.device,
                          budget_bytes=budget_bytes, layout=kv_layout)  # bnhd: a slot grows in finer steps
        self.S = max_batch
        self._len = [0] * self.S
        self._alloc = [False] * self.S
        self._decoded = [0] * self.S
        self._att = torch.zeros(self.S, dtype=torch.float64, device=self.device)  # keys attended (sparse layers)
        self._allowed = torch.zeros_like(self._att)                               # keys a dense step would attend
        self._qbuf = None
        self._plans: dict = {}
        self._spec_text: dict = {}
        self._graphs: dict = {}
        self._pool = None
        self.graphs = self.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and self.device.type != "cuda":
            raise VattnError("graphs=True needs a CUDA device; CUDA graphs do not exist on the CPU")
        self.graph_notes: dict = {}  # spec -> why its steps run eagerly on CUDA
        # Attend all slot rows in one call (dense kernel, fused plans): on CUDA. CPU tests turn
        # it on under TRITON_INTERPRET=1 to run the GPU step's code in the interpreter.
        self.all_rows = self.device.type == "cuda"

    # ------------------------------------------------------------ slots
    def alloc(self) -> int:
        """A free slot. Its own (reference) plans start afresh; a batch that starts from no live
        slot also resets the shared (fused) plans, whose state spans all slot rows."""
        if self.kv.stats().slots_in_use == 0:
            for p in self._plans.values():
                p.reset()
        try:
            s = self.kv.alloc()
        except VattnError:
            raise VattnError(f"no free slot: all {self.S} are in use; free one or raise max_batch") from None
        for key in [k for k in self._plans if k[1] == s]:
            self._plans[key].reset()  # a new sequence in this slot: its own plans start afresh
        self._len[s] = self._decoded[s] = 0
        self._alloc[s] = True
        self._att[s] = 0
        self._allowed[s] = 0
        return s

    def free(self, slot: int) -> None:
        self._check_slot(slot)
        if self.device.type == "cuda":  # a step still in flight may read the slot; its pages may go elsewhere next
            torch.cuda.current_stream(self.device).synchronize()
        self.kv.free(slot)
        self._len[slot] = self._decoded[slot] = 0
        self._alloc[slot] = False

    def length(self, slot: int) -> int:
        return self._len[slot]

    def density(self, slot: int) -> float | None:
        """Keys attended / keys dense attention would attend, over the slot's decode steps in
        sparse layers (prefill is dense and not counted); 1.0 for a dense spec; None before
        the first decode step."""
        if not self._decoded[slot]:
            return None
        allowed = float(self._allowed[slot])
        return float(self._att[slot]) / allowed if allowed > 0 else 1.0

    def fits(self, n_tokens: int) -> bool:
        """Whether a fresh slot of n_tokens could be mapped now: within the budget (cached pages
        of freed slots count as free) and, on CUDA, the device's free memory."""
        st = self.kv.stats()
        need = self.pages_for(n_tokens) * st.page_bytes
        if st.budget_bytes is not None and need > st.budget_bytes - st.mapped_bytes + st.cached_bytes:
            return False
        if self.device.type == "cuda":
            return need <= torch.cuda.mem_get_info(self.device)[0] + st.cached_bytes
        return True

    def pages_for(self, n: int) -> int:
        """Pages (KVCache's unit: one granule of a slot in every layer, K and V) that tokens
        [0, n) of a slot occupy, from the cache's layout (module docstring of cache/kv.py)."""
        kv = self.kv
        if n <= 0:
            return 0
        tb, g = kv.D * kv.esize, kv.G
        if kv.layout == "bnhd":
            return (n * kv.H * tb - 1) // g + 1
        pages = set()
        for h in range(kv.H):
            a = h * kv.N * tb
            pages.update(range(a // g, (a + n * tb - 1) // g + 1))
        return len(pages)

    # ------------------------------------------------------------ plans
    def plan(self, spec=None, slot: int | None = None):
        """The compiled Plan of `spec` (default: the runner's), or None for a dense spec.

        A plan on a fused path attends every slot row in one call and is shared (slot=None).
        A reference-path plan runs one slot at a time, so each slot owns one (its method
        state and generator are that sequence's, made afresh at alloc)."""
        from vattn.plan import compile as compile_plan
        from vattn.spec import parse
        arg = self.spec if spec is None else spec
        text = self._spec_text.get(arg) if isinstance(arg, str) else None
        if text is None:  # parse once per spec string: decode asks every step
            parsed = parse(arg)
            text = "dense" if parsed.is_dense else str(parsed)
            if isinstance(arg, str):
                self._spec_text[arg] = text
        if text == "dense":
            return None
        key = (text, slot)
        if key not in self._plans:
            # buffers sized for the whole cache: graphs captured at one length replay at others
            self._plans[key] = compile_plan(text, self.device, seed=self.seed).reserve(self.max_len)
        return self._plans[key]

    def batched(self, plan) -> bool:
        """Whether `plan` (None: dense) runs over all slot rows in one call: the dense kernel
        and fused plans read each row's keys up to its length only; reference code reads the
        whole view, and unmapped KV pages must never be read on a GPU."""
        if not self.all_rows or not _kernel_fits_dims(self.arch.head_dim, self.dtype):
            return False
        return plan is None or plan.path in BATCHED_PATHS

    def _window_plan(self, window: int):
        """Dense attention over a sliding window on CUDA: the streaming kernel with window(w)
        attends exactly the window's keys (graph-safe, where the dense kernel has no starts)."""
        return self.plan(f"window({int(window)})")

    def sparse_layer(self, layer: int, plan) -> bool:
        """Whether `layer` runs the plan (a sliding-window layer may run its window exactly:
        plan.window_runs_exact)."""
        if plan is None or layer in self.dense_layers:
            return False
        return not (self.arch.windows[layer] and window_runs_exact(plan.spec))

    # ------------------------------------------------------------ prefill
    def prefill(self, slot: int, token_ids, start: int = 0, spec=None, chunk: int | None = None):
        """Dense attention over token_ids at positions start..start+len-1 of `slot`, in chunks of
        `chunk` tokens (default self.chunk); returns float32 [V]: the last token's logits.

        Memory for all of them is mapped first: on VattnOutOfMemory nothing was written and
        the slot's length is unchanged."""
        ids = self.check_ids(token_ids, "token_ids")
        self._check_slot(slot)
        chunk = self.chunk if chunk is None else chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise VattnError(f"chunk must be an int >= 1 (tokens per prefill step), got {chunk!r}")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self._len[slot]:
            raise VattnError(f"start must be an int in [0, length(slot)={self._len[slot]}], got {start!r}")
        if not ids:
            raise VattnError("token_ids is empty: prefill needs at least one token")
        end = start + len(ids)
        if end > self.max_len:
            raise VattnError(f"slot {slot} would hold {end} tokens but max_len is {self.max_len}; "
                             "shorten the prompt or build the Runner with a larger max_len")
        self.kv.grow([slot], end)  # VattnOutOfMemory here: nothing written
        plan = self.plan(spec)
        if plan is not None and not self.batched(plan):
            plan = self.plan(spec, slot)
        out = None
        with torch.inference_mode():
            rows = torch.tensor([slot], device=self.device)
            for lo in range(0, len(ids), chunk):
                part = ids[lo:lo + chunk]
                pos0 = start + lo
                tok = torch.tensor([part], dtype=torch.long, device=self.device)
                pos = torch.arange(pos0, pos0 + len(part), device=self.device)[None]
                h = self.model.forward(tok, pos, self._prefill_attend(slot, pos0, len(part), plan),
                                       cache=self._cache_at(rows))
                out = h[0, -1]
            logits = self.model.logits(out).float()
        self._len[slot] = end
        return logits

    def _prefill_attend(self, slot, start, t, plan):
        a = self.arch

        def attend(i, q, k, v):  # k, v: already in the cache (forward's cache=)
            K, V = self.kv.k(i), self.kv.v(i)
            if self.sparse_layer(i, plan):
                self._append(plan, i, slot, start, t)
            return prefill_attention(q, K[slot:slot + 1, :, :start + t], V[slot:slot + 1, :, :start + t],
                                     start, a.windows[i], a.scale)
        return attend

    def _append(self, plan, layer, slot, start, t):
        """The plan's per-layer state (signatures, page bounds) for the keys just written
        (plans with context/append; older plans build their state lazily in run)."""
        n = start + t
        dev = self.device
        rows = self.S if self.batched(plan) else 1
        ends = torch.zeros(rows, t, dtype=torch.long, device=dev)
        ends[slot if rows > 1 else 0] = torch.arange(start + 1, n + 1, device=dev)
        ctx = plan.context(torch.zeros(rows, dtype=torch.long, device=dev), ends, self.arch.scale, True)
        K, V = self.kv.k(layer), self.kv.v(layer)
        if rows == 1:
            K, V = K[slot:slot + 1], V[slot:slot + 1]
        plan.append(layer, K[:, :, :n], V[:, :, :n], ctx)

    # ------------------------------------------------------------ decode
    def decode(self, slots, tokens, spec=None, greedy: bool = False):
        """One new token per slot at position length(slot), all slots in one step; returns
        float32 [len(slots), V], or with greedy the argmax ids, int64 [len(slots)] on the device.
        On CUDA the step replays a CUDA graph when every layer runs batched (dense kernel, fused
        plans); reference plans run eagerly, one slot at a time. A graphed step takes its argmax
        inside the graph and keeps ids and positions for the next step: greedy ids passed back
        as the next step's tokens for the same slots are not copied (they stay valid until
        that graph's next replay: copy them to keep them)."""
        slots = [self._check_slot(s) for s in _as_list(slots, "slots")]
        tokens = self._step_tokens(tokens, len(slots))
        if len(slots) != len(tokens) or not slots:
            raise VattnError(f"decode takes one token per slot: got {len(slots)} slots and {len(tokens)} tokens")
        if len(set(slots)) != len(slots):
            raise VattnError(f"slots must be distinct in one step, got {slots}")
        for s in slots:
            if self._len[s] + 1 > self.max_len:
                raise VattnError(f"slot {s} holds {self._len[s]} tokens = max_len; it cannot take another "
                                 "(end the request or build the Runner with a larger max_len)")
        for s in slots:  # VattnOutOfMemory: no token was written, lengths unchanged
            self.kv.grow([s], self._len[s] + 1)
        plan = self.plan(spec)
        pos = [self._len[s] for s in slots]
        why = self._graph_misfit(plan)
        with torch.inference_mode():
            if why is None:
                out = self._replay(plan, slots, tokens, pos, greedy)
            else:
                if self.device.type == "cuda" and self.graphs:
                    self.graph_notes.setdefault(str(plan.spec) if plan else "dense", why)
                dev = self.device
                tok = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens, device=dev)
                out = self._step(tok, torch.tensor(slots, device=dev),
                                 torch.tensor(pos, device=dev), max(pos) + 1, plan, len(slots),
                                 host=(slots, pos))
                if greedy:
                    out = out.argmax(-1)
        for s in slots:
            self._len[s] += 1
            self._decoded[s] += 1
        return out

    def _step_tokens(self, tokens, n: int):
        """decode's tokens: host ids (checked), or int64 [n] on the runner's device, the model's
        own sampled ids (not read back: the next step launches before the host sees them)."""
        if not isinstance(tokens, torch.Tensor) or tokens.device.type == "cpu":
            return self.check_ids(tokens, "tokens")
        if tokens.device.type != self.device.type or tokens.dtype != torch.long or tokens.shape != (n,):
            raise VattnError(f"device tokens must be int64 [{n}] on {self.device} (one per slot), got "
                             f"{tokens.dtype} {tuple(tokens.shape)} on {tokens.device}")
        return tokens

    def _step(self, tok, slot_idx, pos, nview: int, plan, bucket: int, host=None):
        """The decode step. tok, slot_idx, pos: int64 [b] on the device. Batched layers attend
        the first nview keys of every slot row (no host sync: a graph captures this); with
        host=(slots, positions) other layers run slot by slot over each slot's own keys."""
        a, S, dev = self.arch, self.S, self.device
        hq = a.heads
        ends = torch.zeros(S, dtype=torch.long, device=dev).index_put_((slot_idx,), pos + 1)
        ends32 = ends.to(torch.int32)
        zero = torch.zeros_like(ends)
        ctxs = {}  # plan context per window (None: full attention), built once per step
        counts, layers_at = [], {}  # sparse layers' key counts and windows: density once per step
        every = self.batched(None) and (plan is None or self.batched(plan))  # every layer batched

        def batched(i, q, K, V, w, sparse):
            qf = q if every else q.new_zeros(S, *q.shape[1:]).index_put_((slot_idx,), q)
            K, V = K[:, :, :nview], V[:, :, :nview]
            starts = (ends - w).clamp(min=0) if w else zero
            if not sparse:
                return self._dense_batched(i, qf, K, V, starts, ends, ends32, w, bucket, slot_idx)
            if w not in ctxs:  # the merge writes the step's rows in batch order (pick)
                ctxs[w] = plan.context(starts, ends[:, None], a.scale, w is None, pick=slot_idx)
            plan.append(i, K, V, ctxs[w])
            o, sel = plan.run(i, qf, K, V, ctxs[w])
            counts.append(sel.count)
            layers_at[w] = layers_at.get(w, 0) + 1
            return o

        def per_slot(i, q, K, V, w, sparse):
            outs = []
            for j, (s, p) in enumerate(zip(*host)):
                n = p + 1
                st = max(0, n - w) if w else 0
                qj, Kj, Vj = q[j:j + 1], K[s:s + 1, :, :n], V[s:s + 1, :, :n]
                starts = torch.tensor([st], device=dev)
                ends_j = torch.tensor([[n]], device=dev)
                if not sparse:
                    from vattn.attend import dense_attend
                    outs.append(dense_attend(qj, Kj, Vj, ends_j[0], starts, a.scale))
                    continue
                pl = self.plan(plan.spec, s)
                ctx = pl.context(starts, ends_j, a.scale, st == 0)
                pl.append(i, Kj, Vj, ctx)
                o, sel = pl.run(i, qj, Kj, Vj, ctx)
                self._att[s] += sel.count.sum().double() * (hq // sel.count.shape[1])
                self._allowed[s] += (n - st) * hq
                outs.append(o)
            return torch.cat(outs, 0)

        def attend(i, q, k, v):  # k, v: already in the cache (forward's cache=)
            K, V = self.kv.k(i), self.kv.v(i)
            sparse = self.sparse_layer(i, plan)
            w = a.windows[i]
            if self.batched(plan if sparse else None):
                return batched(i, q, K, V, w, sparse)
            return per_slot(i, q, K, V, w, sparse)

        # every layer batched: the model writes q straight into the all-slots buffer
        h = self.model.forward(tok[:, None], pos[:, None], attend,
                               cache=self._cache_at(slot_idx, self._queries() if every else None))
        if counts:
            self._count_density(counts, layers_at, ends)
        return self.model.logits(h[:, 0])

    def _count_density(self, counts, layers_at, ends):
        """Add a batched step's keys attended and keys allowed per slot row (a few launches a
        step, not a few per layer). counts: each sparse layer's Selection.count [S, H, T] (H
        the KV heads of a shared selection, else the query heads); layers_at: window -> how
        many sparse layers attended with it (a window allows min(end, window) keys)."""
        hq = self.arch.heads
        by_heads = {}
        for c in counts:
            by_heads.setdefault(c.shape[1], []).append(c)
        for h, cs in by_heads.items():
            self._att.add_(torch.stack(cs).sum((0, 2, 3)).double(), alpha=hq // h)
        allowed = sum(n * (ends.clamp(max=w) if w else ends) for w, n in layers_at.items())
        self._allowed.add_(allowed.double(), alpha=hq)

    def _cache_at(self, rows, queries=None):
        """forward's cache=: layer -> (K, V, the slot of each batch row[, the all-slots query
        buffer]); the model writes there."""
        if queries is None:
            return lambda i: (self.kv.k(i), self.kv.v(i), rows)
        return lambda i: (self.kv.k(i), self.kv.v(i), rows, queries)

    def _queries(self):
        """[S, Hq, 1, D], one per runner (captured graphs write it): rows of slots outside a
        step keep an older query (finite; their rows have no keys in that step)."""
        if self._qbuf is None:
            a = self.arch
            self._qbuf = torch.zeros(self.S, a.heads, 1, a.head_dim, dtype=self.dtype, device=self.device)
        return self._qbuf

    def _dense_batched(self, i, q, K, V, starts, ends, ends32, window, bucket, slot_idx):
        """Dense attention of the step's slot rows on CUDA, in batch order: the split-KV kernel
        over every slot row, split for the step's bucket (rows without keys exit at once; its
        merge gathers the step's rows), or the window's streaming plan."""
        a = self.arch
        if window is None:
            from vattn.kernels.decode import dense_decode, plan_splits
            splits, _ = plan_splits(bucket * a.kv_heads, K.shape[2], 64, self.device)
            return dense_decode(q, K, V, ends32, a.scale, splits=splits, pick=slot_idx)
        plan = self._window_plan(window)
        return plan.run(i, q, K, V, plan.context(starts, ends[:, None], a.scale, pick=slot_idx))[0]

    # ------------------------------------------------------------ CUDA graphs
    def _graph_misfit(self, plan) -> str | None:
        """None when a decode step with this plan can be captured, else why it runs eagerly."""
        if not self.graphs:
            return "graphs are off"
        if not _kernel_fits_dims(self.arch.head_dim, self.dtype):
            return f"head dim {self.arch.head_dim} / {self.dtype} do not fit the Triton decode kernels"
        if plan is not None and not self.batched(plan):
            return f"plan path {plan.path!r} runs slot by slot (reference code: host syncs, whole-view reads)"
        if plan is not None and getattr(plan, "graph_safe", True) is False:
            return f"plan path {plan.path!r} cannot be captured in a CUDA graph"
        return None

    def _replay(self, plan, slots, tokens, pos, greedy: bool):
        b = len(slots)
        bucket = min(next_pow2(b), self.S)
        nview = length_bucket(max(pos) + 1, self.max_len)
        key = (str(plan.spec) if plan is not None else "dense", bucket, nview)
        g = self._graphs.get(key)
        if g is not None and g["next"] == (slots, pos) and _is_view(tokens, g["inputs"][0], b):
            g["graph"].replay()  # the graph's own ids and positions from its last replay: no copy in
        else:
            pad = bucket - b
            # inputs [4, bucket]: ids, slots, positions, and the row whose argmax each row takes
            # next (padding repeats row 0 in all four)
            rows, ids = [slots + slots[:1] * pad, pos + pos[:1] * pad, list(range(b)) + [0] * pad], None
            if isinstance(tokens, torch.Tensor):  # the model's own ids, on the device: no sync
                ids = torch.cat([tokens, tokens[:1].expand(pad)]) if pad else tokens
            else:
                rows.insert(0, tokens + tokens[:1] * pad)
            # pinned, copied without blocking: the host never waits for the steps already queued
            host = torch.tensor(rows, dtype=torch.long).pin_memory()
            if g is None:
                inputs = host.to(self.device)
                g = self._capture(key, plan, inputs if ids is None else torch.cat([ids[None], inputs]), nview, bucket)
            else:
                if ids is not None:
                    g["inputs"][0].copy_(ids, non_blocking=True)
                g["inputs"][4 - len(rows):].copy_(host, non_blocking=True)
                g["graph"].replay()
        g["next"] = (slots, [p + 1 for p in pos])
        return g["inputs"][0][:b] if greedy else g["out"][:b].clone()

    def _capture(self, key, plan, inputs, nview, bucket):
        """Warm up (Triton compiles, cuBLAS workspaces) on a side stream with this step's real
        inputs, then capture; the capture's replay is this step. Warm-up rewrites the same K/V
        the step writes; the density counters are put back as they were. The graph ends by
        writing the step's argmax ids and the next positions into its own inputs."""
        from vattn.kernels.argmax import next_ids
        saved = (self._att.clone(), self._allowed.clone())
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                out = self._step(inputs[0], inputs[1], inputs[2], nview, plan, bucket)
                next_ids(out, inputs[3], inputs[0].clone(), inputs[2].clone())  # (compiled, inputs kept)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._att.copy_(saved[0])
        self._allowed.copy_(saved[1])
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(inputs[0], inputs[1], inputs[2], nview, plan, bucket)
            next_ids(out, inputs[3], inputs[0], inputs[2])
        self._graphs[key] = g = {"graph": graph, "inputs": inputs, "out": out}
        log.info("captured a decode graph: spec %s, batch bucket %d, keys %d", *key)
        graph.replay()
        return g

    def fill_random(self, slot: int, n: int, seed: int = 0) -> None:
        """Benchmarks: unit-normal K and V for tokens [0, n) of `slot`, as if a prompt of n
        tokens had been prefilled (no model run; plans build their state from these keys)."""
        self._check_slot(slot)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_len:
            raise VattnError(f"n must be an int in [1, max_len={self.max_len}], got {n!r}")
        self.kv.grow([slot], n)
        g = torch.Generator(device=self.device).manual_seed(seed)
        for i in range(self.arch.layers):
            self.kv.k(i)[slot, :, :n].normal_(generator=g)
            self.kv.v(i)[slot, :, :n].normal_(generator=g)
        self._len[slot] = n

    # ------------------------------------------------------------ checks
    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.S:
            raise VattnError(f"slot {slot!r} does not exist: slots are 0..{self.S - 1} (max_batch={self.S})")
        if not self._alloc[slot]:
            raise VattnError(f"slot {slot} is not allocated; call alloc() first")
        return slot

    def check_ids(self, ids, what) -> list:
        ids = _as_list(ids, what)
        v = self.arch.vocab
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < v:
                raise VattnError(f"{what} must be token ids, ints in [0, {v}), got {t!r}")
        return ids

    def close(self):
        """Give the KV cache's memory back (the graphs that view it are dropped first)."""
        self._graphs.clear()
        self.kv.close()


class StepIds:
    """A decode step's sampled ids, copied to pinned host memory as soon as they are queued, so a
    read waits for that step only. (ids.tolist() once the next step is launched queues its copy
    behind that step: the host waits a step more, and the GPU idles while the host launches the
    one after: 0.3 ms a step at B=1 on an H200.) .ids: the device tensor, the next step's input."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self._event = ids, None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(ids.device))  # the copy's stream: that of ids' device
        else:
            self._host = ids

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def _is_view(tokens, buf: torch.Tensor, b: int) -> bool:
    """Whether tokens are buf's first b entries (a graph's ids, passed back)."""
    return (isinstance(tokens, torch.Tensor) and tokens.shape == (b,) and tokens.data_ptr() == buf.data_ptr()
            and tokens.device == buf.device)


def prefill_attention(q, k, v, start: int, window, scale: float):
    """Causal attention of T queries at positions start.. over keys 0..start+T-1 (a sliding
    window keeps keys > pos - window). q [1, Hq, T, D]; k, v [1, Hkv, start+T, D]."""
    t, n = q.shape[2], k.shape[2]
    lo = max(0, start - window + 1) if window else 0
    k, v = k[:, :, lo:], v[:, :, lo:]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if lo == 0 and start == 0 and (window is None or window >= t):
        return sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    qpos = torch.arange(start, start + t, device=q.device)[:, None]
    kpos = torch.arange(lo, n, device=q.device)[None]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    if q.device.type == "cuda":  # the memory-efficient kernel takes a mask but not GQA
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return sdpa(q, k, v, attn_mask=mask, scale=scale)
    return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _kernel_fits_dims(d: int, dtype) -> bool:
    return d in (16, 32, 64, 128, 256) and dtype in (torch.float16, torch.bfloat16, torch.float32)


def _as_list(x, what) -> list:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, (int, str)) or not hasattr(x, "__iter__"):
        raise VattnError(f"{what} must be a list of ints, got {x!r}")
    return list(x)


def _dense_set(dense_layers, n: int) -> frozenset:
    """dense_layers: None/0 = none, an int k = the first k layers, or a collection of layer ids."""
    if dense_layers is None:
        return frozenset()
    if isinstance(dense_layers, bool):
        raise VattnError(f"dense_layers must be an int or a list of layer ids, got {dense_layers!r}")
    if isinstance(dense_layers, int):
        if dense_layers < 0:
            raise VattnError(f"dense_layers must be >= 0, got {dense_layers}")
        return frozenset(range(min(dense_layers, n)))
    ids = frozenset(_as_list(dense_layers, "dense_layers"))
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise VattnError(f"dense_layers holds {bad}: layer ids are 0..{n - 1}")
    return ids
