"""Training epoch time: DataLoader ingest vs Ray Data ingest (``--ingest ray-data``).

    RAY_AUTH_MODE=token python bench/ingest_bench.py --out /tmp/ingest_bench [--n 300] [--epochs 3]

Generates demo data (256 px PNG faces, cached in --out), then trains the same run twice on a
local 2-CPU Ray (2 workers x --cpus-per-worker, weights "bundled", image size 224, head phase only),
once per ingest path, and prints a Markdown table of the epoch times (the first epoch
includes the pipelines' start-up, so the later ones are listed separately). Not a test:
figures vary with the machine and with what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import statistics

import ray

from artifact_core import demo_data
from artifact_core.config import TrainConfig
from artifact_core.trainer import run_training


def main() -> None:
    """Parse flags, generate data once, train with each ingest path, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    args = p.parse_args()
    data = os.path.join(args.out, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        demo_data.generate(data, n_train=args.n, n_test=0)
    ray.init(address="local", num_cpus=2)  # its own instance, never a cluster that happens to run here
    rows = []
    for ingest in ("dataloader", "ray-data"):
        cfg = TrainConfig(data_dir=os.path.join(data, "train"), storage_path=os.path.join(args.out, "runs"),
                          name=f"bench-{ingest}", weights="bundled", num_workers=2,
                          cpus_per_worker=args.cpus_per_worker, head_epochs=args.epochs, finetune_epochs=0,
                          patience=0, max_failures=0, ingest=ingest, overwrite=True,
                          # both arms stream images every epoch, as in the README's table
                          head="global", image_size=224, head_cache_views=0)
        hist = run_training(cfg).metrics["history"]
        secs = [h["epoch_seconds"] for h in hist]
        rows.append((ingest, secs[0], statistics.mean(secs[1:]) if len(secs) > 1 else float("nan")))
    print("| ingest | first epoch (s) | later epochs, mean (s) |\n|---|---|---|")
    for ingest, first, later in rows:
        print(f"| {ingest} | {first:.1f} | {later:.1f} |")


if __name__ == "__main__":
    main()
