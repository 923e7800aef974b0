"""`vattn serve --ray --replicas N`: N engine replicas under Ray Serve behind one HTTP endpoint.

Each replica is a Ray Serve deployment replica that loads its own engine (Runner + Scheduler,
one GPU each on CUDA) and answers with the same FastAPI app as the single-process server;
Ray Serve's proxy routes requests among them. /metrics and /health answer for the replica the
request reached. Needs `pip install "vattn[ray]"` (ray[serve]).
"""
from __future__ import annotations

import logging

from vattn.errors import VattnError

log = logging.getLogger(__name__)

APP_NAME = "vattn"


def _serve():
    try:
        from ray import serve
    except ImportError as e:
        raise VattnError(f"--ray needs Ray Serve: pip install 'vattn[ray]' ({e})") from None
    return serve


def replica_class():
    """The deployment class (built on call so that importing this module does not import ray)."""
    serve = _serve()

    @serve.ingress()  # the app is built per replica, after __init__, by __serve_build_asgi_app__
    class VattnReplica:
        def __init__(self, engine_kwargs: dict):
            from vattn.serve.app import load_engine
            self.engine = load_engine(**engine_kwargs)
            self.engine.scheduler.start()

        def __serve_build_asgi_app__(self):
            from vattn.serve.app import build_app
            return build_app(self.engine)

        def check_health(self):  # Ray Serve restarts a replica whose engine loop died
            if not self.engine.scheduler.alive:
                raise RuntimeError("the vattn engine loop stopped")

    return VattnReplica


def serve_ray(engine_kwargs: dict, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
              blocking: bool = True, ray_address: str | None = None):
    """Start (or join, with ray_address) a Ray cluster and run `replicas` engines on host:port.
    Each replica takes one GPU when engine_kwargs' device is CUDA (or unset on a GPU machine)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise VattnError(f"--replicas must be an int >= 1, got {replicas!r}")
    import ray
    serve = _serve()
    device = str(engine_kwargs.get("device") or "")
    gpus = 0 if device == "cpu" else (1 if device.startswith("cuda") else None)
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    if gpus is None:  # unset: a GPU each when the cluster has GPUs
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if gpus and ray.cluster_resources().get("GPU", 0) < replicas:
        raise VattnError(f"{replicas} replicas need {replicas} GPUs; the Ray cluster has "
                         f"{int(ray.cluster_resources().get('GPU', 0))}; lower --replicas")
    waiting = engine_kwargs.get("max_waiting", 256) + engine_kwargs.get("max_batch", 8)
    dep = _serve().deployment(
        replica_class(), name="VattnReplica", num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if not gpus else 1},
        max_ongoing_requests=waiting,  # the replica's own queue and its 429 decide, not Ray's
        health_check_period_s=10)
    serve.start(http_options={"host": host, "port": port})
    log.info("Ray Serve: %d vattn replicas on http://%s:%d", replicas, host, port)
    return serve.run(dep.bind(engine_kwargs), name=APP_NAME, route_prefix="/", blocking=blocking)


def shutdown() -> None:
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()
