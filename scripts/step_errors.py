"""What caching one step costs at t = 0, against what the schedule search's error model counts for it.

    python scripts/step_errors.py --model digits --shift 1 --out docs/calibration/step_errors_digits_shift1.json

For each step j, a policy that caches j alone (``velocity``: reuse of step j-1;
``extrapolate``: the line through steps j-2 and j-1) is sampled on 10 samples and its
MSE at t = 0 against the uncached samples is measured; the error model's count for the
same step is ``dt_j^2 * mean ||v~_j - v_j||^2`` along the uncached trajectory (counted
once, as it is made). Their ratio is how much of a step's error reaches the output. Also
the evenly spaced sets at NFE 15 and 20 (T = 30), with and without step 1 cached.
"""

from __future__ import annotations

import argparse
import json

import torch

from ertacache import Policy, sample, seeded_noise
from ertacache.core.grids import time_grid
from ertacache.io import atomic_write_text
from ertacache.models.bundled import bundled_model
from ertacache.models.digits import NULL_CLASS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    b = bundled_model(args.model)
    model = b.load(None)
    T, g, shift = b.num_inference_steps, b.guidance_scale, args.shift
    labels = torch.arange(10)
    noise = seeded_noise(range(100, 110), b.latent_shape)
    kw = dict(num_inference_steps=T, shift=shift, guidance_scale=g, null_cond=torch.full_like(labels, NULL_CLASS))
    grid = time_grid(T, shift)
    xs: list[torch.Tensor] = [noise]

    def record(step: int, t: float, x: torch.Tensor) -> None:
        xs.append(x.clone())

    with torch.no_grad():
        ref = sample(model, noise, labels, callback=record, **kw).x
        vs = [(xs[i + 1] - xs[i]) / (grid[i + 1] - grid[i]) for i in range(T)]  # the guided velocity of each step

        def mse(cached: list[int], reuse: str) -> float:
            pol = Policy(T, tuple(cached), tuple(grid), reuse=reuse, shift=shift, branches=("cond", "uncond"),
                         guidance_scale=g)
            return float((sample(model, noise, labels, policy=pol, **kw).x - ref).square().mean())

        rows = []
        for j in range(1, T - 1):
            dt2 = (grid[j] - grid[j + 1]) ** 2
            vel = dt2 * float((vs[j - 1] - vs[j]).square().mean())
            ext = vel
            if j >= 2:
                s = (grid[j] - grid[j - 1]) / (grid[j - 1] - grid[j - 2])
                ext = dt2 * float((vs[j - 1] + s * (vs[j - 1] - vs[j - 2]) - vs[j]).square().mean())
            row = {"step": j, "t": round(grid[j], 4), "velocity": {"modelled": vel, "measured": mse([j], "velocity")},
                   "extrapolate": {"modelled": ext, "measured": mse([j], "extrapolate")}}
            print(json.dumps(row), flush=True)
            rows.append(row)
        sets = {}
        for nfe in (T // 2, round(T / 1.5)):
            cached = list(Policy.uniform(T, nfe).cached_steps)
            sets[str(nfe)] = {"cached_steps": cached, "mse": mse(cached, "extrapolate"),
                              "mse_without_step_1": mse([c for c in cached if c != 1], "extrapolate")}
            print(nfe, json.dumps(sets[str(nfe)]), flush=True)
    doc = {"meta": {"command": f"python scripts/step_errors.py --model {args.model} --shift {args.shift:g} "
                               f"--out {args.out}", "T": T, "guidance_scale": g, "samples": 10},
           "steps": rows, "uniform_sets": sets}
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
