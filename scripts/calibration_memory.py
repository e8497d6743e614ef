"""Peak memory and time of one calibration on the bundled model, by micro-batch size.

    python scripts/calibration_memory.py [--batch-sizes 1 4 0] [--threshold 0.2]

The demo's calibration set (20 samples, CFG: 40 rows a model call at batch size 0 =
all), T = 30, a threshold goal (ground truth, one search, every variant of the one
candidate). Memory is the peak resident-set growth during the call on the CPU (CUDA's
allocator peak on a GPU), a rough signal; each size runs in a fresh process.
"""

import argparse
import json
import subprocess
import sys

p = argparse.ArgumentParser()
p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 0])
p.add_argument("--threshold", type=float, default=0.2)
p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
args = p.parse_args()

if args.one is None:
    print("| batch size | peak memory (MB) | seconds | cached steps |")
    print("|---|---|---|---|")
    for k in args.batch_sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(k), "--threshold", str(args.threshold)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {k or 'all (40 rows)'} | {r['mb']:.1f} | {r['seconds']:.1f} | {r['cached']} |", flush=True)
    sys.exit(0)

import time  # noqa: E402

import torch  # noqa: E402

import ertacache  # noqa: E402
from ertacache.bench import PeakMemory  # noqa: E402
from ertacache.models.bundled import labels_and_seeds  # noqa: E402
from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, load_digits_model  # noqa: E402

model = load_digits_model()
labels, seeds = labels_and_seeds(2, 0)
start = time.perf_counter()
with PeakMemory() as mem:
    policy = ertacache.calibrate(model, labels, seeds, latent_shape=LATENT_SHAPE, num_inference_steps=30,
                                 guidance_scale=3.0, null_cond=torch.full_like(labels, NULL_CLASS),
                                 threshold=args.threshold, batch_size=args.one or None)
print(json.dumps({"mb": mem.mb, "seconds": time.perf_counter() - start, "cached": list(policy.cached_steps)}))
