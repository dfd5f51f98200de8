"""Ray Tune sweep over learning rates, unfreeze depth and input size; each trial is a multi-worker TorchTrainer.

On a cluster:
    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/tune.py --data-dir /data/train --storage-path /mnt/runs --name sweep1 --num-samples 20 --num-workers 2 --use-gpu
On a laptop (demo data, local Ray):
    python jobs/tune.py --num-samples 4

Writes <storage-path>/<name>/results.csv, best_config.json, tune_results.png and model/
(the best trial's bundle, ready for jobs/score.py --model).
"""

from __future__ import annotations

import argparse
import logging
import sys

from artifact_core.config import add_sweep_args, add_training_args, config_from_args, sweep_from_args
from artifact_core.jobs_common import run_job
from artifact_core.storage import redact_uri, resolve


def get_args_parser() -> argparse.ArgumentParser:
    """Sweep flags plus every training flag of jobs/train.py (same names)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_args(p)
    return add_training_args(p)


def main(args: argparse.Namespace) -> None:
    """Run the sweep; print the results table and the best bundle."""
    from artifact_core.raycluster import ensure_ray
    from artifact_core.tuning import run_sweep

    sweep = sweep_from_args(args, config_from_args(args))
    ensure_ray()
    out = run_sweep(sweep)
    table = out["results"]
    with_cols = ["trial_id", "lr", "finetune_lr", "unfreeze_depth", "image_size",
                 *[c for c in table.columns if c.startswith("best_")], "epochs", "status"]
    print(table[[c for c in with_cols if c in table]].to_string(index=False))
    print(f"best trial {out['best_config']['trial_id']}: {out['best_config']['params']}")
    results = resolve(out["sweep_dir"]).join("results.csv").uri
    print(f"results: {redact_uri(results)}; best model bundle: {redact_uri(out['bundle_dir'])}")


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser().parse_args(), logging.getLogger("artifact_core")))
