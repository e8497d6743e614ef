"""A set fitted to one calibration sample, checked on fresh noise (issue "Calibration that is right from one
prompt": a guard for sets judged only on the sample they were fitted to).

With one sample there is no fold to leave out; the schedule search's set is judged on the trajectory it was fitted
to. On the bundled digits model (T = 10, shift 1, label 1, seed 1) such a set wins by +9.4 dB on its sample and is
6.5-12.2 dB *below* evenly spaced caching on a seed of every class (docs/calibration/fresh_rows_digits.json); the
check on fresh noise (the sample's class and the unconditional prompt) refuses it. Where the check confirms a win
(shift 3, label 0, seed 0), the set is kept and the check is stated.
"""

import pytest
import torch

from ertacache import CalibrationConfig, Policy, sample, seeded_noise
from ertacache.bench.metrics import psnr
from ertacache.calibration import CalibrationSession, core_session
from ertacache.calibration.drive import fresh_seeds
from ertacache.calibration.fresh import FreshCheck
from ertacache.calibration.plan import plan
from ertacache.integrations.diffusers import PipelineDriver
from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, digits_flux_pipeline, load_digits_model

T, GUIDANCE = 10, 3.0
REFUTED = dict(label=1, seed=1, shift=1.0)  # in-sample +9.4 dB, fresh rows -8.2 dB, held-out -10.1 dB
CONFIRMED = dict(label=0, seed=0, shift=3.0)  # in-sample +9.8 dB, fresh rows +5.1 dB


@pytest.fixture(scope="module")
def model():
    return load_digits_model()


@pytest.fixture(scope="module")
def refuted(model):
    """The checked calibration of the refuted case: its session and its 2x policy (made once)."""
    s = session(model, **REFUTED)
    return s, s.policy(target_speedup=2.0)


def session(model, label, seed, shift, config=None, **kw):
    return core_session(model, torch.tensor([label]), [seed], latent_shape=LATENT_SHAPE, num_inference_steps=T,
                        shift=shift, guidance_scale=GUIDANCE, null_cond=torch.full((1,), NULL_CLASS),
                        config=config or CalibrationConfig(), **kw)


def run(model, policy, labels, seeds, shift):
    with torch.no_grad():
        return sample(model, seeded_noise(seeds, LATENT_SHAPE), labels, policy=policy, num_inference_steps=T,
                      shift=shift, guidance_scale=GUIDANCE, null_cond=torch.full_like(labels, NULL_CLASS)).x


def held_out_psnr(model, policy, shift):
    labels, seeds = torch.arange(10), list(range(10_000, 10_010))
    return psnr(run(model, policy, labels, seeds, shift), run(model, None, labels, seeds, shift))


def test_a_set_fitted_to_one_sample_that_fresh_noise_refutes_is_not_kept(model, refuted):
    shift = REFUTED["shift"]
    unchecked = session(model, config=CalibrationConfig(fresh_check=False), **REFUTED).policy(target_speedup=2.0)
    uniform = Policy.uniform(T, unchecked.nfe, like=unchecked)
    assert unchecked.provenance["selected"] == "search"  # judged on its own sample only: kept ...
    assert held_out_psnr(model, unchecked, shift) < held_out_psnr(model, uniform, shift) - 3.0  # ... and wrong

    s, p = refuted
    checked = [d for d in p.provenance["decisions"] if isinstance(d.get("fresh_check"), dict)]
    assert len(checked) == 1 and not checked[0]["kept"] and checked[0]["fresh_check"]["gain_db"] < 0 < \
        checked[0]["gain_db"]
    # the other sets fitted to the same sample are not tried after it (the first to pass by chance would be kept)
    not_tried = [d for d in p.provenance["decisions"] if isinstance(d.get("fresh_check"), str)]
    assert not_tried and all(not d["kept"] and "failed it" in d["fresh_check"] for d in not_tried)
    assert s.cost["fresh evaluation"]["passes"] == 2 and "not tried (fresh check" in p.summary()
    seeds = fresh_seeds([REFUTED["seed"]])
    assert checked[0]["fresh_check"]["seeds"] == seeds + fresh_seeds(seeds)  # its class, then the null class
    assert checked[0]["fresh_check"]["unconditional"]["samples"] == 1
    assert p.provenance["selected"] == "uniform"
    assert held_out_psnr(model, p, shift) >= held_out_psnr(model, uniform, shift) - 0.25
    assert "on fresh noise -" in p.summary()
    assert "checked on fresh noise" in p.provenance["judged_on"]


def test_a_win_fresh_noise_confirms_is_kept_and_its_check_is_what_inference_gives(model):
    s = session(model, **CONFIRMED)
    p = s.policy(target_speedup=2.0)
    assert p.provenance["selected"] == "search"
    fresh = p.provenance["decision"]["evidence"]["fresh_check"]
    seeds = fresh_seeds([CONFIRMED["seed"]])
    assert fresh["samples"] == 2 and fresh["seeds"] == seeds + fresh_seeds(seeds) and fresh["gain_db"] > 0
    # the stated gain rests on every sample: the one fitted to and the fresh ones
    decision = p.provenance["decision"]
    in_sample = next(d for d in p.provenance["decisions"] if d["kept"])["gain_db"]
    assert decision["n"] == 3
    assert decision["gain_db"] == pytest.approx((in_sample + 2 * fresh["gain_db"]) / 3, abs=2e-3)
    assert "2 of them on fresh noise" in p.summary()
    # the check's gain is the one sampling the fresh rows (the class, then the null class) with either policy gives
    labels, seeds, shift = torch.tensor([CONFIRMED["label"], NULL_CLASS]), fresh["seeds"], CONFIRMED["shift"]
    ref = run(model, None, labels, seeds, shift)

    def mse(policy):
        return (run(model, policy, labels, seeds, shift) - ref).double().square().flatten(1).mean(1)

    uniform = Policy.uniform(T, p.nfe, like=p)
    per_row = 10 * torch.log10(mse(uniform) / mse(p))
    assert fresh["gain_db"] == pytest.approx(float(per_row.mean()), abs=1e-3)
    assert fresh["unconditional"]["gain_db"] == pytest.approx(float(per_row[1]), abs=1e-3)
    # its cost: one uncached pass of the set, shared, and one evaluation per policy compared
    assert s.cost["fresh ground truth"]["passes"] == 1 and s.cost["fresh evaluation"]["passes"] == 2
    assert s.cost["fresh ground truth"]["model_calls"] == 2 * s.cost["ground truth"]["model_calls"]
    assert plan(CalibrationConfig(), T, [2.0], rows=2, samples=1).shared == 3.0
    assert plan(CalibrationConfig(), T, [2.0], rows=4, samples=2).shared == 3.0  # folds of one sample
    assert plan(CalibrationConfig(), T, [2.0], rows=6, samples=3).shared == 1.0


def test_with_two_samples_a_set_past_its_k_fold_check_is_also_checked_on_fresh_rows(model):
    """Two samples: each fold's set is judged on one other sample, so a win past the 2-fold check is checked on
    fresh rows too (both recorded); here the fresh rows confirm it."""
    s = core_session(model, torch.tensor([0, 0]), [0, 1], latent_shape=LATENT_SHAPE, num_inference_steps=T,
                     shift=3.0, guidance_scale=GUIDANCE, null_cond=torch.full((2,), NULL_CLASS))
    p = s.policy(target_speedup=2.0)
    kept = [d for d in p.provenance["decisions"] if d["kept"]]
    assert p.provenance["selected"] == "search" and kept
    assert all(d["k_fold"]["folds"] == 2 and d["fresh_check"]["gain_db"] > 0 for d in kept)
    assert kept[0]["fresh_check"]["samples"] == 4  # two fresh-noise rows, two unconditional ones
    assert s.cost["fresh ground truth"]["model_calls"] == 2 * s.cost["ground truth"]["model_calls"]


@pytest.mark.parametrize("case", ["uniform only", "three samples", "off"])
def test_no_fresh_pass_without_a_fitted_set_to_check(model, case):
    if case == "three samples":  # the k-fold check alone judges fitted sets
        s = core_session(model, torch.tensor([1] * 3), [1, 2, 3], latent_shape=LATENT_SHAPE,
                         num_inference_steps=T, guidance_scale=GUIDANCE, null_cond=torch.full((3,), NULL_CLASS))
        assert s.judge.fresh is None
    else:
        config = CalibrationConfig(candidates=("uniform",)) if case == "uniform only" else \
            CalibrationConfig(fresh_check=False)
        s = session(model, config=config, **REFUTED)
    p = s.policy(target_speedup=2.0)
    assert not any(k.startswith("fresh") for k in s.cost)
    assert all("fresh_check" not in d for d in p.provenance["decisions"])


def test_the_fresh_check_resumes_from_the_checkpoint(model, tmp_path):
    first = session(model, checkpoint_dir=tmp_path, **REFUTED).policy(target_speedup=2.0)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = session(model, checkpoint_dir=tmp_path, **REFUTED)
        p = again.policy(target_speedup=2.0)
    finally:
        hook.remove()
    assert calls == [] and p.cached_steps == first.cached_steps
    assert p.provenance["decisions"] == first.provenance["decisions"]
    assert again.cost["fresh ground truth"]["passes"] == 1  # counted again, as every kept pass is


def test_the_pipeline_path_checks_the_same_way(model, refuted):
    """One method: the pipeline driver's fresh noise is the core loop's (the same seeds, the same decision)."""
    pipe = digits_flux_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.register_to_config(shift=REFUTED["shift"])
    label = torch.tensor([REFUTED["label"]])
    tokens, pooled = model.prompt_embeds(label)
    null_tokens, null_pooled = model.prompt_embeds(torch.full((1,), NULL_CLASS))
    kwargs = dict(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                  negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=GUIDANCE, height=16, width=16)
    driver = PipelineDriver(pipe, None, [REFUTED["seed"]], T, CalibrationConfig().reuse, kwargs)
    p = CalibrationSession(driver, CalibrationConfig()).policy(target_speedup=2.0)
    core = refuted[1]
    assert p.cached_steps == core.cached_steps and p.provenance["selected"] == "uniform"
    def checks(policy):
        return [(d["decision"], d["fresh_check"]["gain_db"] if isinstance(d["fresh_check"], dict) else 0.0)
                for d in policy.provenance["decisions"] if "fresh_check" in d]

    pick, want = checks(p), checks(core)
    assert [a for a, _ in pick] == [a for a, _ in want] and pick
    assert [g for _, g in pick] == pytest.approx([g for _, g in want], abs=0.05)
    # a call that passes its own latents has no other noise: the reason is recorded, the in-sample judgement stands
    latents = torch.randn(1, 64, 4, generator=torch.Generator().manual_seed(REFUTED["seed"]))
    driver = PipelineDriver(pipe, None, [REFUTED["seed"]], T, CalibrationConfig().reuse, {**kwargs, "latents": latents})
    assert driver.twin() is None
    s = CalibrationSession(driver, CalibrationConfig())
    assert s.judge.fresh is None and "its own latents" in s.judge.fresh_off


def test_a_fresh_check_compares_like_with_like(refuted):
    """The same policy on both sides gains exactly 0 dB on fresh noise."""
    s, p = refuted
    assert isinstance(s.judge.fresh, FreshCheck)
    u = Policy.uniform(T, 5, like=p)
    from ertacache.calibration.judge import evaluation_key

    got = s.judge.fresh.gain((evaluation_key(u), u), (evaluation_key(u), u))
    assert got["gain_db"] == 0.0 and got["samples"] == 2 and got["unconditional"]["samples"] == 1


def test_a_pipeline_twin_adds_the_unconditional_prompt():
    """The twin's rows: the set's under fresh seeds, then the negative prompt's (or ""; with embeddings, the
    negative_* rows); none where the call has no unconditional prompt to give."""
    from docs_blocks import tiny_flux_text_pipeline

    pipe = tiny_flux_text_pipeline()
    seeds = fresh_seeds([7, 8])
    twin = PipelineDriver(pipe, ["a red fox", "a cat"], [7, 8], T, "extrapolate", {"guidance_scale": 3.5}).twin()
    assert twin.prompts == ["a red fox", "a cat", "", ""] and twin.seeds == seeds + fresh_seeds(seeds)
    assert twin.unconditional_rows == 2 and twin.kwargs == {"guidance_scale": 3.5}
    twin = PipelineDriver(pipe, ["a red fox"], [7], T, "extrapolate", {"negative_prompt": "blurry"}).twin()
    assert twin.prompts == ["a red fox", "blurry"]
    emb, neg = torch.ones(1, 4, 16), torch.zeros(1, 4, 16)
    twin = PipelineDriver(pipe, None, [7], T, "extrapolate", {"prompt_embeds": emb, "negative_prompt_embeds": neg,
                                                              "true_cfg_scale": 2.0}).twin()
    assert torch.equal(twin.kwargs["prompt_embeds"], torch.cat([emb, neg]))
    assert torch.equal(twin.kwargs["negative_prompt_embeds"], torch.cat([neg, neg])) and twin.unconditional_rows == 1
    twin = PipelineDriver(pipe, None, [7], T, "extrapolate", {"prompt_embeds": emb}).twin()  # distilled, embeddings
    assert twin.size == 1 and twin.unconditional_rows == 0 and twin.seeds == fresh_seeds([7])
