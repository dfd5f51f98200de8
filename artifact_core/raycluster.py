"""Connecting to Ray and making sure, before any work is scheduled, that the work fits.

On a fixed cluster the jobs stop at once with one line when the workers cannot fit (Ray
would wait for them forever). On a cluster with an autoscaler (KubeRay, ``ray up``, a
0-CPU head that grows on demand) they ask the autoscaler for what they need (a placement
group that stands in for the work), wait for it up to ``--wait-for-resources``
seconds and log what is still pending; the same one-line error comes only when the
cluster cannot grow enough or the wait runs out.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import ray

log = logging.getLogger(__name__)

#: How long the jobs wait for an autoscaler by default (``--wait-for-resources``); node
#: start-up on a cloud (VM boot, image pull) takes minutes.
AUTOSCALER_WAIT_S = 600.0
#: Seconds between two "still waiting" log lines.
LOG_EVERY_S = 15.0
_POLL_S = 1.0
# Node types the autoscaler monitor makes up for nodes of a cluster without an autoscaler.
_READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot host the requested workers; Ray would wait for them forever."""


@dataclass(frozen=True)
class NodeGroup:
    """One node type an autoscaler can launch: resources per node and how many at most (-1: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int
    min_count: int = 0

    @property
    def grows(self) -> bool:
        """Whether the autoscaler may add nodes of this type beyond its minimum."""
        return self.max_count == -1 or self.max_count > self.min_count


@dataclass(frozen=True)
class Autoscaler:
    """What the driver can learn about the cluster's autoscaler.

    ``groups`` is None when the node types are not published to the driver (Ray 2.60's
    autoscalers, v1, v2 and KubeRay's, keep their config to themselves); every request then
    counts as feasible and only the wait limits it.
    """

    source: str
    groups: tuple[NodeGroup, ...] | None = None

    def infeasible(self, bundle: dict[str, float]) -> bool:
        """True when no node type the autoscaler can launch holds ``bundle``."""
        if self.groups is None:
            return False
        # (memory a node type does not declare is unknown, not zero)
        return not any(g.max_count != 0 and all(g.resources.get(k, math.inf if k == "memory" else 0.0) >= v
                                                for k, v in bundle.items() if v)
                       for g in self.groups)

    def max_resources(self) -> dict[str, float] | None:
        """CPU and GPU of the largest cluster the autoscaler may build (None if unknown or unbounded)."""
        if self.groups is None or any(g.max_count == -1 for g in self.groups):
            return None
        return {k: sum(g.resources.get(k, 0.0) * g.max_count for g in self.groups) for k in ("CPU", "GPU")}


def ensure_ray() -> None:
    """Attach to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        ray.init()


def detect_autoscaler() -> Autoscaler | None:
    """The cluster's autoscaler, or None when the cluster cannot grow.

    Asks, in order: a cluster config reported to the GCS (node groups with their resources
    and maximum counts; the GCS has room for one, though Ray 2.60's own autoscalers report
    none), the GCS flag of autoscaler v2 (``ray up`` and KubeRay with v2), and the status the
    v1 autoscaler monitor writes (a cluster started without ``--autoscaling-config`` only has
    made-up ``node_<id>`` types there).
    """
    groups = _published_groups()
    if groups is not None:
        growable = [g for g in groups if g.grows]
        return Autoscaler("cluster config", tuple(groups)) if growable else None
    if _autoscaler_v2_enabled():
        return Autoscaler("autoscaler v2")
    if _v1_monitor_has_node_types():
        return Autoscaler("autoscaler")
    return None


def _published_groups() -> list[NodeGroup] | None:
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or unusual GCS: fall back to the other signals
        log.debug("no cluster config in the GCS", exc_info=True)
        return None
    if config is None or not config.node_group_configs:
        return None
    groups = []
    for g in config.node_group_configs:
        # A fixed-size group (min == max) does not grow the cluster, but its nodes are part of
        # it: one still starting can hold the work (infeasible, max_resources).
        groups.append(NodeGroup(g.name, dict(g.resources), g.max_count, g.min_count))
    return groups


def _autoscaler_v2_enabled() -> bool:
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2(fetch_from_server=True))
    except Exception:  # noqa: BLE001
        log.debug("cannot read the autoscaler v2 flag", exc_info=True)
        return False


def _v1_monitor_has_node_types() -> bool:
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001
        log.debug("cannot read the autoscaler status", exc_info=True)
        return False
    if not raw:
        return False
    try:
        status = json.loads(raw)
    except ValueError:
        log.debug("unreadable autoscaler status", exc_info=True)
        return False
    report = (status.get("autoscaler_report") if isinstance(status, dict) else None) or {}
    if not isinstance(report, dict):
        return False
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    types |= set((report.get("node_type_mapping") or {}).values())
    return any(not _READONLY_NODE_TYPE.fullmatch(t) for t in types)


#: Ray's resolution of fractional resources (ray_constants.MIN_RESOURCE_GRANULARITY = 0.0001).
RESOURCE_UNITS = 10_000


def units(x: float) -> int:
    """``x`` CPUs or GPUs in Ray's own unit (1/10000): 20 workers of 0.1 CPU fill 2 CPUs
    exactly, where subtracting floats would leave 0.0999... for the last one."""
    return round(x * RESOURCE_UNITS)


def _place_workers(free: list[list[float]], num_workers: int, cpu: int, gpu: int, memory: float = 0.0) -> int:
    """Place up to ``num_workers`` workers on ``free`` ([CPU, GPU units, memory] left per node,
    taken from as they are placed), fullest node first as a placement group packs; returns
    how many were placed."""
    placed = 0
    for res in sorted(free, key=lambda r: -r[0]):
        while placed < num_workers and res[0] >= cpu and res[1] >= gpu and res[2] >= memory:
            res[0] -= cpu
            res[1] -= gpu
            res[2] -= memory
            placed += 1
    return placed


def _shortfall(num_workers: int, cpus_per_worker: float, gpus_per_worker: float, reserved_cpus: float,
               nodes: list[dict[str, float]], memory_per_worker: float = 0.0) -> tuple[int, str | None]:
    """How many workers fit on ``nodes`` (total resources per node) and what is missing, if anything.

    Packs workers node by node the way a placement group can, so "8 CPUs in total"
    does not pass for eight 1-CPU nodes asked to host two 4-CPU workers.
    """
    # Memory in bytes; a node that reports none (not a Ray node's view) does not limit it.
    free = [[units(n.get("CPU", 0.0)), units(n.get("GPU", 0.0)), n.get("memory", math.inf)] for n in nodes]
    total_cpu = sum(r[0] for r in free) / RESOURCE_UNITS
    total_gpu = sum(r[1] for r in free) / RESOURCE_UNITS
    have = f"the cluster has {len(nodes)} node(s) with {total_cpu:g} CPU and {total_gpu:g} GPU"
    if memory_per_worker:
        largest = max((r[2] for r in free), default=0.0)
        have += f" (at most {largest / 2**30:.1f} GiB of Ray memory on one node)" if math.isfinite(largest) else ""
    placed = _place_workers(free, num_workers, units(cpus_per_worker), units(gpus_per_worker), memory_per_worker)
    # The reserved CPUs are one bundle (scoring's decode tasks): they must fit on one node.
    if placed < num_workers or max((r[0] for r in free), default=0) < units(reserved_cpus):
        return placed, have
    return placed, None


def groups_that_fit(nodes: list[dict[str, float]], *, num_workers: int, cpus_per_worker: float,
                    gpus_per_worker: float = 0.0, reserved_cpus: float = 0.0, limit: int = 10_000) -> int:
    """How many groups of ``num_workers`` workers (plus ``reserved_cpus`` on one node, as
    :func:`_shortfall` places them) fit on ``nodes`` at once, packed node by node: a sweep's
    trials, whose workers cannot share a CPU across nodes. Total CPUs overcount: three
    3-CPU nodes hold one trial of two 2-CPU workers at a time, not two."""
    free = [[units(n.get("CPU", 0.0)), units(n.get("GPU", 0.0)), math.inf] for n in nodes]
    cpu, gpu, reserved = units(cpus_per_worker), units(gpus_per_worker), units(reserved_cpus)
    groups = 0
    while groups < limit:
        trial = [list(r) for r in free]
        placed = _place_workers(trial, num_workers, cpu, gpu)
        room = max(trial, key=lambda r: r[0], default=None)
        if placed < num_workers or (reserved and (room is None or room[0] < reserved)):
            return groups
        if reserved:
            room[0] -= reserved
        free = trial
        groups += 1
    return groups


def live_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _request(bundles: list[dict[str, float]]) -> Callable[[], None]:
    """Ask for ``bundles`` as the job's own work will: a placement group that waits for them,
    which any autoscaler (v1, v2, KubeRay) counts as pending demand; returns its withdrawal.

    Not ``request_resources``: that is one standing floor for the whole cluster that every
    call replaces, so two jobs waiting at once would cancel each other's demand, and one left
    by a killed driver keeps nodes up. A placement group is this job's alone, and Ray removes
    it with the job.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles, strategy="PACK", name=f"{_wait_group_prefix()}{uuid.uuid4().hex[:8]}")
    return lambda: remove_placement_group(group)


#: Names of the stand-in placement groups start with this, the job's id and a dash.
WAIT_GROUP_PREFIX = "artifact-core-wait-"


def _wait_group_prefix() -> str:
    return f"{WAIT_GROUP_PREFIX}{ray.get_runtime_context().get_job_id()}-"


def remove_wait_groups() -> list[str]:
    """Remove the stand-in placement groups of this job's waits that are still there; returns
    their names. A sweep calls it when its trials are done: a trial actor that died while it
    waited (a preempted node) ran no cleanup, and Ray removes a group only with its job, so
    the group, once placed, would hold a trial's resources until the sweep ends. Never raises."""
    from ray.util.placement_group import get_placement_group, placement_group_table, remove_placement_group

    removed = []
    try:
        prefix = _wait_group_prefix()
        for info in placement_group_table().values():
            name = info.get("name") or ""
            if name.startswith(prefix) and info.get("state") != "REMOVED":
                remove_placement_group(get_placement_group(name))
                removed.append(name)
    except Exception:  # noqa: BLE001 - never hide the job's own outcome
        log.warning("could not remove the placement groups left by waits for nodes", exc_info=True)
    return removed


def check_fits(*, num_workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0,
               memory_per_worker: float = 0.0, reserved_cpus: float = 0.0, what: str = "training",
               wait_s: float | None = None,
               autoscaler: Autoscaler | None | Callable[[], Autoscaler | None] = detect_autoscaler,
               nodes: Callable[[], list[dict[str, float]]] = live_nodes,
               request: Callable[[list[dict[str, float]]], Callable[[], None]] = _request,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once ``num_workers`` bundles (plus ``reserved_cpus``) fit the cluster, else raise.

    Args:
        memory_per_worker: Ray ``memory`` (bytes) each worker reserves (scoring's actors do).
        wait_s: how long to wait for nodes to join; None = :data:`AUTOSCALER_WAIT_S` when the
            cluster has an autoscaler, 0 when it has none. 0 never waits; an explicit wait also
            waits on a cluster without autoscaler (nodes started by hand).
        autoscaler, nodes, request, clock, sleep: seams for tests; the defaults ask the live cluster.

    Raises:
        ClusterTooSmallError: the work does not fit and there is nothing to wait for (no autoscaler
            and no explicit wait, or no node type the autoscaler can launch holds one worker), or
            the wait ran out.
    """
    need = (f"{num_workers} worker(s) x {cpus_per_worker:g} CPU"
            + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
            + (f" + {memory_per_worker / 2**30:.1f} GiB memory" if memory_per_worker else "")
            + (f", plus {reserved_cpus:g} CPU for other tasks" if reserved_cpus else ""))
    live = nodes()
    placed, have = _shortfall(num_workers, cpus_per_worker, gpus_per_worker, reserved_cpus, live, memory_per_worker)
    if have is None:
        return
    scaler = autoscaler() if callable(autoscaler) else autoscaler
    wait = (AUTOSCALER_WAIT_S if scaler else 0.0) if wait_s is None else float(wait_s)
    bundle = {"CPU": float(cpus_per_worker), **({"GPU": float(gpus_per_worker)} if gpus_per_worker else {}),
              **({"memory": float(memory_per_worker)} if memory_per_worker else {})}
    if wait <= 0:
        if gpus_per_worker and not any(n.get("GPU", 0.0) for n in live):
            raise ClusterTooSmallError(f"{what} asked for GPUs but {have}; drop --use-gpu or add GPU nodes")
        why = ("it has no autoscaler (--wait-for-resources SECONDS waits for nodes to join)" if scaler is None
               else "--wait-for-resources is 0")
        raise ClusterTooSmallError(f"{what} needs {need}, but {have} (room for {placed} worker(s)) and {why}; "
                                   f"lower --num-workers or --cpus-per-worker, or add nodes")
    if scaler is not None and scaler.infeasible(bundle):
        raise ClusterTooSmallError(
            f"{what} needs {need}, but {have} (room for {placed} worker(s)) and no node type its autoscaler "
            f"({scaler.source}) can launch holds one worker; lower --cpus-per-worker or add a node type")
    bundles = [dict(bundle) for _ in range(num_workers)] + ([{"CPU": float(reserved_cpus)}] if reserved_cpus else [])
    # Without a detected autoscaler the stand-in does no harm (placed for a moment once nodes
    # join), and an explicit --wait-for-resources still waits for nodes started by hand or by
    # an outside scaler.
    log.info("%s needs %s, but %s; %s, waiting up to %gs (--wait-for-resources)", what, need, have,
             f"asked the {scaler.source} for it" if scaler else "no autoscaler found, waiting for nodes to join", wait)
    withdraw = request(bundles)
    start = last_log = clock()
    try:
        while True:
            sleep(_POLL_S)
            placed, have = _shortfall(num_workers, cpus_per_worker, gpus_per_worker, reserved_cpus, nodes(),
                                      memory_per_worker)
            now = clock()
            if have is None:
                log.info("%s: resources arrived after %.0fs", what, now - start)
                return
            if now - start >= wait:
                raise ClusterTooSmallError(
                    f"{what} waited {wait:g}s for more nodes, still pending: {need} "
                    f"({have}, room for {placed} worker(s)); raise --wait-for-resources, check the "
                    f"autoscaler's node limits and logs (`ray status`), or lower --num-workers")
            if now - last_log >= LOG_EVERY_S:
                last_log = now
                log.info("%s: waiting for resources (%.0fs of %gs): pending %s, %s, room for %d worker(s)",
                         what, now - start, wait, need, have, placed)
    finally:
        # The stand-in goes once the nodes are there (the job's own work takes them) or the
        # wait is over (so the cluster can scale down again).
        try:
            withdraw()
        except Exception:  # noqa: BLE001 - never hide the job's own outcome
            log.warning("could not remove the placement group that stood in for the work", exc_info=True)
