"""The job scripts as users run them: one-line errors for bad input (`ray job submit` end to end: test_cluster.py)."""

from __future__ import annotations

import pytest

from conftest import load_job, make_easy_folder, write_image
from artifact_core.jobs_common import run_job

pytestmark = pytest.mark.ray


def run_cli(name: str, argv: list[str], capsys) -> tuple[int, str]:
    job = load_job(name)
    rc = run_job(job.main, job.get_args_parser().parse_args(argv), job.logging.getLogger("artifact_core"))
    return rc, capsys.readouterr().err


TINY = ["--image-size", "32", "--batch-size", "8", "--head-epochs", "1", "--finetune-epochs", "1", "--weights", "none"]


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("one_class", "only class 1"),
    ("bad_label", "cannot read label from 'photo.png'"),
    ("torchvision_offline", "cannot load ImageNet weights"),
    ("too_many_workers", "needs 8 worker(s) x 1 CPU"),
    ("gpu", "asked for GPUs"),
    ("bad_flag", "--unfreeze-depth must be in 1..14 for the multiscale head with phase-2 epochs, got 25"),
])
def test_train_bad_input_is_one_clear_line(ray_session, tmp_path, capsys, monkeypatch, case, expected):
    data = tmp_path / "data"
    argv = ["--data-dir", str(data), "--storage-path", str(tmp_path / "runs"), *TINY]
    if case == "empty":
        data.mkdir()
    elif case == "one_class":
        for i in range(3):
            write_image(data / f"image_{i}_1.png")
    elif case == "bad_label":
        make_easy_folder(data, n=8)
        write_image(data / "photo.png")
    elif case != "missing":
        make_easy_folder(data, n=8)
    if case == "torchvision_offline":
        from artifact_core import model

        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        monkeypatch.setattr(model, "_download",
                            lambda *a, **k: (_ for _ in ()).throw(OSError("network is unreachable")))
        argv[argv.index("none")] = "torchvision"
    argv += {"too_many_workers": ["--num-workers", "8"], "gpu": ["--use-gpu"],
             "bad_flag": ["--unfreeze-depth", "25"]}.get(case, [])
    rc, err = run_cli("train", argv, capsys)
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err

