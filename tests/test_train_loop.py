"""Loop details that need no Ray: mixed-precision choice per GPU generation, evaluation with uneven shards."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from artifact_core import train_loop
from artifact_core.config import TrainConfig
from artifact_core.model import unwrap


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend CUDA exists (so the grad scaler does not disable itself) with a settable capability."""
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    # Says yes for emulated bf16 too: the choice must not follow it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return capability


@pytest.mark.parametrize("capability, dtype, scaled", [
    ((7, 0), torch.float16, True),    # V100
    ((7, 5), torch.float16, True),    # T4: bf16 only emulated
    ((8, 0), torch.bfloat16, False),  # A100
    ((9, 0), torch.bfloat16, False),  # H100
])
def test_amp_bf16_only_from_compute_capability_8(fake_cuda, capability, dtype, scaled):
    fake_cuda["value"] = capability
    device = torch.device("cuda", 0)
    assert train_loop.amp_dtype(device) == dtype
    _, scaler = train_loop._amp(device)
    assert scaler.is_enabled() is scaled


def test_amp_off_on_cpu():
    assert train_loop.amp_dtype(torch.device("cpu")) is None
    autocast, scaler = train_loop._amp(torch.device("cpu"))
    assert not scaler.is_enabled()
    with autocast():
        assert torch.ones(2).dtype == torch.float32


def _tiny_model() -> nn.Module:
    # BatchNorm has buffers: DDP's forward would broadcast them (a collective).
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(n, 3, 8, 8), torch.tensor([i % 2 for i in range(n)])), batch_size=2)


def test_evaluate_empty_shard_calls_no_collective(monkeypatch):
    def collective(*a, **k):
        raise AssertionError("evaluate called a collective")

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
        monkeypatch.setattr(dist, name, collective)
    probs, labels, loss, n = train_loop.evaluate(_tiny_model(), _loader(0), torch.ones(2), torch.device("cpu"))
    assert (probs, labels, loss, n) == ([], [], 0.0, 0)


def _uneven_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(_tiny_model())  # broadcast_buffers=True
        ddp.train()
        ddp(torch.rand(2, 3, 8, 8)).sum().backward()  # one step, as in an epoch
        # rank 1's validation shard is empty (fewer images than ranks): it never runs a forward
        probs, labels, _, n = train_loop.evaluate(unwrap(ddp), _loader(4 if rank == 0 else 0),
                                                  torch.ones(2), torch.device("cpu"))
        gathered = train_loop._gather(probs)  # both ranks must reach the next collective together
        out.put((rank, n, len(gathered)))
    finally:
        dist.destroy_process_group()


def _two_ranks(target) -> list:
    """Run ``target(rank, port, queue)`` in two forked gloo ranks; returns what they put, sorted."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=60)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return sorted(out.get(timeout=5) for _ in procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_uneven_validation_shards_do_not_hang():
    assert _two_ranks(_uneven_rank) == [(0, 4, 4), (1, 0, 4)]


def test_cached_head_epochs_learn_a_local_defect_from_features():
    """Phase 1 on cached trunk features: the local head finds the one cell that differs."""
    from artifact_core.metrics import ranking_metrics
    from artifact_core.model import build_model, set_trainable

    torch.manual_seed(0)
    model = build_model(weights="none", head="local", dropout=0.0)
    set_trainable(model, unfreeze_depth=0)
    n, c = 96, model.features[-1].out_channels
    feats = torch.randn(n, c, 8, 8).abs()
    feats[:, :8] *= 0.2   # normally weak channels
    feats[:, 8:16] *= 3.0  # normally strong ones
    labels = torch.ones(n, dtype=torch.int64)
    labels[::6] = 0  # artifacts: in one cell somewhere the two groups swap (same energy, odd pattern)
    for i in range(0, n, 6):
        y, x = torch.randint(0, 8, (2,))
        feats[i, :16, y, x] = feats[i, :16, y, x].roll(8).clone()
    cache = train_loop.FeatureCache(feats.half(), labels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    weights = torch.tensor([3.0, 0.6])
    from contextlib import nullcontext
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = ranking_metrics(*reversed(train_loop._evaluate_cached(model, cache, weights, nullcontext)[:2]))
    for epoch in range(15):
        total, count = train_loop._train_epoch_cached(model, cache, steps=6, batch_size=16, optimizer=opt,
                                                      scaler=scaler, weights=weights, autocast=nullcontext,
                                                      world=1, seed=epoch)
        assert count == 96
    probs, ys, _, m = train_loop._evaluate_cached(model, cache, weights, nullcontext)
    after = ranking_metrics(ys, probs)
    assert m == n and after["ap_artifact"] > 0.9 > before["ap_artifact"]
    # the trunk stayed frozen: only the head has gradients
    assert all(p.grad is None for p in model.features.parameters())


def test_cached_epoch_on_an_empty_shard_still_steps():
    """A rank that read no image takes the same number of steps (zero loss) as the others."""
    from contextlib import nullcontext

    from artifact_core.model import build_model, set_trainable

    model = build_model(weights="none", head="local")
    set_trainable(model, unfreeze_depth=0)
    empty = train_loop.FeatureCache(torch.zeros(0, 96, 2, 2).half(), torch.zeros(0, dtype=torch.int64))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps = []
    opt.step = lambda *a, **k: steps.append(1)  # count optimizer steps
    total, count = train_loop._train_epoch_cached(model, empty, steps=3, batch_size=4, optimizer=opt,
                                                  scaler=torch.amp.GradScaler("cpu", enabled=False),
                                                  weights=torch.ones(2), autocast=nullcontext, world=1, seed=0)
    assert (total, count, len(steps)) == (0.0, 0, 3)


def _buffers_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bn = nn.BatchNorm2d(3)
        bn.running_mean.fill_(float(rank))  # each rank saw other data
        bn.running_var.fill_(1.0 + 2 * rank)
        train_loop._average_buffers(bn, 2)
        out.put((rank, bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked)))
    finally:
        dist.destroy_process_group()


def test_head_batchnorm_statistics_are_averaged_over_ranks():
    assert _two_ranks(_buffers_rank) == [(0, [0.5] * 3, [2.0] * 3, 0), (1, [0.5] * 3, [2.0] * 3, 0)]


def _spill_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = TrainConfig(head_cache_mb=1)
        answers = []
        for rank_without_room in (None, 1):
            train_loop.spill_room = lambda *a, **k: rank != rank_without_room  # (a forked process of its own)
            answers.append(train_loop._spill_dir(10 << 20, 1 << 20, cfg, torch.device("cpu"), 2))
        out.put((rank, answers))
    finally:
        dist.destroy_process_group()


def test_phase1_spills_to_disk_only_where_every_rank_has_room():
    """Ranks that cached and ranks that streamed would run different collectives and hang:
    one rank without room makes them all stream."""
    tmp = tempfile.gettempdir()
    assert _two_ranks(_spill_rank) == [(0, [tmp, None]), (1, [tmp, None])]
    cfg = TrainConfig(head_cache_mb=1)
    assert train_loop._spill_dir(10 << 20, 2 << 20, cfg, torch.device("cpu"), 1) is None  # validation alone is over
    assert train_loop._spill_dir(10 << 20, 1 << 20, cfg, torch.device("meta"), 1) is None  # not on a CPU


def test_finetune_schedule_warms_up_then_decays_and_resumes_exactly():
    from artifact_core.config import TrainConfig

    spec = train_loop.phases(TrainConfig(finetune_epochs=4, finetune_lr=1e-3))[1]
    assert spec.schedule == "cosine"  # the default
    steps = 10
    lrs = [train_loop.scheduled_lr(spec, i, steps) for i in range(4 * steps)]
    # a linear warm-up over the first epoch up to the phase's rate ...
    assert lrs[0] == pytest.approx(1e-4) and lrs[steps - 1] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:steps - 1], lrs[1:steps]))
    # ... then a monotone decay that ends at the floor on the last step
    assert all(a >= b for a, b in zip(lrs[steps:], lrs[steps + 1:]))
    assert lrs[-1] == pytest.approx(train_loop.COSINE_FLOOR * 1e-3)
    # a pure function of the step: a resumed run picks up the same rate
    assert train_loop.scheduled_lr(spec, 23, steps) == lrs[23]
    constant = train_loop.phases(TrainConfig(finetune_lr=1e-3, finetune_schedule="constant"))[1]
    assert {train_loop.scheduled_lr(constant, i, steps) for i in range(40)} == {1e-3}
    with pytest.raises(ValueError, match="--finetune-schedule"):
        TrainConfig(finetune_schedule="step").validate()


@pytest.mark.parametrize("done, stopped", [(4, False), (2, False), (3, True)])
def test_a_rerun_that_raises_phase_two_continues_its_rate_and_its_patience(done, stopped):
    """4 planned phase-2 epochs, `done` of them run (patience ended the phase when `stopped`),
    then a rerun asks for 8: the rate goes on from where it was, down to the floor at the new
    last step (the new plan's position would be up to 10x higher), and the phase runs on."""
    from artifact_core.config import TrainConfig

    steps = 10
    old = train_loop.phases(TrainConfig(finetune_epochs=4, finetune_lr=1e-3))[1]
    new = train_loop.phases(TrainConfig(finetune_epochs=8, finetune_lr=1e-3))[1]
    state = train_loop.LoopState(phase_index=1)
    train_loop.extend_phase(state, old)  # the first start records its plan
    assert state.phase_planned_epochs == 4 and state.lr_restart == []
    state.phase_epoch, state.stopped_early, state.bad_epochs = done, stopped, 3 if stopped else 0
    last_old = train_loop.scheduled_lr(old, done * steps - 1, steps)
    state = train_loop.LoopState.from_dict(json.loads(json.dumps(dataclasses.asdict(state))))  # through a checkpoint
    train_loop.extend_phase(state, new)
    assert state.phase_planned_epochs == 8 and not state.stopped_early and state.bad_epochs == 0
    lrs = [train_loop.scheduled_lr(new, i, steps, state.lr_restart) for i in range(done * steps, 8 * steps)]
    assert lrs[0] <= last_old * 1.01  # no jump up
    assert lrs[0] >= train_loop.scheduled_lr(old, done * steps, steps) * 0.99
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(train_loop.COSINE_FLOOR * 1e-3)
    # the same plan again changes nothing
    before = list(state.lr_restart)
    train_loop.extend_phase(state, new)
    assert state.lr_restart == before
    # a checkpoint of a version that did not record its plan: the run record's count is used
    legacy = train_loop.LoopState(phase_index=1, phase_epoch=done, stopped_early=stopped)
    train_loop.extend_phase(legacy, new, recorded=4)
    assert legacy.phase_planned_epochs == 8 and legacy.lr_restart == state.lr_restart
    assert not legacy.stopped_early
    # a diverged run trains nothing more: no restart
    diverged = train_loop.LoopState(phase_index=1, phase_epoch=done, diverged_at=done, phase_planned_epochs=4)
    train_loop.extend_phase(diverged, new)
    assert diverged.lr_restart == []


@pytest.mark.parametrize("members", [1, 3])
def test_cached_validation_of_a_flipping_model_scores_what_the_bundle_will(members):
    """Phase 1 validates on cached features; with a test-time flip it caches the mirrors too,
    so its scores equal the model's own (image and mirror, members averaged) in eval mode."""
    from contextlib import nullcontext

    from artifact_core.model import build_model

    torch.manual_seed(0)
    model = build_model(weights="bundled", head="multiscale", test_time_flip=True, dropout=0.0, members=members)
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 1, 0, 1, 1])
    # head BatchNorm statistics from these inputs, so that the scores differ from image to image
    model.classifier[0].momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    cache = train_loop._cache_features(model, loader, torch.device("cpu"), nullcontext, mirrored=True)
    assert cache.mirrored is not None and cache.mirrored.shape == cache.features.shape
    probs, labels, _, n = train_loop._evaluate_cached(model, cache, torch.tensor([1.0, 1.0]), nullcontext)
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).squeeze(1)
        model.test_time_flip = False
        plain = torch.sigmoid(model(x)).squeeze(1)
    assert n == 6 and labels == y.tolist()
    # the cache is float16: equal to that precision, and not the image alone
    assert torch.allclose(torch.tensor(probs), expected, atol=2e-3)
    assert float(expected.std()) > 1e-3, "scores do not vary: the comparison would prove nothing"
    assert not torch.allclose(torch.tensor(probs), plain, atol=1e-3)


def _skipping_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 4) -> train_loop.SkippingLoader:
    """A loader shaped like training's: a Subset behind a DataLoader behind a SkippingLoader."""
    from torch.utils.data import Subset

    data = Subset(TensorDataset(x, y), list(range(len(y))))
    return train_loop.SkippingLoader(DataLoader(
        data, batch_size=batch_size, collate_fn=lambda b: (torch.stack([i[0] for i in b]), torch.stack([i[1] for i in b]), [])))


def _phase2_model(members: int = 1, *, flip: bool = False, weights: str = "bundled"):
    from artifact_core.model import build_model, set_trainable

    torch.manual_seed(0)
    model = build_model(weights=weights, head="multiscale", test_time_flip=flip, dropout=0.0, members=members)
    set_trainable(model, unfreeze_depth=6)
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("members, per_pass", [(1, 0), (3, 0), (3, 2)])
def test_phase2_validation_from_the_frozen_blocks_scores_what_the_model_does(members, per_pass, monkeypatch):
    """Phase 2 validates from the frozen blocks' cached output (float32, mirrors too): the
    same probabilities as the whole model in eval mode, to float precision; also when the
    cache is built and read a few images per pass (as on CPU)."""
    from contextlib import nullcontext

    model = _phase2_model(members, flip=True)
    if per_pass:
        model.images_per_pass = per_pass
        monkeypatch.setattr(train_loop, "images_per_pass", lambda per_image: per_pass)
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 1, 0, 1, 1])
    model.classifier[0].momentum = None  # head statistics from these inputs: scores differ per image
    model.train()
    with torch.no_grad():
        model(x)
    cfg = TrainConfig(image_size=64, batch_size=4)
    val = train_loop._prefix_val_cache(model, cfg, (_skipping_loader(x, y), _skipping_loader(x, y)),
                                       torch.device("cpu"), nullcontext, 1)
    assert val.start == 8 and val.features.dtype == torch.float32 and val.mirrored_skip is not None
    probs, labels, _, n = train_loop._evaluate_cached(model, val, torch.tensor([1.0, 1.0]), nullcontext)
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).squeeze(1)
    assert n == 6 and labels == y.tolist()
    assert float(expected.std()) > 1e-3, "scores do not vary: the comparison would prove nothing"
    assert torch.allclose(torch.tensor(probs), expected, atol=1e-5)


def test_phase2_validation_streams_over_the_memory_limit_or_with_nothing_frozen(monkeypatch):
    from contextlib import nullcontext

    from artifact_core.model import set_trainable

    model = _phase2_model(flip=True, weights="none")
    x, y = torch.randn(8, 3, 64, 64), torch.tensor([0, 1] * 4)
    args = (model, TrainConfig(image_size=64), (_skipping_loader(x, y), _skipping_loader(x, y)),
            torch.device("cpu"), nullcontext, 1)
    per_image = 64 * 4 * 4 + 32 * 4 * 4  # block 7's output and the pooled tap, at 64 px
    need = 9 * 2 * per_image * 4  # the largest shard plus one, with mirrors, float32
    val = train_loop._prefix_val_cache(*args)
    assert len(val) == 8 and val.nbytes == 8 * 2 * per_image * 4
    monkeypatch.setattr(train_loop, "head_cache_limit", lambda cfg: need)
    assert train_loop._prefix_val_cache(*args) is not None
    monkeypatch.setattr(train_loop, "head_cache_limit", lambda cfg: need - 1)
    assert train_loop._prefix_val_cache(*args) is None
    monkeypatch.undo()
    set_trainable(model, unfreeze_depth=14)  # nothing frozen: nothing to cache
    assert train_loop._prefix_val_cache(*args) is None
    set_trainable(model, unfreeze_depth=6)
    assert train_loop._prefix_val_cache(*args[:1], TrainConfig(image_size=64, ingest="ray-data"), *args[2:]) is None


def test_phase2_hands_validations_decode_cache_room_to_training():
    """Phase 2 validates from cached features: validation's decoded images are not read
    again, so their room goes to training's cache."""
    from artifact_core.dataset import DecodeCache

    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 1])
    train_ds = TensorDataset(x, y)
    train_ds.cache = DecodeCache(100)
    val = _skipping_loader(x, y)
    val.loader.dataset.dataset.cache = DecodeCache(40)
    train = train_loop.SkippingLoader(DataLoader(train_ds, batch_size=2))
    train_loop._release_validation_decode_cache((train, val))
    assert train_ds.cache.max_bytes == 140 and val.loader.dataset.dataset.cache is None
    train_loop._release_validation_decode_cache((train, val))  # once only
    assert train_ds.cache.max_bytes == 140


def test_phase1_caches_the_plain_images_and_their_mirrors_or_augmented_draws(tmp_path, monkeypatch, caplog):
    """Phase 1's default views are the trunk's features of each training image as validation
    sees it and of its mirror, and the training loader still augments."""
    from contextlib import nullcontext

    from PIL import Image

    from artifact_core.model import build_model, set_trainable
    from artifact_core.transforms import eval_transform

    rng = torch.Generator().manual_seed(0)
    paths = []
    for i in range(5):
        path = tmp_path / f"image_{i}_{i % 2}.png"
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=rng)
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(str(path))
    split = {"train_paths": paths, "train_labels": [i % 2 for i in range(5)], "val_paths": paths[:2], "val_labels": [0, 1]}
    cfg = TrainConfig(image_size=64, batch_size=2, head_cache_augment=False, head_cache_views=2, decode_cache_mb=0)
    loaders = train_loop._loaders({"split": split}, cfg, 0, 1)
    torch.manual_seed(0)
    model = build_model(weights="bundled", head="multiscale", test_time_flip=True, dropout=0.0, members=1).eval()
    set_trainable(model, unfreeze_depth=0)
    train, val = train_loop._head_caches(model, cfg, loaders, torch.device("cpu"), nullcontext,
                                         train_loop.LoopState(), 1)

    order = [i for i, _, _ in loaders[0].sampler]  # the epoch-0 (index, epoch, draw) order the cache was read in, every image (no drop_last)
    x = torch.stack([eval_transform(image_size=64)(Image.open(paths[i]).convert("RGB")) for i in order])
    with torch.inference_mode():
        want = torch.cat([model.features(x), model.features(x.flip(-1))])
    assert len(train) == 10 and train.labels.tolist() == [i % 2 for i in order] * 2
    assert float((want[:5] - want[5:]).abs().max()) > 1e-2, "the mirror's features equal the image's: proves nothing"
    torch.testing.assert_close(train.features.float(), want, atol=2e-2, rtol=1e-2)  # cached as float16
    assert len(val) == 2 and val.mirrored is not None
    assert "RandomAffine" in repr(loaders[0].loader.dataset.transform)  # phase 2 still augments

    # --head-cache-augment: two passes of the augmenting training loader (drop_last: 2 x 4
    # images), none of them the plain image or its mirror
    augmented, _ = train_loop._head_caches(model, dataclasses.replace(cfg, head_cache_augment=True), loaders,
                                           torch.device("cpu"), nullcontext, train_loop.LoopState(), 1)
    assert len(augmented) == 8
    assert min(float((view.float() - plain).abs().max()) for view in augmented.features for plain in want) > 1e-2
    # a restart at phase 1's third epoch builds the views of the phase's first epochs again,
    # whatever the process's random stream holds
    torch.manual_seed(123)
    resumed, _ = train_loop._head_caches(model, dataclasses.replace(cfg, head_cache_augment=True), loaders,
                                         torch.device("cpu"), nullcontext,
                                         train_loop.LoopState(global_epoch=3, phase_epoch=3), 1)
    assert torch.equal(resumed.labels, augmented.labels) and torch.equal(resumed.features, augmented.features)

    # training views over the budget go to disk (validation still fits): the same features,
    # mapped from a file in the temp dir that has no name
    assert train_loop.head_cache_limit(TrainConfig(head_cache_mb=3)) == 3 << 20
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_dir))
    # (the room check has its own test, test_spill; here the disk has room whatever the
    # machine's /tmp is: tmpfs or nearly full on some CI runners)
    asked = []
    monkeypatch.setattr(train_loop, "spill_room",
                        lambda nbytes, **kw: asked.append((nbytes, kw)) or True)
    monkeypatch.setattr(train_loop, "head_cache_limit", lambda cfg: val.nbytes + 2 * val.features[0].nbytes)
    with caplog.at_level(logging.INFO, logger="artifact_core.train"):
        on_disk, val_again = train_loop._head_caches(model, cfg, loaders, torch.device("cpu"), nullcontext,
                                                     train_loop.LoopState(), 1)
    assert "cached on disk in " + str(spill_dir) in caplog.text
    # (room for the mirrors written apart before they are copied after the images)
    assert asked == [(train.nbytes * 3 // 2, {"workers_on_node": 1, "directory": str(spill_dir)})], asked
    assert torch.equal(on_disk.features, train.features) and torch.equal(on_disk.labels, train.labels)
    mapped = [line for line in pathlib.Path("/proc/self/maps").read_text().splitlines() if f"{spill_dir}/" in line]
    assert mapped and all(line.rstrip().endswith("(deleted)") for line in mapped)  # mapped, not copied
    assert torch.equal(val_again.features, val.features) and list(spill_dir.iterdir()) == []
    # (an empty shard spills nothing)
    empty = train_loop._cache_features(model, [], torch.device("cpu"), nullcontext, mirrors_as_views=True,
                                       spill=str(spill_dir))
    assert len(empty) == 0 and empty.mirrored is None
    # ... unless the disk has no room: then phase 1 streams, as with a budget of 0
    monkeypatch.setattr(train_loop, "spill_room", lambda *a, **k: False)
    assert train_loop._head_caches(model, cfg, loaders, torch.device("cpu"), nullcontext,
                                   train_loop.LoopState(), 1) is None
    monkeypatch.undo()
    assert train_loop._head_caches(model, dataclasses.replace(cfg, head_cache_mb=0), loaders,
                                   torch.device("cpu"), nullcontext, train_loop.LoopState(), 1) is None

    # the plain views are the default: the image and its mirror are all there is to cache
    assert TrainConfig().head_cache_augment is False
    with pytest.raises(ValueError, match="--head-cache-views must be 0, 1 .* or 2 .* unless --head-cache-augment"):
        TrainConfig(head_cache_views=3).validate()
    for ok in (TrainConfig(head_cache_views=0), TrainConfig(head_cache_views=3, head_cache_augment=True),
               TrainConfig(ingest="ray-data")):  # (ray-data streams augmented images: no cache to refuse)
        ok.validate()
    with pytest.raises(ValueError, match="--head-cache-mb"):
        TrainConfig(head_cache_mb=-1).validate()


@pytest.mark.parametrize("saved_enabled", [False, True])
def test_resume_onto_a_scaling_gpu_loads_only_a_scaler_state_that_exists(monkeypatch, saved_enabled):
    """A checkpoint of a run on CPU or bf16 saved a disabled scaler ({}): resumed where fp16
    scales, the phase starts its scaler afresh instead of failing to load the empty state."""
    from contextlib import nullcontext

    model = _tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    saved_scaler = torch.amp.GradScaler("cpu", init_scale=512.0, enabled=saved_enabled)
    saved = {"optimizer": torch.optim.AdamW(params, lr=1e-3).state_dict(), "scaler": saved_scaler.state_dict()}
    scalers = []

    def enabled_amp(device):
        scalers.append(torch.amp.GradScaler("cpu", enabled=True))  # as fp16 on a pre-Ampere GPU
        return nullcontext, scalers[-1]

    monkeypatch.setattr(train_loop, "_amp", enabled_amp)
    monkeypatch.setattr(train_loop, "set_trainable", lambda model, unfreeze_depth: 0)
    monkeypatch.setattr(train_loop, "_head_caches", lambda *a, **k: ("train views", "validation"))
    monkeypatch.setattr(train_loop, "_collect_unreadable", lambda *a, **k: 0)
    state = train_loop.LoopState(phase_epoch=2)  # the phase is done: no epoch runs, nothing is reported
    out = train_loop.run_phase(train_loop.PhaseSpec("head", 2, 1e-3, 0), model=model, state=state,
                               optimizer_state=saved, cfg=TrainConfig(), loop_config={}, loaders=(None, None),
                               weights=torch.ones(2), device=torch.device("cpu"),
                               context={"rank": 0, "world": 1, "workers_on_node": 1, "node_ids": []})
    assert out is model
    assert scalers[0].get_scale() == (512.0 if saved_enabled else 65536.0)


def test_more_head_epochs_once_phase_two_began_are_refused():
    head = [{"epoch": i, "phase": "head", "phase_epoch": i} for i in (1, 2)]
    state = train_loop.LoopState(phase_index=1, phase_epoch=1, global_epoch=3,
                                 history=[*head, {"epoch": 3, "phase": "finetune", "phase_epoch": 1}])
    with pytest.raises(ValueError, match=r"--head-epochs 5: run x trained 2 head epoch\(s\) and has begun phase 2 .*"
                                         r"rerun with --head-epochs 2"):
        train_loop.check_phase_one_growth(state, 5, run="run x")
    train_loop.check_phase_one_growth(state, 2)  # as before: resumes
    train_loop.check_phase_one_growth(dataclasses.replace(state, phase_index=0, history=head), 5)  # extends phase 1
    # patience ended phase 1: raised then, the epochs would have continued it; now they cannot
    stopped = [head[0], {**head[1], "early_stopped": True}, state.history[-1]]
    with pytest.raises(ValueError, match="has begun phase 2"):
        train_loop.check_phase_one_growth(dataclasses.replace(state, history=stopped), 5)
    train_loop.check_phase_one_growth(dataclasses.replace(state, history=stopped, diverged_at=3), 5)


def test_cached_head_epochs_leave_no_patience_debt_for_a_resume_that_streams(tmp_path, monkeypatch):
    """Patience skips cached epochs; counting them anyway cut a resumed phase 1 that streams
    (less disk, another --head-cache-mb) short at its first epoch."""
    import ray.train
    import ray.train.torch

    from conftest import make_easy_folder

    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: None)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    data = make_easy_folder(tmp_path / "d", n=12, size=32)
    paths = sorted(str(p) for p in data.glob("*.png"))
    labels = [int(p[-5]) for p in paths]
    split = {"train_paths": paths[:8], "train_labels": labels[:8], "val_paths": paths[8:], "val_labels": labels[8:]}
    cfg = TrainConfig(image_size=32, batch_size=4, head_members=1, weights="none", decode_cache_mb=0,
                      head_epochs=3, finetune_epochs=0, patience=1)
    torch.manual_seed(0)
    model = train_loop.model_for(cfg)
    # a best score no epoch can beat: every epoch is one without a gain
    state = train_loop.LoopState(phase_best_score=float("inf"), phase_best_metric=cfg.select_metric)
    train_loop.run_phase(train_loop.phases(cfg)[0], model=model, state=state, optimizer_state=None, cfg=cfg,
                         loop_config={"split": split}, loaders=train_loop._loaders({"split": split}, cfg, 0, 1),
                         weights=torch.ones(2), device=torch.device("cpu"),
                         context={"rank": 0, "world": 1, "workers_on_node": 1, "node_ids": []})
    assert state.history and all(h["features_cached"] for h in state.history)
    assert state.bad_epochs == 0 and state.phase_epoch == 3


@pytest.mark.parametrize("n_clean", [10, 11])  # 12 images: whole batches of 4; 13: a last, short one
def test_oversampling_caches_every_image_once_and_draws_each_epochs_mix_from_the_cache(tmp_path, n_clean):
    """With --oversample, phase 1's cache holds each image of the rank's shard once (one
    with-replacement draw cached for every head epoch would leave most clean images out),
    and each epoch on the cache draws about the asked share of artifact views."""
    from contextlib import nullcontext

    from PIL import Image

    from artifact_core.model import build_model, set_trainable
    from artifact_core.transforms import eval_transform

    rng = torch.Generator().manual_seed(1)
    paths, labels = [], [0, 0] + [1] * n_clean
    for i, y in enumerate(labels):
        path = tmp_path / f"image_{i}_{y}.png"
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=rng).numpy()).save(path)
        paths.append(str(path))
    split = {"train_paths": paths, "train_labels": labels, "val_paths": paths[:2], "val_labels": [0, 1]}
    cfg = TrainConfig(image_size=64, batch_size=4, head_cache_views=1, decode_cache_mb=0, oversample=0.5)
    loaders = train_loop._loaders({"split": split}, cfg, 0, 1)
    assert isinstance(loaders[0].loader.sampler.inner, train_loop.OversamplingSampler)  # training still oversamples
    torch.manual_seed(0)
    model = build_model(weights="bundled", head="multiscale", dropout=0.0, members=1).eval()
    set_trainable(model, unfreeze_depth=0)
    train, _ = train_loop._head_caches(model, cfg, loaders, torch.device("cpu"), nullcontext,
                                       train_loop.LoopState(), 1)
    x = torch.stack([eval_transform(image_size=64)(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        want = model.features(x).float()
    cached = train.features.float()
    assert len(train) == len(paths)  # every image of the shard, once
    # augmented views too (from the shard's own loader): a short last batch is cached, not dropped
    augmented, _ = train_loop._head_caches(model, dataclasses.replace(cfg, head_cache_augment=True), loaders,
                                           torch.device("cpu"), nullcontext, train_loop.LoopState(), 1)
    assert len(augmented) == len(paths)
    nearest = [int(min(range(len(paths)), key=lambda j: float((c - want[j]).abs().max()))) for c in cached]
    assert len(set(nearest)) == len(nearest), f"an image cached twice: {nearest}"

    order = train_loop._cached_order(torch.tensor(labels), steps=200, batch_size=8, seed=3, oversample=0.5)
    share = float((torch.tensor(labels)[order] == 0).float().mean())
    assert len(order) == 1600 and 0.45 < share < 0.55  # 2 artifacts in 12, drawn half the time
    plain = train_loop._cached_order(torch.tensor(labels[:12]), steps=3, batch_size=4, seed=3)
    assert sorted(plain.tolist()) == list(range(12))  # without oversampling: a shuffle of the views
    assert train_loop._cached_order(torch.tensor([], dtype=torch.int64), steps=3, batch_size=4, seed=3) is None


@pytest.mark.parametrize("n,world,ingest,steps", [(100, 2, "dataloader", 3), (101, 2, "dataloader", 3),
                                                   (97, 2, "ray-data", 3), (20, 2, "dataloader", 1),
                                                   (128, 1, "dataloader", 8)])
def test_the_schedule_counts_the_batches_the_loader_yields(n, world, ingest, steps, tmp_path):
    cfg = TrainConfig(batch_size=16, ingest=ingest, image_size=32, decode_cache_mb=0)
    assert train_loop.epoch_steps(cfg, n, world) == steps
    if ingest == "dataloader":  # the DataLoader's own count
        paths = [str(tmp_path / f"image_{i}_{int(i % 10 != 0)}.png") for i in range(n)]
        split = {"train_paths": paths, "train_labels": [int(i % 10 != 0) for i in range(n)],
                 "val_paths": paths[:2], "val_labels": [0, 1]}
        assert len(train_loop._loaders({"split": split}, cfg, 0, world)[0]) == steps


def _tiny_run(tmp_path, *, head_epochs: int) -> TrainConfig:
    """A named run of 16 easy 32 px images, phase 1 only."""
    from conftest import make_easy_folder

    data = make_easy_folder(tmp_path / "d", n=16, size=32)
    return TrainConfig(data_dir=str(data), storage_path=str(tmp_path / "runs"), name="r", image_size=32,
                       batch_size=4, head_members=1, weights="none", decode_cache_mb=0, head_epochs=head_epochs,
                       finetune_epochs=0, patience=0, val_fraction=0.25)


def test_a_job_whose_run_another_start_claimed_stops_before_its_next_checkpoint(tmp_path, monkeypatch):
    """The same command run again while the first job still trains: the first job's next epoch
    reports no checkpoint (nor lets Ray prune any) and its loop ends cleanly."""
    import ray.train
    import ray.train.torch

    cfg = _tiny_run(tmp_path, head_epochs=3)

    def start() -> dict:
        from conftest import held_run
        return held_run(cfg)
    first = start()
    reports, claims = [], [1]

    def report(metrics, checkpoint=None):
        reports.append(metrics["epoch"])
        if claims:
            start()  # another job takes the run over after this job's first epoch
            claims.pop()
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    torch.manual_seed(0)
    model = train_loop.model_for(cfg)
    state = train_loop.LoopState()
    with pytest.raises(train_loop._TakenOver, match="was taken over"):
        train_loop.run_phase(train_loop.phases(cfg)[0], model=model, state=state, optimizer_state=None, cfg=cfg,
                             loop_config=first, loaders=train_loop._loaders(first, cfg, 0, 1),
                             weights=torch.ones(2), device=torch.device("cpu"),
                             context={"rank": 0, "world": 1, "workers_on_node": 1, "node_ids": []})
    assert reports == [1], "the epoch after the takeover must not be reported"
    # The job that holds the run trains on as before.
    again = start()
    reports.clear()
    train_loop.run_phase(train_loop.phases(cfg)[0], model=model, state=train_loop.LoopState(), optimizer_state=None,
                         cfg=cfg, loop_config=again, loaders=train_loop._loaders(again, cfg, 0, 1),
                         weights=torch.ones(2), device=torch.device("cpu"),
                         context={"rank": 0, "world": 1, "workers_on_node": 1, "node_ids": []})
    assert reports == [1, 2, 3]


def test_a_worker_group_of_a_run_taken_over_ends_cleanly_before_it_loads_a_checkpoint(tmp_path, monkeypatch):
    """Ray restarts the earlier job's workers (or starts them late) after another start took
    the run: they return at once, without an error Ray would retry, without loading a
    checkpoint the new holder may have deleted, and without reporting."""
    import types

    import ray
    import ray.train
    import ray.train.torch

    cfg = _tiny_run(tmp_path, head_epochs=2)

    def start() -> dict:
        from conftest import held_run
        return held_run(cfg)
    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1,
                                    get_local_world_size=lambda: 1)
    reports, loads = [], []
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m: m)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: loads.append(1))
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics["epoch"]))
    earlier = start()
    start()  # taken over
    train_loop.train_loop_per_worker(earlier)
    assert reports == [] and loads == []
    holder = start()
    train_loop.train_loop_per_worker(holder)
    assert reports == [1, 2] and loads == [1]
