"""Model-quality benchmark on the subtle demo data: generate, train with the defaults, score a held-out folder.

    python bench/quality_bench.py --out /tmp/qbench                       # defaults: 2,000 train + 500 test at 1024 px
    python bench/quality_bench.py --out /tmp/qbench --image-size 448 --oversample 0.3 --name s448-os
    python bench/quality_bench.py --out /tmp/qtiny --n-train 60 --n-test 20 --size 64 \\
        --image-size 64 --head-epochs 1 --finetune-epochs 1 --weights none  # a smoke run, about a minute

The training set (``--train-seed``) and the test set (``--test-seed``, another generator
seed, so different faces and defects) are generated once under ``--out`` and reused by
later variants. Training runs ``jobs/train.py`` and scoring ``jobs/score.py`` as a user
would (each a subprocess with its own local Ray, or the cluster in ``RAY_ADDRESS``); every
flag this script does not know is passed to ``jobs/train.py`` (``--image-size``,
``--oversample``, ``--select-metric``, ``--finetune-epochs``...). Prints micro F1, artifact
recall, artifact average precision and ROC AUC on the test folder (at the bundle's tuned
threshold) and the training time, and appends them to ``<out>/results.jsonl``.

It takes tens of minutes on 2 CPU cores with the full sizes: a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser() -> argparse.ArgumentParser:
    """Benchmark flags; unknown flags go to jobs/train.py."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder: data, runs, predictions, results.jsonl")
    p.add_argument("--name", default="default", help="variant name: run and prediction folders (default: %(default)s)")
    g = p.add_argument_group("data (generated once per setting)")
    g.add_argument("--n-train", type=int, default=2000, help="training images (default: %(default)s)")
    g.add_argument("--n-test", type=int, default=500, help="held-out test images (default: %(default)s)")
    g.add_argument("--size", type=int, default=1024, help="image side in pixels (default: %(default)s)")
    g.add_argument("--train-seed", type=int, default=1, help="(default: %(default)s)")
    g.add_argument("--test-seed", type=int, default=2, help="another generator seed for the test folder (default: %(default)s)")
    g.add_argument("--gen-workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="rendering processes (default: %(default)s)")
    p.add_argument("--score-batch-size", type=int, default=16, help="jobs/score.py --batch-size (default: %(default)s)")
    return p


def _data(args: argparse.Namespace, seed: int, n: int, part: str) -> str:
    """``<out>/data/<setting>/<part>``: a labelled folder (train) or test folder with its labels CSV."""
    from artifact_core.demo_data import generate

    root = os.path.join(args.out, "data", f"subtle-{args.size}px-seed{seed}-n{n}")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        t0 = time.time()
        # All n images go to train/ (labelled names); for the test part the labels are read
        # back from the names into a CSV and the files scored from that folder.
        generate(root, n_train=n, n_test=0, size=args.size, seed=seed, difficulty="subtle", workers=args.gen_workers)
        with open(done, "w") as f:
            f.write(f"{time.time() - t0:.1f} s\n")
        print(f"generated {n} {part} images at {args.size} px in {time.time() - t0:.0f} s: {root}", flush=True)
    return os.path.join(root, "train")


def _labels_csv(folder: str, path: str) -> str:
    from artifact_core.data import list_images, parse_label

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for p in list_images(folder):
            w.writerow([os.path.relpath(p, folder), parse_label(p)])
    return path


def _run(cmd: list[str], log_path: str) -> float:
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return time.time() - t0


def held_out_metrics(predictions_csv: str, labels_csv: str) -> dict[str, Any]:
    """Micro F1 and artifact recall at the bundle's threshold, AP and ROC AUC, from the job's CSV."""
    from artifact_core.metrics import classification_metrics, ranking_metrics

    with open(labels_csv) as f:
        truth = {r["filename"]: int(r["label"]) for r in csv.DictReader(f)}
    y, pred, prob, errors = [], [], [], 0
    with open(predictions_csv) as f:
        for r in csv.DictReader(f):
            if r["filename"] not in truth:
                continue
            t = truth[r["filename"]]
            cls = int(r["predicted_class"])
            if cls < 0:  # an error row is a miss, and ranks last for its class
                errors += 1
                cls, p = 1 - t, float(t == 0)
            else:
                p = float(r["prob_artifact_free"])
            y.append(t)
            pred.append(cls)
            prob.append(p)
    m = classification_metrics(y, pred)
    return {**m, **ranking_metrics(y, prob), "errors": errors}


def recall_by_defect(predictions_csv: str, seed: int, n: int) -> dict[str, list[int]]:
    """Per subtle defect kind of the test folder: [artifacts found, artifacts], at the bundle's threshold."""
    from artifact_core.demo_data import defect_kinds

    kinds = defect_kinds(n_train=n, n_test=0, seed=seed, difficulty="subtle")["train"]  # see _data
    out: dict[str, list[int]] = {}
    with open(predictions_csv) as f:
        for r in csv.DictReader(f):
            kind = kinds.get(r["filename"])
            if kind is not None:
                hit_n = out.setdefault(kind, [0, 0])
                hit_n[0] += int(r["predicted_class"]) == 0
                hit_n[1] += 1
    return dict(sorted(out.items()))


def main(args: argparse.Namespace, train_args: list[str]) -> dict[str, Any]:
    """Generate (once), train, score, measure; returns the result row."""
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    train_dir = _data(args, args.train_seed, args.n_train, "training")
    test_dir = _data(args, args.test_seed, args.n_test, "test")
    labels = _labels_csv(test_dir, os.path.join(args.out, f"test_labels-{args.test_seed}-{args.n_test}-{args.size}.csv"))
    runs = os.path.join(args.out, "runs")
    py = sys.executable
    train_cmd = [py, os.path.join(REPO, "jobs", "train.py"), "--data-dir", train_dir, "--storage-path", runs,
                 "--name", args.name, *train_args]
    print("training:", " ".join(train_cmd[1:]), flush=True)
    train_s = _run(train_cmd, os.path.join(args.out, f"train-{args.name}.log"))
    bundle = os.path.join(runs, args.name, "model")
    preds = os.path.join(args.out, "predictions", args.name)
    score_cmd = [py, os.path.join(REPO, "jobs", "score.py"), "--model", bundle, "--input", test_dir, "--output", preds,
                 "--overwrite", "--batch-size", str(args.score_batch_size)]
    score_s = _run(score_cmd, os.path.join(args.out, f"score-{args.name}.log"))
    m = held_out_metrics(os.path.join(preds, "predictions.csv"), labels)
    by_kind = recall_by_defect(os.path.join(preds, "predictions.csv"), args.test_seed, args.n_test)
    with open(os.path.join(bundle, "metrics.json")) as f:
        bundle_metrics = json.load(f)
    with open(os.path.join(bundle, "config.json")) as f:
        train_cfg = json.load(f).get("train_config", {})
    row = {
        "name": args.name, "train_args": train_args, "n_train": args.n_train, "n_test": args.n_test, "size": args.size,
        "image_size": train_cfg.get("image_size"), "select_metric": bundle_metrics.get("select_metric"),
        "best_epoch": bundle_metrics.get("best_epoch"), "threshold": bundle_metrics.get("threshold"),
        "test_micro_f1": m["micro_f1"], "test_recall_artifact": m["recall_artifact"],
        "test_precision_artifact": m["precision_artifact"], "test_ap_artifact": m["ap_artifact"],
        "test_roc_auc": m["roc_auc"], "test_confusion_matrix": m["confusion_matrix"], "test_errors": m["errors"],
        "test_found_by_defect": by_kind,
        "val_ap_artifact": bundle_metrics.get("ap_artifact"), "train_seconds": round(train_s, 1),
        "train_job_seconds": round(bundle_metrics.get("wall_seconds", float("nan")), 1), "score_seconds": round(score_s, 1),
    }
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{args.name}: test micro F1 {m['micro_f1']:.4f}, artifact recall {m['recall_artifact']:.3f} "
          f"(precision {m['precision_artifact']:.3f}), artifact AP {m['ap_artifact']:.3f}, ROC AUC {m['roc_auc']:.3f}, "
          f"confusion matrix {m['confusion_matrix']}; training {train_s:.0f} s, scoring {score_s:.0f} s", flush=True)
    print("artifacts found per defect kind: " + ", ".join(f"{k} {hit}/{n}" for k, (hit, n) in by_kind.items()), flush=True)
    return row


if __name__ == "__main__":
    known, rest = get_args_parser().parse_known_args()
    main(known, rest)
