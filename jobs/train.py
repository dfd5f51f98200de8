"""Two-phase MobileNetV2 fine-tune on Ray Train (DDP over N CPU or GPU workers).

On a cluster:
    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/train.py --data-dir /data/train --storage-path /mnt/runs --name exp1 --num-workers 4 --use-gpu
On a laptop (starts a local Ray; no --data-dir trains on generated demo data):
    python jobs/train.py

Writes <storage-path>/<name>/model/ (the bundle jobs/score.py reads); --data-dir and
--storage-path may be URIs (s3://...). Rerunning the same command resumes the run with its
stored split; a rerun with other training flags or data is refused (new --name, or --overwrite).
"""

from __future__ import annotations

import argparse
import logging
import sys

from artifact_core.config import add_training_args, config_from_args
from artifact_core.jobs_common import run_job
from artifact_core.storage import redact_uri


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_training_args(parser)


def main(args: argparse.Namespace) -> None:
    """Train, export the bundle, print where it is and the headline metrics."""
    from artifact_core.raycluster import ensure_ray
    from artifact_core.trainer import run_training

    cfg = config_from_args(args)
    ensure_ray()
    summary = run_training(cfg)
    v = summary.metrics["validation"]
    print(f"validation micro F1 {v['micro_f1']:.4f} (macro F1 {v['macro_f1']:.4f}) at threshold "
          f"{summary.metrics['threshold']:.3f}; confusion matrix [rows true 0/1, cols predicted 0/1] "
          f"{v['confusion_matrix']}; artifact AP {summary.metrics['ap_artifact']:.4f}, ROC AUC "
          f"{summary.metrics['roc_auc']:.4f} (checkpoint chosen by {summary.metrics['select_metric']})")
    print(f"model bundle: {redact_uri(summary.bundle_dir)}")


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser().parse_args(), logging.getLogger("artifact_core")))
