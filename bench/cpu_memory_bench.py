"""Where a CPU forward pass of the default model spends its time, and what glibc's settings and
passes of fewer images change (artifact_core.cpu_memory).

    python bench/cpu_memory_bench.py                  # 448 px, batches of 16, one thread
    python bench/cpu_memory_bench.py --image-size 224 --images 64

Each variant runs in a fresh process (glibc's settings hold for a process's life) on the model
a default training run builds (ImageNet weights as shipped, multiscale head, test-time flip,
five head members), random images (speed does not depend on the pixels), one thread as a
worker has with ``--cpus-per-worker 1``:

- ``eval``: the whole model in eval mode under inference_mode, as validation and the torch
  scoring engine run it (each image and its mirror);
- ``train``: a phase-2 step at the default unfreeze depth (forward, backward, AdamW).

Per variant: milliseconds per image, user and system CPU time per image, minor page faults
per image and peak RSS. Variants: glibc's defaults with the whole batch (as before), passes of
fewer images alone, the settings alone, and both (what training and the torch engine do now).
Not a test: absolute figures vary with the machine; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = [("defaults, whole batch", False, False), ("passes of fewer images", False, True),
            ("malloc settings", True, False), ("both (now)", True, True)]

CHILD = r"""
import json, resource, sys, time
import torch
from artifact_core import cpu_memory
from artifact_core.config import TrainConfig
from artifact_core.model import model_for, set_trainable, train_mode

mode, size, batch, n_images, tuned, passes = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5] == "1", sys.argv[6] == "1"
if tuned:
    assert cpu_memory.tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = TrainConfig(image_size=size)
model = model_for(cfg, weights="bundled").to(memory_format=torch.channels_last)
if passes:
    model.images_per_pass = cpu_memory.trunk_images_per_pass(model, size)
x = torch.rand(n_images, 3, size, size).contiguous(memory_format=torch.channels_last)
y = (torch.rand(n_images, 1) > 0.1).float()
if mode == "eval":
    model.eval()
    def step(xb, yb):
        with torch.inference_mode():
            model(xb)
else:
    set_trainable(model, unfreeze_depth=cfg.unfreeze_depth)
    train_mode(model, trunk_bn_frozen=cfg.finetune_bn == "frozen")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    def step(xb, yb):
        logits = model(xb)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb.expand_as(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
step(x[:batch], y[:batch])  # warm-up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(0, n_images, batch):
    step(x[i:i + batch], y[i:i + batch])
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms": wall / n_images * 1e3, "user": (r1.ru_utime - r0.ru_utime) / n_images * 1e3,
                  "sys": (r1.ru_stime - r0.ru_stime) / n_images * 1e3, "faults": (r1.ru_minflt - r0.ru_minflt) / n_images,
                  "rss": r1.ru_maxrss / 1024, "per_pass": model.images_per_pass}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=32, help="timed images per variant")
    args = p.parse_args()
    print(f"{args.image_size} px, batches of {args.batch_size}, {args.images} images per variant, one thread")
    print(f"{'pass':6} {'variant':24} {'ms/img':>7} {'user':>6} {'sys':>6} {'faults/img':>11} {'peak RSS':>9}  images/pass  speed-up")
    for mode in ("eval", "train"):
        base = None
        for name, tuned, passes in VARIANTS:
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.image_size), str(args.batch_size),
                                  str(args.images), "1" if tuned else "0", "1" if passes else "0"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            base = base or r["ms"]
            print(f"{mode:6} {name:24} {r['ms']:7.0f} {r['user']:6.0f} {r['sys']:6.0f} {r['faults']:11.0f} "
                  f"{r['rss']:7.0f} MiB  {r['per_pass'] or args.batch_size:>3}   {base / r['ms']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
