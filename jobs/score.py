"""Score a (huge) image folder with Ray Data into Parquet and CSV.

On a cluster:
    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/score.py --model /mnt/runs/exp1/model --input /data/test --output /mnt/preds/exp1
On a laptop (no arguments: the demo test folder with the demo model under ./runs):
    python jobs/score.py

Writes <output>/predictions.parquet/, predictions.csv, summary.json, confidence_hist.png and
the review page report/index.html (flagged images with artifact heatmaps).
"""

from __future__ import annotations

import argparse
import logging
import sys

from artifact_core.config import add_score_args, score_from_args
from artifact_core.jobs_common import run_job
from artifact_core.storage import redact_uri, resolve


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags (see --help)."""
    return add_score_args(argparse.ArgumentParser(description=__doc__,
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))


def main(args: argparse.Namespace) -> None:
    """Score, then print counts, speed and (with labels) micro F1."""
    from artifact_core.raycluster import ensure_ray
    from artifact_core.scoring import evaluate_against_labels, read_labels, run_scoring

    cfg, labels = score_from_args(args)
    if labels:
        read_labels(labels)  # checked before the run, not after it
    ensure_ray()
    s = run_scoring(cfg)
    print(f"scored {s['files']} file(s): {s['predicted']['0 (artifact)']} artifact, "
          f"{s['predicted']['1 (artifact-free)']} artifact-free, {s['errors']} error(s); "
          f"{s['scored_this_run']} this run in {s['wall_seconds']:.1f}s "
          f"({s['images_per_second'] or 0:.1f} images/s); threshold {s['threshold']:.3f}")
    if labels:
        m = evaluate_against_labels(cfg.output, labels)
        print(f"against {labels} ({m['labels_matched']} labelled file(s) scored): micro F1 {m['micro_f1']:.4f}, "
              f"macro F1 {m['macro_f1']:.4f}, confusion matrix [rows true 0/1, cols predicted 0/1] "
              f"{m['confusion_matrix']}")
        if m["labels_unmatched"] or m["scored_without_label"]:
            # A partial match is a metric of a subset: say which, rather than let it pass as the folder's.
            logging.getLogger("artifact_core").warning(
                "the metrics cover %d of %d labelled file(s): %d label(s) name no scored file (e.g. %s), and %d "
                "scored file(s) have no label", m["labels_matched"], m["labels_matched"] + m["labels_unmatched"],
                m["labels_unmatched"], m["unmatched_examples"][:3], m["scored_without_label"])
    print(f"predictions: {redact_uri(resolve(cfg.output).join('predictions.csv').uri)}")
    report = s.get("report", {})
    print(f"report: {report['path']}" if report.get("path") else f"no report: {report.get('reason')}")


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser().parse_args(), logging.getLogger("artifact_core")))
