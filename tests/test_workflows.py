"""The workflows users run every day, on the bundled FLUX (digits) and Wan (moving digits) pipelines: offloading
in every form and order, LoRA adapters, other precisions, guidance that changes nothing. Each test is a cell of
the workflow matrix in docs/diffusers.md."""

import tempfile
import warnings

import pytest
import torch

from conftest import assert_policy_follows
from ertacache import Policy, PolicyMismatchError, apply_ertacache, model_fingerprint
from ertacache.core.config import CalibrationConfig
from ertacache.errors import ErtaCacheError
from ertacache.integrations.diffusers.calibrate import calibrate_pipeline
from ertacache.integrations.diffusers.identity import AdapterWarning

CALLS = 3


class Flux:
    """The digits model as a FluxPipeline with true CFG (two branches), T = 10."""

    T, NFE = 10, 5

    def __init__(self):
        from ertacache.models import digits

        self.m = digits
        self.model = digits.load_digits_model()
        self.pipe = digits.digits_flux_pipeline(self.model)
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def transformer(self):
        return self.pipe.transformer

    def kwargs(self, labels=(3, 5)):
        labels = torch.tensor(labels)
        tokens, pooled = self.model.prompt_embeds(labels)
        null_tokens, null_pooled = self.model.prompt_embeds(torch.full_like(labels, self.m.NULL_CLASS))
        noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
        dtype = self.transformer.dtype  # the inputs in the transformer's precision, as a text encoder gives them
        return dict(prompt_embeds=tokens.to(dtype), pooled_prompt_embeds=pooled.to(dtype),
                    negative_prompt_embeds=null_tokens.to(dtype), negative_pooled_prompt_embeds=null_pooled.to(dtype),
                    true_cfg_scale=3.0, latents=self.m.pack(noise).to(dtype), height=16, width=16)

    def __call__(self, **over):
        kw = {**self.kwargs(), **over}
        return self.pipe(num_inference_steps=self.T, output_type="latent", **kw).images

    def policy(self, **kw):
        return Policy.uniform(self.T, self.NFE, branches=("cond", "uncond"),
                              model_fingerprint=model_fingerprint(self.transformer), **kw)


class Wan:
    """The moving-digits model as a WanPipeline with CFG (two branches), T = 8."""

    T, NFE = 8, 4

    def __init__(self):
        from ertacache.models import moving_digits

        self.m = moving_digits
        self.model = moving_digits.load_moving_digits_model()
        self.pipe = moving_digits.moving_digits_wan_pipeline(self.model)
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def transformer(self):
        return self.pipe.transformer

    def __call__(self, **over):
        labels = torch.tensor([3])
        kw = dict(prompt_embeds=self.model.prompt_embeds(labels), guidance_scale=3.0,
                  negative_prompt_embeds=self.model.prompt_embeds(torch.full_like(labels, self.m.NULL_CLASS)),
                  generator=torch.Generator().manual_seed(0), **self.m.PIPELINE_SIZE)
        return self.pipe(num_inference_steps=self.T, output_type="latent", **{**kw, **over}).frames

    def policy(self, **kw):
        return Policy.uniform(self.T, self.NFE, branches=("cond", "uncond"),
                              model_fingerprint=model_fingerprint(self.transformer), **kw)


PIPELINES = {"flux": Flux, "wan": Wan}


def offload(p, how):
    cpu = torch.device("cpu")
    if how == "model":
        p.pipe.enable_model_cpu_offload(device="cpu")
    elif how == "group-block":
        p.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    elif how == "group-leaf":
        p.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="leaf_level")
    elif how == "group-disk":
        p.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level",
                                           num_blocks_per_group=1, offload_to_disk_path=tempfile.mkdtemp())


@pytest.fixture(scope="module")
def references():
    """Per pipeline: the uncached output and the cached one without offloading."""
    out = {}
    for name, cls in PIPELINES.items():
        p = cls()
        with apply_ertacache(p.pipe, p.policy()):
            cached = p()
        out[name] = (p(), cached)
    return out


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("how", ["model", "group-block", "group-leaf", "group-disk"])
@pytest.mark.parametrize("order", ["offload-then-apply", "apply-then-offload"])
def test_offloading_keeps_the_cache_call_after_call(references, name, how, order):
    p = PIPELINES[name]()
    uncached, cached = references[name]
    policy = p.policy()
    if order == "offload-then-apply":
        offload(p, how)
    handle = apply_ertacache(p.pipe, policy)  # the fingerprint reads offloaded weights where they live
    if order == "apply-then-offload":
        offload(p, how)
    outs = []
    for _ in range(CALLS):  # model offload re-installs accelerate's hook at the end of every call
        outs.append(p())
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    handle.remove()
    # what offloading itself changes: nothing, but Wan's weights read back from disk move the output by 1e-5
    drift = float((p() - uncached).abs().max())
    assert drift <= (2e-5 if how == "group-disk" else 0.0)
    for out in outs:  # the cache lost would move it by 0.2 (FLUX) or 0.03 (Wan)
        assert float((out - cached).abs().max()) <= 4 * drift


def test_sequential_offload_works_where_diffusers_runs_it(references):
    """Where diffusers' sequential offload runs uncached, the cache follows it exactly; where it cannot (on this
    CPU build accelerate fails to move a weight back to the meta device), the cache adds no failure of its own:
    apply succeeds (the fingerprint reads the meta weights from accelerate's map) and the call fails as the
    uncached one does."""
    uncached, cached = references["flux"]
    p = Flux()
    policy = p.policy()
    p.pipe.enable_sequential_cpu_offload(device="cpu")
    try:
        plain = p()
    except Exception as e:  # noqa: BLE001 - whatever diffusers raises here, the cached call must raise alike
        with apply_ertacache(p.pipe, policy), pytest.raises(type(e)):
            p()
        return
    assert torch.equal(plain, uncached)
    with apply_ertacache(p.pipe, policy) as handle:
        for _ in range(CALLS):
            assert torch.equal(p(), cached)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


def test_calibration_under_model_offload_gives_the_same_policy():
    def calibrated(how):
        p = Flux()
        offload(p, how)
        labels = torch.arange(4)
        tokens, pooled = p.model.prompt_embeds(labels)
        null_tokens, null_pooled = p.model.prompt_embeds(torch.full_like(labels, p.m.NULL_CLASS))
        return calibrate_pipeline(p.pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(4),
                                  config=CalibrationConfig(candidates=("search",), component_check=False),
                                  prompt_embeds=tokens, pooled_prompt_embeds=pooled,
                                  negative_prompt_embeds=null_tokens, negative_pooled_prompt_embeds=null_pooled,
                                  true_cfg_scale=3.0, height=16, width=16)

    plain, offloaded = calibrated(None), calibrated("model")
    assert offloaded.cached_steps == plain.cached_steps and offloaded.grid == plain.grid
    assert offloaded.rect_form == plain.rect_form and offloaded.adjusted_grid == plain.adjusted_grid
    for a, b in zip(offloaded.rect_a.values(), plain.rect_a.values()):
        assert torch.equal(a, b)
    assert offloaded.model_fingerprint == plain.model_fingerprint


# ----- LoRA adapters -----------------------------------------------------------------------------------------
def lora(p, name="style", identity=False, targets=("to_q", "to_k", "to_v")):
    from peft import LoraConfig

    p.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets),
                                         init_lora_weights=identity), adapter_name=name)


@pytest.mark.parametrize("name", PIPELINES)
def test_an_adapter_keeps_the_base_policy_with_one_warning(references, name):
    uncached, cached = references[name]
    p = PIPELINES[name]()
    policy = p.policy()
    lora(p, identity=True)  # an adapter that adds zero: the output is the base model's
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with apply_ertacache(p.pipe, policy) as handle:
            for _ in range(CALLS):
                assert torch.equal(p(), cached)
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    adapter_warnings = [w for w in seen if issubclass(w.category, AdapterWarning)]
    assert len(adapter_warnings) == 1 and "'style'" in str(adapter_warnings[0].message)
    assert "Recalibrate on the adapted pipeline" in str(adapter_warnings[0].message)
    p.transformer.disable_adapters()
    with pytest.warns(AdapterWarning), apply_ertacache(p.pipe, policy):
        assert torch.equal(p(), cached)
    p.transformer.delete_adapters("style")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)
        with apply_ertacache(p.pipe, policy):
            assert torch.equal(p(), cached)


def test_an_adapter_added_after_apply_is_seen_at_the_next_call():
    p = Flux()
    with apply_ertacache(p.pipe, p.policy()):
        p()
        lora(p, "late")
        with pytest.warns(AdapterWarning, match="'late'"):
            p()


def test_fused_lora_weights_are_another_checkpoint(tmp_path):
    """diffusers' own LoRA route: save, load_lora_weights, fuse_lora."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    source = Flux()
    lora(source, "fused")
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(
        source.transformer, adapter_name="fused"))
    p = Flux()
    policy = p.policy()
    p.pipe.load_lora_weights(tmp_path, adapter_name="fused")
    with pytest.warns(AdapterWarning), apply_ertacache(p.pipe, policy):  # loaded, not fused: the base policy applies
        pass
    p.pipe.fuse_lora()
    with pytest.raises(PolicyMismatchError, match=r"LoRA adapter\(s\) \['fused'\] are fused .*check_fingerprint=False "
                                                  r"\(CLI: --no-check-fingerprint\)"):
        apply_ertacache(p.pipe, policy)
    with apply_ertacache(p.pipe, policy, check_fingerprint=False) as handle:  # the user's call
        p()
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


def test_another_checkpoint_is_refused_with_the_way_out():
    p = Flux()
    policy = p.policy()
    with torch.no_grad():
        for w in p.transformer.parameters():
            w.mul_(1.02)
    with pytest.raises(PolicyMismatchError, match=r"another checkpoint.*check_fingerprint=False"):
        apply_ertacache(p.pipe, policy)


# ----- precision ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_policy_fits_half_precision_copies(dtype):
    p = Flux()
    policy = p.policy()
    p.transformer.to(dtype)
    with apply_ertacache(p.pipe, policy) as handle:
        if dtype == torch.bfloat16:  # float16 matmuls are not all on this CPU build
            p()
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


# ----- guidance ----------------------------------------------------------------------------------------------
def test_guidance_that_changes_nothing_is_neither_recorded_nor_checked():
    """The digits transformer has no guidance embedding: FLUX's guidance_scale changes nothing; true CFG does."""
    p = Flux()
    assert not p.transformer.config.guidance_embeds
    labels = torch.arange(4)
    tokens, pooled = p.model.prompt_embeds(labels)
    null_tokens, null_pooled = p.model.prompt_embeds(torch.full_like(labels, p.m.NULL_CLASS))
    policy = calibrate_pipeline(p.pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(4),
                                config=CalibrationConfig(candidates=("uniform",), component_check=False),
                                prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)
    assert policy.guidance == {"true_cfg_scale": 3.0}
    old = p.policy(guidance={"guidance_scale": 3.5, "true_cfg_scale": 3.0})  # as policies recorded it before
    for pol in (policy, old):
        with apply_ertacache(p.pipe, pol):
            assert torch.equal(p(guidance_scale=1.0), p(guidance_scale=3.5))  # FLUX.1-schnell's setting runs
            with pytest.raises(PolicyMismatchError, match="true_cfg_scale: policy 3.0, got 2.0"):
                p(true_cfg_scale=2.0)


def test_guidance_without_a_negative_branch_is_not_checked():
    p = Wan()
    policy = Policy.uniform(p.T, p.NFE, branches=("cond",), guidance={"guidance_scale": 1.0},
                            model_fingerprint=model_fingerprint(p.transformer))
    with apply_ertacache(p.pipe, policy):
        p(guidance_scale=1.0, negative_prompt_embeds=None)
    with pytest.raises(ErtaCacheError):  # a CFG call has a branch the policy was not calibrated for
        with apply_ertacache(p.pipe, policy):
            p()


# ----- image-to-image ----------------------------------------------------------------------------------------
class FluxImg2Img(Flux):
    """FluxImg2ImgPipeline over the digits model: it sets no cache_context, and strength < 1 starts part-way down."""

    def __init__(self):
        from diffusers import FluxImg2ImgPipeline

        super().__init__()
        self.pipe = FluxImg2ImgPipeline.from_pipe(self.pipe)
        self.pipe.set_progress_bar_config(disable=True)
        self.image = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))

    def call_kwargs(self, labels, cfg):
        kw = self.kwargs(labels)
        for k in ("latents", "height", "width") + (() if cfg else ("negative_prompt_embeds",
                                                                    "negative_pooled_prompt_embeds")):
            kw.pop(k)
        if not cfg:
            kw["true_cfg_scale"] = 1.0
        return dict(image=self.image[:len(labels)], height=16, width=16, **kw)

    def __call__(self, strength, cfg=True, **over):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return self.pipe(num_inference_steps=self.T, strength=strength, output_type="latent", generator=gens,
                         **{**self.call_kwargs((3, 5), cfg), **over}).images


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("cfg", [True, False], ids=["true-cfg", "distilled"])
def test_image_to_image_calibrates_and_follows_the_steps_that_run(strength, cfg):
    from ertacache.bench.metrics import psnr

    p = FluxImg2Img()
    runs = p.T - int(p.T - p.T * strength)  # diffusers' img2img: the first T - T * strength steps are skipped
    ref = p(strength, cfg)
    policy = calibrate_pipeline(p.pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(4),
                                strength=strength, config=CalibrationConfig(candidates=("search", "uniform")),
                                **p.call_kwargs((0, 1, 2, 3), cfg))
    branches = ("cond", "uncond") if cfg else ("cond",)
    assert policy.num_inference_steps == runs and policy.branches == branches  # each CFG branch its own cache
    assert policy.provenance["strength"] == strength and policy.provenance["pipeline_steps"] == p.T
    assert policy.nfe <= runs // 2
    every = Policy(runs, (), policy.grid, branches=branches, model_fingerprint=policy.model_fingerprint)
    with apply_ertacache(p.pipe, every):
        assert torch.equal(p(strength, cfg), ref)
    with apply_ertacache(p.pipe, policy) as handle:
        out = p(strength, cfg)
        assert handle.forwards() == dict.fromkeys(branches, policy.nfe)
        assert psnr(p.m.unpack(out), p.m.unpack(ref)) > 25.0
        with pytest.raises(PolicyMismatchError, match="strength skips the first"):
            p(0.8 if strength < 1 else 0.6, cfg)
    with apply_ertacache(p.pipe, Policy.uniform(runs, policy.nfe, like=policy)):
        uniform = p(strength, cfg)
    assert psnr(p.m.unpack(out), p.m.unpack(ref)) >= psnr(p.m.unpack(uniform), p.m.unpack(ref)) - 0.25


@pytest.mark.parametrize("cfg", [True, False], ids=["true-cfg", "distilled"])
def test_flux_kontext_caches_with_its_reference_image_tokens(cfg, tmp_path):
    """FluxKontextPipeline: the reference image's tokens join the latents' in every transformer call (128 tokens for
    64 latents here), its calls set no cache_context (branches by call order); saved and loaded from a folder."""
    from diffusers import FluxKontextPipeline

    p = FluxImg2Img()
    FluxKontextPipeline.from_pipe(p.pipe).save_pretrained(tmp_path)
    pipe = FluxKontextPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                               tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)

    def kw(labels):
        out = {**p.call_kwargs(labels, cfg), "height": 16, "width": 16, "_auto_resize": False, "max_area": 256}
        return {**out, "image": p.image[: len(labels)]}

    def run():
        return pipe(num_inference_steps=p.T, output_type="latent", generator=torch.Generator().manual_seed(5),
                    **kw((3, 5))).images

    ref = run()
    policy = calibrate_pipeline(pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(4),
                                **kw((0, 1, 2, 3)))
    assert policy.branches == (("cond", "uncond") if cfg else ("cond",)) and policy.latent_shape == (128, 4)
    assert_policy_follows(pipe, run, policy, ref)
    assert torch.equal(run(), ref)  # removed: the uncached output


# ----- schedulers --------------------------------------------------------------------------------------------
def scheduler(name):
    import diffusers

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return {"euler": lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0),
            "euler-dynamic": lambda: diffusers.FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=64,
                max_image_seq_len=256),
            "unipc": lambda: diffusers.UniPCMultistepScheduler(**flow),
            "dpm++": lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **flow),
            }[name]()


def wan_policy(p, **config):
    labels = torch.arange(2)
    return calibrate_pipeline(p.pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(2),
                              config=CalibrationConfig(candidates=("search", "uniform"), **config),
                              prompt_embeds=p.model.prompt_embeds(labels), guidance_scale=3.0,
                              negative_prompt_embeds=p.model.prompt_embeds(torch.full_like(labels, p.m.NULL_CLASS)),
                              **p.m.PIPELINE_SIZE)


@pytest.mark.parametrize("name", ["euler", "unipc", "dpm++"])
def test_schedulers_calibrate_and_follow(name):
    p = Wan()
    p.pipe.scheduler = scheduler(name)
    ref = p()
    policy = wan_policy(p, timestep_adjustment=name == "euler")  # an adjusted grid needs a flow-matching scheduler
    assert policy.provenance["scheduler"]["class"] == type(p.pipe.scheduler).__name__
    every = Policy(p.T, (), policy.grid, branches=policy.branches, model_fingerprint=policy.model_fingerprint)
    from ertacache.integrations.diffusers.apply import SchedulerWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SchedulerWarning)  # the scheduler's grid is the policy's
        with apply_ertacache(p.pipe, every):
            assert torch.equal(p(), ref)
        with apply_ertacache(p.pipe, policy) as handle:
            p()
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


def test_dynamic_shifting_calibrates_and_follows():
    p = Flux()
    p.pipe.scheduler = scheduler("euler-dynamic")
    ref = p()
    labels = torch.arange(4)
    tokens, pooled = p.model.prompt_embeds(labels)
    null_tokens, null_pooled = p.model.prompt_embeds(torch.full_like(labels, p.m.NULL_CLASS))
    policy = calibrate_pipeline(p.pipe, None, num_inference_steps=p.T, target_speedup=2.0, seeds=range(4),
                                config=CalibrationConfig(candidates=("search",), component_check=False),
                                prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=null_tokens,
                                negative_pooled_prompt_embeds=null_pooled, true_cfg_scale=3.0, height=16, width=16)
    assert policy.provenance["scheduler"]["use_dynamic_shifting"] is True
    every = Policy(p.T, (), policy.grid, branches=policy.branches, model_fingerprint=policy.model_fingerprint)
    from ertacache.integrations.diffusers.apply import SchedulerWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SchedulerWarning)
        with apply_ertacache(p.pipe, every):
            assert torch.equal(p(), ref)
        with apply_ertacache(p.pipe, policy) as handle:
            p()
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}


def test_heun_calibrates_and_caches_its_calls():
    """FlowMatchHeunDiscreteScheduler calls the transformer 2T - 1 times for T steps: each call is a step of the
    policy, a 2x policy halves them, the all-compute policy is exact, and timestep adjustment is refused."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    from ertacache.bench.metrics import psnr

    p = Wan()
    p.pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=5.0)
    ref = p()
    policy = wan_policy(p)  # timestep adjustment asked for: off, with the reason recorded
    calls = 2 * p.T - 1
    assert policy.num_inference_steps == calls and policy.provenance["pipeline_steps"] == p.T
    assert policy.adjusted_grid is None and calls / policy.nfe >= 2.0
    every = Policy(calls, (), policy.grid, branches=policy.branches, model_fingerprint=policy.model_fingerprint)
    with apply_ertacache(p.pipe, every):
        assert torch.equal(p(), ref)
    with apply_ertacache(p.pipe, policy) as handle:
        out = p()
        assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    with apply_ertacache(p.pipe, Policy.uniform(calls, policy.nfe, like=policy)):
        uniform = p()
    assert psnr(out, ref) >= psnr(uniform, ref) - 0.25
    p.T -= 1  # another step count: 2T - 3 calls
    with pytest.raises(PolicyMismatchError, match="transformer calls per branch"):
        with apply_ertacache(p.pipe, policy):
            p()
    p.T += 1
    adjusted = Policy.uniform(calls, policy.nfe, like=policy, adjusted_grid=tuple(policy.grid))
    with pytest.raises(ErtaCacheError, match="order 2"):
        apply_ertacache(p.pipe, adjusted)
    assert torch.equal(p(), ref)  # removed: the uncached output


def test_an_unsupported_second_order_scheduler_is_refused_before_the_first_model_call():
    from diffusers import KDPM2DiscreteScheduler

    p = Wan()
    policy = p.policy()
    p.pipe.scheduler = KDPM2DiscreteScheduler()
    calls = []
    p.transformer.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))  # the model runs
    with pytest.raises(ErtaCacheError, match="KDPM2DiscreteScheduler calls the transformer 2 times per step"):
        apply_ertacache(p.pipe, policy)
    with pytest.raises(ErtaCacheError, match="KDPM2DiscreteScheduler calls the transformer 2 times"):
        wan_policy(p)
    assert not calls
    p.pipe.scheduler = scheduler("euler")
    with apply_ertacache(p.pipe, policy):  # swapped in after apply: refused at the call
        p.pipe.scheduler = KDPM2DiscreteScheduler()
        with pytest.raises(ErtaCacheError, match="2 times per step"):
            p()
    assert not calls


def test_another_scheduler_or_shift_after_calibration_warns_once_or_is_refused():
    from ertacache.integrations.diffusers.apply import SchedulerWarning

    p = Wan()
    policy = wan_policy(p, timestep_adjustment=False)
    p.pipe.scheduler = scheduler("euler")
    p.pipe.scheduler.register_to_config(shift=3.0)
    p.pipe.scheduler = type(p.pipe.scheduler).from_config(p.pipe.scheduler.config)
    with pytest.warns(SchedulerWarning, match="another scheduler, shift or dynamic shifting") as seen:
        with apply_ertacache(p.pipe, policy) as handle:
            p()
            p()
            assert handle.forwards() == {"cond": policy.nfe, "uncond": policy.nfe}
    assert len([w for w in seen if issubclass(w.category, SchedulerWarning)]) == 1
    with apply_ertacache(p.pipe, policy, strict=True):
        with pytest.raises(PolicyMismatchError, match="the scheduler's grid differs"):
            p()
