"""Every candidate set a default calibration judged, on a larger set of fresh held-out seeds, paired against uniform.

    python scripts/candidates_heldout.py --model moving-digits --shift 5 --target 2 --calibration 10 --heldout 40

Calibrates on the first ``--calibration`` samples (classes 0..9 repeated, seeds 0..), then
samples each candidate set (plain: no rectification) on ``--heldout`` fresh seeds
(20000..) and prints its calibration error, its held-out mean PSNR, and its paired
difference from the evenly spaced set with the standard error: whether the choice the
calibration samples made holds on data they never saw.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from heldout import Reference

from ertacache import Policy
from ertacache.calibration import core_session


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="moving-digits")
    p.add_argument("--shift", type=float, default=None, help="default: the model's sampler")
    p.add_argument("--target", type=float, default=2.0)
    p.add_argument("--calibration", type=int, default=10)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    held_labels = torch.arange(args.heldout) % 10
    held = Reference(args.model, shift=args.shift, labels=held_labels,
                     seeds=range(20_000, 20_000 + args.heldout), threads=1)
    labels = torch.arange(args.calibration) % 10
    session = core_session(held.model, labels, range(args.calibration), latent_shape=held.bundled.latent_shape,
                           **held.sampler(labels))
    policy = session.policy(args.target)
    print(f"chosen: {policy.provenance['selected']}, {policy.provenance['variant']}; "
          f"decisions: {policy.provenance['decisions']}")
    scores = {}
    for c in policy.provenance["candidates"]:
        pol = Policy(cached_steps=tuple(c["cached_steps"]),
                     step_reuse={int(k): v for k, v in c.get("step_reuse", {}).items()}, **session.base)
        x = held.sample(pol)
        name = f"{c['source']} NFE {c['nfe']}" + (f" ({c['rule']})" if c.get("rule") else "")
        scores[name] = -10 * torch.log10((x - held.ref).double().square().flatten(1).mean(1) / 4.0)  # range [-1, 1]
        print(f"{name}: calibration error {c['errors']['plain']:.3e}, held-out PSNR "
              f"{float(scores[name].mean()):.2f} dB")
    base = next(v for k, v in scores.items() if k.startswith("uniform") and "(" not in k)
    rows = []
    for (name, v), c in zip(scores.items(), policy.provenance["candidates"]):
        d = v - base
        gain, se = float(d.mean()), float(d.std() / math.sqrt(len(d)))
        print(f"{name}: {gain:+.2f} +- {se:.2f} dB against uniform ({len(d)} held-out seeds)")
        rows.append({"candidate": name, "cached_steps": c["cached_steps"], "calibration_error": c["errors"]["plain"],
                     "heldout_psnr": round(float(v.mean()), 2), "heldout_gain_db": round(gain, 2),
                     "heldout_se_db": round(se, 2)})
    if args.out:
        from ertacache.io import atomic_write_text

        meta = {"command": "python scripts/candidates_heldout.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None), "T": held.T, "shift": held.shift,
            "date": time.strftime("%Y-%m-%d"), "chosen": [policy.provenance["selected"], policy.provenance["variant"]],
            "decisions": policy.provenance["decisions"]}
        atomic_write_text(args.out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
