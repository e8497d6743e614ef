"""What a set fitted to one calibration sample gains on other prompts: per class, on fresh noise of its own class, and
on the unconditional prompt (the rows of calibration's fresh check, docs/method.md section 2.8).

    python scripts/fresh_rows.py --model photos --shift 3 --label 10 --seed 6735 --target 3 \\
        --out docs/calibration/fresh_rows_photos.json

Calibrates on the one sample with the fresh check off (the set the sample alone would keep), then scores that policy
against evenly spaced caching at its NFE (same reuse): ``10 log10(MSE_uniform / MSE_policy)`` per row, on one held-out
seed of every class (seeds 20000..), on ``--fresh`` seeds of the sample's own class, and on as many of the null
class (the unconditional prompt); the fresh check's own verdict with the check on is recorded beside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from results import commit

from ertacache import CalibrationConfig, Policy, calibrate, sample, seeded_noise
from ertacache.calibration.drive import FRESH_SEED_OFFSET
from ertacache.io import atomic_write_text
from ertacache.models.bundled import bundled_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="photos")
    p.add_argument("--shift", type=float, required=True)
    p.add_argument("--label", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--fresh", type=int, default=4, help="fresh seeds of the sample's class and of the null class")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b = bundled_model(args.model)
    model = b.load(None)
    kw = dict(num_inference_steps=args.steps or b.num_inference_steps, shift=args.shift,
              guidance_scale=b.guidance_scale)
    label = torch.tensor([args.label])

    def policy(check: bool) -> Policy:
        return calibrate(model, label, [args.seed], target_speedup=args.target, latent_shape=b.latent_shape,
                         null_cond=torch.full_like(label, b.null_class), config=CalibrationConfig(fresh_check=check),
                         **kw)

    fitted = policy(False)
    uniform = Policy.uniform(fitted.num_inference_steps, fitted.nfe, like=fitted)

    @torch.no_grad()
    def gains(labels: list[int], seeds: list[int]) -> list[float]:
        cond, noise = torch.tensor(labels), seeded_noise(seeds, b.latent_shape)
        k = dict(kw, null_cond=torch.full_like(cond, b.null_class))
        ref = sample(model, noise, cond, **k).x

        def mse(pol: Policy) -> torch.Tensor:
            return (sample(model, noise, cond, policy=pol, **k).x - ref).double().square().flatten(1).mean(1)

        return [round(float(g), 2) for g in 10 * torch.log10(mse(uniform) / mse(fitted))]

    fresh = [args.seed + FRESH_SEED_OFFSET * (k + 1) for k in range(args.fresh)]
    per_class = gains(list(range(b.num_classes)), [20_000 + c for c in range(b.num_classes)])
    row = {"cached_steps": list(fitted.cached_steps), "step_reuse": {str(k): v for k, v in fitted.step_reuse.items()},
           "selected": fitted.provenance.get("selected"), "nfe": fitted.nfe,
           "in_sample_gain_db": next((d["gain_db"] for d in fitted.provenance.get("decisions", []) if d.get("kept")),
                                     None),
           "per_class_db": per_class, "mean_over_classes_db": round(sum(per_class) / len(per_class), 2),
           "own_class_fresh_db": gains([args.label] * args.fresh, fresh),
           "unconditional_fresh_db": gains([b.null_class] * args.fresh, fresh),
           "with_the_check": {"selected": (checked := policy(True)).provenance.get("selected"),
                              "cached_steps": list(checked.cached_steps),
                              "fresh_check": next((d.get("fresh_check") for d in checked.provenance.get("decisions", [])
                                                   if "fresh_check" in d), None)}}
    print(json.dumps(row, indent=1))
    doc = {"meta": {"command": "python scripts/fresh_rows.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "threads" and v is not None),
        "commit": commit(), "date": time.strftime("%Y-%m-%d"), "T": kw["num_inference_steps"]}, "result": row}
    atomic_write_text(Path(args.out), json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
