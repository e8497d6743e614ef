"""The fresh check on conditions the set was not fitted to (``check_cond=``, ``check_prompts=``; docs/method.md
section 2.8): its rows, its rule, and where it is refused.

A set the schedule search fitted to a few prompts can gain on them under any noise and lose on other prompts; the
check runs such other conditions (each under its own seed) after the set's own rows and the unconditional ones, and
keeps a fitted set only where its mean gain per prompt it was not fitted to is positive.
"""

import pytest
import torch

from ertacache import CalibrationConfig, ErtaCacheError, Policy
from ertacache.calibration import CalibrationSession, core_session
from ertacache.calibration.drive import CoreDriver, fresh_seeds, other_seeds
from ertacache.calibration.fresh import FreshCheck
from ertacache.calibration.plan import plan
from ertacache.integrations.diffusers import PipelineDriver

T = 10


def velocity(x, t, cond):
    return x * 0.0 + 1.0


def core_driver(cond, null, check, seeds=(3, 4)):
    return CoreDriver(velocity, cond, list(seeds), (1, 2, 2), T, 1.0, 3.0, null, "extrapolate", None,
                      check_cond=check)


def test_the_core_twin_adds_the_other_conditions_after_the_unconditional_rows():
    cond, null, check = torch.tensor([1, 2]), torch.tensor([10, 10]), torch.tensor([5, 6, 7])
    twin = core_driver(cond, null, check).twin()
    own = fresh_seeds([3, 4])
    assert twin.seeds == own + fresh_seeds(own) + other_seeds([3, 4], 3)
    assert len(set(twin.seeds)) == 7  # every row its own noise
    assert twin.cond.tolist() == [1, 2, 10, 10, 5, 6, 7] and twin.null_cond.tolist() == [10] * 7
    assert twin.size == 7 and twin.unconditional_rows == 2 and twin.other_rows == 3
    assert core_driver(cond, null, None).twin().other_rows == 0  # without: the rows of before
    # the conditions are part of what a resumed calibration must match
    assert core_driver(cond, null, check).identity() != core_driver(cond, null, check + 1).identity()


@pytest.mark.parametrize("check, cond, words", [
    (torch.zeros(2, 3), torch.tensor([1, 2]), "(M, )"),
    (torch.zeros(0, dtype=torch.long), torch.tensor([1, 2]), "M >= 1"),
    (torch.tensor([1]), None, "cond is None"),
])
def test_check_conditions_unlike_the_set_are_refused_before_any_model_call(check, cond, words):
    with pytest.raises(ErtaCacheError, match="check_cond must be other conditions") as err:
        core_driver(cond, None, check)
    assert words in str(err.value) and "got (" in str(err.value)


class Twin:
    """A twin of 2 own rows, 2 unconditional ones and 2 of other conditions (one process)."""

    size, unconditional_rows, other_rows, seeds = 6, 2, 2, [1, 2, 3, 4, 5, 6]

    def local(self, rows):
        return list(range(self.size))[rows]

    def reduce(self, t):
        return t


def gain(per_row_db):
    """The check's statement for per-row gains (dB) of ``new`` over ``old``."""
    check = FreshCheck(runner=None, twin=Twin())
    check._reference = torch.zeros(1)
    check.scores["old"] = torch.zeros(6, dtype=torch.float64)
    check.scores["new"] = -torch.tensor(per_row_db, dtype=torch.float64) / (10 / torch.log(torch.tensor(10.0)))
    return check.gain(("old", None), ("new", None))


def test_the_rule_counts_each_prompt_the_set_was_not_fitted_to_once():
    # own rows gain, the unconditional prompt loses a little, the other prompts lose: refused although the mean of
    # every row is positive
    got = gain([12.0, 10.0, -1.0, -1.0, -3.0, 1.0])
    assert got["gain_db"] == pytest.approx(3.0) and got["unconditional"]["gain_db"] == pytest.approx(-1.0)
    assert got["other"] == {"gain_db": pytest.approx(-1.0), "samples": 2}
    assert got["other_prompts"] == {"gain_db": pytest.approx(-1.0), "prompts": 3}  # (-1 - 3 + 1) / 3
    assert not FreshCheck.holds(got)
    # the unconditional prompt counts as one prompt however many rows it has: here it decides the sign
    got = gain([12.0, 10.0, -7.0, -7.0, 3.0, 3.0])
    assert got["other_prompts"]["gain_db"] == pytest.approx(-1 / 3, abs=1e-3) and not FreshCheck.holds(got)
    got = gain([1.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    assert FreshCheck.holds(got)
    assert not FreshCheck.holds({"gain_db": -0.1})  # without other rows: the mean over the fresh rows alone
    assert FreshCheck.holds({"gain_db": 0.1, "unconditional": {"gain_db": -5.0, "samples": 1}})


def test_the_plan_counts_the_other_rows_and_the_check_runs_at_any_size():
    assert plan(CalibrationConfig(), T, [2.0], rows=6, samples=3).shared == 1.0  # three samples: no check
    assert plan(CalibrationConfig(), T, [2.0], rows=6, samples=3, other=6).shared == 1.0 + 2 + 2
    assert plan(CalibrationConfig(), T, [2.0], rows=2, samples=1, other=4).shared == 1.0 + 2 + 4
    s = core_session(velocity, torch.tensor([1, 2, 3]), [1, 2, 3], latent_shape=(1, 2, 2), num_inference_steps=T,
                     guidance_scale=3.0, null_cond=torch.full((3,), 10), check_cond=torch.tensor([5, 6]))
    assert isinstance(s.judge.fresh, FreshCheck) and s.judge.fresh.twin.other_rows == 2


def test_a_pipeline_twin_adds_the_check_prompts_last():
    from docs_blocks import tiny_flux_text_pipeline

    pipe = tiny_flux_text_pipeline()
    own = fresh_seeds([7, 8])
    driver = PipelineDriver(pipe, ["a red fox", "a cat"], [7, 8], T, "extrapolate",
                            {"guidance_scale": 3.5, "negative_prompt": ["blurry", "dark"]},
                            check_prompts=["a city street", "a bowl of ramen", "a lighthouse"])
    twin = driver.twin()
    assert twin.prompts == ["a red fox", "a cat", "blurry", "dark", "a city street", "a bowl of ramen",
                            "a lighthouse"]
    assert twin.seeds == own + fresh_seeds(own) + other_seeds([7, 8], 3)
    assert twin.kwargs["negative_prompt"] == ["blurry", "dark", "blurry", "dark", "blurry", "blurry", "blurry"]
    assert twin.unconditional_rows == 2 and twin.other_rows == 3 and driver.check_rows == 3
    assert driver.provenance()["check_prompts"] == ["a city street", "a bowl of ramen", "a lighthouse"]
    assert driver.identity() != PipelineDriver(pipe, ["a red fox", "a cat"], [7, 8], T, "extrapolate",
                                               {"guidance_scale": 3.5}).identity()


@pytest.mark.parametrize("prompts, check, kw, words", [
    (None, ["a cat"], {"prompt_embeds": torch.ones(1, 4, 16)}, "passes prompt_embeds"),
    (["a red fox"], "a cat", {}, "non-empty list of prompt strings"),
    (["a red fox"], [], {}, "non-empty list of prompt strings"),
])
def test_check_prompts_the_call_cannot_take_are_refused_before_any_model_call(prompts, check, kw, words):
    from docs_blocks import tiny_flux_text_pipeline

    pipe = tiny_flux_text_pipeline()
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ErtaCacheError, match=words):
            PipelineDriver(pipe, prompts, [7], T, "extrapolate", kw, check_prompts=check)
    finally:
        hook.remove()
    assert calls == []


def test_a_session_without_check_conditions_is_the_one_of_before():
    """No other rows: the twin, the plan and the rule are those of the check on the set's own conditions."""
    s = core_session(velocity, torch.tensor([1]), [1], latent_shape=(1, 2, 2), num_inference_steps=T,
                     guidance_scale=3.0, null_cond=torch.full((1,), 10))
    assert s.judge.fresh.twin.other_rows == 0 and s.judge.fresh.twin.size == 2
    assert isinstance(s, CalibrationSession) and Policy.uniform(T, 5, like=s.policy(target_speedup=2.0)).nfe == 5


def test_the_one_line_mode_calibrates_with_its_check_prompts_and_keys_by_them(tmp_path, monkeypatch):
    from ertacache import apply_ertacache
    from ertacache.integrations.diffusers import calibrate
    from ertacache.integrations.diffusers.auto import setting_key
    from ertacache.integrations.diffusers.families import family_for
    from test_one_line import call
    from test_workflows import Flux

    p = Flux()
    seen = []

    def calibrating(*a, **k):
        seen.append(k.get("check_prompts"))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(calibrate, "calibrate_pipeline", calibrating)
        with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, check_prompts=("a cat", "a dog")):
            with pytest.raises(KeyboardInterrupt):
                call(p)
    assert seen == [["a cat", "a dog"]]
    family = family_for(p.pipe)
    kwargs = {"num_inference_steps": T}
    assert setting_key(p.pipe, family, kwargs, 2.0)[0] != setting_key(p.pipe, family, kwargs, 2.0, ["a cat"])[0]
    assert setting_key(p.pipe, family, kwargs, 2.0)[0] == setting_key(p.pipe, family, kwargs, 2.0, None)[0]
    # this pipeline's calls pass embeddings: the check prompts are refused at the first call, before a model call
    calls = []
    hook = p.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, check_prompts=["a cat"]):
            with pytest.raises(ErtaCacheError, match="passes prompt_embeds"):
                call(p)
    finally:
        hook.remove()
    assert calls == [] and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ErtaCacheError, match="non-empty list of prompt strings"):
        apply_ertacache(p.pipe, target_speedup=2.0, cache_dir=tmp_path, check_prompts="a cat")
    with pytest.raises(ErtaCacheError, match="not both"):
        apply_ertacache(p.pipe, Policy.uniform(T, 5), check_prompts=["a cat"])


def test_on_the_digits_model_the_check_runs_the_other_classes_and_states_them():
    """One sample of class 0 (T = 10, shift 3, CFG 3): the searched set wins on its sample (+9.8 dB); the check runs
    the class under fresh noise, the unconditional prompt, and classes 3, 5 and 7 under their own seeds, and its
    statement is what sampling those rows with either policy gives. Here the other prompts confirm the win (their
    mean per prompt is positive) and the set is kept: on a seed of every class it is +2.9 dB over evenly spaced
    caching."""
    from ertacache import sample, seeded_noise
    from ertacache.models.digits import LATENT_SHAPE, NULL_CLASS, load_digits_model

    model = load_digits_model()
    others = torch.tensor([3, 5, 7])
    kw = dict(num_inference_steps=T, shift=3.0, guidance_scale=3.0)
    s = core_session(model, torch.tensor([0]), [0], latent_shape=LATENT_SHAPE, null_cond=torch.full((1,), NULL_CLASS),
                     check_cond=others, **kw)
    p = s.policy(target_speedup=2.0)
    checked = [d for d in p.provenance["decisions"] if "fresh_check" in d]
    assert checked, "a fitted set won on its sample and was checked"
    got = checked[0]["fresh_check"]
    assert got["samples"] == 5 and got["other"]["samples"] == 3 and got["other_prompts"]["prompts"] == 4
    assert got["seeds"] == fresh_seeds([0]) + fresh_seeds(fresh_seeds([0])) + other_seeds([0], 3)
    assert checked[0]["kept"] and FreshCheck.holds(got) and p.provenance["selected"] == "search"
    assert p.provenance["check_conditions"] == 3 and "check_conditions: 3" in p.summary()  # the evidence used
    # the statement is the rows' own: class 0, the null class, then the other classes, each policy sampled on them
    labels = torch.cat([torch.tensor([0, NULL_CLASS]), others])
    noise = seeded_noise(got["seeds"], LATENT_SHAPE)
    old, new = Policy.uniform(T, p.nfe, like=p), p

    def run(policy):
        with torch.no_grad():
            return sample(model, noise, labels, policy=policy, null_cond=torch.full_like(labels, NULL_CLASS),
                          **kw).x

    ref = run(None)
    per_row = 10 * torch.log10((run(old) - ref).double().square().flatten(1).mean(1)
                               / (run(new) - ref).double().square().flatten(1).mean(1))
    assert got["other"]["gain_db"] == pytest.approx(float(per_row[2:].mean()), abs=2e-3)
    assert got["other_prompts"]["gain_db"] == pytest.approx(float((per_row[1] + per_row[2:].sum()) / 4), abs=2e-3)
    assert s.cost["fresh ground truth"]["model_calls"] == 5 * s.cost["ground truth"]["model_calls"]


def test_the_pipeline_estimate_prices_the_check_prompts():
    from docs_blocks import tiny_flux_text_pipeline
    from ertacache import estimate_pipeline

    pipe = tiny_flux_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=T, target_speedups=[2.0], height=256, width=256, guidance_scale=3.5)
    alone = estimate_pipeline(pipe, ["a red fox"], **kw)
    checked = estimate_pipeline(pipe, ["a red fox"], check_prompts=["a cat", "a city street"], **kw)
    assert alone.shared == 3.0 and checked.shared == 5.0  # the fresh rows: 1 + 1 unconditional, then 2 more
    assert checked.model_calls > alone.model_calls
