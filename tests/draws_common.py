"""Calibration from one or two prompts, over several draws (issue "Calibration that is right from one prompt"):
the reduced version of scripts/calibration_draws.py, shared by test_draws_shift1.py and test_draws_shift5.py (one
file a shift, so that the two run on different workers).

On the bundled digits model at shifts 1 and 5, 2x, for calibration sets of 1 and 2 samples drawn at random (four
draws each): the policy is never more than 0.25 dB below evenly spaced caching at its NFE on held-out seeds (one of
each class, seeds 10000..), and where the held-out seeds rate the schedule search's set 3 dB or more above evenly
spaced caching, a searched set is kept.
"""

import random

import pytest
import torch

from ertacache import Policy, calibrate, sample, seeded_noise
from ertacache.bench.metrics import psnr
from ertacache.models.bundled import bundled_model, labels_and_seeds

TOLERANCE_DB, CLEAR_WIN_DB = 0.25, 3.0


@pytest.fixture(scope="module")
def digits():
    b = bundled_model("digits")
    return b, b.load(None)


def _held_out(b, model, shift):
    labels, seeds = labels_and_seeds(1, 10_000, b.num_classes)
    noise = seeded_noise(seeds, b.latent_shape)
    kw = dict(num_inference_steps=b.num_inference_steps, shift=shift, guidance_scale=b.guidance_scale,
              null_cond=torch.full_like(labels, b.null_class))

    def score(policy):
        with torch.no_grad():
            return psnr(sample(model, noise, labels, policy=policy, **kw).x, ref)

    with torch.no_grad():
        ref = sample(model, noise, labels, **kw).x
    return score


@pytest.fixture(scope="module")
def draws(digits):
    """Per shift, one row per draw: ``(n, draw, chosen, uniform, searched, selected)`` (held-out PSNR, dB)."""
    b, model = digits
    cache: dict[float, list[tuple]] = {}

    def rows(shift: float) -> list[tuple]:
        if shift not in cache:
            cache[shift] = _draws(b, model, shift)
        return cache[shift]

    return rows


def _draws(b, model, shift):
    score = _held_out(b, model, shift)
    rows = []
    for n in (1, 2):
        for draw in range(4):
            rng = random.Random(f"digits/{shift:g}/{n}/{draw}")
            labels = torch.tensor([rng.randrange(b.num_classes) for _ in range(n)])
            seeds = [rng.randrange(10_000) for _ in range(n)]
            p = calibrate(model, labels, seeds, target_speedup=2.0, latent_shape=b.latent_shape,
                          num_inference_steps=b.num_inference_steps, shift=shift, guidance_scale=b.guidance_scale,
                          null_cond=torch.full_like(labels, b.null_class))
            uniform = score(Policy.uniform(p.num_inference_steps, p.nfe, like=p))
            first = next(c for c in p.provenance["candidates"] if c["source"] == "search" and c["nfe"] <= p.nfe)
            searched = score(Policy(cached_steps=tuple(first["cached_steps"]), **{
                k: getattr(p, k) for k in ("num_inference_steps", "grid", "reuse", "branches", "shift",
                                           "guidance_scale", "latent_shape", "config")}))
            plain = p.provenance["variant"] == "plain" and not p.step_reuse and p.adjusted_grid is None
            if plain and p.provenance["selected"] == "uniform":
                chosen = uniform  # the same samples: not run again
            elif plain and list(p.cached_steps) == first["cached_steps"] and not first.get("step_reuse"):
                chosen = searched
            else:
                chosen = score(p)
            rows.append((n, draw, chosen, uniform, searched, p.provenance["selected"]))
    return rows


def check_never_below(rows):
    for n, draw, chosen, uniform, _, _ in rows:
        assert chosen >= uniform - TOLERANCE_DB, (n, draw, chosen, uniform, rows)


def check_clear_wins_kept(rows):
    for n, draw, _, uniform, searched, selected in rows:
        if searched >= uniform + CLEAR_WIN_DB:
            assert selected == "search", (n, draw, searched, uniform, rows)


def draw_tests(shift, clear_win_shortfall):
    """The two tests of one shift, for a test module to bind (``test_a, test_b = draw_tests(...)``): never more than
    0.25 dB below evenly spaced caching, and (a strict expected failure, ``clear_win_shortfall`` its reason) a
    searched set kept where the held-out seeds rate it 3 dB or more above it."""

    def test_one_or_two_prompts_never_lose_to_evenly_spaced_caching(draws):
        check_never_below(draws(shift))

    @pytest.mark.xfail(strict=True, reason=clear_win_shortfall)
    def test_one_or_two_prompts_keep_a_clear_win(draws):
        check_clear_wins_kept(draws(shift))

    return test_one_or_two_prompts_never_lose_to_evenly_spaced_caching, test_one_or_two_prompts_keep_a_clear_win

