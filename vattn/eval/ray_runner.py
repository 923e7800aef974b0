"""Run the sweep's samples as Ray tasks; the driver appends rows as tasks finish.

One task = one sample: its dense prefill and all its specs (the prefill is the
expensive part, so it is never repeated). Each worker process loads the model
once and keeps it for the next tasks it gets. A killed run loses the samples in
flight; finished ones are already in results.jsonl.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import vattn
from vattn.errors import VattnError

log = logging.getLogger(__name__)

_EVALUATORS: dict[tuple, object] = {}  # per worker process: (model, device, dtype, chat) -> Evaluator


def evaluate_sample(cfg: dict, sample, pairs: list[tuple[str, str]]) -> list[dict]:
    """Ray task body: run one sample on this worker's (cached) model."""
    from vattn.eval.runner import Evaluator, load, resolve_device
    key = (cfg["model"], resolve_device(cfg["device"]), cfg["dtype"], cfg["chat"])
    if key not in _EVALUATORS:
        model, tok = load(cfg["model"], key[1], cfg["dtype"])
        _EVALUATORS[key] = Evaluator(model, tok, cfg["model"] or _embedded(), cfg["chat"])
    return list(_EVALUATORS[key].run_sample(sample, pairs, cfg["max_new_tokens"], cfg["match_density"]))


def _embedded() -> str:
    from vattn.eval.runner import EMBEDDED
    return EMBEDDED


class RayRuntime:
    """Starts a local Ray cluster (or joins `address`) and runs samples on it."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ModuleNotFoundError:
            raise VattnError("--ray needs Ray: pip install ray") from None
        self.ray, self.address, self.num_cpus = ray, address, num_cpus
        self.started = False

    def start(self):
        """Start or join the cluster (lazily: a resumed run with nothing left starts none)."""
        ray = self.ray
        if ray.is_initialized():
            return
        # Workers import vattn from the same source tree as the driver.
        root = str(Path(vattn.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {"env_vars": {"PYTHONPATH": path}}
        if self.address:
            ray.init(address=self.address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False,
                     runtime_env=env, log_to_driver=False)
        self.started = True

    def run(self, cfg, jobs: list, write: Callable[[dict], None]):
        if not jobs:
            return
        self.start()
        ray = self.ray
        gpus = ray.cluster_resources().get("GPU", 0) > 0 and cfg.device != "cpu"
        task = ray.remote(evaluate_sample).options(num_cpus=1, num_gpus=1 if gpus else 0, max_retries=1)
        cfg_dict = asdict(cfg)
        pending = [task.remote(cfg_dict, sample, pairs) for sample, pairs in jobs]
        log.info("submitted %d samples to Ray (%s per task)", len(pending), "1 GPU" if gpus else "1 CPU")
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for row in ray.get(ready[0]):
                write(row)

    def shutdown(self):
        if self.started:
            self.ray.shutdown()
            self.started = False
