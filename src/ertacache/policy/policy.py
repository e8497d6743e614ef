"""The policy: everything calibration decides, as a versioned file.

One ``.safetensors`` file holds the coefficients as tensors and every other field
as a JSON header in its metadata (:mod:`ertacache.policy.file`); it is written
atomically and can be renamed freely. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..config import CalibrationConfig, ReuseMode
from ..core.engine import FollowPolicy
from ..core.grids import check_grid, time_grid
from ..core.rectify import CHANNELS_FIRST, ChannelLayout
from ..core.reuse import DEFAULT_REUSE, check_step_reuse, get_reuse
from ..errors import ErtaCacheError, PolicyMismatchError
from ..io import atomic_write
from . import file as policy_file

SCHEMA_VERSION = 3
"""The newest schema this library reads and writes. A policy is written with the oldest
schema that holds it: 3 only when it has :attr:`Policy.step_reuse` (which a reader of
schema 2 would silently ignore), else 2."""
READABLE_SCHEMAS = (1, 2, 3)
MAX_STEPS = 10_000
MAX_COEFFICIENT = 1e3
"""Largest |a| or |b| a policy may hold: fitted coefficients are O(1); larger means a corrupted file."""


@dataclass(frozen=True, eq=False)
class Policy:
    """A calibrated caching policy for one model and one set of sampler settings.

    Step ``i`` (0-based, ``i = 0`` at t = 1) evaluates the model at ``t'_i`` and takes
    the Euler step to ``t'_{i+1}`` of :attr:`sampling_grid`.

    Attributes:
        num_inference_steps: T.
        cached_steps: the set S of steps that reuse the cache (Algorithm 2), sorted.
        grid: the original ``T + 1`` times, 1 -> 0.
        adjusted_grid: the grid after timestep adjustment (Eq. 13-14), or None.
        reuse: what the cache keeps (:data:`~ertacache.config.ReuseMode`; default calibration's,
            :data:`~ertacache.core.reuse.DEFAULT_REUSE`).
        step_reuse: ``{cached step: reuse mode}`` where a cached step rebuilds ``v~``
            with another mode than ``reuse`` (one that keeps the same thing, e.g.
            ``velocity`` inside an ``extrapolate`` policy); chosen per step by the
            schedule search's error model (:func:`~ertacache.calibration.schedule.choose_step_reuse`).
            Not in the paper.
        branches: guidance branch names, ``("cond",)`` or ``("cond", "uncond")``.
        rect_a, rect_b: rectification coefficients per branch, each ``(T, C)``
            float32 (C = 1 per step, or channels); zero where off. Eq. 21 with
            ``K = 4a``, ``B = 4(b - 1/2)``.
        rect_enabled: ``(n_branches, T)`` bool, the steps whose fit passed the
            held-out check. All false when rectification is off.
        rect_form: ``linear``, ``sigmoid`` or ``off``.
        shift: the time shift the grid was made with.
        guidance_scale: classifier-free guidance scale used in calibration.
        latent_shape: one sample's state shape, or None when any shape fits.
        model_fingerprint: :func:`ertacache.fingerprint.model_fingerprint` or None.
        config: the calibration config.
        guidance: a pipeline's guidance settings at calibration, by argument name
            (``guidance_scale``, ``true_cfg_scale``, ``guidance_scale_2``); empty for
            the core sampler (whose scale is :attr:`guidance_scale`).
        sample_size: a pipeline's ``height``, ``width`` (pixels) and ``num_frames`` at
            calibration, where known.
        provenance: calibration set size, seeds, threshold, candidates, library
            version, date, ...
    """

    num_inference_steps: int
    cached_steps: tuple[int, ...]
    grid: tuple[float, ...]
    adjusted_grid: tuple[float, ...] | None = None
    reuse: ReuseMode = DEFAULT_REUSE
    branches: tuple[str, ...] = ("cond",)
    rect_a: dict[str, Tensor] = field(default_factory=dict)
    rect_b: dict[str, Tensor] = field(default_factory=dict)
    rect_enabled: Tensor | None = None
    rect_form: str = "off"
    shift: float = 1.0
    guidance_scale: float = 1.0
    latent_shape: tuple[int, ...] | None = None
    model_fingerprint: str | None = None
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    provenance: dict[str, Any] = field(default_factory=dict)
    guidance: dict[str, float] = field(default_factory=dict)
    sample_size: dict[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    step_reuse: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        T = self.num_inference_steps
        if not _is_int(T) or not 1 <= T <= MAX_STEPS:
            raise ErtaCacheError(f"num_inference_steps must be an int in 1..{MAX_STEPS}, got {T!r}")
        object.__setattr__(self, "grid", tuple(check_grid(self.grid, T)))
        if self.adjusted_grid is not None:
            object.__setattr__(self, "adjusted_grid", tuple(check_grid(self.adjusted_grid, T)))
        if isinstance(self.cached_steps, (str, bytes)) or not hasattr(self.cached_steps, "__iter__") \
                or not all(_is_int(i) for i in self.cached_steps):
            raise ErtaCacheError(f"cached_steps must be a list of int step indices, got {self.cached_steps!r}")
        cached = tuple(sorted(int(i) for i in self.cached_steps))
        if len(set(cached)) != len(cached) or any(not 0 < i < T - 1 for i in cached):
            raise ErtaCacheError(
                f"cached_steps must be distinct steps in 1..T-2 = 1..{T - 2} (the first and last steps are "
                f"always computed), got {list(self.cached_steps)}"
            )
        object.__setattr__(self, "cached_steps", cached)
        if not isinstance(self.reuse, str):
            raise ErtaCacheError(f"reuse must be a reuse-mode name, got {self.reuse!r}")
        get_reuse(self.reuse)
        object.__setattr__(self, "step_reuse", check_step_reuse(self.step_reuse, self.reuse, cached))
        branches = self.branches
        if isinstance(branches, (str, bytes)) or not isinstance(branches, (tuple, list)) or not branches \
                or not all(isinstance(b, str) and b for b in branches) or len(set(branches)) != len(branches):
            raise ErtaCacheError(f"branches must be distinct guidance branch names, e.g. ['cond', 'uncond'], "
                                 f"got {branches!r}")
        object.__setattr__(self, "branches", tuple(branches))
        if self.latent_shape is not None:
            shape = self.latent_shape
            if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= 8 \
                    or not all(_is_int(s) and 0 < s <= 1 << 24 for s in shape):
                raise ErtaCacheError(f"latent_shape must be a list of positive ints, got {shape!r}")
            object.__setattr__(self, "latent_shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "shift", _finite(self.shift, "shift", positive=True))
        object.__setattr__(self, "guidance_scale", _finite(self.guidance_scale, "guidance_scale"))
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise ErtaCacheError(f"model_fingerprint must be a string or null, got {self.model_fingerprint!r}")
        if not isinstance(self.config, CalibrationConfig):
            raise ErtaCacheError(f"config must be a CalibrationConfig, got {type(self.config).__name__}")
        object.__setattr__(self, "guidance", _named_numbers(self.guidance, "guidance", float))
        object.__setattr__(self, "sample_size", _named_numbers(self.sample_size, "sample_size", int))
        _check_json(self.provenance, "provenance")
        if not _is_int(self.schema_version) or self.schema_version < 1:
            raise ErtaCacheError(f"schema_version must be an int >= 1, got {self.schema_version!r}")
        self._check_rectification()

    def _check_rectification(self) -> None:
        T = self.num_inference_steps
        if not isinstance(self.rect_form, str) or self.rect_form not in ("linear", "sigmoid", "off"):
            raise ErtaCacheError(f"rect_form must be linear, sigmoid or off, got {self.rect_form!r}")
        for coeffs in (self.rect_a, self.rect_b):
            if not isinstance(coeffs, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                       for k, v in coeffs.items()):
                raise ErtaCacheError("rect_a and rect_b must map branch names to tensors")
            unknown = set(coeffs) - set(self.branches)
            if unknown:
                raise ErtaCacheError(f"rectification coefficients for unknown branches {sorted(unknown)}; "
                                     f"the policy's branches are {list(self.branches)}")
        if self.rect_form == "off":
            return
        widths = set()
        for name in self.branches:
            for label, coeffs in (("rect_a", self.rect_a), ("rect_b", self.rect_b)):
                c = coeffs.get(name)
                if c is None or c.ndim != 2 or c.shape[0] != T or c.shape[1] < 1 or not c.is_floating_point():
                    raise ErtaCacheError(f"{label} for branch {name!r} must be a float (T={T}, C) tensor, got "
                                         f"{None if c is None else (tuple(c.shape), str(c.dtype))}")
                if not bool(torch.isfinite(c).all()) or float(c.abs().max()) > MAX_COEFFICIENT:
                    raise ErtaCacheError(f"{label} for branch {name!r} holds non-finite or out-of-range values "
                                         f"(|a|, |b| <= {MAX_COEFFICIENT:g}); the file is corrupted, recalibrate")
                widths.add(c.shape[1])
        if len(widths) != 1:
            raise ErtaCacheError(f"rectification coefficients must have one channel count C, got {sorted(widths)}")
        enabled = self.rect_enabled
        if not isinstance(enabled, Tensor) or tuple(enabled.shape) != (len(self.branches), T) \
                or enabled.dtype != torch.bool:
            raise ErtaCacheError(f"rect_enabled must be a ({len(self.branches)}, {T}) bool tensor")

    # ----- what inference needs -------------------------------------------------
    @property
    def sampling_grid(self) -> tuple[float, ...]:
        """The grid inference follows: the adjusted one when present."""
        return self.adjusted_grid if self.adjusted_grid is not None else self.grid

    @property
    def compute_mask(self) -> list[bool]:
        """``compute_mask[i]`` is True when step i runs the full model (static Python bools)."""
        cached = set(self.cached_steps)
        return [i not in cached for i in range(self.num_inference_steps)]

    @property
    def nfe(self) -> int:
        """Transformer forwards per sample and per branch."""
        return self.num_inference_steps - len(self.cached_steps)

    @property
    def nfe_speedup(self) -> float:
        """``T / NFE``, the speedup if cached steps cost nothing."""
        return self.num_inference_steps / self.nfe

    def rectification(self, branch: int, step: int) -> tuple[Tensor, Tensor] | None:
        """``(a, b)`` of a branch at a cached step, or None where off."""
        if self.rect_form == "off" or self.rect_enabled is None or not bool(self.rect_enabled[branch, step]):
            return None
        name = self.branches[branch]
        return self.rect_a[name][step], self.rect_b[name][step]

    def follower(self, layout: ChannelLayout = CHANNELS_FIRST, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> FollowPolicy:
        """The inference pass that follows this policy (Algorithm 1), for any driver.

        The rectification coefficients of every enabled (branch, step) are looked up
        and moved to ``device``/``dtype`` here, once: following the policy then reads
        nothing from tensors and copies nothing between host and device.

        Args:
            layout: where the model output's channels are (per-channel coefficients).
            device, dtype: where and in what precision the model's outputs are
                (None: as stored, float32 on the CPU).
        """
        enabled = self.rect_enabled.tolist() if self.rect_form != "off" and self.rect_enabled is not None else []
        table: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        for k, name in enumerate(self.branches):
            for step in self.cached_steps:
                if enabled and enabled[k][step]:
                    table[(name, step)] = (self.rect_a[name][step].to(device=device, dtype=dtype),
                                           self.rect_b[name][step].to(device=device, dtype=dtype))
        return FollowPolicy(self.compute_mask, lambda branch, step: table.get((branch, step)),
                            self.rect_form, layout, self.step_reuse)  # type: ignore[arg-type]

    # ----- constructors ---------------------------------------------------------
    @classmethod
    def all_compute(cls, num_inference_steps: int, shift: float = 1.0, **kwargs: Any) -> Policy:
        """The policy that caches nothing: reproduces the uncached sampler exactly."""
        return cls(num_inference_steps, (), tuple(time_grid(num_inference_steps, shift)), shift=shift, **kwargs)

    @classmethod
    def uniform(cls, num_inference_steps: int, nfe: int, shift: float = 1.0, *, like: Policy | None = None,
                **kwargs: Any) -> Policy:
        """Evenly spaced computed steps (first and last included): uniform caching at ``nfe``, the baseline a
        calibrated set is compared with.

        Args:
            num_inference_steps: T.
            nfe: computed steps, in 2..T.
            shift: the grid's time shift (ignored with ``like``).
            like: a calibrated policy whose settings it takes (grid, shift, reuse mode,
                guidance, branches, latent shape, model fingerprint): that policy's own
                evenly spaced baseline.
            kwargs: other :class:`Policy` fields. ``reuse`` defaults to calibration's
                (:attr:`CalibrationConfig.reuse`, ``extrapolate``). Without ``like`` and
                without ``branches``, ``guidance_scale`` or ``guidance``, the guidance is
                the call's: the policy is used with any guidance setting (it holds no
                per-branch data).

        Raises:
            ErtaCacheError: ``nfe`` outside 2..T, or an invalid field.
        """
        cached = uniform_cached_steps(num_inference_steps, nfe)
        if like is not None:
            if like.num_inference_steps != num_inference_steps:
                raise ErtaCacheError(f"like: that policy has T={like.num_inference_steps}, not {num_inference_steps}")
            keep = dict(grid=like.grid, shift=like.shift, reuse=like.reuse, branches=like.branches,
                        guidance_scale=like.guidance_scale, guidance=dict(like.guidance),
                        latent_shape=like.latent_shape, model_fingerprint=like.model_fingerprint,
                        sample_size=dict(like.sample_size), config=like.config)
            return cls(num_inference_steps, cached, **{**keep, **kwargs})
        if not {"branches", "guidance_scale", "guidance"} & set(kwargs):
            kwargs["provenance"] = {**kwargs.get("provenance", {}), "guidance": GUIDANCE_OF_THE_CALL}
        return cls(num_inference_steps, cached, tuple(time_grid(num_inference_steps, shift)), shift=shift, **kwargs)

    @property
    def any_guidance(self) -> bool:
        """True for a policy built without guidance settings (:meth:`uniform`): it follows the call's."""
        return self.provenance.get("guidance") == GUIDANCE_OF_THE_CALL

    def ablate(self, *, timestep_adjustment: bool = True, rectification: bool = True) -> Policy:
        """A copy with components switched off (the paper's Table 3 ablation)."""
        return replace(
            self,
            adjusted_grid=self.adjusted_grid if timestep_adjustment else None,
            rect_form=self.rect_form if rectification else "off",
            rect_a=self.rect_a if rectification else {},
            rect_b=self.rect_b if rectification else {},
            rect_enabled=self.rect_enabled if rectification else None,
        )

    def for_steps(self, num_inference_steps: int) -> Policy:
        """This policy mapped to another step count by relative position (:func:`ertacache.policy.travel.for_steps`)."""
        from .travel import for_steps

        return for_steps(self, num_inference_steps)

    # ----- checks ---------------------------------------------------------------
    def check_compatible(
        self,
        *,
        num_inference_steps: int | None = None,
        shift: float | None = None,
        guidance_scale: float | None = None,
        branches: Sequence[str] | None = None,
        latent_shape: Sequence[int] | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """Refuse settings the policy was not calibrated for.

        Each argument left None is not checked.

        Raises:
            PolicyMismatchError: listing every setting that differs, with both values.
        """
        diffs = []
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            diffs.append(f"num_inference_steps: policy {self.num_inference_steps}, got {num_inference_steps}")
        if shift is not None and not math.isclose(shift, self.shift, rel_tol=1e-6):
            diffs.append(f"shift: policy {self.shift}, got {shift}")
        if guidance_scale is not None and not self.any_guidance \
                and not math.isclose(guidance_scale, self.guidance_scale, rel_tol=1e-6):
            diffs.append(f"guidance_scale: policy {self.guidance_scale}, got {guidance_scale}")
        if branches is not None and not self.any_guidance and tuple(branches) != self.branches:
            diffs.append(f"guidance branches: policy {self.branches}, got {tuple(branches)}")
        if latent_shape is not None and self.latent_shape is not None and tuple(latent_shape) != self.latent_shape:
            diffs.append(f"latent shape: policy {self.latent_shape}, got {tuple(latent_shape)}")
        fingerprints = (model_fingerprint, self.model_fingerprint)
        if None not in fingerprints and fingerprints[0] != fingerprints[1]:
            diffs.append(f"model fingerprint: policy {self.model_fingerprint}, got {model_fingerprint}")
        if diffs:
            raise PolicyMismatchError(
                "this policy was calibrated for other settings: " + "; ".join(diffs)
                + ". Calibrate a policy for these settings (ertacache calibrate), or use the calibrated ones."
            )

    # ----- files ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the policy as one ``.safetensors`` file (tensors + JSON header as metadata), atomically.

        Args:
            path: where to write, conventionally ``*.safetensors``.

        Returns:
            ``path``.

        Raises:
            ErtaCacheError: a ``.json`` path (schema-1 pairs are read, no longer written).
        """
        path = Path(path)
        if path.suffix == ".json":
            raise ErtaCacheError(f"policies are one .safetensors file since schema 2; save to "
                                 f"{path.with_suffix('.safetensors')} instead of {path}")
        blob = policy_file.encode(self._header(), self._tensors())
        atomic_write(path, lambda tmp: tmp.write_bytes(blob))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy written by :meth:`save` (schema 2), or a schema-1 JSON + safetensors pair.

        Every field is validated as the policy is built (:meth:`__post_init__`).

        Raises:
            ErtaCacheError: a missing, truncated or corrupted file, another format, a
                schema newer than this library, or any field out of its range.
        """
        path = Path(path)
        if not path.is_file():
            raise ErtaCacheError(f"no policy file at {path}")
        doc, tensors = policy_file.decode(path)
        version = doc.get("schema_version")
        if not _is_int(version) or version not in READABLE_SCHEMAS:
            library = doc.get("provenance", {}).get("library_version") if isinstance(doc.get("provenance"), dict) \
                else None
            raise ErtaCacheError(
                f"policy {path} has schema version {version!r}; this ertacache {__version__} reads versions "
                f"{', '.join(map(str, READABLE_SCHEMAS))}. Recalibrate, or install the ertacache version that wrote "
                f"it ({library or 'unknown'})."
            )
        try:
            return cls._from_doc(doc, tensors)
        except KeyError as exc:
            raise ErtaCacheError(f"policy {path} is missing the field {exc}") from exc

    @classmethod
    def from_pretrained(cls, source: str | Path, revision: str | None = None) -> Policy:
        """Load from a policy file, a folder holding ``ertacache_policy.safetensors``, or a hub id.

        Raises:
            ErtaCacheError: as :meth:`load`, or a hub id that cannot be fetched.
        """
        from .hub import from_pretrained

        return from_pretrained(source, revision)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload to a Hugging Face Hub repository (:func:`~.hub.push_to_hub`); returns the commit URL."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def _tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in self.rect_a:
            out[f"rect_a.{name}"] = self.rect_a[name].float().contiguous()
            out[f"rect_b.{name}"] = self.rect_b[name].float().contiguous()
        if self.rect_enabled is not None:
            out["rect_enabled"] = self.rect_enabled.to(torch.uint8).contiguous()
        return out

    def _header(self) -> dict[str, Any]:
        return {
            "format": policy_file.FORMAT_NAME,
            "schema_version": 3 if self.step_reuse else 2,
            "num_inference_steps": self.num_inference_steps,
            "nfe": self.nfe,
            "cached_steps": list(self.cached_steps),
            "grid": list(self.grid),
            "adjusted_grid": None if self.adjusted_grid is None else list(self.adjusted_grid),
            "reuse": self.reuse,
            **({"step_reuse": {str(k): v for k, v in self.step_reuse.items()}} if self.step_reuse else {}),
            "branches": list(self.branches),
            "rect_form": self.rect_form,
            "shift": self.shift,
            "guidance_scale": self.guidance_scale,
            "guidance": dict(self.guidance),
            "sample_size": dict(self.sample_size),
            "latent_shape": None if self.latent_shape is None else list(self.latent_shape),
            "model_fingerprint": self.model_fingerprint,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], tensors: dict[str, Tensor]) -> Policy:
        branches = doc["branches"]
        if not isinstance(branches, list) or not all(isinstance(b, str) for b in branches):
            raise ErtaCacheError(f"branches must be a list of names, got {branches!r}")
        expected = {f"rect_{k}.{b}" for k in "ab" for b in branches} | {"rect_enabled"}
        unknown = set(tensors) - expected
        if unknown:
            raise ErtaCacheError(f"the policy file holds unknown tensors {sorted(unknown)}")
        enabled = tensors.get("rect_enabled")
        if enabled is not None and (enabled.dtype != torch.uint8 or bool((enabled > 1).any())):
            raise ErtaCacheError(f"rect_enabled must be a 0/1 uint8 tensor, got {enabled.dtype}")
        for key in ("grid", "cached_steps"):
            if not isinstance(doc[key], list):
                raise ErtaCacheError(f"{key} must be a list, got {type(doc[key]).__name__}")
        adjusted = doc["adjusted_grid"]
        if adjusted is not None and not isinstance(adjusted, list):
            raise ErtaCacheError(f"adjusted_grid must be a list or null, got {type(adjusted).__name__}")
        latent_shape = doc["latent_shape"]
        if latent_shape is not None and not isinstance(latent_shape, list):
            raise ErtaCacheError(f"latent_shape must be a list or null, got {type(latent_shape).__name__}")
        provenance = doc["provenance"]
        if not isinstance(provenance, dict):
            raise ErtaCacheError(f"provenance must be an object, got {type(provenance).__name__}")
        step_reuse = doc.get("step_reuse", {})
        if not isinstance(step_reuse, dict) or not all(isinstance(k, str) and k.isdigit() for k in step_reuse):
            raise ErtaCacheError(f"step_reuse must map step numbers to reuse modes, got {step_reuse!r}")
        if step_reuse and doc.get("schema_version") != 3:
            raise ErtaCacheError("step_reuse needs schema version 3; the file is hand-edited or corrupted")
        return cls(
            num_inference_steps=doc["num_inference_steps"],
            cached_steps=tuple(doc["cached_steps"]),
            grid=tuple(doc["grid"]),
            adjusted_grid=None if adjusted is None else tuple(adjusted),
            reuse=doc["reuse"],
            step_reuse={int(k): v for k, v in step_reuse.items()},
            branches=tuple(branches),
            rect_a={b: tensors[f"rect_a.{b}"] for b in branches if f"rect_a.{b}" in tensors},
            rect_b={b: tensors[f"rect_b.{b}"] for b in branches if f"rect_b.{b}" in tensors},
            rect_enabled=None if enabled is None else enabled.bool(),
            rect_form=doc["rect_form"],
            shift=doc["shift"],
            guidance_scale=doc["guidance_scale"],
            guidance=doc.get("guidance", {}),
            sample_size=doc.get("sample_size", {}),
            latent_shape=None if latent_shape is None else tuple(latent_shape),
            model_fingerprint=doc["model_fingerprint"],
            config=CalibrationConfig.from_dict(doc["config"]),
            provenance=dict(provenance),
        )

    def summary(self) -> str:
        """A human-readable description (``ertacache inspect``)."""
        lines = [
            f"ertacache policy (schema {3 if self.step_reuse else 2})",
            f"  steps T={self.num_inference_steps}, NFE={self.nfe} per branch "
            f"({self.nfe_speedup:.2f}x fewer forwards), reuse={self.reuse}",
            f"  cached steps: {list(self.cached_steps)}",
            *([f"  per-step reuse: {self.step_reuse}"] if self.step_reuse else []),
            f"  shift={self.shift}, guidance_scale={self.guidance_scale}, branches={list(self.branches)}, "
            f"latent_shape={self.latent_shape}",
            f"  timestep adjustment: {'on' if self.adjusted_grid is not None else 'off'}",
            f"  rectification: {self.rect_form}"
            + (f", on at {int(self.rect_enabled.sum())} of {len(self.cached_steps) * len(self.branches)} "
               "(cached step, branch) pairs" if self.rect_enabled is not None else ""),
            f"  model fingerprint: {self.model_fingerprint}",
        ]
        if self.guidance or self.sample_size:
            lines.append(f"  calibrated with: {dict(**self.guidance, **self.sample_size)}")
        for key in ("selected", "variant", "threshold", "calibration_size", "seeds", "mapped_from", "library_version",
                    "date"):
            if key in self.provenance:
                lines.append(f"  {key}: {self.provenance[key]}")
        if "judged_on" in self.provenance:
            lines.append(f"  judged on: {self.provenance['judged_on']}")
        for d in self.provenance.get("decisions", []) if isinstance(self.provenance.get("decisions"), list) else []:
            numbers = isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) and not isinstance(d.get(k), bool)
                                                  for k in ("gain_db", "se_db"))
            if numbers and {"decision", "n", "kept"} <= set(d):
                check, fold = d.get("k_fold"), ""
                if isinstance(check, dict) and {"folds", "refit_differs"} <= set(check):
                    fold = (f"; {check['folds']}-fold, {check['refit_differs']} refitted sets differ, in-sample "
                            f"{d.get('in_sample_gain_db', 0.0):+.2f} dB")
                elif check:  # the check could not run (its reason)
                    fold = f"; k-fold check {check}"
                lines.append(f"  {d['decision']}: {d['gain_db']:+.2f} dB +- {d['se_db']:.2f} (standard error, "
                             f"{d['n']} samples{fold}): {'kept' if d['kept'] else 'not kept'}")
        cost = self.provenance.get("cost")
        if isinstance(cost, dict) and "model_calls" in cost:
            lines.append(f"  calibration cost: {cost['model_calls']} model calls ({cost.get('uncached_generations')} "
                         f"uncached generations of the set), {cost.get('seconds')} s")
            target, gt = cost.get("target"), cost.get("ground_truth")
            if isinstance(target, dict) and isinstance(gt, dict):
                lines.append(f"    this target: {target.get('model_calls')} model calls "
                             f"({target.get('uncached_generations')} generations); ground truth (shared by every "
                             f"target of the session): {gt.get('model_calls')}")
        return "\n".join(lines)


GUIDANCE_OF_THE_CALL = "the call's"
"""``provenance["guidance"]`` of a policy that follows the call's guidance (:meth:`Policy.uniform`)."""


def uniform_cached_steps(num_inference_steps: int, nfe: int) -> tuple[int, ...]:
    """Cached steps of evenly spaced computation: ``nfe`` computed steps incl. the first and last.

    Raises:
        ErtaCacheError: ``nfe`` outside ``2..T`` (or != 1 for T = 1).
    """
    T = num_inference_steps
    if T == 1 and nfe == 1:
        return ()
    if not 2 <= nfe <= T:
        raise ErtaCacheError(f"nfe must be in 2..T={T} (first and last steps are always computed), got {nfe}")
    computed = {round(k * (T - 1) / (nfe - 1)) for k in range(nfe)}
    return tuple(i for i in range(T) if i not in computed)


def provenance(**extra: Any) -> dict[str, Any]:
    """Standard provenance fields plus ``extra``."""
    return {
        "library_version": __version__,
        "torch_version": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: object, name: str, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ErtaCacheError(f"{name} must be a number, got {x!r}")
    try:
        value = float(x)
    except OverflowError as exc:
        raise ErtaCacheError(f"{name} is out of range: {x!r}") from exc
    if not math.isfinite(value) or (positive and value <= 0) or abs(value) > 1e6:
        raise ErtaCacheError(f"{name} must be a finite number{' > 0' if positive else ''} (|x| <= 1e6), got {x!r}")
    return value


def _named_numbers(d: object, name: str, kind: type) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ErtaCacheError(f"{name} must map names to numbers, got {type(d).__name__}")
    out: dict[str, Any] = {}
    for key, value in d.items():
        if not isinstance(key, str):
            raise ErtaCacheError(f"{name} keys must be names, got {key!r}")
        if kind is int:
            if not _is_int(value) or not 0 < value <= 1 << 24:
                raise ErtaCacheError(f"{name}[{key!r}] must be a positive int, got {value!r}")
            out[key] = int(value)
        else:
            out[key] = _finite(value, f"{name}[{key!r}]")
    return out


def _check_json(value: object, name: str) -> None:
    if not isinstance(value, dict):
        raise ErtaCacheError(f"{name} must be an object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ErtaCacheError(f"{name} must hold JSON values only (finite numbers, no deep nesting): "
                             f"{type(exc).__name__}") from exc
