"""The methods of ``ertacache bench`` on the bundled model, each at several settings."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..calibration import calibrate, core_session
from ..core.config import CalibrationConfig
from ..core.euler import sample, seeded_noise
from ..core.reuse import DEFAULT_REUSE, REUSE_MODES
from ..models.bundled import BundledModel, bundled_model
from ..peers.cache_dit import CACHE_DIT_INSTALL
from ..policy import Policy

Runner = Callable[[Tensor, Tensor], tuple[Tensor, int]]
"""``(noise (B, *latent_shape), labels (B,)) -> (x at t = 0, NFE per sample and branch)``."""


@dataclass
class Method:
    """One method at one setting: ``name`` groups a curve, ``setting`` labels the point."""

    name: str
    setting: str
    run: Runner
    group: str = "speed"  # "speed": on the speed/quality curves; "ablation" / "option": ablation tables


@dataclass(frozen=True)
class RunSettings:
    """What the benchmark and the demo share: a bundled ``model`` at its family's sampler (T, CFG, shift), the
    calibration and held-out sets (samples per class) and the interleaved timing repeats (defaults: the image
    model's)."""

    num_inference_steps: int = 30
    guidance_scale: float = 3.0
    shift: float = 3.0
    calibration_per_class: int = 2
    heldout_per_class: int = 4
    repeats: int = 3
    model: str = "digits"

    @staticmethod
    def sampler_of(bundled: BundledModel) -> dict[str, Any]:
        """A bundled model's family sampler and its name, as keywords of these settings."""
        return {**bundled.sampler, "model": bundled.name}


@dataclass(frozen=True)
class BenchSettings(RunSettings):
    """The benchmark's :class:`RunSettings` and its sweep: the targets, the option rows, ``--quick``."""

    target_speedups: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0)
    options: bool = True
    quick: bool = False

    @property
    def calibration(self) -> CalibrationConfig:
        """ERTACache's calibration config (full and ``--quick``): the library's default candidates and rules, with
        timestep adjustment (Eq. 13-14) estimated too so that the ablation ladder has every component (each is
        kept only where it wins), and no pass budget (the adjustment's fits alone would take the default's)."""
        return CalibrationConfig(timestep_adjustment=True, max_passes=None)

    @classmethod
    def for_model(cls, name: str, quick: bool = False) -> BenchSettings:
        """The settings for a bundled model: its family's sampler; the video model with a smaller held-out set.
        ``quick`` calibrates on the model's default calibration size (:attr:`BundledModel.calibration_size`, what
        ``ertacache calibrate`` uses: the video models need more clips than the image models need images)."""
        b = bundled_model(name)
        base = cls.sampler_of(b)
        if quick:
            return cls(**base, calibration_per_class=b.calibration_per_class,
                       heldout_per_class=1 if b.video or b.num_classes > 10 else 2,
                       repeats=1,
                       target_speedups=(2.0, 3.0) if b.video else (1.5, 2.0, 3.0), options=False, quick=True)
        if b.video:
            return cls(**base, calibration_per_class=2, heldout_per_class=2, repeats=1, options=False)
        return cls(**base)

    @classmethod
    def quick_settings(cls) -> BenchSettings:
        return cls.for_model("digits", quick=True)


class Context:
    """The bundled model, its calibration set and the sampler settings every method shares."""

    def __init__(self, model: Any, settings: BenchSettings, fingerprint: str | None,
                 bundled: BundledModel | None = None) -> None:
        from ..models.bundled import labels_and_seeds

        self.model, self.settings, self.fingerprint = model, settings, fingerprint
        self.bundled = bundled or bundled_model(settings.model)
        self.latent_shape = self.bundled.latent_shape
        self.cal_labels, self.cal_seeds = labels_and_seeds(settings.calibration_per_class, 0,
                                                           self.bundled.num_classes)
        self.null = self.bundled.null_class

    def kwargs(self, labels: Tensor) -> dict[str, Any]:
        s = self.settings
        return dict(num_inference_steps=s.num_inference_steps, shift=s.shift, guidance_scale=s.guidance_scale,
                    null_cond=torch.full_like(labels, self.null))

    def cal_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return dict(latent_shape=self.latent_shape, num_inference_steps=s.num_inference_steps, shift=s.shift,
                    guidance_scale=s.guidance_scale, null_cond=torch.full_like(self.cal_labels, self.null),
                    model_fingerprint=self.fingerprint)

    def policy_runner(self, policy: Policy | None, model: Any = None) -> Runner:
        def run(noise: Tensor, labels: Tensor) -> tuple[Tensor, int]:
            out = sample(model or self.model, noise, labels, policy=policy, **self.kwargs(labels))
            return out.x, out.stats.nfe["cond"]

        return run


def uncached(ctx: Context) -> list[Method]:
    return [Method("none", "uncached", ctx.policy_runner(None))]


def uniform(ctx: Context) -> list[Method]:
    T = ctx.settings.num_inference_steps
    out = []
    for s in ctx.settings.target_speedups:
        nfe = int(T // s)
        policy = Policy.uniform(T, nfe, shift=ctx.settings.shift, reuse="block_residual",
                                branches=("cond", "uncond"), guidance_scale=ctx.settings.guidance_scale)
        out.append(Method("uniform", f"nfe={nfe}", ctx.policy_runner(policy)))
    return out


def ablation_ladder(policy: Policy, variants: dict[str, Policy]) -> dict[str, Policy | None]:
    """The ablation ladder on the chosen cached set, then the calibrated policy.

    ``uniform``: evenly spaced computed steps at the same NFE and reuse mode;
    ``offline_policy``: the chosen set S alone; ``timestep_adjustment``: + the adjusted
    grid; ``rectification``: + rectification (every component on); ``per_step_reuse``
    (when calibration kept per-step reuse modes): the set alone with them; ``ertacache``:
    the policy calibration returns, which keeps a component only where it lowered the
    held-out calibration error.
    """
    uniform = Policy.uniform(policy.num_inference_steps, policy.nfe, shift=policy.shift, reuse=policy.reuse,
                             branches=policy.branches, guidance_scale=policy.guidance_scale,
                             latent_shape=policy.latent_shape, model_fingerprint=policy.model_fingerprint)
    ladder = {"offline_policy": "plain", "timestep_adjustment": "adjusted", "rectification": "full"}
    out: dict[str, Policy | None] = {"none": None, "uniform": uniform}
    out.update({row: variants[key] for row, key in ladder.items() if key in variants})
    if policy.step_reuse and "plain" in variants:
        out["per_step_reuse"] = replace(variants["plain"], step_reuse=policy.step_reuse)
    out["ertacache"] = policy
    return out


LADDER_NAMES = {"uniform": "uniform cache", "offline_policy": "offline policy",
                "timestep_adjustment": "+ timestep adjustment", "rectification": "+ rectification",
                "per_step_reuse": "offline policy + per-step reuse"}
"""The benchmark's row names for :func:`ablation_ladder`."""


def ertacache(ctx: Context) -> list[Method]:
    """ERTACache with the library defaults, one policy per target speedup (one shared calibration session),
    and at 2x the paper's Table 3 ladder on the chosen cached set: uniform cache, offline policy,
    + timestep adjustment, + rectification (every component on)."""
    session = core_session(ctx.model, ctx.cal_labels, ctx.cal_seeds, config=ctx.settings.calibration,
                           **ctx.cal_kwargs())
    out, ladder, policies = [], [], {}
    for s in sorted(ctx.settings.target_speedups, reverse=True):  # the smallest NFE budget first, as calibrate_many
        policies[s] = p = session.policy(target_speedup=s)
        if s == 2.0:

            ladder = [(LADDER_NAMES.get(name, f"ertacache ({p.provenance['variant']})"), q)
                      for name, q in ablation_ladder(p, session.variants).items() if name != "none"]
    for s in ctx.settings.target_speedups:
        p = policies[s]
        per_step = ", per-step reuse" if p.step_reuse else ""
        out.append(Method("ertacache", f"target={s}x ({p.provenance['selected']}{per_step}, {p.provenance['variant']})",
                          ctx.policy_runner(p)))
    return out + [Method("ablation", name, ctx.policy_runner(p), group="ablation") for name, p in ladder]


OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    **{f"reuse={name}": {"reuse": name} for name in REUSE_MODES if name != DEFAULT_REUSE},  # every registered mode
    "l1_denominator=current (v2)": {"l1_denominator": "current"},
    "phi_denominator=velocity (v2)": {"phi_denominator": "velocity"},
    "phi_denominator=gt_velocity_change": {"phi_denominator": "gt_velocity_change"},
    "rectification=sigmoid": {"rectification": "sigmoid"},
    "granularity=channel": {"granularity": "channel"},
    "candidates=threshold (paper)": {"candidates": ("threshold",)},
    "candidates=threshold+uniform (0.1)": {"candidates": ("threshold", "uniform")},
    "search only, fewest passes": {"candidates": ("search",), "search_candidates": 1, "component_check": False,
                                   "timestep_adjustment": False, "step_reuse_choice": False},
    "step_reuse_choice=off": {"step_reuse_choice": False},
    "thorough (CalibrationConfig.thorough())": {"candidates": ("threshold", "uniform", "search"),
                                                "timestep_adjustment": True},
    "component_check=off": {"component_check": False},
}


def options(ctx: Context) -> list[Method]:
    """Each option docs/method.md lists, at 2x, against the default."""
    out = []
    for label, change in OPTIONS.items():
        config = replace(CalibrationConfig(), **change)
        p = calibrate(ctx.model, ctx.cal_labels, ctx.cal_seeds, target_speedup=2.0, config=config, **ctx.cal_kwargs())
        out.append(Method("option", f"{label} [{p.provenance['selected']}, {p.provenance['variant']}]",
                          ctx.policy_runner(p), group="option"))
    return out


def _registered(kind: str) -> list[Any]:
    from ..peers.registry import peers as registered

    return registered("core", kind)  # type: ignore[arg-type]


def wrapped_peers(ctx: Context, selected: list[Any] | None = None) -> list[Method]:
    """Our TeaCache, its polynomial fitted on the calibration conditions."""
    selected = _registered("model_wrapper") if selected is None else selected
    from ..core.grids import time_grid
    from ..peers.teacache import TeaCacheModel, fit_coefficients

    s = ctx.settings
    modulated = ctx.bundled.modulated_input(ctx.model)
    coeffs = fit_coefficients(ctx.model, modulated, seeded_noise(ctx.cal_seeds, ctx.latent_shape), ctx.cal_labels,
                              s.num_inference_steps, s.guidance_scale, torch.full_like(ctx.cal_labels, ctx.null),
                              s.shift)
    grid = time_grid(s.num_inference_steps, s.shift)
    out = []
    for peer in selected:
        for setting in peer.sweep(s.quick):
            tc = TeaCacheModel(ctx.model, modulated, setting["threshold"], coeffs, grid[0], grid[-2])

            def run(noise: Tensor, labels: Tensor, tc: TeaCacheModel = tc) -> tuple[Tensor, int]:
                tc.reset()
                x = sample(tc, noise, labels, reuse="block_residual", **ctx.kwargs(labels)).x
                return x, tc.nfe

            out.append(Method(peer.name, peer.label(setting), run))
    return out


def hooked_peers(ctx: Context, selected: list[Any] | None = None) -> list[Method]:
    """diffusers' cache methods (FirstBlockCache, TaylorSeer, MagCache, PAB, FasterCache) on the transformer."""
    selected = _registered("diffusers_hook") if selected is None else selected
    from ..peers.diffusers_hooks import TransformerVelocity, magcache_ratios, peer_config, run_with_cache

    s = ctx.settings
    velocity = TransformerVelocity(ctx.model, ctx.bundled.counted(ctx.model))
    ratios = None
    if any(p.prepare == "mag_ratios" for p in selected):
        ratios = magcache_ratios(velocity, seeded_noise(ctx.cal_seeds, ctx.latent_shape), ctx.cal_labels,
                                 torch.full_like(ctx.cal_labels, ctx.null), s.num_inference_steps, s.guidance_scale,
                                 s.shift)
    out = []
    for peer in selected:
        for setting in peer.sweep(s.quick):
            setting = {**setting, "mag_ratios": ratios} if peer.prepare == "mag_ratios" else setting

            def run(noise: Tensor, labels: Tensor, name: str = peer.name, setting: dict[str, Any] = setting
                    ) -> tuple[Tensor, int]:
                config = peer_config(name, setting, lambda: velocity.timestep, s.num_inference_steps)
                return run_with_cache(velocity, config, lambda vel: sample(vel, noise, labels, **ctx.kwargs(labels)).x)

            out.append(Method(peer.name, peer.label(setting), run))
    return out


def cache_dit_peers(ctx: Context, selected: list[Any] | None = None) -> list[Method]:
    """cache-dit through its public ``cache_dit.enable_cache`` on the model's diffusers pipeline.

    The pipeline's scheduler is set to the sampler's grid, so its uncached output is the
    reference's. cache-dit runs on its own copy of the model: ``cache_dit.disable_cache``
    (1.5.x) leaves its patched FLUX transformer forward in place, which breaks the hooks of
    the methods measured after it (diffusers' FirstBlockCache raised ``TypeError`` there)
    and would time them through cache-dit's forward.
    """
    selected = _registered("cache_dit") if selected is None else selected
    try:
        import cache_dit
    except ImportError:
        return [Method("cache_dit", f"unavailable: cache-dit is not installed ({CACHE_DIT_INSTALL})",
                       _unavailable, group="failed")]
    import logging

    from ..core.grids import time_grid
    from ..integrations.diffusers.scheduler import set_scheduler_grid
    from ..peers.cache_dit import dbcache_config

    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    s = ctx.settings
    model = copy.deepcopy(ctx.model)  # same weights, so the same uncached output; cache-dit's patches stay on it
    pipe = ctx.bundled.pipeline(model, s.shift)
    set_scheduler_grid(pipe.scheduler, time_grid(s.num_inference_steps, s.shift))
    counted = ctx.bundled.counted(model)
    calls = [0]
    counted.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    out = []
    for peer in selected:
        for setting in peer.sweep(s.quick):
            def run(noise: Tensor, labels: Tensor, setting: dict[str, Any] = setting) -> tuple[Tensor, int]:
                config, calibrator = dbcache_config(setting, s.num_inference_steps)
                cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
                try:
                    calls[0] = 0
                    x = ctx.bundled.pipeline_sample(pipe, model, noise, labels, s.num_inference_steps,
                                                    s.guidance_scale)
                    return x, calls[0] // 2  # forwards per branch (one call per branch and step)
                finally:
                    cache_dit.disable_cache(pipe)

            out.append(Method(peer.name, peer.label(setting), run))
    return out


RUNNERS: dict[str, Callable[[Context, list[Any] | None], list[Method]]] = {
    "model_wrapper": wrapped_peers, "diffusers_hook": hooked_peers, "cache_dit": cache_dit_peers}
"""How the core benchmark runs each kind of peer (:data:`ertacache.peers.registry.PeerKind`), in table order."""


def peers(ctx: Context) -> list[Method]:
    """Every peer of the registry (:mod:`ertacache.peers.registry`) that runs on the core sampler, over its sweep,
    each kind through its runner."""
    out: list[Method] = []
    for kind, runner in RUNNERS.items():
        selected = _registered(kind)
        if selected:
            out += runner(ctx, selected)
    return out


def _unavailable(noise: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    raise RuntimeError(f"cache-dit is not installed ({CACHE_DIT_INSTALL})")
