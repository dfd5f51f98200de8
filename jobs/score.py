"""Score a (huge) image folder with Ray Data into Parquet and CSV.

On a cluster:
    ray job submit --working-dir . -- python jobs/score.py --model /mnt/runs/exp1/model --input /data/test --output /mnt/preds/exp1
On a laptop (no arguments: the demo test folder with the demo model under ./runs):
    python jobs/score.py

Writes <output>/predictions.parquet/, predictions.csv, summary.json, confidence_hist.png and
the review page report/index.html (flagged images with artifact heatmaps).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from artifact_core.config import (DEMO_DATA_FOLDER, DEMO_RUN_NAME, SCORE_ENGINES, SCORE_PIPELINES, SCORE_PRECISIONS,
                                  WAIT_HELP, ScoreConfig, TrainConfig)
from artifact_core.jobs_common import run_job
from artifact_core.storage import redact_uri, resolve

# the demo's train run writes here when started without arguments
DEMO_RUNS = TrainConfig().storage_path


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags (see --help)."""
    d = ScoreConfig(model="", input="", output="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"model bundle folder (default: ./{DEMO_RUNS}/{DEMO_RUN_NAME}/model)")
    p.add_argument("--input", default=None,
                   help=f"image folder, searched recursively; local path or pyarrow URI such as s3://bucket/dir "
                        f"(default: ./{DEMO_RUNS}/{DEMO_DATA_FOLDER}/test)")
    p.add_argument("--output", default=None,
                   help=f"output folder (default: ./{DEMO_RUNS}/{DEMO_RUN_NAME}/predictions, which the demo, run "
                        f"with neither --input nor --output, replaces)")
    p.add_argument("--labels", default=None,
                   help="optional CSV filename,label to report micro F1 against (default for the demo: its test_labels.csv)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per model call (default: %(default)s)")
    p.add_argument("--num-actors", type=int, default=None,
                   help="predictor actors (default: fused, one per node or per GPU; split, one per GPU, "
                        "else the CPUs' share that inference takes when auto measured it, else half the "
                        "CPUs / --cpus-per-actor)")
    p.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="CPUs per predictor actor in the split pipeline (default: %(default)s)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per predictor actor")
    p.add_argument("--engine", choices=SCORE_ENGINES, default=d.engine,
                   help="inference engine; auto: ONNX Runtime on CPU when the bundle has model.onnx, "
                        "else PyTorch; PyTorch on GPU (default: %(default)s)")
    p.add_argument("--precision", choices=SCORE_PRECISIONS, default=d.precision,
                   help="int8: the bundle's model.int8.onnx in ONNX Runtime (CPU); see README (default: %(default)s)")
    p.add_argument("--pipeline", choices=SCORE_PIPELINES, default=d.pipeline,
                   help="fused: each actor decodes in threads while its engine runs, using its node's CPUs; "
                        "split: decode tasks feed predictor actors; auto: measures decode and inference "
                        "cost on a few files and picks (see README) (default: %(default)s)")
    p.add_argument("--object-store-budget-mb", type=int, default=d.object_store_budget_mb,
                   help="object store memory the pipeline's blocks may use; keeps memory flat (default: %(default)s)")
    p.add_argument("--wait-for-resources", type=float, default=d.wait_for_resources, metavar="SECONDS", help=WAIT_HELP)
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's decision threshold")
    g = p.add_argument_group("review page (<output>/report/index.html)")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--report", dest="report", action="store_const", const=True, default=d.report,
                   help="always write the page (with more than --report-top flagged: the top ones and a count of the rest)")
    r.add_argument("--no-report", dest="report", action="store_const", const=False, help="never write it")
    g.add_argument("--report-top", type=int, default=d.report_top,
                   help="flagged images shown, most confident first; without --report/--no-report the page is "
                        "written when at most this many are flagged (default: %(default)s)")
    g.add_argument("--report-uncertain", type=int, default=d.report_uncertain,
                   help="images closest to the threshold shown as well (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="score only files without a row in an existing output")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def score_config(args: argparse.Namespace) -> tuple[ScoreConfig, str | None]:
    """The run's settings and labels CSV (if any); omitted paths are the demo's.

    Raises:
        ValueError: a flag out of range (:meth:`ScoreConfig.validate`).
    """
    demo = os.path.abspath(DEMO_RUNS)
    labels = args.labels
    if args.input is None:
        labels = labels or os.path.join(demo, DEMO_DATA_FOLDER, "test_labels.csv")
    # Only the demo as a whole (neither --input nor --output) replaces its own earlier output:
    # another folder scored into the demo's default output must not delete those results.
    demo_rerun = args.input is None and args.output is None and not args.resume
    # (an empty value, such as an unset shell variable, is an error, not "the demo's")
    model, input_, output = (os.path.join(demo, DEMO_RUN_NAME, "model") if args.model is None else args.model,
                             os.path.join(demo, DEMO_DATA_FOLDER, "test") if args.input is None else args.input,
                             os.path.join(demo, DEMO_RUN_NAME, "predictions") if args.output is None else args.output)
    if demo_rerun and not args.overwrite:
        from artifact_core.score_output import OutputConflictError, scored_input
        from artifact_core.storage import redact_uri, resolve

        other = scored_input(resolve(output))
        if other is not None and other != redact_uri(resolve(input_).uri):
            raise OutputConflictError(
                f"the demo's output {output} holds the scores of another input ({other}); nothing was deleted. "
                f"Pass --overwrite to replace them, or --output to score the demo elsewhere")
    cfg = ScoreConfig(
        model=model, input=input_, output=output,
        batch_size=args.batch_size, num_actors=args.num_actors, cpus_per_actor=args.cpus_per_actor,
        use_gpu=args.use_gpu, engine=args.engine, precision=args.precision, pipeline=args.pipeline, threshold=args.threshold,
        object_store_budget_mb=args.object_store_budget_mb,
        resume=args.resume, overwrite=args.overwrite or demo_rerun,
        report=args.report, report_top=args.report_top, report_uncertain=args.report_uncertain,
        wait_for_resources=args.wait_for_resources,
    )
    return cfg.validate(), labels


def main(args: argparse.Namespace) -> None:
    """Score, then print counts, speed and (with labels) micro F1."""
    from artifact_core.raycluster import ensure_ray
    from artifact_core.scoring import evaluate_against_labels, read_labels, run_scoring

    cfg, labels = score_config(args)
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
        print(f"against {labels}: micro F1 {m['micro_f1']:.4f}, macro F1 {m['macro_f1']:.4f}, "
              f"confusion matrix [rows true 0/1, cols predicted 0/1] {m['confusion_matrix']}")
    print(f"predictions: {redact_uri(resolve(cfg.output).join('predictions.csv').uri)}")
    report = s.get("report", {})
    print(f"report: {report['path']}" if report.get("path") else f"no report: {report.get('reason')}")


if __name__ == "__main__":
    sys.exit(run_job(main, get_args_parser().parse_args(), logging.getLogger("artifact_core")))
