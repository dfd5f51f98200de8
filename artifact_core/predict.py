"""The predictor shared by scoring (a Ray Data actor) and in-process evaluation.

Two engines with one contract, ``predict(batch) -> P(artifact-free)`` for a (N, 3, S, S)
batch that is either uint8 pixels (normalized by the engine) or already normalized floats:

- :class:`TorchEngine`: the bundle's ``model.pt`` in PyTorch, on CPU or GPU;
- :class:`OnnxEngine`: ``model.onnx`` (fp32) or ``model.int8.onnx`` in ONNX Runtime on CPU.

:func:`resolve_engine` turns ``--engine auto|torch|onnx`` and ``--precision fp32|int8``
into one of them. A bundle may be a local folder or a URI (``s3://``...): its ONNX model is
read into memory, never from a path ONNX Runtime would have to reach.

An ONNX model that records the sha256 of another ``model.pt`` than the bundle's (a
re-export that was interrupted or not copied along) is never run: ``auto`` falls back to
torch with a warning, an explicit ONNX engine or int8 is an error (:class:`StaleOnnxError`).
So is one that records no source in a bundle whose ``config.json`` records its weights (a
version that records both wrote it: the file was replaced since); one without a source in an
older bundle is used as it is. An ONNX model whose input size is not the config's is refused.

Torch is imported only by the torch engine: an ONNX Runtime actor starts without it
(about 0.9 GB and seconds less per actor; ``tests/test_predict.py`` checks that in a fresh
interpreter).
"""

from __future__ import annotations

import logging
import posixpath
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow.fs as pafs

from artifact_core.bundle import (ONNX_FILE, ONNX_INT8_FILE, ONNX_SOURCE_KEY, BundleConfig, load_bundle,
                                  read_bundle_config, weights_sha256)
from artifact_core.config import SCORE_ENGINES as ENGINES
from artifact_core.config import SCORE_PRECISIONS as PRECISIONS
from artifact_core.decode import decode_batch, decode_paths
from artifact_core.storage import Location, join_uri, redact_uri, resolve

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("filename", "path", "predicted_class", "confidence", "prob_artifact_free", "error")

# uri -> ((size, mtime), bytes): a remote ONNX model is downloaded once per process for the
# engine check and every lane's session, not once each.
_REMOTE_MODELS: dict[str, tuple[tuple[int | None, int | None], bytes]] = {}
# (uri, size, mtime) -> the model.pt sha256 an ONNX file records (None: it records none)
_RECORDED_SOURCE: dict[tuple[str, int | None, int | None], str | None] = {}
# messages already logged: the driver resolves the engine several times per job
_LOGGED: set[str] = set()


class StaleOnnxError(ValueError):
    """A bundle's ONNX model was exported from another ``model.pt`` than the one beside it."""


class BundleChangedError(ValueError):
    """A bundle holds other weights than the scoring run that loads it began with."""


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


def _read_model_bytes(model: Location) -> bytes:
    """An ONNX file's bytes; a remote one is downloaded once per process per version of the file.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    info = model.info()
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{model.uri} does not exist")
    if model.is_local:
        with open(model.path, "rb") as f:
            return f.read()
    version = (info.size, info.mtime_ns)
    cached = _REMOTE_MODELS.get(model.uri)
    if cached is None or cached[0] != version:
        with model.fs.open_input_stream(model.path) as f:
            cached = (version, f.read())
        _REMOTE_MODELS[model.uri] = cached
    return cached[1]


def _recorded_source(session: Any) -> str | None:
    """The model.pt sha256 an ONNX Runtime session's model records (None for older exports)."""
    return session.get_modelmeta().custom_metadata_map.get(ONNX_SOURCE_KEY)


def _recorded_source_of(model: Location) -> str | None:
    """:func:`_recorded_source` of an ONNX file, read once per process per version of the file."""
    import onnxruntime as ort

    info = model.info()
    key = (model.uri, info.size, info.mtime_ns)
    if key not in _RECORDED_SOURCE:
        # An unoptimized session only to read the metadata: ONNX Runtime is imported by
        # the ONNX engine anyway, the onnx package is not (0.7 s more per process).
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(_read_model_bytes(model), options, providers=["CPUExecutionProvider"])
        _RECORDED_SOURCE[key] = _recorded_source(session)
    return _RECORDED_SOURCE[key]


def _stale_reason(bundle_dir: str, model: Location, recorded: str | None) -> str | None:
    """Why the ONNX file ``model`` must not stand for the bundle's model.pt, or None when it may."""
    if recorded is None:
        # Exports have recorded their source since before config.json recorded the weights'
        # hash: a bundle whose config has that hash had its ONNX file replaced or rewritten.
        if read_bundle_config(bundle_dir).weights_sha256 is not None:
            return (f"{redact_uri(model.uri)} does not record the model.pt it was exported from, though the "
                    f"bundle was written by a version whose exports do (replaced or rewritten since)")
        _log_once(logging.INFO, f"{redact_uri(model.uri)} does not record the model.pt it was exported from "
                                f"(an older export); using it as it is")
        return None
    actual = weights_sha256(bundle_dir)
    if recorded == actual:
        return None
    return (f"{redact_uri(model.uri)} was exported from another model.pt (sha256 {recorded[:12]}...) than the "
            f"bundle's (sha256 {actual[:12]}...)")


def _reexport_hint(bundle_dir: str, precision: str) -> str:
    command = (f"python -m artifact_core.export_onnx {redact_uri(bundle_dir)}"
               f"{' --int8 --calibration-dir DIR' if precision == 'int8' else ''}")
    if not resolve(bundle_dir).is_local:
        return f"re-export it with '{command}' run on a local copy of the bundle, then upload the .onnx files"
    return f"re-export it with '{command}'"


def resolve_engine(bundle_dir: str, engine: str = "auto", precision: str = "fp32", *,
                   use_gpu: bool = False) -> str:
    """The engine that will run: ``"torch"`` or ``"onnx"``.

    ``auto`` is torch on GPU, ONNX Runtime on CPU when the bundle has the ONNX file for
    ``precision``, else torch. ``int8`` exists only as ONNX (CPU). An ONNX file exported from
    another ``model.pt`` than the bundle's makes ``auto`` torch (with a warning) and is an
    error otherwise. ``bundle_dir`` may be a local folder or a URI.

    Raises:
        ValueError: an unknown engine/precision, or a combination that cannot run.
        FileNotFoundError: ONNX asked for but the bundle lacks the file.
        StaleOnnxError: ONNX asked for (``--engine onnx`` or int8) but the file was exported
            from another ``model.pt``.
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    onnx_file = resolve(onnx_path(bundle_dir, precision))
    if precision == "int8" and (use_gpu or engine == "torch"):
        raise ValueError("--precision int8 runs in ONNX Runtime on CPU only; "
                         "use --engine onnx (or auto) without --use-gpu, or --precision fp32")
    asked = engine
    if engine == "auto":
        engine = "torch" if use_gpu else ("onnx" if onnx_file.exists() or precision == "int8" else "torch")
    if engine == "onnx":
        if use_gpu:
            raise ValueError("--engine onnx runs on CPU; drop --use-gpu or use --engine torch (or auto)")
        if not onnx_file.exists():
            raise FileNotFoundError(
                f"model bundle {redact_uri(bundle_dir)!r} has no {posixpath.basename(onnx_file.path)}; "
                f"{_reexport_hint(bundle_dir, precision).replace('re-export it', 'make it')} or use "
                f"{'--precision fp32' if precision == 'int8' else '--engine torch'}")
        stale = _stale_reason(bundle_dir, onnx_file, _recorded_source_of(onnx_file))
        if stale and asked == "auto" and precision == "fp32":
            _log_once(logging.WARNING, f"{stale}: running model.pt in PyTorch instead; "
                                       f"{_reexport_hint(bundle_dir, precision)}")
            return "torch"
        if stale:
            raise StaleOnnxError(f"{stale}; {_reexport_hint(bundle_dir, precision)} (or use --engine torch"
                                 f"{' --precision fp32' if precision == 'int8' else ''})")
    return engine


def onnx_path(bundle_dir: str, precision: str = "fp32") -> str:
    """Path (or URI) of the bundle's ONNX model for ``precision``."""
    return join_uri(bundle_dir, ONNX_INT8_FILE if precision == "int8" else ONNX_FILE)


class TorchEngine:
    """The bundle's model in PyTorch eager mode (channels-last), on CPU or one GPU.

    On GPU the uint8 batch goes through pinned memory to the device and is normalized
    there (a quarter of the bytes of float32 over PCIe), under bf16/fp16 autocast.
    """

    name = "torch"
    precision = "fp32"

    def __init__(self, bundle_dir: str, *, device: torch.device | str = "cpu", micro_batch: int | None = None) -> None:
        import torch

        device = torch.device(device)
        bundle = load_bundle(bundle_dir, device=device)
        self.config: BundleConfig = bundle.config
        self.device = device
        self.model = bundle.model.to(memory_format=torch.channels_last)
        if device.type == "cpu":
            from artifact_core.cpu_memory import use_cpu_passes

            use_cpu_passes(self.model, bundle.config.image_size)  # (sets glibc's allocator process-wide)
        self.micro_batch = micro_batch
        self.mean = torch.tensor(bundle.config.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(bundle.config.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        from artifact_core.model import amp_dtype

        self.autocast_dtype = amp_dtype(device)

    def _to_device(self, chunk: torch.Tensor) -> torch.Tensor:
        # (torch is already imported: only predict() calls this)
        if self.device.type == "cuda" and chunk.device.type == "cpu":
            chunk = chunk.pin_memory()
        return chunk.to(self.device, non_blocking=True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> [0, 1] -> mean/std normalized float32 (on ``x``'s device)."""
        import torch

        return (x.to(torch.float32) / 255.0 - self.mean) / self.std

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(artifact-free) for a (N, 3, S, S) uint8 or normalized float batch."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
        chunks = x.split(self.micro_batch) if self.micro_batch else (x,)
        out = []
        with torch.inference_mode():
            for chunk in chunks:
                chunk = self._to_device(chunk)
                if chunk.dtype == torch.uint8:
                    chunk = self.normalize(chunk)
                chunk = chunk.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                                    enabled=self.autocast_dtype is not None):
                    logits = self.model(chunk)
                out.append(torch.sigmoid(logits.squeeze(1).float()).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


class OnnxEngine:
    """An ONNX Runtime session on CPU, made once (per actor), of a local or remote bundle.

    ``intra_op_num_threads`` = the CPUs the actor reserved; one inter-op thread and
    sequential execution, since MobileNetV2 is a chain with nothing to run in parallel.
    ``spin=False`` stops idle intra-op threads from busy-waiting: needed when decode threads
    share the cores (:class:`DecodingPredictor`), else they burn the cores the decoders need.

    Raises:
        StaleOnnxError: the ONNX file was exported from another ``model.pt`` than the bundle's
            (see :func:`_stale_reason`), or takes another input size than ``config.json`` says.
    """

    name = "onnx"

    def __init__(self, bundle_dir: str, *, precision: str = "fp32", num_threads: int | None = None,
                 micro_batch: int | None = None, spin: bool = True) -> None:
        import onnxruntime as ort  # only the ONNX engine needs it

        self.config = read_bundle_config(bundle_dir)
        model = resolve(onnx_path(bundle_dir, precision))
        self.precision = precision
        self.micro_batch = micro_batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(num_threads or 0)  # 0: ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # From bytes: a bundle in object storage needs no local copy, and the bytes checked
        # below are the ones that run.
        self.session = ort.InferenceSession(_read_model_bytes(model), options, providers=["CPUExecutionProvider"])
        stale = _stale_reason(bundle_dir, model, _recorded_source(self.session))
        if stale:
            raise StaleOnnxError(f"{stale}; {_reexport_hint(bundle_dir, precision)}")
        self.input_name = self.session.get_inputs()[0].name
        # The exported graph has the training size fixed in it: a config.json that says another
        # size would fail every batch inside the actors, after the job has started.
        size = self.session.get_inputs()[0].shape[2:]
        if all(isinstance(d, int) for d in size) and list(size) != [self.config.image_size] * 2:
            raise StaleOnnxError(f"{redact_uri(model.uri)} takes {size[0]} x {size[1]} images but the bundle's "
                                 f"config.json says image_size {self.config.image_size}; "
                                 f"{_reexport_hint(bundle_dir, precision)}")
        self.mean = np.asarray(self.config.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(self.config.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels -> mean/std normalized float32, as :meth:`TorchEngine.normalize`."""
        return (x.astype(np.float32) / np.float32(255.0) - self.mean) / self.std

    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw logits (float32) for a (N, 3, S, S) uint8 or normalized float batch."""
        # A torch tensor (in-process callers) becomes a view; never imports torch here.
        x = np.asarray(batch) if isinstance(batch, np.ndarray) else np.asarray(batch.numpy() if hasattr(batch, "numpy") else batch)
        step = self.micro_batch or max(len(x), 1)
        out = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            chunk = self.normalize(chunk) if chunk.dtype == np.uint8 else np.ascontiguousarray(chunk, dtype=np.float32)
            out.append(self.session.run(None, {self.input_name: chunk})[0].reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """P(artifact-free) for a (N, 3, S, S) uint8 or normalized float batch."""
        return 1.0 / (1.0 + np.exp(-self.logits(batch).astype(np.float64)))


class ArtifactPredictor:
    """Callable class for ``Dataset.map_batches``: loads the bundle once per actor.

    Input batch (numpy format): ``image`` (N, 3, S, S) uint8 from
    :func:`~artifact_core.decode.decode_batch` (normalized by the engine),
    ``error`` (str, "" when the image decoded), ``path``, ``filename``.
    Output: :data:`OUTPUT_COLUMNS`. Rows with a decode error keep it, with
    ``predicted_class = -1`` and NaN probabilities.

    The torch engine on CPU sets glibc's allocator for the whole process
    (:func:`~artifact_core.cpu_memory.tune_malloc`): freed memory stays with it for reuse
    (ONNX Runtime has an arena of its own).
    """

    def __init__(self, bundle_dir: str, *, use_gpu: bool = False, threshold: float | None = None,
                 num_threads: int | None = None, cpu_micro_batch: int = 8, engine: str = "auto",
                 precision: str = "fp32", spin: bool = True, expected_weights_sha256: str | None = None) -> None:
        self.engine_name = resolve_engine(bundle_dir, engine, precision, use_gpu=use_gpu)
        self.device = "cuda" if use_gpu else "cpu"
        # On CPU MobileNetV2 runs ~2x faster per image in chunks of 4-8 than of 64 (its
        # activations then stay in cache; measured with bench/score_bench.py). GPUs take it whole.
        micro_batch = cpu_micro_batch if self.device == "cpu" else None
        self.engine: Any
        if self.engine_name == "onnx":
            self.engine = OnnxEngine(bundle_dir, precision=precision, num_threads=num_threads, micro_batch=micro_batch,
                                     spin=spin)
        else:
            if num_threads:
                import torch

                torch.set_num_threads(num_threads)
            self.engine = TorchEngine(bundle_dir, device=self.device, micro_batch=micro_batch)
        self.precision = self.engine.precision
        self.config = self.engine.config
        # A scoring actor that starts late (a node the autoscaler added, a restart) must score
        # with the model the run recorded, not one exported into the bundle since. (The config
        # was checked against the model.pt its engine runs; a config of a bundle written
        # before it recorded the hash cannot tell.)
        found = self.config.weights_sha256
        if expected_weights_sha256 and found and found != expected_weights_sha256:
            raise BundleChangedError(f"model bundle {redact_uri(bundle_dir)} holds other weights (model.pt sha256 "
                                 f"{found[:12]}...) than this scoring run began with ({expected_weights_sha256[:12]}...): "
                                 f"it was exported again meanwhile; rerun with --overwrite to score with the new model")
        self.threshold = float(self.config.threshold if threshold is None else threshold)

    def predict_tensor(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """P(artifact-free) for a (N, 3, H, W) batch, uint8 or normalized."""
        return self.engine.predict(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.asarray(batch["error"], dtype=object)
        ok = errors == ""
        prob = np.full(len(errors), np.nan)
        if ok.any():
            prob[ok] = self.engine.predict(np.ascontiguousarray(batch["image"][ok]))
            # NaN >= threshold is False: without this a broken model would call the image an
            # artifact with a NaN confidence; it is an error row instead.
            broken = ok & ~np.isfinite(prob)
            if broken.any():
                errors = errors.copy()
                errors[broken] = "the model returned a non-finite probability"
                ok &= ~broken
        pred = np.where(ok, (prob >= self.threshold).astype(np.int64), -1)
        confidence = np.where(pred == 1, prob, 1.0 - prob)
        return {"filename": batch["filename"], "path": batch["path"], "predicted_class": pred,
                "confidence": confidence, "prob_artifact_free": prob, "error": errors.astype(str)}


class DecodingPredictor:
    """Callable class for ``Dataset.map_batches`` in the fused pipeline: read, decode and predict
    in one actor, with no object-store hop for the pixels.

    Input batch: ``raw_path`` (bytes, as :func:`~artifact_core.decode.decode_batch`); output:
    :data:`OUTPUT_COLUMNS`, the same rows and error rows as the split pipeline. The batch is cut
    into chunks of ``chunk`` images. Two layouts:

    - ``lanes`` > 1 (ONNX Runtime on CPU): that many lanes, each a thread with its own
      session of ``num_threads`` threads (1: one lane per core) that decodes a chunk and then
      infers it.
      On 2 cores this scored 512² JPEGs 10-20 % faster than one two-threaded session: a
      single-threaded session wastes nothing on synchronizing its threads at every layer of a
      small batch, and a lane never waits for another;
    - ``lanes`` = 1: one engine with ``num_threads`` intra-op threads, fed by
      ``decode_threads`` threads that decode chunks ahead while it runs the current one (the
      torch engine, whose thread pool is per process). On a GPU the chunks decode side by side
      and the engine then takes the whole batch in one call; decoding overlaps inference there
      across the actor's concurrent calls (``scoring.FUSED_CONCURRENT_CALLS``).

    Decode and inference overlap for real: PIL and ONNX Runtime (and torch) release the GIL
    in their C code.
    """

    def __init__(self, bundle_dir: str, *, image_size: int, root: str, fs: Any = None, decode_threads: int = 1,
                 chunk: int = 8, lanes: int = 1, **predictor_kwargs: Any) -> None:
        self.lanes = max(1, lanes)
        self.predictor = ArtifactPredictor(bundle_dir, cpu_micro_batch=chunk, spin=False, **predictor_kwargs)
        if self.lanes > 1 and self.predictor.engine_name != "onnx":
            raise ValueError(f"lanes > 1 needs the ONNX engine (one session per lane); got {self.predictor.engine_name}")
        # Idle lane engines; one chunk holds one engine, so no two chunks share an engine's threads.
        self._engines: queue.SimpleQueue[ArtifactPredictor] = queue.SimpleQueue()
        self._engines.put(self.predictor)
        for _ in range(self.lanes - 1):
            self._engines.put(ArtifactPredictor(bundle_dir, cpu_micro_batch=chunk, spin=False, **predictor_kwargs))
        self.decode_kwargs = {"image_size": image_size, "root": root, "fs": fs}
        self.chunk = max(1, chunk)
        self.pool = ThreadPoolExecutor(self.lanes if self.lanes > 1 else max(1, decode_threads),
                                       thread_name_prefix="lane" if self.lanes > 1 else "decode")

    def _predict(self, decoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # With two calls in flight (the scoring job lets Ray Data run
        # scoring.FUSED_CONCURRENT_CALLS per actor) the next batch decodes while this one
        # infers; an engine serves one chunk at a time.
        engine = self._engines.get()
        try:
            return engine(decoded)
        finally:
            self._engines.put(engine)

    def _lane(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        return self._predict(decode_batch({"raw_path": raw}, **self.decode_kwargs))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw = batch["raw_path"]
        chunks = [raw[i:i + self.chunk] for i in range(0, len(raw), self.chunk)]
        if not chunks:
            return self._predict(decode_batch({"raw_path": raw}, **self.decode_kwargs))
        if self.lanes > 1:
            parts = [f.result() for f in [self.pool.submit(self._lane, c) for c in chunks]]
        else:
            futures = [self.pool.submit(decode_batch, {"raw_path": c}, **self.decode_kwargs) for c in chunks]
            if self.predictor.device == "cuda":
                # Chunks decode side by side; the GPU then takes the whole batch at once (chunks
                # of 8 would leave it idle between tiny launches).
                decoded = [f.result() for f in futures]
                return self._predict({k: np.concatenate([d[k] for d in decoded]) for k in decoded[0]})
            parts = [self._predict(f.result()) for f in futures]  # in order: chunk k runs while k+1.. decode
        return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUT_COLUMNS}


def predict_paths(predictor: ArtifactPredictor, paths: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """P(artifact-free) for image files, in process, with the same decode as scoring's tasks.

    Raises:
        ImageDecodeError: for the first file that cannot be decoded.
    """
    out = [predictor.engine.predict(decode_paths(paths[i:i + batch_size], predictor.config.image_size))
           for i in range(0, len(paths), batch_size)]
    return np.concatenate(out) if out else np.zeros(0)
