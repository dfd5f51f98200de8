"""CPU memory behaviour of eager passes: glibc's settings and the images per pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from artifact_core import cpu_memory
from artifact_core.model import build_model

# Three large arrays per round (20, 20 and 30 MiB), touched and freed, ten rounds: the
# allocation pattern of a forward pass whose activations are below glibc's mmap ceiling.
_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from artifact_core.cpu_memory import tune_malloc
    tuned = tune_malloc() if sys.argv[1] == "1" else None
    def once():
        arrays = [np.ones(n // 8) for n in (20 << 20, 20 << 20, 30 << 20)]
        return sum(float(a[-1]) for a in arrays)
    once()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        once()
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
""")


def _faults(tuned: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_freed_activation_memory_instead_of_faulting_it_in_again():
    """10 rounds of 70 MiB are 179k pages: glibc's defaults map most of them afresh each round;
    tuned, the freed memory is reused and hardly a page faults in."""
    flag, tuned = _faults(True)
    _, default = _faults(False)
    assert flag == "True"
    assert tuned < 1000, tuned
    assert default > 5000, f"glibc's defaults faulted only {default} pages in: the premise no longer holds"


def test_tune_malloc_is_idempotent(monkeypatch):
    """The C library is asked once per process, whatever the number of engines built."""
    opened = []
    cdll = cpu_memory.ctypes.CDLL
    monkeypatch.setattr(cpu_memory, "_tuned", None)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda *a, **k: (opened.append(a), cdll(*a, **k))[1])
    first = cpu_memory.tune_malloc()
    assert cpu_memory.tune_malloc() is first
    assert len(opened) == (1 if sys.platform.startswith("linux") else 0)


def test_images_per_pass_keeps_each_activation_within_the_limit():
    limit = cpu_memory.MMAP_THRESHOLD_MAX
    assert cpu_memory.images_per_pass(96 * 224 * 224 * 4) == 1  # 448 px: block 1's expansion
    assert cpu_memory.images_per_pass(96 * 112 * 112 * 4) == 6  # 224 px
    assert cpu_memory.images_per_pass(limit + 1) == 1
    assert cpu_memory.images_per_pass(0) == limit
    assert cpu_memory.images_per_pass(1000, limit=4999) == 4


def test_largest_output_bytes_sees_every_submodule():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.zeros(2, 3, 10, 10)
    assert cpu_memory.largest_output_bytes(net, lambda: net(x)) == 2 * 8 * 10 * 10 * 4
    assert not net[0]._forward_hooks  # the hooks are removed


def test_trunk_images_per_pass_follows_the_image_size_and_restores_training_mode():
    model = build_model(weights="none", head="multiscale").train()
    assert cpu_memory.trunk_images_per_pass(model, 448) == 1
    assert cpu_memory.trunk_images_per_pass(model, 224) == 6
    assert all(m.training for m in model.modules())
