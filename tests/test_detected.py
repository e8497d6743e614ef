"""The long tail: a pipeline no family names is cached after detecting its transformer, its time and its branches
from the calls of each step; where detection cannot decide, calibration stops with one line, before any cached
output."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from conftest import assert_policy_follows
from ertacache import calibrate_pipeline
from ertacache.core.config import CalibrationConfig
from ertacache.errors import ErtaCacheError
from ertacache.integrations.diffusers.families import DetectedFamilyWarning, family_for
from test_workflows import Flux

T = 10


def unregistered(flux_pipe):
    """FluxPipeline's methods under a class that is no subclass of a registered one."""
    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None):
        DiffusionPipeline.__init__(self)
        self.register_modules(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                              image_encoder=image_encoder, feature_extractor=feature_extractor)

    cls = type("MyFluxLikePipeline", (DiffusionPipeline,),
               {**{k: v for k, v in vars(FluxPipeline).items() if not k.startswith("__") or k == "__call__"},
                "__init__": __init__})
    pipe = cls(**flux_pipe.components)
    for name, value in vars(flux_pipe).items():  # what FluxPipeline.__init__ sets beside its modules
        if name not in flux_pipe.components and not name.startswith("_"):
            setattr(pipe, name, value)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_an_unregistered_pipeline_is_detected_calibrated_and_followed():
    p = Flux()
    pipe = unregistered(p.pipe)
    assert not isinstance(pipe, FluxPipeline)
    with pytest.warns(DetectedFamilyWarning, match="MyFluxLikePipeline is not a registered family"):
        family = family_for(pipe)
    assert family.name == "detected:MyFluxLikePipeline"
    kw = p.kwargs((3, 5))

    def run():
        return pipe(num_inference_steps=T, output_type="latent", **kw).images

    ref = run()
    labels = torch.arange(4)
    cal = p.kwargs(tuple(range(4)))
    cal.pop("latents")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectedFamilyWarning)
        policy = calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(len(labels)),
                                    config=CalibrationConfig(candidates=("search", "uniform")), **cal)
        assert policy.branches == ("cond", "uncond")  # FLUX's own cache_context names, read from the calls
        assert_policy_follows(pipe, run, policy, ref)
    # the same policy as the registered FluxPipeline's: detection reads what the registration says
    registered = calibrate_pipeline(p.pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(4),
                                    config=CalibrationConfig(candidates=("search", "uniform")), **cal)
    assert registered.cached_steps == policy.cached_steps
    assert all(abs(a - b) < 1e-6 for a, b in zip(registered.grid, policy.grid))


def test_calls_that_change_from_step_to_step_stop_calibration_in_one_line():
    p = Flux()
    pipe = unregistered(p.pipe)
    forward = pipe.transformer.forward
    state = {"steps": 0, "inner": False}

    def every_other_step_twice(*args, **kwargs):  # a second call at odd steps only
        out = forward(*args, **kwargs)
        if not state["inner"]:
            state["steps"] += 1
            if state["steps"] % 2 == 0:
                state["inner"] = True
                pipe.transformer(*args, **kwargs)
                state["inner"] = False
        return out

    cal = p.kwargs((0, 1))
    cal.pop("latents")
    cal["true_cfg_scale"] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectedFamilyWarning)
        pipe.transformer.forward = every_other_step_twice
        with pytest.raises(ErtaCacheError, match=r"calls change from step to step \(\[1, 2\] calls a step"):
            calibrate_pipeline(pipe, None, num_inference_steps=T, target_speedup=2.0, seeds=range(2), **cal)
