"""Phase 2's validation on one core: the whole model per epoch vs the trainable blocks from cached
output of the frozen ones, and where a phase-2 training step spends its time.

    python bench/phase2_bench.py                      # 448 px, the default model (multiscale, flip, 5 members)
    python bench/phase2_bench.py --image-size 256 --images 32

Builds the model a default training run builds (ImageNet weights as shipped, phase 2's freezing:
``--unfreeze-depth``), random images at ``--image-size`` (speed does not depend on the pixels),
one thread as a training worker has with ``--cpus-per-worker 1``, and measures in one run:

- per block, the forward time of the trunk (eval mode, batches of ``--batch-size``);
- validation as it ran before, the whole model on each image and its mirror, every epoch;
- validation from the cache: the frozen blocks once per phase (float32), then every epoch only
  the trainable blocks and the head, and the largest difference between the two in probability;
- a training step (forward, backward, AdamW) split into the frozen blocks' forward and the rest.

Prints milliseconds per image and what a phase of ``--epochs`` epochs costs each way. Not a
test: absolute figures vary with the machine; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from artifact_core import train_loop
from artifact_core.config import TrainConfig
from artifact_core.model import frozen_prefix, model_for, set_trainable, train_mode, trunk_prefix


def _timed(fn, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=448, help="input pixels (default: %(default)s)")
    p.add_argument("--images", type=int, default=64, help="validation images per measurement (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="per step, as training's (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="phase-2 epochs to cost (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per measurement (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrainConfig(image_size=args.image_size, batch_size=args.batch_size, weights="bundled")
    model = model_for(cfg, weights="bundled").to(memory_format=torch.channels_last)
    set_trainable(model, unfreeze_depth=cfg.unfreeze_depth)
    stop = frozen_prefix(model)
    n, s = args.images, args.image_size
    x = torch.rand(n, 3, s, s).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(n) % 10 != 0).long()
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, n, args.batch_size)]
    weights = torch.tensor([3.0, 1.0])

    # per block, eval forward of one batch
    model.eval()
    blocks = []
    with torch.inference_mode():
        h = batches[0][0]
        for block in model.features:
            t0 = time.perf_counter()
            h = block(h)
            blocks.append((time.perf_counter() - t0) / len(batches[0][1]) * 1000)
    frozen_share = sum(blocks[:stop]) / sum(blocks)
    print(f"trunk forward per image (ms), blocks 0-{len(blocks) - 1}: " + " ".join(f"{b:.1f}" for b in blocks))
    print(f"frozen blocks 0-{stop - 1}: {frozen_share:.0%} of the trunk's forward at {s} px")

    live_probs: list[float] = []

    def live() -> None:
        live_probs[:] = train_loop.evaluate(model, batches, weights, torch.device("cpu"), nullcontext)[0]

    cache_holder: dict[str, train_loop.FeatureCache] = {}

    def build() -> None:
        cache_holder["c"] = train_loop._cache_features(model, batches, torch.device("cpu"), nullcontext,
                                                       mirrored=model.test_time_flip, stop=stop, dtype=torch.float32)

    cached_probs: list[float] = []

    def cached() -> None:
        cached_probs[:] = train_loop._evaluate_cached(model, cache_holder["c"], weights, nullcontext)[0]

    t_live = _timed(live, args.repeats) / n * 1000
    t_build = _timed(build, args.repeats) / n * 1000
    t_cached = _timed(cached, args.repeats) / n * 1000
    diff = max(abs(a - b) for a, b in zip(live_probs, cached_probs))

    # a training step: the frozen blocks' forward, then the rest (forward, backward, AdamW)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    xb, yb = batches[0]

    def prefix() -> None:
        with torch.no_grad():
            trunk_prefix(model.features, stop, xb)

    def step() -> None:
        train_mode(model, trunk_bn_frozen=True)
        loss, _ = train_loop._weighted_bce(model(xb), yb, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = _timed(step, args.repeats) / len(yb) * 1000
    t_prefix = _timed(prefix, args.repeats) / len(yb) * 1000
    mirrors = " and its mirror" if model.test_time_flip else ""
    print(f"validation, whole model on each image{mirrors}: {t_live:.1f} ms per image per epoch")
    print(f"validation from the cache: {t_build:.1f} ms per image once (frozen blocks), then "
          f"{t_cached:.1f} ms per image per epoch; max |difference| in probability {diff:.1e}")
    e = args.epochs
    print(f"over {e} phase-2 epochs: {e * t_live:.0f} ms per validation image before, "
          f"{t_build + e * t_cached:.0f} ms now ({e * t_live / (t_build + e * t_cached):.1f}x)")
    print(f"training step: {t_step:.1f} ms per image, of which {t_prefix:.1f} ms the frozen blocks' forward "
          f"({t_prefix / t_step:.0%})")
    return {"live_ms": t_live, "build_ms": t_build, "cached_ms": t_cached, "max_abs_diff": diff,
            "step_ms": t_step, "prefix_ms": t_prefix, "frozen_share": frozen_share}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
