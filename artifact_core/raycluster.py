"""Connecting to Ray and checking, before any work is scheduled, that the work fits."""

from __future__ import annotations

import logging

import ray

log = logging.getLogger(__name__)


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot host the requested workers; Ray would wait for them forever."""


def ensure_ray() -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        ray.init()


def check_fits(*, num_workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
               reserved_cpus: float = 0.0, what: str = "training") -> None:
    """Raise :class:`ClusterTooSmallError` unless ``num_workers`` bundles fit on the live nodes.

    Packs workers node by node the way a placement group can, so "8 CPUs in total"
    does not pass for eight 1-CPU nodes asked to host two 4-CPU workers.
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    free = [[n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)] for n in nodes]
    total_cpu = sum(c for c, _ in free)
    total_gpu = sum(g for _, g in free)
    need = (f"{num_workers} worker(s) x {cpus_per_worker:g} CPU"
            + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
            + (f", plus {reserved_cpus:g} CPU for other tasks" if reserved_cpus else ""))
    have = f"the cluster has {len(nodes)} node(s) with {total_cpu:g} CPU and {total_gpu:g} GPU"
    if gpus_per_worker and total_gpu == 0:
        raise ClusterTooSmallError(f"{what} asked for GPUs but {have}; drop --use-gpu or add GPU nodes")
    placed = 0
    for res in sorted(free, key=lambda r: -r[0]):
        while placed < num_workers and res[0] >= cpus_per_worker and res[1] >= gpus_per_worker:
            res[0] -= cpus_per_worker
            res[1] -= gpus_per_worker
            placed += 1
    left = sum(c for c, _ in free)
    if placed < num_workers or left + 1e-9 < reserved_cpus:
        raise ClusterTooSmallError(
            f"{what} needs {need}, but {have} (room for {placed} worker(s)); "
            f"lower --num-workers or --cpus-per-worker, or add nodes"
        )
