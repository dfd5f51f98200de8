"""The per-worker training loop: two phases of one function, DDP, resumable checkpoints.

Phase 1 trains the head with the backbone frozen; phase 2 unfreezes the last K feature
blocks at a lower learning rate with a fresh optimizer. Every epoch is reported to Ray
Train with a checkpoint that holds everything needed to resume mid-phase.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from typing import Any, Iterator, Sequence

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from artifact_core.config import TrainConfig
from artifact_core.cpu_memory import images_per_pass, largest_output_bytes, use_cpu_passes
from artifact_core.data import ARTIFACT
from artifact_core.dataset import DecodeCache, EpochSampler, ImageFileDataset, Unreadable, collate_readable
from artifact_core.metrics import (KEEP_SCORE, SELECT_SCORE, SELECT_SCORE_METRIC, classification_metrics,
                                   keep_score, predict_labels, ranking_metrics, selection_score)
from artifact_core.model import (amp_dtype, frozen_prefix, head_logits, model_for, set_trainable, train_mode, trunk_prefix,
                                 trunk_suffix, unwrap)
from artifact_core.run_identity import holder_lost
from artifact_core.spill import SpillFile, spill_room
from artifact_core.transforms import eval_transform, train_transform

log = logging.getLogger("artifact_core.train")

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
VAL_SCORES_FILE = "val_scores.json"


def head_cache_limit(cfg: TrainConfig) -> int:
    """Bytes of cached features a worker may keep in memory for a phase (``--head-cache-mb``):
    phase 1, the trunk's features of its training views and validation images; phase 2, the
    frozen blocks' output for validation. Building a cache briefly takes twice that; above
    it phase 1's training views go to disk where they can (:func:`_spill_dir`), else the
    phase streams those images."""
    return cfg.head_cache_mb << 20


@dataclass
class PhaseSpec:
    """One training phase: how many epochs, at which learning rate, how deep unfrozen."""

    name: str
    epochs: int
    lr: float
    unfreeze_depth: int
    #: "constant", or "cosine": a linear warm-up over the first epoch, then a cosine decay to
    #: :data:`COSINE_FLOOR` of ``lr`` at the phase's last step (see :func:`scheduled_lr`)
    schedule: str = "constant"


#: The cosine schedule ends at this share of the phase's learning rate.
COSINE_FLOOR = 0.05


def scheduled_lr(spec: PhaseSpec, step: int, steps_per_epoch: int, restart: Sequence[float] = ()) -> float:
    """The learning rate of a phase's ``step`` (0-based, counted over the whole phase).

    A pure function of the position, so a run resumed from a checkpoint continues the
    schedule exactly without saving a scheduler. The warm-up matters when the trunk is
    unfrozen: a full rate at once moves every feature the phase-1 head was fitted to.
    ``restart`` (epoch, share of ``lr``), set when a rerun raised the phase's epochs (see
    :func:`extend_phase`): from that epoch on, a cosine from that share down to the floor at
    the phase's new last step, so the rate goes on from where it was instead of jumping up.
    """
    if spec.schedule == "constant":
        return spec.lr
    total = max(1, spec.epochs * steps_per_epoch)
    if restart and step >= int(restart[0] * steps_per_epoch):
        start, floor, lr0 = int(restart[0] * steps_per_epoch), COSINE_FLOOR * spec.lr, restart[1] * spec.lr
        progress = min(1.0, (step - start) / max(1, total - start - 1))
        return floor + (lr0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    warmup = max(1, steps_per_epoch)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return spec.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint so a restart continues exactly."""

    phase_index: int = 0
    phase_epoch: int = 0          # epochs finished in the current phase
    global_epoch: int = 0         # epochs finished in total
    phase_best_score: float = -math.inf  # best select score of phase_best_metric in this phase
    phase_best_metric: str = ""     # the --select-metric that score is of
    bad_epochs: int = 0           # epochs without a gain of the selection metric in this phase
    stopped_early: bool = False   # the current phase ended by patience
    phase_planned_epochs: int = 0  # the epochs the current phase was run for (0: not recorded)
    lr_restart: list[float] = field(default_factory=list)  # (epoch, share of lr): see scheduled_lr
    diverged_at: int = 0          # the epoch whose loss or validation scores were not finite (0: none)
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_after: list[int] = field(default_factory=list)  # global_epoch at each resume
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason, skipped by the loaders

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        """Build from a saved ``state.json``, ignoring keys this version does not know.

        Checkpoints from before ``--select-metric`` saved ``phase_best_f1`` (micro F1): it
        is kept with its metric's name, so a run resumed under another metric restarts
        the phase's best (see :func:`update_patience`).
        """
        d = dict(d)
        if "phase_best_f1" in d and "phase_best_score" not in d:
            d["phase_best_score"], d["phase_best_metric"] = d["phase_best_f1"], "val_micro_f1"
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def update_patience(state: LoopState, metrics: dict[str, Any], metric: str) -> None:
    """Count an epoch toward patience: a gain of ``metric`` resets the count.

    A best score of another metric (a resumed run whose ``--select-metric`` changed)
    does not count: the first epoch under the new metric sets the best.
    """
    value = selection_score(metrics, metric)  # NaN (a diverged epoch) is never a gain
    if state.phase_best_metric != metric:
        state.phase_best_score, state.phase_best_metric = -math.inf, metric
    if value > state.phase_best_score + 1e-9:
        state.phase_best_score, state.bad_epochs = value, 0
    else:
        state.bad_epochs += 1


def phases(cfg: TrainConfig) -> list[PhaseSpec]:
    """The two phases as data, so one function runs both."""
    return [PhaseSpec("head", cfg.head_epochs, cfg.lr, 0),
            PhaseSpec("finetune", cfg.finetune_epochs, cfg.finetune_lr, cfg.unfreeze_depth, cfg.finetune_schedule)]


#: Report field: the epoch as the phases plan it (see :func:`schedule_epoch`); ASHA's clock.
SCHEDULE_EPOCH = "schedule_epoch"


def schedule_epoch(cfg: TrainConfig, phase_index: int, phase_epoch: int) -> int:
    """Epoch ``phase_epoch`` of phase ``phase_index`` counted as if every earlier phase ran all
    its planned epochs: the global epoch, unless patience stopped an earlier phase. Phase 2's
    n-th epoch is then the same number in every run, whenever its phase 1 ended."""
    return sum(p.epochs for p in phases(cfg)[:phase_index]) + phase_epoch


def _setup_logging(rank: int) -> None:
    # Each worker is its own process: the driver's logging set-up does not reach it.
    # Ray Train 2.60 logs every report's whole metrics dict from every rank at INFO under a
    # logger named after its file, which RunConfig(logging_config=...) does not reach; the
    # one-line epoch summary below says the same readably.
    from ray.train.v2._internal.execution import context as train_context
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    if rank != 0:
        log.setLevel(logging.WARNING)
    elif not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _amp(device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """Autocast context factory and grad scaler: bf16 on 8.0+ GPUs, else fp16 + scaling."""
    dtype = amp_dtype(device)
    if dtype is None:
        return nullcontext, torch.amp.GradScaler("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _gather(values: list) -> list:
    """Concatenate a Python list from every rank (validation is sharded without padding)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    out: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


class _TakenOver(Exception):
    """Another start claimed this run's folder: every rank leaves the loop (raised on all at once)."""


def _check_still_held(loop_config: dict, rank: int) -> None:
    """Raise :class:`_TakenOver` on every rank when another start has claimed the run folder
    since this job did (rank 0 reads the record; the others take its answer)."""
    holder = loop_config.get("run_holder")
    if not holder or loop_config.get("run_folder") is None:
        return
    why = holder_lost(loop_config["run_folder"], holder) if rank == 0 else ""
    why = _gather([why])[0]
    if why:
        if rank == 0:
            log.error("%s", why)
        raise _TakenOver(why)


def _mean_across_ranks(total: float, count: int, device: torch.device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _weighted_bce(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted BCE on the 'artifact-free' logit; returns (mean loss, summed loss).

    ``logits`` is (N, 1), or (N, members) for a head ensemble in training: each member's own
    loss, averaged over the members, so that a member's own weights learn only from its errors.
    """
    logits = logits.float()
    per_sample = F.binary_cross_entropy_with_logits(logits, y.float().unsqueeze(1).expand_as(logits),
                                                    reduction="none").mean(dim=1)
    per_sample = per_sample * weights[y]
    # sum / n rather than mean(): a batch whose files were all unreadable is empty, and its
    # step must still run (DDP) with a zero loss, not NaN.
    return per_sample.sum() / max(len(y), 1), per_sample.sum().detach()


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(device)


def evaluate(model: nn.Module, loader: DataLoader, weights: torch.Tensor, device: torch.device,
             autocast: Any = nullcontext) -> tuple[list[float], list[int], float, int]:
    """Probabilities of 'artifact-free', labels and summed loss over this rank's loader."""
    model.eval()
    probs: list[float] = []
    labels: list[int] = []
    loss_sum, n = 0.0, 0
    with torch.inference_mode():
        for x, y in loader:
            x, y = _to_device(x, y, device)
            with autocast():
                logits = model(x)
            _, s = _weighted_bce(logits, y, weights)
            loss_sum += float(s)
            n += len(y)
            probs.extend(torch.sigmoid(logits.squeeze(1).float()).cpu().tolist())
            labels.extend(y.cpu().tolist())
    return probs, labels, loss_sum, n


def _save_checkpoint(tmpdir: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, state: LoopState, val_probs: list[float],
                     val_labels: list[int]) -> None:
    torch.save(unwrap(model).state_dict(), os.path.join(tmpdir, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()},
               os.path.join(tmpdir, OPTIMIZER_FILE))
    with open(os.path.join(tmpdir, STATE_FILE), "w") as f:
        json.dump(asdict(state), f)
    with open(os.path.join(tmpdir, VAL_SCORES_FILE), "w") as f:
        json.dump({"prob_artifact_free": val_probs, "label": val_labels}, f)


def _load_checkpoint(checkpoint: ray.train.Checkpoint, model: nn.Module) -> tuple[LoopState, dict | None]:
    with checkpoint.as_directory() as d:
        model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True))
        with open(os.path.join(d, STATE_FILE)) as f:
            state = LoopState.from_dict(json.load(f))
        opt_path = os.path.join(d, OPTIMIZER_FILE)
        opt = torch.load(opt_path, map_location="cpu", weights_only=True) if os.path.exists(opt_path) else None
    return state, opt


def restore_optimizer(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, saved: dict) -> None:
    """Load a checkpoint's optimizer and grad-scaler state into this phase's.

    A disabled scaler (CPU, bf16) saves ``{}``: a run resumed on a GPU that scales (fp16)
    starts its scaler afresh instead of failing on the empty state, and a disabled scaler
    has nothing to load.
    """
    optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])


def _maybe_override_val_probs(loop_config: dict, epoch: int, probs: list[float], labels: list[int]) -> list[float]:
    """Selection drill (see the tests): ``val_prob_drill`` maps an epoch to the probability of
    'artifact-free' every validation image of label 0 and of label 1 gets, so a test can
    script which epoch has skill and check that selection keeps it."""
    drill = (loop_config.get("val_prob_drill") or {}).get(str(epoch))
    if drill is None:
        return probs
    return [float(drill[y]) for y in labels]


def _maybe_inject_failure(loop_config: dict, state: LoopState, rank: int, world: int) -> None:
    """Fault-tolerance drill: kill the last rank once at a given epoch (see the tests)."""
    at, marker = loop_config.get("fail_at_epoch"), loop_config.get("fail_marker")
    if at is None or not marker or state.global_epoch != at or rank != world - 1:
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"failed at epoch {at}\n")
    raise RuntimeError(f"injected worker failure at epoch {at} (rank {rank})")


class OversamplingSampler(Sampler[int]):
    """Draws training images with replacement so that about ``share`` of the draws are
    artifact images (more positives per batch than a 1:9 folder gives).

    DDP-aware: each rank draws its own ``ceil(n / world)`` indices per epoch from its own
    random stream (seed, epoch, rank), so together the ranks see about one epoch's worth of
    images and no rank repeats another's draws; ``set_epoch`` changes the draws as
    :class:`~torch.utils.data.DistributedSampler` does.
    """

    def __init__(self, labels: list[int], *, share: float, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        y = np.asarray(labels)
        n_art = int(np.sum(y == ARTIFACT))
        if not 0 < share < 1 or n_art == 0 or n_art == y.size:
            raise ValueError(f"oversampling needs a share in (0, 1) and both classes, got share {share} "
                             f"with {n_art} artifact(s) in {y.size} images")
        w = np.where(y == ARTIFACT, share / n_art, (1 - share) / (y.size - n_art))
        self.weights = torch.as_tensor(w, dtype=torch.double)
        self.num_samples = math.ceil(y.size / num_replicas)
        self.rank, self.seed, self.epoch = rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """New draws for a new epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples


def _rows_per_rank(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, bool]:
    """Training rows each rank reads per epoch, and whether its loader drops the last short
    batch (once there is more than one batch: a batch of one sample breaks BatchNorm in the
    unfrozen blocks). DataLoader: ceil(n / world) (DistributedSampler pads, the oversampler
    draws that many); Ray Data's streaming_split: floor(n / world)."""
    per_rank = n_train // world if cfg.ingest == "ray-data" else math.ceil(n_train / world)
    return per_rank, per_rank > cfg.batch_size


def epoch_steps(cfg: TrainConfig, n_train: int, world: int) -> int:
    """Batches each rank runs per epoch on images, as its loader yields them: from the split,
    not the loader (a Ray Data shard has no length), the same on every rank. The phase-2
    schedule counts its steps by it, so it warms up over exactly the first epoch and ends at
    its floor on the last step."""
    per_rank, drop_last = _rows_per_rank(cfg, n_train, world)
    return max(1, per_rank // cfg.batch_size if drop_last else 1)


def loss_weights(cfg: TrainConfig, folder_weights: list[float]) -> list[float]:
    """Class weights of the loss: the folder's balanced weights, or with ``--oversample R``
    the balanced weights of the drawn mix (artifact share R), so sampling and weighting
    together still count both classes equally."""
    if cfg.oversample > 0:
        return [1 / (2 * cfg.oversample), 1 / (2 * (1 - cfg.oversample))]
    return list(folder_weights)


class SkippingLoader:
    """Iterates ``(images, labels)`` of a DataLoader that uses :func:`collate_readable`,
    keeping the unreadable files it met in ``unreadable``."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.unreadable: list[Unreadable] = []

    @property
    def sampler(self) -> Any:
        """The wrapped loader's sampler (``set_epoch`` goes there)."""
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, bad in self.loader:
            self.unreadable.extend(bad)
            yield x, y


def _collect_unreadable(loaders: tuple, state: LoopState, device: torch.device) -> int:
    """Distinct files skipped this epoch over all ranks; the state keeps them with reasons.

    Counted when a loader meets them: a file in a batch that ``drop_last`` drops is not met.
    """
    mine = [(u.path, u.reason) for loader in loaders for u in loader.unreadable]
    for loader in loaders:
        loader.unreadable.clear()
    everyone = _gather(mine)
    new = [(p, r) for p, r in everyone if p not in state.unreadable]
    if new:  # logged once per file (rank 0 only logs at INFO)
        log.info("skipped %d unreadable image(s), e.g. %s", len(new),
                 "; ".join(f"{os.path.basename(p)}: {r}" for p, r in new[:3]))
    state.unreadable.update(dict(everyone))
    return len({p for p, _ in everyone})  # the sampler's padding may repeat a file


def _decode_caches(cfg: TrainConfig, *, n_val: int) -> tuple[DecodeCache | None, DecodeCache | None]:
    """This worker's decode caches (training, validation) for ``--decode-cache-mb``, or None.

    Validation's shard is fixed and read whole to build each phase's cache (and every epoch
    where a phase streams it), so it is reserved room first; training gets the rest, and
    validation's room too once phase 2 has cached its validation features (see
    :func:`_release_validation_decode_cache`). Training needs room for the whole training set,
    not this rank's share: the DistributedSampler deals the images out anew every epoch. Off with
    DataLoader processes, where each process would fill its own copy of the same budget.
    """
    if cfg.decode_cache_mb <= 0 or cfg.loader_workers > 0:
        return None, None
    budget = cfg.decode_cache_mb << 20
    val_bytes = min(budget, n_val * 3 * cfg.image_size * cfg.image_size)
    return DecodeCache(budget - val_bytes), DecodeCache(val_bytes)


def _release_validation_decode_cache(loaders: tuple) -> None:
    """Hand validation's decode-cache room to training's: phase 2 validates from cached
    features and will not read those images again."""
    val_ds, train_ds = loaders[1].loader.dataset.dataset, loaders[0].loader.dataset
    if val_ds.cache is None:
        return
    if train_ds.cache is not None:
        train_ds.cache.max_bytes += val_ds.cache.max_bytes
    val_ds.cache = None


def _loader_generator(cfg: TrainConfig) -> torch.Generator:
    # A DataLoader draws its processes' seeds from this stream of its own, not the process's:
    # persistent loader processes draw once, so a restart would shift the dropout masks.
    return torch.Generator().manual_seed(cfg.seed)


def _loaders(loop_config: dict, cfg: TrainConfig, rank: int, world: int) -> tuple[Any, SkippingLoader]:
    split = loop_config["split"]
    fs = loop_config.get("data_fs")  # a pyarrow filesystem for data in object storage, else None
    # Validation is sharded without padding (DistributedSampler would duplicate samples
    # and bias the metrics); the shards are gathered before computing F1.
    val_indices = list(range(rank, len(split["val_paths"]), world))
    train_cache, val_cache = _decode_caches(cfg, n_val=len(val_indices))
    train_ds = ImageFileDataset(split["train_paths"], split["train_labels"],
                                train_transform(image_size=cfg.image_size), fs=fs, target_size=cfg.image_size,
                                cache=train_cache, seed=cfg.seed)
    val_ds = ImageFileDataset(split["val_paths"], split["val_labels"], eval_transform(image_size=cfg.image_size), fs=fs,
                              target_size=cfg.image_size, cache=val_cache)
    collate = partial(collate_readable, image_size=cfg.image_size)
    sampler: DistributedSampler | OversamplingSampler
    if cfg.oversample > 0:
        sampler = OversamplingSampler(split["train_labels"], share=cfg.oversample, num_replicas=world, rank=rank,
                                      seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    _, drop_last = _rows_per_rank(cfg, len(train_ds), world)
    if cfg.ingest == "ray-data":  # this worker's streaming_split shard (artifact_core.ingest)
        from artifact_core.ingest import ShardLoader
        train: Any = ShardLoader(ray.train.get_dataset_shard("train"), batch_size=cfg.batch_size,
                                 drop_last=drop_last)
    else:
        train = SkippingLoader(DataLoader(train_ds, batch_size=cfg.batch_size,
                                          sampler=EpochSampler(sampler, rank=rank),
                                          num_workers=cfg.loader_workers, drop_last=drop_last,
                                          persistent_workers=cfg.loader_workers > 0, collate_fn=collate,
                                          pin_memory=cfg.use_gpu, generator=_loader_generator(cfg)))
    val_shard = Subset(val_ds, val_indices)
    # pinned batches: the non-blocking copies to the GPU (_to_device) then overlap compute
    val_loader = DataLoader(val_shard, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.loader_workers,
                            collate_fn=collate, pin_memory=cfg.use_gpu, generator=_loader_generator(cfg))
    return train, SkippingLoader(val_loader)


@dataclass
class FeatureCache:
    """Features of one worker's images and their labels, on its device: the whole trunk's
    output (phase 1, float16), or the frozen first ``start`` blocks' output (phase 2), which
    the trainable blocks continue from."""

    features: torch.Tensor
    labels: torch.Tensor
    #: the mirrored images' features, for a model that flips at test time (validation only)
    mirrored: torch.Tensor | None = None
    #: phase 2: the trunk continues from this block; None: ``features`` are the trunk's output
    start: int | None = None
    #: phase 2 with the multiscale head: the tap's map, when the tap is a frozen block
    skip: torch.Tensor | None = None
    mirrored_skip: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        held = (self.features, self.mirrored, self.skip, self.mirrored_skip)
        return sum(t.numel() * t.element_size() for t in held if t is not None)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # Indexing a batch out of the cache drops the layout; MobileNetV2's blocks run about
    # twice as slow on CPU without it.
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _cached_logits(model: nn.Module, cache: FeatureCache, index: Any, *, mirrored: bool = False) -> torch.Tensor:
    """The model's logits for ``cache[index]`` (of the mirrored images with ``mirrored``)."""
    features = (cache.mirrored if mirrored else cache.features)[index].float()
    if cache.start is None:
        return head_logits(model, features)
    skip = cache.mirrored_skip if mirrored else cache.skip
    skip = _channels_last(skip[index].float()) if skip is not None else None
    return head_logits(model, trunk_suffix(model.features, cache.start, _channels_last(features), skip))


def _cache_features(model: nn.Module, loader: Any, device: torch.device, autocast: Any, *,
                    passes: int = 1, first_epoch: int = 0, mirrored: bool = False, stop: int | None = None,
                    dtype: torch.dtype = torch.float16, mirrors_as_views: bool = False,
                    spill: str | None = None) -> FeatureCache:
    """Run the frozen trunk (or with ``stop``, its first ``stop`` blocks) over ``loader``
    ``passes`` times (each a fresh augmented view); with ``mirrored``, over each image's mirror too.

    With ``mirrors_as_views`` the mirrors follow the images as more views of them (labels
    repeated) instead of filling ``mirrored``. With ``spill`` (a directory; the whole trunk
    only) the features go to files there and come back memory-mapped (:mod:`artifact_core.spill`).
    """
    if (spill is not None or mirrors_as_views) and (stop is not None or mirrored):
        raise ValueError("only the whole trunk's features of training views can be cached on disk or with "
                         "their mirrors as views")
    labels = []
    n = getattr(model, "images_per_pass", 0)
    with ExitStack() as files:  # (a mapped tensor keeps its pages after its file is closed)
        out: dict[str, Any] = {k: files.enter_context(SpillFile(spill, dtype))
                               if spill is not None and k in ("features", "mirrored") else []
                               for k in ("features", "skip", "mirrored", "mirrored_skip")}

        def keep(x: torch.Tensor, key: str, skip_key: str) -> None:
            for part in x.split(n) if n > 0 else (x,):
                h, skip = (model.features(part), None) if stop is None else trunk_prefix(model.features, stop, part)
                out[key].append(h.to(dtype))
                if skip is not None:
                    out[skip_key].append(skip.to(dtype))

        model.eval()
        with torch.inference_mode():
            for i in range(passes):
                if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
                    loader.sampler.set_epoch(first_epoch + i)
                for x, y in loader:
                    x, y = _to_device(x, y, device)
                    with autocast():
                        keep(x, "features", "skip")
                        if mirrored or mirrors_as_views:
                            keep(x.flip(-1), "mirrored", "mirrored_skip")
                    labels.append(y)
        if mirrors_as_views:  # [images..., mirrors...], as two passes over the same order would give
            if spill is not None:
                out["features"].extend(out["mirrored"])
            else:
                out["features"] += out["mirrored"]
            out["mirrored"] = []
            labels += labels
        if not labels:
            empty = torch.zeros(0, device=device, dtype=dtype)
            return FeatureCache(empty, torch.zeros(0, dtype=torch.int64, device=device),
                                empty if mirrored else None, start=stop)

        def joined(key: str) -> torch.Tensor | None:
            held = out[key]
            if isinstance(held, SpillFile):
                return held.tensor() if held.rows else None
            return torch.cat(held).contiguous(memory_format=torch.channels_last) if held else None

        return FeatureCache(joined("features"), torch.cat(labels), joined("mirrored"), start=stop,
                            skip=joined("skip"), mirrored_skip=joined("mirrored_skip"))


def _shard_loader(loader: SkippingLoader, cfg: TrainConfig, world: int) -> SkippingLoader:
    """The training loader's dataset over this rank's shard of the split, every image once (a
    shuffled :class:`DistributedSampler`, as without oversampling), for phase 1's cache.
    Without drop_last: it guards BatchNorm in training mode, and the frozen trunk runs in eval
    mode here; with it, up to a batch of images per rank would never reach the cache."""
    inner = loader.loader
    rank = inner.sampler.rank  # (an EpochSampler)
    sampler = EpochSampler(DistributedSampler(inner.dataset, num_replicas=world, rank=rank, shuffle=True,
                                              seed=cfg.seed), rank=rank)
    return SkippingLoader(DataLoader(inner.dataset, batch_size=inner.batch_size, sampler=sampler,
                                     num_workers=cfg.loader_workers, collate_fn=inner.collate_fn,
                                     pin_memory=cfg.use_gpu, generator=_loader_generator(cfg)))


def _plain_views(model: nn.Module, loader: SkippingLoader, cfg: TrainConfig, device: torch.device,
                 autocast: Any, *, first_epoch: int, spill: str | None = None) -> FeatureCache:
    """Trunk features of the training images as validation and scoring see them (the eval
    preset), and with ``--head-cache-views 2`` of their mirrors too, as one cache of views."""
    inner = loader.loader
    plain = copy.copy(inner.dataset)  # (shares the decode cache: phase 2 reads the same images)
    plain.transform = eval_transform(image_size=cfg.image_size)
    # A loader of its own, so the training loader's processes keep the augmenting dataset for
    # phase 2; without drop_last, which guards BatchNorm in training mode (the frozen trunk runs
    # in eval) and would drop the same images from both views for every epoch.
    plain_loader = SkippingLoader(DataLoader(plain, batch_size=inner.batch_size, sampler=inner.sampler,
                                             num_workers=cfg.loader_workers, collate_fn=inner.collate_fn,
                                             pin_memory=cfg.use_gpu, generator=_loader_generator(cfg)))
    cache = _cache_features(model, plain_loader, device, autocast, first_epoch=first_epoch,
                            mirrors_as_views=cfg.head_cache_views >= 2, spill=spill)
    loader.unreadable.extend(plain_loader.unreadable)  # counted as the training loader's
    return cache


def _largest_val_shard(val_loader: SkippingLoader, world: int) -> int:
    """An upper bound on any rank's validation shard: cache decisions sized by it are the same
    on every rank."""
    return len(val_loader.loader.dataset.dataset) // max(world, 1) + 1


def _spill_dir(disk_bytes: int, val_bytes: int, cfg: TrainConfig, device: torch.device,
               workers_on_node: int) -> str | None:
    """Where phase 1 keeps training views that are over :func:`head_cache_limit`: the temp
    dir (``TMPDIR``), when validation still fits in memory, the worker runs on CPU (a GPU
    streams the trunk fast enough) and every rank's disk has room for ``disk_bytes`` (the
    files' peak); else None (stream). The answer is the same on every rank."""
    directory = tempfile.gettempdir()
    ok = (device.type == "cpu" and val_bytes <= head_cache_limit(cfg)
          and spill_room(disk_bytes, workers_on_node=workers_on_node, directory=directory))
    if device.type == "cpu" and dist.is_available() and dist.is_initialized():
        refused = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(refused)
        ok = float(refused) == 0.0
    return directory if ok else None


def _head_caches(model: nn.Module, cfg: TrainConfig, loaders: tuple, device: torch.device,
                 autocast: Any, state: LoopState, world: int,
                 workers_on_node: int = 1) -> tuple[FeatureCache, FeatureCache] | None:
    """Phase 1's training views and validation features, or None to stream (off, ray-data
    ingest, or over :func:`head_cache_limit` with no disk to spill the views to). The
    decision is the same on every rank."""
    train_loader, val_loader = loaders
    if cfg.head_cache_views <= 0 or cfg.ingest != "dataloader":
        return None
    model.eval()  # (a dry run of one image: BatchNorm must neither need a batch nor learn from it)
    with torch.inference_mode():
        per_image = model.features(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)).numel() * 2
    train_bytes = len(train_loader.sampler) * cfg.head_cache_views * per_image
    # Validation scores what the bundle will: with the mirror too when the model flips at test time.
    mirrored = bool(getattr(model, "test_time_flip", False))
    val_bytes = _largest_val_shard(val_loader, world) * (2 if mirrored else 1) * per_image
    spill = None
    if train_bytes + val_bytes > head_cache_limit(cfg):
        # The plain views' mirrors are written beside the images, then copied after them.
        mirrors_apart = not cfg.head_cache_augment and cfg.head_cache_views >= 2
        spill = _spill_dir(train_bytes * 3 // 2 if mirrors_apart else train_bytes, val_bytes, cfg, device,
                           workers_on_node)
        if spill is None:
            # Streaming runs the whole trunk over every image every epoch: many times slower
            # than the cache, and on augmented images where the plain views were asked for.
            log.warning("phase 1 streams %s, a trunk pass per epoch: caching its features would take %.1f GiB "
                        "per worker, over --head-cache-mb, and they cannot go to disk (GPU, or too little room "
                        "in the temp dir); raise --head-cache-mb to %d or add workers to cache them",
                        "images" if cfg.head_cache_augment else "augmented images, not the plain views",
                        (train_bytes + val_bytes) / 2**30, math.ceil((train_bytes + val_bytes) / 2**20))
            return None
        log.info("phase 1: its training views (%.0f MiB per worker) are over --head-cache-mb: cached on disk in %s",
                 train_bytes / 2**20, spill)
    t0 = time.time()
    # The views are those of the phase's first epochs, also when a restart builds them again.
    phase_start = state.global_epoch - state.phase_epoch
    # Oversampling draws with replacement: one draw cached for every head epoch would leave
    # most clean images out of phase 1. The cache holds each image of the rank's shard once
    # instead, and every epoch draws its mix from it (_cached_order).
    source = _shard_loader(train_loader, cfg, world) if cfg.oversample > 0 else train_loader
    if cfg.head_cache_augment:
        train = _cache_features(model, source, device, autocast, passes=cfg.head_cache_views,
                                first_epoch=phase_start, spill=spill)
    else:
        train = _plain_views(model, source, cfg, device, autocast, first_epoch=phase_start, spill=spill)
    if source is not train_loader:
        train_loader.unreadable.extend(source.unreadable)
    val = _cache_features(model, val_loader, device, autocast, mirrored=mirrored)
    cached = train.features.numel() + val.features.numel() + (val.mirrored.numel() if val.mirrored is not None else 0)
    log.info("phase 1: trunk features of %d training views and %d validation images%s cached (%.0f MiB%s) in %.1fs",
             len(train), len(val), " and their mirrors" if val.mirrored is not None else "", cached * 2 / 2**20,
             ", the views on disk" if spill else "", time.time() - t0)
    return train, val


def _prefix_val_cache(model: nn.Module, cfg: TrainConfig, loaders: tuple, device: torch.device, autocast: Any,
                      world: int) -> FeatureCache | None:
    """Phase 2's validation images (and their mirrors) run through the frozen blocks once, or
    None to stream them (ray-data ingest, nothing frozen, or more than
    :func:`head_cache_limit`). The decision is the same on every rank.

    The frozen first blocks, BatchNorm in eval, give the same output for the same image every
    epoch, and they are most of the cost of a forward pass (at 448 px blocks 0-7 take about
    85 % of it: the high-resolution ones). Validation images are not augmented, so their
    output is kept in float32 and each phase-2 epoch validates by running only the trainable
    blocks: the scores the live model would give.
    """
    stop = frozen_prefix(model)
    if cfg.ingest != "dataloader" or stop == 0:
        return None
    model.eval()  # (a dry run of one image: BatchNorm must neither need a batch nor learn from it)
    with torch.inference_mode():
        h, skip = trunk_prefix(model.features, stop, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
    per_image = h.numel() + (skip.numel() if skip is not None else 0)
    mirrored = bool(getattr(model, "test_time_flip", False))
    n_val = _largest_val_shard(loaders[1], world)
    need = n_val * (2 if mirrored else 1) * per_image * 4
    if need > head_cache_limit(cfg):
        log.info("phase 2 validates from images: caching the frozen blocks' output would take %.1f GiB per worker "
                 "(limit %.1f GiB)", need / 2**30, head_cache_limit(cfg) / 2**30)
        return None
    t0 = time.time()
    val = _cache_features(model, loaders[1], device, autocast, mirrored=mirrored, stop=stop, dtype=torch.float32)
    log.info("phase 2: output of the %d frozen blocks for %d validation images%s cached (%.0f MiB) in %.1fs",
             stop, len(val), " and their mirrors" if val.mirrored is not None else "", val.nbytes / 2**20,
             time.time() - t0)
    return val


def _allreduce_mean_(tensors: list[torch.Tensor], world: int) -> None:
    """Average tensors over the ranks, in place, in one collective."""
    if world <= 1 or not tensors or not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _allreduce_mean_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over the ranks (what DDP does for the head); a missing one counts as zero."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _allreduce_mean_([p.grad for p in params], world)


def _average_buffers(module: nn.Module, world: int) -> None:
    """Average floating-point buffers (the head's BatchNorm statistics) over the ranks.

    Outside DDP nothing keeps them equal, and each rank would judge its validation shard
    with statistics of its own training shard while rank 0's model is the one saved.
    """
    _allreduce_mean_([b for b in module.buffers() if b.is_floating_point()], world)


def _cached_order(labels: torch.Tensor, *, steps: int, batch_size: int, seed: int,
                  oversample: float = 0.0) -> torch.Tensor | None:
    """The views an epoch on cached features trains on, in order (None: no views on this rank):
    a fresh shuffle, or with ``oversample`` R, ``steps * batch_size`` draws with replacement of
    which about R are artifact views (as :class:`OversamplingSampler` draws images)."""
    if not len(labels):
        return None
    generator = torch.Generator().manual_seed(seed)
    y = labels.cpu()
    n_art = int((y == ARTIFACT).sum())
    if oversample > 0 and 0 < n_art < len(y):
        w = torch.where(y == ARTIFACT, oversample / n_art, (1 - oversample) / (len(y) - n_art)).double()
        return torch.multinomial(w, steps * batch_size, replacement=True, generator=generator).to(labels.device)
    return torch.randperm(len(y), generator=generator).to(labels.device)


def _train_epoch_cached(model: nn.Module, cache: FeatureCache, *, steps: int, batch_size: int,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, weights: torch.Tensor,
                        autocast: Any, world: int, seed: int, oversample: float = 0.0) -> tuple[float, int]:
    """One epoch of the head on cached features: ``steps`` batches (the same count on every
    rank, so the gradient collectives match), drawn from a fresh shuffle of the views, or
    oversampled from them (:func:`_cached_order`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    order = _cached_order(cache.labels, steps=steps, batch_size=batch_size, seed=seed, oversample=oversample)
    total, count = 0.0, 0
    train_mode(model)
    for step in range(steps):
        if order is None:  # this rank read no image: a zero loss keeps it in step with the others
            loss = sum(p.sum() for p in params) * 0.0
            s = torch.zeros(())
        else:
            idx = order[torch.arange(step * batch_size, (step + 1) * batch_size, device=order.device) % len(order)]
            with autocast():
                logits = _cached_logits(model, cache, idx)
            loss, s = _weighted_bce(logits, cache.labels[idx], weights)
            count += len(idx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        _allreduce_mean_grads(params, world)
        scaler.step(optimizer)
        scaler.update()
        total += float(s)
    _average_buffers(model.classifier, world)
    return total, count


def _evaluate_cached(model: nn.Module, cache: FeatureCache, weights: torch.Tensor,
                     autocast: Any, batch_size: int = 64) -> tuple[list[float], list[int], float, int]:
    """:func:`evaluate` on cached validation features (on CPU in passes whose activations stay
    within glibc's mmap threshold, see :mod:`artifact_core.cpu_memory`)."""
    model.eval()
    probs: list[float] = []
    loss_sum = 0.0
    if len(cache) and cache.features.device.type == "cpu":
        per_image = largest_output_bytes(model, lambda: _cached_logits(model, cache, slice(0, 1)))
        batch_size = min(batch_size, images_per_pass(per_image))
    with torch.inference_mode():
        for i in range(0, len(cache), batch_size):
            with autocast():
                logits = _cached_logits(model, cache, slice(i, i + batch_size))
                if cache.mirrored is not None:  # as LocalEvidenceNet.forward with test_time_flip
                    logits = torch.minimum(logits, _cached_logits(model, cache, slice(i, i + batch_size), mirrored=True))
            y = cache.labels[i:i + batch_size]
            loss_sum += float(_weighted_bce(logits, y, weights)[1])
            probs.extend(torch.sigmoid(logits.squeeze(1).float()).cpu().tolist())
    return probs, cache.labels.cpu().tolist(), loss_sum, len(cache)


def run_phase(spec: PhaseSpec, *, model: nn.Module, state: LoopState, optimizer_state: dict | None,
              cfg: TrainConfig, loop_config: dict, loaders: tuple[DataLoader, DataLoader],
              weights: torch.Tensor, device: torch.device, context: dict) -> nn.Module:
    """Run (or continue) one phase; returns the plain model (no DDP wrapper)."""
    rank, world = context["rank"], context["world"]
    base = unwrap(model)
    trainable = set_trainable(base, unfreeze_depth=spec.unfreeze_depth)
    autocast, scaler = _amp(device)
    # Phase 1 with a frozen trunk: its features are the same every epoch but for the
    # augmentation, so they are computed for a few augmented views once and the head trains
    # on them for as many epochs as it needs, at the cost of a pass of the head.
    t_setup = time.time()
    caches = (_head_caches(base, cfg, loaders, device, autocast, state, world, context["workers_on_node"])
              if spec.unfreeze_depth == 0 else None)
    # Phase 2: validation from the frozen blocks' output, computed once.
    prefix_val = _prefix_val_cache(base, cfg, loaders, device, autocast, world) if spec.unfreeze_depth > 0 else None
    if prefix_val is not None:
        _release_validation_decode_cache(loaders)
    unreadable_cached = _collect_unreadable(loaders, state, device) if caches is not None else 0
    # validation read once for its cache: its unreadable files count in every epoch, as when streamed
    unreadable_val = _collect_unreadable(loaders[1:], state, device) if prefix_val is not None else 0
    setup_seconds = time.time() - t_setup  # caching: counted in the phase's first epoch
    # DDP registers gradient hooks only for parameters that require grad when it wraps the
    # model, so each phase wraps anew after changing what is frozen. On cached features the
    # head runs outside DDP and its gradients are averaged by hand.
    ddp_model = base if caches is not None else ray.train.torch.prepare_model(base)
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        restore_optimizer(optimizer, scaler, optimizer_state)
    train_loader, val_loader = loaders
    while state.phase_epoch < spec.epochs and not state.stopped_early and not state.diverged_at:
        _maybe_inject_failure(loop_config, state, rank, world)
        # Dropout and whatever else draws from the process's stream: seeded by (seed, epoch,
        # rank) at each epoch, so a resumed epoch runs as the uninterrupted one would have
        # (augmentations have their own seeds: dataset.EpochSampler).
        # (another formula than OversamplingSampler's, whose draws dropout must not repeat)
        torch.manual_seed(((cfg.seed * 1_000_003 + state.global_epoch) * 1_013 + rank + 1) % (2 ** 63 - 1))
        t0 = time.time() - setup_seconds
        setup_seconds = 0.0
        if caches is not None:
            total, count = _train_epoch_cached(ddp_model, caches[0], steps=len(train_loader), batch_size=cfg.batch_size,
                                               optimizer=optimizer, scaler=scaler, weights=weights, autocast=autocast,
                                               world=world, seed=cfg.seed * 100_003 + state.global_epoch * 101 + rank,
                                               oversample=cfg.oversample)
        else:
            train_loader.sampler.set_epoch(state.global_epoch)
            train_mode(ddp_model, trunk_bn_frozen=cfg.finetune_bn == "frozen")
            total, count = 0.0, 0
            steps = epoch_steps(cfg, len(loop_config["split"]["train_paths"]), world)
            for i, (x, y) in enumerate(train_loader):
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(spec, state.phase_epoch * steps + i, steps, state.lr_restart)
                x, y = _to_device(x, y, device)
                with autocast():
                    logits = ddp_model(x)
                loss, s = _weighted_bce(logits, y, weights)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(s)
                count += len(y)
        train_loss = _mean_across_ranks(total, count, device)
        # The plain model, not DDP: DDP's forward may sync buffers (a collective), and a rank
        # whose validation shard is empty would never join it.
        val_cache = caches[1] if caches is not None else prefix_val
        if caches is None and world > 1:
            # Each rank's BatchNorm statistics moved with its own last batch (DDP copies rank 0's
            # only at the next forward): validate, as the checkpoint saves, with rank 0's.
            for b in unwrap(ddp_model).buffers():
                if b.is_floating_point():
                    dist.broadcast(b, src=0)
        if val_cache is not None:
            probs, labels, vloss, vn = _evaluate_cached(unwrap(ddp_model), val_cache, weights, autocast)
        else:
            probs, labels, vloss, vn = evaluate(unwrap(ddp_model), val_loader, weights, device, autocast)
        val_loss = _mean_across_ranks(vloss, vn, device)
        probs, labels = _gather(probs), _gather(labels)
        probs = _maybe_override_val_probs(loop_config, state.global_epoch + 1, probs, labels)
        # Threshold-free AP and ROC AUC of the artifact class beside micro F1 at 0.5: they
        # drive selection (--select-metric), since a one-class model cannot win them.
        m = {**classification_metrics(labels, predict_labels(probs, 0.5)), **ranking_metrics(labels, probs)}
        # A model whose weights went to inf/NaN stays there; its AP on NaN scores would only
        # reflect the order of the validation list. Every rank sees the same gathered values.
        diverged = not (math.isfinite(train_loss) and bool(np.all(np.isfinite(probs))))
        unreadable = (unreadable_cached if caches is not None
                      else _collect_unreadable(loaders, state, device) + unreadable_val)

        state.phase_epoch += 1
        state.global_epoch += 1
        reported = {f"val_{k}": v for k, v in m.items()}
        if diverged:
            state.diverged_at = state.global_epoch
            log.error("epoch %d: the training loss or validation scores are not finite (the model diverged; "
                      "lower --lr or --finetune-lr): training stops here, selection keeps an earlier epoch",
                      state.global_epoch)
        select = selection_score({**reported, "diverged": diverged}, cfg.select_metric)
        # Ray's checkpoint keeper orders by keep_score: select_score with selection's tie-breaks
        keep = keep_score({**reported, SELECT_SCORE: select, SELECT_SCORE_METRIC: cfg.select_metric,
                           "diverged": diverged, "epoch": state.global_epoch}, cfg.select_metric, state.history)
        update_patience(state, {**reported, "diverged": diverged}, cfg.select_metric)
        if caches is not None:
            # Patience does not apply to cached epochs (below): they must not count toward it
            # when a resumed phase streams instead (another --head-cache-mb, less disk).
            state.bad_epochs = 0
        # Not on cached features: their epochs take seconds, and a head that learns a subtle
        # defect from ~100 positives often shows nothing for its first ten epochs; the best
        # epoch is kept by selection anyway.
        stop_early = (cfg.patience > 0 and caches is None and state.bad_epochs >= cfg.patience
                      and state.phase_epoch < spec.epochs)
        state.stopped_early = stop_early
        metrics = {
            "epoch": state.global_epoch, "phase": spec.name, "phase_epoch": state.phase_epoch,
            SCHEDULE_EPOCH: schedule_epoch(cfg, state.phase_index, state.phase_epoch),
            "train_loss": train_loss, "val_loss": val_loss,
            **reported, SELECT_SCORE: select, SELECT_SCORE_METRIC: cfg.select_metric, KEEP_SCORE: keep,
            "diverged": diverged,
            "lr": optimizer.param_groups[0]["lr"], "trainable_params": trainable, "epoch_seconds": time.time() - t0,
            "world_size": world, "node_ids": context["node_ids"], "early_stopped": stop_early,
            "unreadable_skipped": unreadable, "features_cached": caches is not None,
        }
        state.history.append(metrics)
        # Before the checkpoint: a job whose run another start took over must not add to (or
        # let Ray prune) the checkpoints the new holder resumes from.
        _check_still_held(loop_config, rank)
        with tempfile.TemporaryDirectory() as tmpdir:
            checkpoint = None
            if rank == 0:
                _save_checkpoint(tmpdir, ddp_model, optimizer, scaler, state, probs, labels)
                checkpoint = ray.train.Checkpoint.from_directory(tmpdir)
            ray.train.report(metrics, checkpoint=checkpoint)
        log.info("epoch %d [%s %d/%d] train_loss %.4f val_loss %.4f val_micro_f1 %.4f macro_f1 %.4f "
                 "recall(artifact) %.3f AP(artifact) %.3f ROC AUC %.3f cm %s %.1fs%s", state.global_epoch,
                 spec.name, state.phase_epoch, spec.epochs, train_loss, val_loss, m["micro_f1"], m["macro_f1"],
                 m["recall_artifact"], m["ap_artifact"], m["roc_auc"],
                 m["confusion_matrix"], metrics["epoch_seconds"], " (early stop)" if stop_early else "")
    return unwrap(ddp_model)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point: both phases, resuming from ``ray.train.get_checkpoint()``.

    ``loop_config`` holds ``train`` (a :class:`TrainConfig` dict), ``split`` (paths and
    labels of both parts), ``class_weights``, ``initial_state`` (the starting weights,
    loaded once on the driver) and optional failure-drill keys.
    """
    cfg = TrainConfig.from_dict(loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _setup_logging(rank)
    torch.manual_seed(cfg.seed + rank)
    # Each worker owns cpus_per_worker cores (GPU workers too: several share a node's cores);
    # more threads only fight each other.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    context = {"rank": rank, "world": world, "workers_on_node": ctx.get_local_world_size(),
               "node_ids": sorted(set(_gather([ray.get_runtime_context().get_node_id()])))}

    model = model_for(cfg)
    model.load_state_dict(loop_config["initial_state"])
    model = model.to(memory_format=torch.channels_last)
    if not cfg.use_gpu:
        # Most of a CPU step was the kernel mapping fresh pages for large activations.
        per_pass = use_cpu_passes(model, cfg.image_size)
        log.info("CPU passes without autograd take %s through the trunk",
                 f"{per_pass} image(s) at a time" if per_pass else "whole batches")
    try:
        # Before the checkpoint: a worker group Ray restarts after the run was taken over may
        # find its checkpoint deleted by the new holder; it stops before any work.
        _check_still_held(loop_config, rank)
    except _TakenOver:
        return
    state, optimizer_state = LoopState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, optimizer_state = _load_checkpoint(checkpoint, model)
        state.resumed_after.append(state.global_epoch)
        log.info("resumed from checkpoint after epoch %d (phase %d, epoch %d in phase)",
                 state.global_epoch, state.phase_index + 1, state.phase_epoch)
        try:  # (prepare_run refuses a new raise up front; here only a record an older version wrote)
            check_phase_one_growth(state, cfg.head_epochs)
        except ValueError as exc:
            log.warning("%s; the head epochs beyond those are not run", exc)
    # On the device now: phase 1 on cached features never goes through prepare_model, which
    # would otherwise be what moves it.
    model = model.to(device)

    try:
        _run_phases(loop_config, cfg, model, state, optimizer_state, device, context)
    except _TakenOver:
        # A clean end, not an error: Ray would restart a failed worker group (--max-failures)
        # only to stop it again; the driver then refuses to export (run_identity.check_holder).
        return


def _run_phases(loop_config: dict, cfg: TrainConfig, model: nn.Module, state: LoopState,
                optimizer_state: dict | None, device: torch.device, context: dict) -> None:
    """The phases from ``state`` on (both, or what is left of them after a resume)."""
    rank, world = context["rank"], context["world"]
    weights = torch.tensor(loss_weights(cfg, loop_config["class_weights"]), dtype=torch.float32, device=device)
    loaders = _loaders(loop_config, cfg, rank, world)
    specs = phases(cfg)
    while state.phase_index < len(specs):
        spec = specs[state.phase_index]
        # Judged against this run's config: a rerun with more epochs extends the phase (phase 1
        # only until phase 2 began: check_phase_one_growth).
        extend_phase(state, spec, (loop_config.get("recorded_epochs") or {}).get(spec.name))
        if state.phase_epoch < spec.epochs and not state.stopped_early and not state.diverged_at:
            log.info("phase %d (%s): %d epoch(s) at lr %g, unfreeze depth %d", state.phase_index + 1,
                     spec.name, spec.epochs, spec.lr, spec.unfreeze_depth)
            model = run_phase(spec, model=model, state=state, optimizer_state=optimizer_state, cfg=cfg,
                              loop_config=loop_config, loaders=loaders, weights=weights,
                              device=device, context=context)
        optimizer_state = None
        state = _next_phase(state)


def check_phase_one_growth(state: LoopState, head_epochs: int, *, run: str = "this run") -> None:
    """Refuse ``--head-epochs`` above the head epochs a run trained once its phase 2 began.

    The loop never returns to phase 1, so more head epochs would be ignored while the run
    record says they applied (also when patience ended phase 1: raised before phase 2 began,
    they would have continued it). A run that diverged runs nothing more: nothing to refuse.

    Raises:
        ValueError: naming the head epochs trained and what to do.
    """
    if state.phase_index < 1 or state.diverged_at or any(not isinstance(h, dict) or "phase" not in h
                                                         for h in state.history):
        return  # (histories from before the phase was reported cannot tell)
    head = [h for h in state.history if h["phase"] == "head"]
    if head_epochs <= len(head):
        return
    raise ValueError(f"--head-epochs {head_epochs}: {run} trained {len(head)} head epoch(s) and has begun phase 2 "
                     f"(fine-tuning), which cannot go back to phase 1; rerun with --head-epochs {len(head)}, or "
                     f"start again with a new --name or --overwrite")


def _next_phase(state: LoopState) -> LoopState:
    state.phase_index += 1
    state.phase_epoch, state.bad_epochs, state.phase_best_score, state.stopped_early = 0, 0, -math.inf, False
    state.phase_planned_epochs, state.lr_restart = 0, []
    return state


def extend_phase(state: LoopState, spec: PhaseSpec, recorded: int | None = None) -> None:
    """Continue the current phase for the epochs a rerun raised it to (``spec.epochs``).

    The epochs it was run for are recorded on first entry (``recorded``: the run record's
    count before this start, for a checkpoint of an older version, which has none). When a
    rerun raises them, the phase goes on: patience that had ended it starts counting again
    (the user asked for the epochs), and a cosine schedule continues from the rate it had
    reached rather than from the new plan's position, which could be 10x above it on an
    unfrozen trunk.
    """
    planned = state.phase_planned_epochs or (recorded if state.phase_epoch and recorded else spec.epochs)
    state.phase_planned_epochs = max(planned, spec.epochs)
    if spec.epochs <= planned or state.diverged_at:
        return
    if state.stopped_early:
        log.info("phase %d had ended by patience after %d epoch(s); raised to %d epochs, it continues",
                 state.phase_index + 1, state.phase_epoch, spec.epochs)
        state.stopped_early, state.bad_epochs = False, 0
    if spec.schedule != "constant" and state.phase_epoch > 0:
        steps = 1000  # (any resolution: the rate at an epoch boundary does not depend on it)
        was = scheduled_lr(replace(spec, epochs=planned), state.phase_epoch * steps, steps, state.lr_restart)
        state.lr_restart = [state.phase_epoch, was / spec.lr]
        log.info("phase %d: its schedule continues from %.3g (%.0f%% of its rate) to the floor over %d more epoch(s)",
                 state.phase_index + 1, was, 100 * was / spec.lr, spec.epochs - state.phase_epoch)


def read_val_scores(checkpoint_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Validation (labels, P(artifact-free)) saved with a checkpoint."""
    with open(os.path.join(checkpoint_dir, VAL_SCORES_FILE)) as f:
        d = json.load(f)
    return np.asarray(d["label"], dtype=np.int64), np.asarray(d["prob_artifact_free"], dtype=np.float64)


def read_state(checkpoint_dir: str) -> dict[str, Any]:
    """The loop state saved with a checkpoint: per-epoch ``history`` (it survives restarts,
    unlike driver memory) and ``resumed_after`` (the epochs at which the loop resumed)."""
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)
