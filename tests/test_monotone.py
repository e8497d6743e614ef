"""Never worse with more compute: on held-out seeds, calibrate_many's policy for a larger NFE budget is not below
the one for a smaller budget, nor below evenly spaced computation with the same reuse mode at its own NFE.

A reduced grid of ``scripts/calibration_grid.py`` (whose full table, shifts 1, 3 and 5, is docs/calibration.md): both
bundled models at their step counts on the unshifted grid, where evenly spaced computation is not monotone (the
failure this property was written for); targets 1.5x-4x; a small calibration set. The shifted grids are the full
table's (one more row here costs 30 s of `make test`).
"""

import torch

from ertacache import Policy, calibrate_many, sample, seeded_noise
from ertacache.bench.metrics import psnr
from ertacache.models.bundled import bundled_model
from ertacache.models.digits import NULL_CLASS

TOLERANCE_DB = 0.25
TARGETS = [1.5, 2.0, 3.0, 4.0]


def test_more_compute_is_never_worse_on_held_out_seeds():
    check_more_compute("digits", 4, 10, 1.0)  # the video model's: test_monotone_video.py (another worker)


def check_more_compute(name, n, held_out, shift):
    bundled = bundled_model(name)
    model = bundled.load(None)
    T, cfg = bundled.num_inference_steps, bundled.guidance_scale
    labels = torch.arange(n) % 10
    policies = calibrate_many(model, labels, range(n), target_speedups=TARGETS, latent_shape=bundled.latent_shape,
                              num_inference_steps=T, shift=shift, guidance_scale=cfg,
                              null_cond=torch.full_like(labels, NULL_CLASS))
    test_labels = torch.arange(held_out) % 10
    noise = seeded_noise(range(10_000, 10_000 + held_out), bundled.latent_shape)
    args = dict(num_inference_steps=T, shift=shift, guidance_scale=cfg, null_cond=torch.full_like(test_labels,
                                                                                                 NULL_CLASS))
    with torch.no_grad():
        ref = sample(model, noise, test_labels, **args).x

        def score(policy):
            return psnr(sample(model, noise, test_labels, policy=policy, **args).x, ref)

        scores = [score(p) for p in policies]
        uniform = [score(Policy.uniform(T, p.nfe, like=p)) for p in policies]
    nfes = [p.nfe for p in policies]
    assert nfes == sorted(nfes, reverse=True) and all(p.nfe <= T / s for p, s in zip(policies, TARGETS))
    for k in range(len(TARGETS) - 1):  # targets in decreasing NFE budget
        assert scores[k] >= scores[k + 1] - TOLERANCE_DB, (nfes, scores)
    for s, u in zip(scores, uniform):
        assert s >= u - TOLERANCE_DB, (nfes, scores, uniform)
