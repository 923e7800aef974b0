"""Equal-density comparisons: tune each spec to a target measured density.

Knobs, tried in order: verified's eps (density falls as eps grows), then one
factor that scales every size (sink, window, top-k sizes, uniform rate, magicpig's L).
Bisection in log space on a small calibration set (three samples per length from
different tasks, seeds nobody evaluates); one dense prefill per calibration sample
serves every probe.

Results are looked up before anything is measured, by a key of model identity and
suite settings (`calibration_key`): in the run directory's calibration.json, in the
calibrations shipped with vattn (vattn/eval/data/calibration.json, the embedded model's
default suite), then in the user cache ($VATTN_CACHE_DIR or ~/.cache/vattn). Only a
missing entry, or `recalibrate=True`, measures. Each probe's density is checkpointed in
the run directory as it is measured, so a killed calibration resumes at its next probe.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Callable

from vattn.eval.tasks import make_sample

CALIBRATION_SEED = 1_000_000  # calibration samples never coincide with evaluated ones
CALIBRATION_SAMPLES = 3  # per length, from the first tasks: one task's density is not another's
CALIBRATION_VERSION = 2  # part of every key: bump when the procedure or the density measure changes
SHIPPED = Path(__file__).parent / "data" / "calibration.json"
VACUOUS_EPS = 0.5  # a verified bound at or above this relative error says little: flagged in tables

log = logging.getLogger(__name__)

# The field that sets each part's size; magicpig's density grows with its table count L.
SIZE_FIELDS = {"sink": "n", "window": "n", "topk": "k", "uniform": "rate", "quest": "budget",
               "hashtopk": "k", "doublesparse": "k", "squeezed": "k", "magicpig": "L"}


def _num(v) -> str:
    if not isinstance(v, float):
        return repr(v)
    t = f"{v:.4g}"
    return t if any(c in t for c in ".en") else t + ".0"  # a float stays a fraction, never a count


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _is_default(p, f) -> bool:
    """Whether field f of part p holds its default; a None default is resolved by the part
    (verified's share and heavy depend on its draws), so compare with what it resolves to."""
    d, v = _default(f), getattr(p, f.name)
    if d is None and v is not None:
        try:
            return getattr(replace(p, **{f.name: None}), f.name) == v
        except Exception:  # noqa: BLE001 (a part that refuses None: not a default)
            return False
    return v == d


def render(parts, short: bool = False) -> str:
    """Spec text for a list of parts: every field written out, so the log is exact; with
    short=True only the fields that differ from their defaults (for tables)."""
    out = []
    for p in parts:
        # short keeps a part's first field (its size) even at its default: topk(k=0.05), not topk
        args = ",".join(f"{f.name}={_num(getattr(p, f.name))}" for i, f in enumerate(fields(p))
                        if not (short and i > 0 and _is_default(p, f)))
        out.append(f"{p.name}({args})" if args else p.name)
    return "+".join(out)


def short_spec(text: str) -> str:
    """`text` with default-valued fields dropped; `text` itself when it does not parse."""
    try:
        from vattn.spec import parse
        return render(parse(text).parts, short=True)
    except Exception:  # a label only: never fail a table over it
        return text


def bound(text: str) -> tuple[float, float] | None:
    """(eps, delta) of the verified part of a spec text; None when it has none."""
    try:
        from vattn.spec import parse
        parts = parse(text).parts
    except Exception:
        return None
    v = next((p for p in parts if p.name == "verified"), None)
    return None if v is None else (float(v.eps), float(v.delta))


def vacuous(text: str) -> bool:
    """True when the spec's verified bound allows a relative error >= VACUOUS_EPS."""
    b = bound(text)
    return b is not None and b[0] >= VACUOUS_EPS


def _with_eps(parts, eps: float):
    return [replace(p, eps=eps) if p.name == "verified" else p for p in parts]


def _scaled(parts, s: float):
    out = []
    for p in parts:
        f = SIZE_FIELDS.get(p.name)
        if f is None:
            out.append(p)
            continue
        v = getattr(p, f)
        # Fractions stay fractions (<= 1); counts stay counts (>= 1).
        out.append(replace(p, **{f: min(1.0, v * s) if isinstance(v, float) else max(1, round(v * s))}))
    return out


def knobs(parts) -> list[tuple[str, float, float, bool]]:
    """(knob, low, high, density increases with it) for each knob `parts` has."""
    out = []
    if any(p.name == "verified" for p in parts):
        out.append(("eps", 0.01, 0.95, False))
    if any(p.name in SIZE_FIELDS for p in parts):
        out.append(("scale", 0.02, 8.0, True))
    return out


def turn(parts, knob: str, value: float):
    return _with_eps(parts, value) if knob == "eps" else _scaled(parts, value)


def max_probes(spec: str, steps: int = 8) -> int:
    """The most densities `calibrate` measures for `spec` (it often stops sooner)."""
    from vattn.spec import parse
    return 1 + sum(steps + (name == "eps") for name, *_ in knobs(parse(spec).parts))


def calibrate(measure: Callable[[str], float], spec: str, target: float,
              steps: int = 8, tol: float = 0.05,
              on_probe: Callable[[int, str, float], None] | None = None) -> tuple[str, float]:
    """(spec text, measured density) by bisection on the knobs: the densest point at or
    below `target` (within tol * target of it when one is found), so "at <= 10% density"
    claims hold on the calibration sample; above the target only when nothing is below.

    on_probe(i, spec text, density) after each measurement (i from 1; at most
    max_probes(spec, steps) of them)."""
    from vattn.spec import parse
    parts = parse(spec).parts
    count = [0]

    def measured(text):
        d = measure(text)
        count[0] += 1
        if on_probe:
            on_probe(count[0], text, d)
        return d

    def better(d, best):  # at or below the target beats above it; then closer wins
        return (d <= target, -abs(d - target)) > (best <= target, -abs(best - target))

    def done(d):
        return (1 - tol) * target <= d <= target

    best = [spec, measured(spec)]  # [text, density] of the best point so far
    log.info("calibrate %s: start density %.4f, target %.4f", spec, best[1], target)

    def probe(parts, name, value) -> float:
        text = render(turn(parts, name, value))
        d = measured(text)
        log.info("calibrate %s: %s=%.4g -> density %.4f", spec, name, value, d)
        if better(d, best[1]):
            best[:] = [text, d]
        return d

    if done(best[1]):
        return tuple(best)
    for name, lo, hi, increasing in knobs(parts):
        if name == "eps" and best[1] > target:
            # Density falls with eps: if even eps's far end stays above the target,
            # bisecting it wastes probes; go on to the sizes from that end. (Not for the
            # sizes: after a weak front, shrinking them can raise density.)
            d = probe(parts, name, hi)
            if done(d):
                return tuple(best)
            if d > target:
                parts = parse(best[0]).parts
                continue
        lo_l, hi_l = math.log(lo), math.log(hi)
        for _ in range(steps):
            mid = math.exp((lo_l + hi_l) / 2)
            d = probe(parts, name, mid)
            if done(d):
                return tuple(best)
            if (d < target) == increasing:
                lo_l = math.log(mid)
            else:
                hi_l = math.log(mid)
        # The next knob starts from the best point of this one.
        parts = parse(best[0]).parts
    return tuple(best)


def calibration_tasks(cfg) -> list[str]:
    """The tasks of the calibration samples: the first tasks, cycled to CALIBRATION_SAMPLES."""
    return [cfg.tasks[i % len(cfg.tasks)] for i in range(CALIBRATION_SAMPLES)] if cfg.tasks else []


def calibration_samples(cfg, samples, n: int, tokenizer) -> list:
    """Up to CALIBRATION_SAMPLES samples of length n from different tasks, with seeds no one
    evaluates (a JSONL-only run uses its first samples)."""
    if not cfg.tasks:
        return samples[:CALIBRATION_SAMPLES]
    return [make_sample(t, n, CALIBRATION_SEED + i, tokenizer) for i, t in enumerate(calibration_tasks(cfg))]


def calibration_key(cfg, model_id: str, spec: str, n: int) -> str:
    """What a calibrated spec depends on: the model, the spec (a preset by what it stands for,
    so changing a preset retires its calibrations), the length, the target and how density is
    measured (calibration tasks, new tokens, chat template, dtype)."""
    from vattn.spec import PRESETS
    spec = PRESETS.get(spec, spec)
    tasks = ",".join(calibration_tasks(cfg)) or "jsonl:" + ",".join(Path(p).name for p in cfg.jsonl_tasks)
    budget = cfg.max_new_tokens if cfg.max_new_tokens else "auto"
    return (f"{model_id}|{spec}|{n}|{cfg.match_density:g}|tasks={tasks}|new={budget}|chat={int(cfg.chat)}"
            f"|dtype={cfg.dtype or 'default'}|v{CALIBRATION_VERSION}")


def user_cache() -> Path:
    base = os.environ.get("VATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vattn")
    return Path(base) / "calibration.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict):
    """Write JSON atomically (a kill mid-write leaves the previous file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Store:
    """Calibrations: the run's own (RUN/calibration.json: {"done": {key: entry}, "probes":
    {key: {spec text: density}}}), the shipped ones, and the user cache."""

    def __init__(self, out: Path, recalibrate: bool = False, shipped: Path | None = None):
        self.path = out / "calibration.json"
        run = _read(self.path)
        self.run = {"done": run.get("done", {}), "probes": run.get("probes", {})}
        self.recalibrate = recalibrate
        self.shipped = _read(shipped or SHIPPED).get("done", {})
        self.cache_path = user_cache()

    def lookup(self, key: str) -> tuple[dict, str] | None:
        """(entry, where it came from) or None; with recalibrate, only this run's own new ones."""
        if key in self.run["done"]:
            entry = self.run["done"][key]
            if not self.recalibrate or entry.get("source") == "measured":
                return entry, "run"
        if self.recalibrate:
            return None
        if key in self.shipped:
            return self.shipped[key], "shipped"
        cached = _read(self.cache_path).get("done", {})
        if key in cached:
            return cached[key], "cache"
        return None

    def adopt(self, key: str, entry: dict, source: str):
        """Record in the run directory which calibration this run used."""
        self.run["done"][key] = {**entry, "source": source}
        _write(self.path, self.run)

    def probes(self, key: str) -> dict:
        return self.run["probes"].setdefault(key, {})

    def save_probe(self, key: str, text: str, density: float):
        self.probes(key)[text] = density
        _write(self.path, self.run)

    def finish(self, key: str, entry: dict):
        self.run["probes"].pop(key, None)
        self.adopt(key, entry, "measured")
        try:  # the user cache serves other run directories; failing to write it costs a recalibration
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            cached = _read(self.cache_path)
            cached.setdefault("done", {})[key] = entry
            _write(self.cache_path, cached)
        except OSError as e:
            log.warning("could not write the calibration cache %s: %s", self.cache_path, e)


def calibrate_all(evaluator, cfg, samples, out: Path, model_id: str, budget: Callable,
                  recalibrate: bool = False, on_event: Callable[[dict], None] | None = None
                  ) -> dict[tuple[str, int], str]:
    """{(spec, length): calibrated spec}, from the store or measured.

    budget(sample) -> new tokens decoded for it. on_event(event) reports progress:
    {"kind": "found", "spec", "length", "source", "run_spec", "density"},
    {"kind": "start", "spec", "length", "total"} (total: most probes),
    {"kind": "probe", "spec", "length", "i", "total", "run_spec", "density", "resumed"},
    {"kind": "done", "spec", "length", "run_spec", "density"}.
    """
    store = Store(out, recalibrate)
    target = cfg.match_density
    emit = on_event or (lambda event: None)
    # One calibration length per --lengths value; JSONL samples borrow the nearest one
    # (or, in a JSONL-only run, all use the first JSONL sample).
    anchors = sorted(cfg.lengths) if cfg.tasks else [samples[0].length]
    calibrated, prefills = {}, {}
    for n in anchors:
        for spec in cfg.specs:
            if spec == "dense":
                continue
            key = calibration_key(cfg, model_id, spec, n)
            found = store.lookup(key)
            if found is not None:
                entry, source = found
                if source != "run":
                    store.adopt(key, entry, source)
                log.info("calibration of %s at %d tokens from %s: %s", spec, n, source, entry["spec"])
                emit({"kind": "found", "spec": spec, "length": n, "source": source,
                      "run_spec": entry["spec"], "density": entry["density"]})
            else:
                entry = _measure(evaluator, cfg, samples, n, spec, target, key, store, prefills, budget, emit)
            calibrated[(spec, n)] = entry["spec"]
    result = {}
    for s in samples:
        n = min(anchors, key=lambda a: abs(a - s.length))
        for spec in cfg.specs:
            if (spec, n) in calibrated:
                result[(spec, s.length)] = calibrated[(spec, n)]
    return result


def _measure(evaluator, cfg, samples, n, spec, target, key, store, prefills, budget, emit) -> dict:
    total = max_probes(spec)
    emit({"kind": "start", "spec": spec, "length": n, "total": total})
    seen = store.probes(key)  # densities a killed run measured already: replayed, not remeasured

    def measure(text):  # adaptive budgets vary by task: average a few samples
        if text in seen:
            return seen[text]
        if n not in prefills:
            prefills[n] = [(evaluator.prefill(c), q, budget(s)) for s in
                           calibration_samples(cfg, samples, n, evaluator.tok) for c, q in [evaluator.ids(s)]]
        d = sum(evaluator.density(kv, q, text, new) for kv, q, new in prefills[n]) / len(prefills[n])
        store.save_probe(key, text, d)
        return d

    def on_probe(i, text, d):
        emit({"kind": "probe", "spec": spec, "length": n, "i": i, "total": total, "run_spec": text,
              "density": d})

    text, density = calibrate(measure, spec, target, on_probe=on_probe)
    entry = {"spec": text, "density": density}
    store.finish(key, entry)
    log.info("calibrated %s at %d tokens: %s (density %.4f)", spec, n, text, density)
    emit({"kind": "done", "spec": spec, "length": n, "run_spec": text, "density": density})
    return entry
