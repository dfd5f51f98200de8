"""The fit-or-wait decision of the jobs, without a cluster: fixed nodes, an autoscaler, a wait that runs out."""

from __future__ import annotations

import logging

import pytest

from artifact_core.raycluster import Autoscaler, ClusterTooSmallError, NodeGroup, check_fits

HEAD_ONLY = [{"CPU": 0.0}]
CPU_GROUP = (NodeGroup("cpu", {"CPU": 2.0}, 1),)


class FakeCluster:
    """Nodes that appear after ``grow_after`` polls; records requests and a fake clock."""

    def __init__(self, nodes, *, grow_to=None, grow_after=None):
        self.current, self.grow_to, self.grow_after = list(nodes), grow_to, grow_after
        self.requests: list[list[dict]] = []
        self.withdrawn = 0
        self.now = 0.0
        self.polls = 0

    def nodes(self):
        return list(self.current)

    def request(self, bundles):
        self.requests.append(bundles)

        def withdraw():
            self.withdrawn += 1
        return withdraw

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.polls += 1
        if self.grow_after is not None and self.polls >= self.grow_after:
            self.current = list(self.grow_to)

    def fits(self, **kw):
        return check_fits(nodes=self.nodes, request=self.request, clock=self.clock, sleep=self.sleep, **kw)


def test_fits_now_asks_nothing():
    c = FakeCluster([{"CPU": 2.0}])
    c.fits(num_workers=2, cpus_per_worker=1, autoscaler=Autoscaler("autoscaler"), wait_s=60)
    assert c.requests == [] and c.polls == 0


def test_fractional_cpus_fill_a_node_exactly():
    # 20 x 0.1 CPU and 6 x 0.15 CPU fit 2.0 and 0.9 CPUs in Ray's 1/10000 units; float
    # subtraction left 0.0999... for the last worker and called the cluster too small
    for nodes, n, cpus in (([{"CPU": 2.0}], 20, 0.1), ([{"CPU": 0.9}], 6, 0.15)):
        c = FakeCluster(nodes)
        c.fits(num_workers=n, cpus_per_worker=cpus, autoscaler=None)
        assert c.requests == [] and c.polls == 0
    with pytest.raises(ClusterTooSmallError, match=r"room for 20 worker"):
        FakeCluster([{"CPU": 2.0}]).fits(num_workers=21, cpus_per_worker=0.1, autoscaler=None)


def test_the_actors_memory_must_fit_too():
    # scoring's actors reserve Ray memory (a session per lane): CPUs alone are not enough
    gib = 2**30
    c = FakeCluster([{"CPU": 4.0, "memory": 3.0 * gib}])
    with pytest.raises(ClusterTooSmallError, match=r"x 1 CPU \+ 2\.0 GiB memory.*at most 3\.0 GiB .*room for 1 worker"):
        c.fits(num_workers=2, cpus_per_worker=1, memory_per_worker=2 * gib, autoscaler=None)
    FakeCluster([{"CPU": 4.0, "memory": 4.0 * gib}]).fits(num_workers=2, cpus_per_worker=1,
                                                           memory_per_worker=2 * gib, autoscaler=None)
    FakeCluster([{"CPU": 4.0}]).fits(num_workers=2, cpus_per_worker=1, memory_per_worker=2 * gib,
                                     autoscaler=None)  # a node that reports no memory does not limit it
    # a node type that does not declare memory is not ruled out for it; one that declares too little is
    c = FakeCluster(HEAD_ONLY, grow_to=[{"CPU": 0.0}, {"CPU": 2.0, "memory": 4.0 * gib}], grow_after=2)
    c.fits(num_workers=1, cpus_per_worker=1, memory_per_worker=2 * gib, autoscaler=Autoscaler("cluster config", CPU_GROUP),
           wait_s=60)
    assert c.requests[0][0] == {"CPU": 1.0, "memory": 2.0 * gib}
    small = (NodeGroup("cpu", {"CPU": 2.0, "memory": 1.0 * gib}, 1),)
    with pytest.raises(ClusterTooSmallError, match="no node type"):
        FakeCluster(HEAD_ONLY).fits(num_workers=1, cpus_per_worker=1, memory_per_worker=2 * gib,
                                    autoscaler=Autoscaler("cluster config", small), wait_s=60)


def test_no_autoscaler_fails_at_once():
    c = FakeCluster([{"CPU": 1.0}])
    with pytest.raises(ClusterTooSmallError, match=r"needs 2 worker\(s\) x 1 CPU.*room for 1 worker.*no autoscaler"):
        c.fits(num_workers=2, cpus_per_worker=1, autoscaler=None)  # default wait: 0 without an autoscaler
    assert c.requests == [] and c.polls == 0


def test_explicit_wait_without_autoscaler_waits_for_nodes_started_by_hand():
    c = FakeCluster(HEAD_ONLY, grow_to=[{"CPU": 0.0}, {"CPU": 2.0}], grow_after=5)
    c.fits(num_workers=2, cpus_per_worker=1, autoscaler=None, wait_s=120)
    assert c.polls == 5 and len(c.requests) == 1 and c.withdrawn == 1


def test_gpu_on_a_fixed_cpu_cluster_names_the_flag():
    c = FakeCluster([{"CPU": 4.0}])
    with pytest.raises(ClusterTooSmallError, match="asked for GPUs.*drop --use-gpu"):
        c.fits(num_workers=1, cpus_per_worker=1, gpus_per_worker=1, autoscaler=None)


def test_wait_zero_fails_at_once_even_with_an_autoscaler():
    c = FakeCluster(HEAD_ONLY)
    with pytest.raises(ClusterTooSmallError, match="--wait-for-resources is 0"):
        c.fits(num_workers=1, cpus_per_worker=1, autoscaler=Autoscaler("autoscaler"), wait_s=0)
    assert c.requests == []


def test_infeasible_for_every_node_type_fails_at_once():
    c = FakeCluster(HEAD_ONLY)
    with pytest.raises(ClusterTooSmallError, match="no node type its autoscaler .* can launch holds one worker"):
        c.fits(num_workers=2, cpus_per_worker=4, autoscaler=Autoscaler("cluster config", CPU_GROUP), wait_s=600)
    with pytest.raises(ClusterTooSmallError, match="no node type"):  # a GPU nobody can launch
        c.fits(num_workers=1, cpus_per_worker=1, gpus_per_worker=1, autoscaler=Autoscaler("cluster config", CPU_GROUP))
    assert c.requests == [] and c.polls == 0


def test_waits_asks_and_clears_when_nodes_join(caplog):
    c = FakeCluster(HEAD_ONLY, grow_to=[{"CPU": 0.0}, {"CPU": 2.0}], grow_after=40)
    with caplog.at_level(logging.INFO, logger="artifact_core.raycluster"):
        c.fits(num_workers=1, cpus_per_worker=1, reserved_cpus=1, what="scoring",
               autoscaler=Autoscaler("cluster config", CPU_GROUP))  # default wait with an autoscaler
    # one bundle per worker plus the reserved CPUs, then the request is withdrawn for scale-down
    assert c.requests == [[{"CPU": 1.0}, {"CPU": 1.0}]] and c.withdrawn == 1
    assert c.polls == 40
    waiting = [r.getMessage() for r in caplog.records if "waiting for resources" in r.getMessage()]
    assert len(waiting) == 2 and "pending 1 worker(s) x 1 CPU, plus 1 CPU" in waiting[0]  # every 15 s of 40


def test_wait_runs_out_names_what_is_pending():
    c = FakeCluster(HEAD_ONLY)
    with pytest.raises(ClusterTooSmallError, match=r"waited 30s for more nodes, still pending: 2 worker\(s\) x 1 CPU \+ 1 GPU"):
        c.fits(num_workers=2, cpus_per_worker=1, gpus_per_worker=1, autoscaler=Autoscaler("autoscaler v2"), wait_s=30)
    assert c.requests == [[{"CPU": 1.0, "GPU": 1.0}] * 2] and c.withdrawn == 1  # withdrawn on failure too
    assert 30 <= c.now <= 32


def test_autoscaler_limits():
    a = Autoscaler("cluster config", (NodeGroup("head", {"CPU": 0.0}, 0), NodeGroup("gpu", {"CPU": 8.0, "GPU": 1.0}, 4)))
    assert a.max_resources() == {"CPU": 32.0, "GPU": 4.0}
    assert not a.infeasible({"CPU": 8.0, "GPU": 1.0}) and a.infeasible({"CPU": 1.0, "GPU": 2.0})
    assert Autoscaler("autoscaler").max_resources() is None and not Autoscaler("autoscaler").infeasible({"GPU": 64})
    assert Autoscaler("cluster config", (NodeGroup("cpu", {"CPU": 2.0}, -1),)).max_resources() is None


def test_sweep_concurrency_counts_what_the_autoscaler_may_build(monkeypatch):
    from artifact_core import tuning
    from artifact_core.config import SweepConfig, TrainConfig

    checked = []
    monkeypatch.setattr(tuning, "check_fits", lambda **kw: checked.append(kw))
    monkeypatch.setattr(tuning, "live_nodes", lambda: [{"CPU": 0.0}])  # a 0-CPU head, nothing else yet
    cfg = SweepConfig(base=TrainConfig(num_workers=2, cpus_per_worker=1))
    limits = Autoscaler("cluster config", (NodeGroup("head", {"CPU": 0.0}, 0), NodeGroup("cpu", {"CPU": 4.0}, 3)))
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: limits)
    assert tuning._concurrency(cfg) == 6  # 12 CPUs at most, 2 per trial
    assert checked[0]["num_workers"] == 2 and checked[0]["what"] == "one sweep trial"  # waits for one trial
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: Autoscaler("autoscaler"))  # limits unknown
    assert tuning._concurrency(cfg) == 1
    cfg.max_concurrent_trials = 4
    assert tuning._concurrency(cfg) == 4  # the user's number stands: extra trials wait for nodes
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: None)
    monkeypatch.setattr(tuning, "live_nodes", lambda: [{"CPU": 4.0}])
    assert tuning._concurrency(cfg) == 2  # fixed cluster: capped at what fits


def test_a_fixed_size_group_counts_as_a_node_type_and_toward_the_largest_cluster(monkeypatch):
    from types import SimpleNamespace

    from artifact_core import raycluster

    groups = [SimpleNamespace(name="gpu", resources={"CPU": 8.0, "GPU": 1.0}, min_count=1, max_count=1),
              SimpleNamespace(name="cpu", resources={"CPU": 4.0}, min_count=0, max_count=2)]
    config = SimpleNamespace(node_group_configs=groups)
    monkeypatch.setattr(raycluster.ray._private.state.state, "get_cluster_config", lambda: config)
    scaler = raycluster.detect_autoscaler()
    # the GPU node is still starting: a GPU worker is feasible, not refused at once
    assert scaler is not None and not scaler.infeasible({"CPU": 1.0, "GPU": 1.0})
    assert scaler.max_resources() == {"CPU": 16.0, "GPU": 1.0}
    groups[1].max_count = 0  # nothing can grow: no autoscaler to wait for
    assert raycluster.detect_autoscaler() is None


def test_the_reserved_cpu_must_fit_on_one_node():
    # 4 workers x 0.75 CPU on two 2-CPU nodes leave 0.5 CPU on each: no node holds scoring's
    # 1-CPU decode bundle, although 1 CPU is free in total
    with pytest.raises(ClusterTooSmallError):
        FakeCluster([{"CPU": 2.0}, {"CPU": 2.0}]).fits(num_workers=4, cpus_per_worker=0.75, reserved_cpus=1.0,
                                                       autoscaler=None)
    FakeCluster([{"CPU": 2.0}, {"CPU": 2.0}]).fits(num_workers=3, cpus_per_worker=1.0, reserved_cpus=1.0,
                                                   autoscaler=None)


@pytest.mark.parametrize("raw, expected", [
    (b"not json", False), (b"null", False), (b"[1, 2]", False), (b'{"autoscaler_report": [1]}', False),
    (b'{"autoscaler_report": {"active_nodes": {"node_1a2b3c": 1}}}', False),  # made-up types: no config
    (b'{"autoscaler_report": {"active_nodes": {"cpu_worker": 1}}}', True),
    (b'{"autoscaler_report": {"pending_launches": {"gpu_worker": 2}}}', True),
    (b'{"autoscaler_report": {"node_type_mapping": {"10.0.0.2": "cpu_worker"}}}', True),
])
def test_the_v1_autoscaler_status_is_read_and_an_unreadable_one_means_no_autoscaler(monkeypatch, raw, expected):
    import ray.experimental.internal_kv as kv

    from artifact_core import raycluster

    monkeypatch.setattr(kv, "_internal_kv_get", lambda *a, **k: raw)
    assert raycluster._v1_monitor_has_node_types() is expected


def test_sweep_flags_out_of_range_are_refused():
    from artifact_core.config import SweepConfig, TrainConfig

    for kw, flag in (({"lr_max": float("inf")}, "--lr-max"), ({"finetune_lr_ratio_max": float("inf")}, "ratio-max"),
                     ({"max_concurrent_trials": 0}, "--max-concurrent-trials"),
                     ({"max_concurrent_trials": -3}, "--max-concurrent-trials")):
        with pytest.raises(ValueError, match=flag):
            SweepConfig(base=TrainConfig(), **kw).validate()


def test_sweep_concurrency_counts_fractional_cpus_exactly(monkeypatch):
    from artifact_core import tuning
    from artifact_core.config import SweepConfig, TrainConfig

    monkeypatch.setattr(tuning, "check_fits", lambda **kw: None)
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: None)
    monkeypatch.setattr(tuning, "live_nodes", lambda: [{"CPU": 3.0}])
    assert tuning._concurrency(SweepConfig(base=TrainConfig(num_workers=3, cpus_per_worker=0.1))) == 10


def test_sweep_concurrency_packs_trials_node_by_node(monkeypatch):
    """Three 3-CPU nodes hold one trial of two 2-CPU workers at a time (9 CPUs in total would
    say two): the second trial's workers would wait for the first one's."""
    from artifact_core import tuning
    from artifact_core.config import SweepConfig, TrainConfig
    from artifact_core.raycluster import groups_that_fit

    monkeypatch.setattr(tuning, "check_fits", lambda **kw: None)
    monkeypatch.setattr(tuning, "detect_autoscaler", lambda: None)
    monkeypatch.setattr(tuning, "live_nodes", lambda: [{"CPU": 3.0}] * 3)
    assert tuning._concurrency(SweepConfig(base=TrainConfig(num_workers=2, cpus_per_worker=2))) == 1
    assert groups_that_fit([{"CPU": 4.0}] * 3, num_workers=2, cpus_per_worker=2) == 3
    # a decode CPU per trial on a node with room; GPUs one per worker
    assert groups_that_fit([{"CPU": 5.0}], num_workers=2, cpus_per_worker=2, reserved_cpus=1) == 1
    assert groups_that_fit([{"CPU": 8.0, "GPU": 1.0}] * 4, num_workers=2, cpus_per_worker=2, gpus_per_worker=1) == 2
    assert groups_that_fit([{"CPU": 0.0}], num_workers=1, cpus_per_worker=1) == 0


def test_a_sweep_with_no_trial_to_pick_is_a_one_line_error():
    import pandas as pd

    from artifact_core.tuning import best_trial_id

    table = pd.DataFrame({"trial_id": ["a"], "status": ["error"], "best_val_ap_artifact": [0.5],
                          "best_select_score": [0.5]})
    with pytest.raises(ValueError, match="every trial failed"):
        best_trial_id(table, "val_ap_artifact")


@pytest.mark.ray
def test_the_stand_in_placement_group_is_pending_demand_and_goes_when_withdrawn_or_left(ray_session):
    """The real request: a placement group of the job's own (pending: no node holds 1000 CPUs),
    removed by its withdrawal, and one left behind (a trial killed while it waited) by
    remove_wait_groups."""
    from ray.util.placement_group import placement_group_table

    from artifact_core.raycluster import WAIT_GROUP_PREFIX, _request, remove_wait_groups

    def states():
        return {i["name"]: i["state"] for i in placement_group_table().values()
                if i["name"].startswith(WAIT_GROUP_PREFIX)}

    before = set(states())
    withdraw = _request([{"CPU": 1000.0}, {"CPU": 1.0, "memory": float(2**20)}])
    left = _request([{"CPU": 1000.0}])
    mine = {n: s for n, s in states().items() if n not in before}
    assert len(mine) == 2 and set(mine.values()) == {"PENDING"}, mine
    withdraw()
    removed = remove_wait_groups()
    assert len(removed) == 1 and removed[0] in mine
    assert all(states()[n] == "REMOVED" for n in mine)
    assert remove_wait_groups() == []
    del left
