"""What a base policy costs on LoRA-adapted models, against a policy recalibrated on each adapted model.

The bundled image model as a FluxPipeline (FLUX's dynamic shift, scaled to its token counts; T = 30, true CFG
3) gets a random LoRA adapter (rank 8 on every attention projection and feed-forward layer) whose update is
scaled to a share ``s`` of each adapted weight's Frobenius norm (``--strengths``). On each adapted pipeline,
PSNR (dB) against its own uncached output on held-out seeds: the base model's policy (calibrated without the
adapter, applied with its ``AdapterWarning``), a policy recalibrated on the adapted pipeline, and evenly spaced
caching at the same NFE. Calibration: 10 samples (one per class), target 2x, default config.

    python scripts/lora_cost.py [--strengths 0.02,0.1,0.3] [--out docs/lora.md]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from results import write_results
from travel import Image

from ertacache import Policy, apply_ertacache, calibrate_pipeline
from ertacache.bench.metrics import psnr

T, SIZE = 30, 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
           "proj_out", "ff.net.0.proj", "ff.net.2"]


def add_lora(transformer: torch.nn.Module, strength: float, seed: int) -> None:
    """A random rank-8 adapter whose update ``B A`` is ``strength`` of each adapted weight's norm."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                            adapter_name="lora")
    with torch.no_grad():
        for module in transformer.modules():
            if hasattr(module, "lora_A") and "lora" in module.lora_A:
                a, b = module.lora_A["lora"].weight, module.lora_B["lora"].weight
                delta = (b @ a).norm()
                b.mul_(strength * module.base_layer.weight.norm() / delta.clamp_min(1e-12))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strengths", default="0.02,0.1,0.3")
    p.add_argument("--held-out", type=int, default=20)
    p.add_argument("--out", default="docs/lora.md")
    args = p.parse_args()
    bench = Image()
    cal_labels = torch.arange(10)
    held_labels, held_seeds = torch.arange(args.held_out) % 10, list(range(1000, 1000 + args.held_out))

    def calibrated() -> Policy:
        return calibrate_pipeline(bench.pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(10),
                                  **bench.kwargs(cal_labels, SIZE))

    def score(policy: Policy | None, ref: torch.Tensor | None = None) -> float | torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if policy is None:
                return bench.generate(held_labels, held_seeds, SIZE, T)
            with apply_ertacache(bench.pipe, policy):
                out = bench.generate(held_labels, held_seeds, SIZE, T)
        assert ref is not None
        return round(psnr(out, ref), 2)

    base = calibrated()
    rows = []
    for s in [0.0] + [float(x) for x in args.strengths.split(",")]:
        if s > 0:
            add_lora(bench.pipe.transformer, s, seed=int(1000 * s))
        ref = score(None)
        own = calibrated() if s > 0 else base
        uniform = Policy.uniform(T, base.nfe, like=base)
        rows.append({"strength": s, "base_policy": score(base, ref), "base_nfe": base.nfe,
                     "recalibrated": score(own, ref), "recalibrated_nfe": own.nfe,
                     "uniform_same_nfe": score(uniform, ref),
                     "same_cached_steps": own.cached_steps == base.cached_steps})
        print(json.dumps(rows[-1]), flush=True)
        if s > 0:
            bench.pipe.transformer.delete_adapters("lora")
    lines = ["| LoRA strength (update / weight norm) | base policy: PSNR (NFE) | recalibrated: PSNR (NFE) | "
             "evenly spaced at the base NFE | same cached steps |", "|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["same_cached_steps"] else "no"
        lines.append(f"| {r['strength']:g} | {r['base_policy']} ({r['base_nfe']}) | {r['recalibrated']} "
                     f"({r['recalibrated_nfe']}) | {r['uniform_same_nfe']} | {same} |")
    print(write_results(args.out, lines, rows, f"python scripts/lora_cost.py --strengths {args.strengths}"))


if __name__ == "__main__":
    main()
