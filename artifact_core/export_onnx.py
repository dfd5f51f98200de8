"""Add ONNX models to a bundle: ``model.onnx`` (fp32) and, optionally, ``model.int8.onnx``.

Training's export calls :func:`export_onnx_or_log` with the validation images; for older
bundles::

    python -m artifact_core.export_onnx BUNDLE [--int8] [--calibration-dir DIR]

fp32 is checked against the PyTorch model at export (max abs logit/probability
difference); int8 is ONNX Runtime static quantization (QDQ, per-channel weights, MinMax
calibration) on images the bundle names (``calibration.json``), and its validation micro
F1, macro F1 and artifact recall are written next to fp32's. Everything goes into the
bundle's ``metrics.json`` under ``onnx``. Both ONNX files record the sha256 of the
``model.pt`` they were made from (``ONNX_SOURCE_KEY`` in their metadata): scoring refuses or
bypasses an ONNX file that does not match the bundle's ``model.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch

from artifact_core.bundle import (CALIBRATION_FILE, ONNX_FILE, ONNX_INT8_FILE, ONNX_SOURCE_KEY, OPTIONAL_FILES,
                                  load_bundle, read_metrics, update_metrics, weights_sha256, write_json_atomic)
from artifact_core.data import list_images, parse_label
from artifact_core.decode import decode_array
from artifact_core.images import ImageDecodeError
from artifact_core.metrics import classification_metrics, predict_labels
from artifact_core.storage import is_uri, read_file_bytes

log = logging.getLogger(__name__)

#: ONNX Runtime 1.17+ runs it; every MobileNetV2 op exists in it.
OPSET = 17
#: fp32 ONNX must give the PyTorch model's probabilities to this (it gives ~1e-6).
FP32_TOLERANCE = 1e-3
#: MinMax calibration needs a few hundred images, not the whole validation set.
MAX_CALIBRATION_IMAGES = 256
#: Below this many calibration images the int8 export warns (MinMax ranges from a handful of images).
FEW_CALIBRATION_IMAGES = 32
#: The export checks fp32 and evaluates int8 on at most this many of the images it is given
#: (evenly spaced): a big validation set, decoded at once at 768 px, would not fit in memory.
MAX_CHECK_IMAGES = 512
INPUT_NAME = "input"
OUTPUT_NAME = "logit"


def _decode_all(paths: Sequence[str], labels: Sequence[int] | None, image_size: int,
                fs: pafs.FileSystem | None = None) -> tuple[np.ndarray, list[str], list[int] | None]:
    """Decode what can be decoded (paths on ``fs``, e.g. a bucket's keys, when given); files that
    fail (moved, broken) are skipped with a warning."""
    images, kept, kept_labels, bad = [], [], [], []
    for i, p in enumerate(paths):
        try:
            images.append(decode_array(read_file_bytes(p, fs) if fs is not None else p, image_size, name=p))
        except (ImageDecodeError, OSError) as exc:
            bad.append(f"{os.path.basename(p)}: {exc}")
            continue
        kept.append(p)
        if labels is not None:
            kept_labels.append(int(labels[i]))
    if bad:
        log.warning("skipping %d unreadable calibration image(s), e.g. %s", len(bad), "; ".join(bad[:3]))
    arr = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), dtype=np.uint8)
    return arr, kept, (kept_labels if labels is not None else None)


def _normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x.astype(np.float32) / np.float32(255.0) - m) / s


def _session(path: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # quantized graphs log one line per folded node otherwise
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_logits(path: str, x: np.ndarray, batch_size: int = 32,
                normalize: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Logits of ``x`` by batches; ``normalize`` turns each batch into the model's input
    (uint8 images stay uint8 until then: a float copy of them all is 4x their size)."""
    sess = _session(path)
    prep = normalize or (lambda b: b)
    out = [sess.run(None, {INPUT_NAME: prep(x[i:i + batch_size])})[0].reshape(-1) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _summary_metrics(labels: Sequence[int], probs: np.ndarray, threshold: float) -> dict[str, float]:
    m = classification_metrics(labels, predict_labels(probs, threshold))
    return {"micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "recall_artifact": m["recall_artifact"]}


def _export_fp32(model: torch.nn.Module, image_size: int, out_path: str, opset: int) -> None:
    import onnx

    dummy = torch.zeros(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # torch 2.9+ warns that the TorchScript exporter is legacy; it is the one that needs
        # neither onnxscript nor network access, and it exports MobileNetV2 exactly.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), out_path, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    onnx.checker.check_model(out_path)


def _record_source(path: str, source_sha256: str) -> None:
    """Write ``source_sha256`` (the model.pt the model was made from) into an ONNX file's metadata."""
    import onnx

    model = onnx.load(path)
    kept = [p for p in model.metadata_props if p.key != ONNX_SOURCE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ONNX_SOURCE_KEY, value=source_sha256)
    onnx.save(model, path)


def _quantize_int8(fp32_path: str, out_path: str, calibration: np.ndarray, batch_size: int = 2, *,
                   source_sha256: str | None = None,
                   normalize: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Static QDQ quantization, per-channel weights, MinMax calibration on ``calibration``
    (normalized float32 images, or images that ``normalize`` makes so a batch at a time;
    ``batch_size`` per calibration run).

    Small batches because the export's peak memory grows with them (at 448 px: 15.6 GB with
    batches of 16, 5.6 GB with batches of 2). MinMax ranges are the minimum and maximum over
    all images, the same for any batching. ``source_sha256`` is recorded in the output as
    :func:`_record_source` does, before it takes the final name."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            prep = normalize or (lambda b: b)
            self.batches = iter(prep(calibration[i:i + batch_size]) for i in range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = out_path + ".pre.onnx"
    try:
        # Shape inference and graph clean-up first, as ONNX Runtime's docs advise; when it
        # fails the raw export still quantizes.
        try:
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=False)
            source = prepared
        except Exception as exc:  # noqa: BLE001 - an optional step
            log.info("quantization pre-processing skipped (%s)", exc)
            source = fp32_path
        quantize_static(source, out_path + ".tmp", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        if source_sha256:
            _record_source(out_path + ".tmp", source_sha256)
        os.replace(out_path + ".tmp", out_path)
    finally:
        for leftover in (prepared, out_path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)


def export_onnx(bundle_dir: str, calibration_paths: Sequence[str] | None = None,
                calibration_labels: Sequence[int] | None = None, *, int8: bool = False, opset: int = OPSET,
                max_calibration_images: int = MAX_CALIBRATION_IMAGES,
                fs: pafs.FileSystem | None = None, require_int8: bool = True) -> dict[str, Any]:
    """Write ``model.onnx`` (and with ``int8`` ``model.int8.onnx``) into a bundle folder.

    Args:
        bundle_dir: a local bundle folder (``model.pt``, ``config.json``).
        calibration_paths: images to check fp32 on and calibrate int8 with (training passes
            its validation images). Without them fp32 is checked on random pixels and int8
            uses the images ``calibration.json`` names.
        calibration_labels: their labels (0/1); with them int8's and fp32's validation
            micro F1, macro F1 and artifact recall are reported.
        int8: also quantize.
        opset: ONNX opset of the export.
        max_calibration_images: int8 calibrates on an evenly spaced subset of this size
            (of the at most :data:`MAX_CHECK_IMAGES` it checks and evaluates on).
        fs: the filesystem ``calibration_paths`` are on (a bucket's, for object-storage
            data); None: local paths.
        require_int8: with ``int8`` and no calibration image that decodes, raise (after
            ``model.onnx`` is written); False: skip int8 and record why.

    Returns:
        What was written to ``metrics.json`` under ``onnx``. An int8 failure is recorded
        there as ``int8.error`` (fp32 stays usable); an fp32 failure raises.

    Raises:
        RuntimeError: ONNX Runtime's fp32 probabilities differ from PyTorch's by more
            than :data:`FP32_TOLERANCE` (no ``model.onnx`` is left behind).
        ValueError: ``int8`` and ``require_int8`` without any calibration image that decodes
            (``model.onnx`` is written first).
    """
    import onnxruntime

    # Hashed before the model is loaded: if model.pt is replaced in between, the ONNX model
    # records the older hash and is refused, never taken for the newer weights.
    source = weights_sha256(bundle_dir)
    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    if calibration_paths is None and os.path.isfile(os.path.join(bundle_dir, CALIBRATION_FILE)):
        with open(os.path.join(bundle_dir, CALIBRATION_FILE)) as f:
            named = json.load(f)
        calibration_paths, calibration_labels = named.get("paths") or [], named.get("labels")
    if calibration_labels is not None and len(calibration_labels) != len(calibration_paths or []):
        raise ValueError(f"{len(calibration_paths or [])} calibration paths but {len(calibration_labels)} labels")
    if calibration_paths is not None and len(calibration_paths) > MAX_CHECK_IMAGES:
        keep = np.unique(np.linspace(0, len(calibration_paths) - 1, MAX_CHECK_IMAGES).round().astype(int))
        log.info("checking and calibrating on %d evenly spaced of %d images", len(keep), len(calibration_paths))
        calibration_paths = [calibration_paths[i] for i in keep]
        calibration_labels = None if calibration_labels is None else [calibration_labels[i] for i in keep]
    images, paths, labels = _decode_all(calibration_paths or [], calibration_labels, cfg.image_size, fs)
    if len(images):
        x = images
    else:  # no image to hand: random pixels still catch an exporter that changed the graph
        x = np.random.default_rng(0).integers(0, 256, (8, 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    norm = partial(_normalize, mean=cfg.mean, std=cfg.std)  # by batches: x stays uint8

    fp32_path = os.path.join(bundle_dir, ONNX_FILE)
    tmp = fp32_path + ".tmp"
    try:
        _export_fp32(bundle.model, cfg.image_size, tmp, opset)
        _record_source(tmp, source)
        with torch.inference_mode():
            torch_logits = torch.cat([bundle.model(torch.from_numpy(norm(x[i:i + 32]))).reshape(-1)
                                      for i in range(0, len(x), 32)]).double().numpy()
        onnx_logits = _ort_logits(tmp, x, normalize=norm)
        logit_diff = float(np.max(np.abs(onnx_logits - torch_logits)))
        prob_diff = float(np.max(np.abs(_sigmoid(onnx_logits) - _sigmoid(torch_logits))))
        if not prob_diff <= FP32_TOLERANCE:
            raise RuntimeError(f"ONNX export of {bundle_dir!r} disagrees with the PyTorch model: max abs "
                               f"probability difference {prob_diff:.2e} > {FP32_TOLERANCE:.0e}")
        os.replace(tmp, fp32_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    info: dict[str, Any] = {
        "file": ONNX_FILE, "opset": opset, "exporter": "torch.onnx.export (TorchScript)", "model_pt_sha256": source,
        "onnxruntime": onnxruntime.__version__,
        "checked_on": f"{len(x)} calibration images" if len(images) else f"{len(x)} random images",
        "max_abs_logit_diff": logit_diff, "max_abs_prob_diff": prob_diff, "threshold": cfg.threshold,
    }
    fp32_probs = _sigmoid(onnx_logits)
    if labels is not None and len(images):
        info["fp32_validation"] = _summary_metrics(labels, fp32_probs, cfg.threshold)
    log.info("wrote %s (max abs logit difference to PyTorch %.2e on %s)", fp32_path, logit_diff, info["checked_on"])

    if int8 and not len(images) and not require_int8:
        log.warning("no int8 model for %s: none of its %d calibration image(s) decodes", bundle_dir,
                    len(calibration_paths or []))
        info["int8"] = {"skipped": f"none of {len(calibration_paths or [])} calibration image(s) decodes"}
        int8 = False
    if int8 and not len(images):
        # The fp32 model is written and checked: keep its record, and that of an int8 model
        # still there from before (scoring checks the model.pt it records).
        earlier = (read_metrics(bundle_dir).get("onnx") or {}).get("int8")
        if earlier and os.path.exists(os.path.join(bundle_dir, ONNX_INT8_FILE)):
            info["int8"] = earlier
        update_metrics(bundle_dir, "onnx", info)
        raise ValueError(f"int8 needs calibration images and {bundle_dir!r} names none that decode: "
                         f"pass --calibration-dir DIR (images like the ones to score; a bundle trained on "
                         f"object storage names its images by their keys in the bucket); {ONNX_FILE} was written")
    if int8:
        info["int8"] = _int8_step(bundle_dir, fp32_path, x, fp32_probs, paths, labels, cfg.threshold,
                                  max_calibration_images, source, norm)
    elif os.path.exists(os.path.join(bundle_dir, ONNX_INT8_FILE)):
        # An fp32-only re-export leaves the int8 model as it is: keep its figures with it.
        # (Scoring checks the model.pt each ONNX file records, so a stale one is never run.)
        earlier = (read_metrics(bundle_dir).get("onnx") or {}).get("int8")
        if earlier:
            info["int8"] = earlier
    update_metrics(bundle_dir, "onnx", info)
    return info


def _int8_step(bundle_dir: str, fp32_path: str, x: np.ndarray, fp32_probs: np.ndarray, paths: list[str],
               labels: list[int] | None, threshold: float, max_calibration_images: int,
               source_sha256: str, normalize: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Quantize, evaluate against fp32 and record the calibration set; failures are returned, not raised."""
    int8_path = os.path.join(bundle_dir, ONNX_INT8_FILE)
    pick = np.unique(np.linspace(0, len(x) - 1, min(len(x), max_calibration_images)).round().astype(int))
    try:
        _quantize_int8(fp32_path, int8_path, x[pick], source_sha256=source_sha256, normalize=normalize)
        probs = _sigmoid(_ort_logits(int8_path, x, normalize=normalize))
    except Exception as exc:  # noqa: BLE001 - int8 is optional; fp32 stays usable
        log.warning("int8 quantization of %s failed; the bundle keeps fp32 only: %s: %s", bundle_dir,
                    type(exc).__name__, exc)
        if os.path.exists(int8_path):
            os.remove(int8_path)
        return {"error": f"{type(exc).__name__}: {exc}"}
    write_json_atomic(os.path.join(bundle_dir, CALIBRATION_FILE), {
        "image_size": int(x.shape[-1]), "paths": paths, "labels": labels,
        "calibrated_on": [paths[i] for i in pick],
        "note": f"int8 calibrated on 'calibrated_on' ({len(pick)} images); metrics on all 'paths'",
    })
    out: dict[str, Any] = {"file": ONNX_INT8_FILE, "calibration_images": int(len(pick)), "evaluated_on": len(paths),
                           "max_abs_prob_diff_vs_fp32": float(np.max(np.abs(probs - fp32_probs))),
                           # (in training's export: the validation images, which also chose the
                           # checkpoint and the threshold, and some of which set the int8 ranges)
                           "note": "figures on the calibration images' set, not a held-out one"}
    if len(pick) < FEW_CALIBRATION_IMAGES:
        log.warning("int8 of %s calibrated on %d image(s) only: its value ranges may not hold for other images; "
                    "check it on a held-out folder (or score with --precision fp32)", bundle_dir, len(pick))
    if labels is not None:
        out["validation"] = _summary_metrics(labels, probs, threshold)
    log.info("wrote %s (max abs probability change vs fp32 %.3f)", int8_path, out["max_abs_prob_diff_vs_fp32"])
    return out


def export_onnx_or_log(bundle_dir: str, calibration_paths: Sequence[str] | None = None,
                       calibration_labels: Sequence[int] | None = None, *, int8: bool = True,
                       fs: pafs.FileSystem | None = None) -> dict[str, Any]:
    """:func:`export_onnx` for training's export, right after ``model.pt`` was written.

    ONNX files left from an earlier model in the folder are removed first (they record that
    model's ``model.pt``, so scoring would only fall back to torch or refuse them). A failure is
    logged and recorded (``{"error": ...}``), never raised, so the PyTorch bundle is still
    produced. int8 is skipped without calibration images.
    """
    for stale in OPTIONAL_FILES:  # (upload_bundle deletes them from a remote destination likewise)
        if os.path.exists(os.path.join(bundle_dir, stale)):
            os.remove(os.path.join(bundle_dir, stale))
    try:
        return export_onnx(bundle_dir, calibration_paths, calibration_labels,
                           int8=int8 and bool(calibration_paths), fs=fs, require_int8=False)
    except Exception as exc:  # noqa: BLE001 - the torch bundle must survive any export problem
        log.warning("ONNX export of %s failed; the bundle has the PyTorch model only: %s: %s",
                    bundle_dir, type(exc).__name__, exc)
        info = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            update_metrics(bundle_dir, "onnx", info)
        except OSError:
            pass
        return info


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line flags of ``python -m artifact_core.export_onnx``."""
    p = argparse.ArgumentParser(description="Add model.onnx (and model.int8.onnx) to a model bundle.")
    p.add_argument("bundle", help="model bundle folder (with model.pt and config.json)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static quantization)")
    p.add_argument("--calibration-dir", default=None,
                   help="images to check and calibrate on, searched recursively; labels are read from "
                        "names '<name>_<0|1>.<ext>' when every file has one (default: the images the "
                        "bundle's calibration.json names)")
    p.add_argument("--max-calibration-images", type=int, default=MAX_CALIBRATION_IMAGES,
                   help=f"int8 calibrates on at most this many of them (default: %(default)s; the export reads "
                        f"at most {MAX_CHECK_IMAGES}, evenly spaced)")
    return p


def main(args: argparse.Namespace) -> int:
    """Export; prints the figures written to metrics.json. Returns the exit status."""
    from artifact_core.jobs_common import run_job

    status = []
    code = run_job(lambda a: status.append(_export(a)), args, log)
    return code or (status[0] if status else 0)


def _export(args: argparse.Namespace) -> int:
    if is_uri(args.bundle):
        raise ValueError(f"{args.bundle!r}: export a local copy of the bundle, then upload the .onnx files "
                         f"(and metrics.json) beside its model.pt")
    if not os.path.isdir(args.bundle):
        raise FileNotFoundError(f"model bundle {args.bundle!r} does not exist (expected a folder with model.pt)")
    if args.max_calibration_images < 1:
        raise ValueError(f"--max-calibration-images must be at least 1, got {args.max_calibration_images}")
    paths = labels = None
    if args.calibration_dir:
        paths = list_images(args.calibration_dir)
        if not paths:
            raise ValueError(f"no images found under --calibration-dir {args.calibration_dir!r}")
        try:
            labels = [parse_label(p) for p in paths]
        except ValueError:
            labels = None
            log.info("not every name under %s carries a label: no accuracy figures", args.calibration_dir)
    info = export_onnx(args.bundle, paths, labels, int8=args.int8, max_calibration_images=args.max_calibration_images)
    print(json.dumps(info, indent=2))
    return 1 if "error" in info.get("int8", {}) else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
