"""Phase 1's head epoch from cached features in memory, from the memory-mapped spill file,
and (the fallback before) from images through the frozen trunk; one worker, CPU.

    python bench/spill_bench.py --image-size 768 --views 800 --steps 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext

import torch

from artifact_core import train_loop
from artifact_core.config import TrainConfig
from artifact_core.cpu_memory import use_cpu_passes
from artifact_core.model import model_for, set_trainable
from artifact_core.spill import SpillFile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--views", type=int, default=800, help="cached views (one worker's share)")
    p.add_argument("--steps", type=int, default=40, help="head steps timed per cache")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(image_size=args.image_size, weights="none")
    model = model_for(cfg).to(memory_format=torch.channels_last)
    set_trainable(model, unfreeze_depth=0)
    use_cpu_passes(model, cfg.image_size)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size).contiguous(memory_format=torch.channels_last)
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        one = torch.cat([model.features(x[i:i + 1]) for i in range(len(x))]).half()
    trunk_s = (time.perf_counter() - t0) / len(x)
    features = one.repeat((args.views + len(one) - 1) // len(one), 1, 1, 1)[:args.views]
    features = features.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.views) % 2
    with tempfile.TemporaryDirectory() as d, SpillFile(d) as f:
        for i in range(0, args.views, 64):
            f.append(features[i:i + 64])
        mapped = f.tensor()
        print(f"{args.views} views of {tuple(one.shape[1:])} fp16 at {cfg.image_size} px: "
              f"{features.nbytes / 2**20:.0f} MiB; trunk forward {trunk_s * 1e3:.0f} ms per image")
        for name, feats in (("in memory", features), ("spilled, memory-mapped", mapped)):
            cache = train_loop.FeatureCache(feats, labels)
            optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
            run = dict(cache=cache, batch_size=cfg.batch_size, optimizer=optimizer,
                       scaler=torch.amp.GradScaler("cpu", enabled=False), weights=torch.ones(2),
                       autocast=nullcontext, world=1, seed=0)
            train_loop._train_epoch_cached(model, steps=2, **run)  # warm-up
            t0 = time.perf_counter()
            train_loop._train_epoch_cached(model, steps=args.steps, **run)
            per_step = (time.perf_counter() - t0) / args.steps
            print(f"{name:>24}: {per_step * 1e3:7.1f} ms per step of {cfg.batch_size}, "
                  f"{per_step * args.views / cfg.batch_size:6.1f} s per epoch of {args.views} views")
    print(f"{'streamed (trunk + head)':>24}: at least {trunk_s * args.views:6.1f} s per epoch (the trunk alone)")


if __name__ == "__main__":
    main()
