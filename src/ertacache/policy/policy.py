"""The policy: everything calibration decides, as a versioned file.

One ``.safetensors`` file holds the coefficients as tensors and every other field
as a JSON header in its metadata (:mod:`ertacache.policy.file`); it is written
atomically and can be renamed freely. Nothing is ever unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..core.config import CalibrationConfig, ReuseMode
from ..core.engine import FollowPolicy
from ..core.grids import time_grid, uniform_cached_steps
from ..core.rectify import CHANNELS_FIRST, ChannelLayout
from ..core.reuse import DEFAULT_REUSE, check_step_reuse
from ..errors import ErtaCacheError, PolicyMismatchError
from ..fingerprint import fingerprint_id, same_model
from ..io import atomic_write
from . import file as policy_file
from .checks import (
    check_branches,
    check_cached,
    check_coefficients,
    check_config,
    check_fingerprint,
    check_grid,
    check_latent_shape,
    check_rect_form,
    check_rectification,
    check_reuse,
    check_schema,
    check_steps,
    step_reuse_from_json,
)
from .fields import (
    at_default,
    check_json,
    finite,
    is_default,
    is_int,
    json_list,
    json_object,
    listed,
    named_numbers,
    spec,
    spec_of,
)
from .provenance import GUIDANCE_OF_THE_CALL, provenance_lines

SCHEMA_VERSION = 3
"""The newest schema this library reads and writes. A policy is written with the oldest
schema that holds it (:attr:`Policy.written_schema`: the largest ``schema`` of a field
declared in :mod:`.fields` that is not at its default, at least 2)."""
READABLE_SCHEMAS = (1, 2, 3)


def _show_rectification(form: str, policy: Policy) -> str:
    on = policy.rect_enabled
    return f"rectification: {form}" + (f", on at {int(on.sum())} of {len(policy.cached_steps) * len(policy.branches)} "
                                       "(cached step, branch) pairs" if on is not None else "")


def _show(label: str, when: Callable[[Any], bool] = lambda v: True) -> Callable[[Any, Any], str | None]:
    return lambda value, policy: f"{label}: {value}" if when(value) else None


@dataclass(frozen=True, eq=False)
class Policy:
    """A calibrated caching policy for one model and one set of sampler settings.

    Step ``i`` (0-based, ``i = 0`` at t = 1) evaluates the model at ``t'_i`` and takes
    the Euler step to ``t'_{i+1}`` of :attr:`sampling_grid`. Each field is declared once
    (:mod:`.fields`): its check, its form in the file and its summary line follow.

    Attributes:
        num_inference_steps: T.
        cached_steps: the set S of steps that reuse the cache (Algorithm 2), sorted.
        grid: the original ``T + 1`` times, 1 -> 0.
        adjusted_grid: the grid after timestep adjustment (Eq. 13-14), or None.
        reuse: what the cache keeps (:data:`~ertacache.core.config.ReuseMode`; default calibration's,
            :data:`~ertacache.core.reuse.DEFAULT_REUSE`).
        branches: guidance branch names, ``("cond",)`` or ``("cond", "uncond")``.
        rect_a, rect_b: rectification coefficients per branch, each ``(T, C)``
            float32 (C = 1 per step, or channels); zero where off. Eq. 21 with
            ``K = 4a``, ``B = 4(b - 1/2)``.
        rect_enabled: ``(n_branches, T)`` bool, the steps whose fit passed the
            held-out check. All false when rectification is off.
        rect_form: one of :data:`~ertacache.core.rectify.Rectification` (``linear``, ``sigmoid``, ``off``).
        shift: the time shift the grid was made with.
        guidance_scale: classifier-free guidance scale used in calibration.
        latent_shape: one sample's state shape, or None when any shape fits.
        model_fingerprint: :func:`ertacache.fingerprint.model_fingerprint` or None.
        config: the calibration config.
        provenance: calibration set size, seeds, threshold, candidates, library
            version, date, ...
        guidance: a pipeline's guidance settings at calibration, by argument name
            (``guidance_scale``, ``true_cfg_scale``, ``guidance_scale_2``); empty for
            the core sampler (whose scale is :attr:`guidance_scale`).
        sample_size: a pipeline's ``height``, ``width`` (pixels) and ``num_frames`` at
            calibration, where known.
        schema_version: the newest schema this library reads (not written: a file's schema is
            :attr:`written_schema`).
        step_reuse: ``{cached step: reuse mode}`` where a cached step rebuilds ``v~``
            with another mode than ``reuse`` (one that keeps the same thing, e.g.
            ``velocity`` inside an ``extrapolate`` policy); chosen per step by the
            schedule search's error model (:func:`~ertacache.calibration.schedule.choose_step_reuse`).
            Not in the paper.
    """

    num_inference_steps: int = field(metadata=spec(check=check_steps))
    cached_steps: tuple[int, ...] = field(metadata=spec(
        check=check_cached, to_json=listed, from_json=json_list("cached_steps"), show=_show("cached steps", bool)))
    grid: tuple[float, ...] = field(metadata=spec(
        check=check_grid, to_json=listed, from_json=json_list("grid"), like=True))
    adjusted_grid: tuple[float, ...] | None = field(default=None, metadata=spec(
        check=check_grid, to_json=listed, from_json=json_list("adjusted_grid", nullable=True),
        show=lambda v, p: f"timestep adjustment: {'on' if v is not None else 'off'}"))
    reuse: ReuseMode = field(default=DEFAULT_REUSE, metadata=spec(check=check_reuse, like=True, show=_show("reuse")))
    branches: tuple[str, ...] = field(default=("cond",), metadata=spec(
        check=check_branches, to_json=list, from_json=json_list("branches"), like=True, show=_show("branches")))
    rect_a: dict[str, Tensor] = field(default_factory=dict, metadata=spec(check=check_coefficients, where="tensors"))
    rect_b: dict[str, Tensor] = field(default_factory=dict, metadata=spec(check=check_coefficients, where="tensors"))
    rect_enabled: Tensor | None = field(default=None, metadata=spec(where="tensors"))
    rect_form: str = field(default="off", metadata=spec(check=check_rect_form, show=_show_rectification))
    shift: float = field(default=1.0, metadata=spec(
        check=lambda v, _: finite(v, "shift", positive=True), like=True, show=_show("shift")))
    guidance_scale: float = field(default=1.0, metadata=spec(
        check=lambda v, _: finite(v, "guidance_scale"), like=True, show=_show("guidance_scale")))
    latent_shape: tuple[int, ...] | None = field(default=None, metadata=spec(
        check=check_latent_shape, to_json=listed, from_json=json_list("latent_shape", nullable=True), like=True,
        show=_show("latent shape")))
    model_fingerprint: str | None = field(default=None, metadata=spec(
        check=check_fingerprint, like=True,
        show=lambda v, _: f"model fingerprint: {v if v is None else fingerprint_id(v)}"))
    config: CalibrationConfig = field(default_factory=CalibrationConfig, metadata=spec(
        check=check_config, to_json=lambda c: c.to_dict(), from_json=CalibrationConfig.from_dict, like=True))
    provenance: dict[str, Any] = field(default_factory=dict, metadata=spec(
        check=lambda v, _: check_json(v, "provenance"), from_json=json_object("provenance")))
    guidance: dict[str, float] = field(default_factory=dict, metadata=spec(
        check=lambda v, _: named_numbers(v, "guidance", float), to_json=dict, optional=True, like=True,
        show=_show("calibrated with guidance", bool)))
    sample_size: dict[str, int] = field(default_factory=dict, metadata=spec(
        check=lambda v, _: named_numbers(v, "sample_size", int), to_json=dict, optional=True, like=True,
        show=_show("calibrated at size", bool)))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(check=check_schema, where="none"))
    step_reuse: dict[int, str] = field(default_factory=dict, metadata=spec(
        check=lambda v, e: check_step_reuse(v, e["reuse"], e["cached_steps"]),
        to_json=lambda v: {str(k): m for k, m in v.items()}, from_json=step_reuse_from_json, optional=True,
        omit_default=True, schema=3, show=_show("per-step reuse", bool)))

    def __post_init__(self) -> None:
        earlier: dict[str, Any] = {}
        for f in fields(self):
            check = spec_of(f).check
            value = getattr(self, f.name) if check is None else check(getattr(self, f.name), earlier)
            object.__setattr__(self, f.name, value)
            earlier[f.name] = value
        check_rectification(self)

    @property
    def written_schema(self) -> int:
        """The schema this policy's file is written with: the oldest that holds every field not at its default."""
        return max([2] + [spec_of(f).schema for f in fields(self) if not at_default(self, f)])

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
            keep = {f.name: getattr(like, f.name) for f in fields(cls) if spec_of(f).like}
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
        """This policy mapped to another step count, keeping where along t it computes
        (:func:`ertacache.policy.travel.for_steps`)."""
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
        if model_fingerprint is not None and self.model_fingerprint is not None \
                and not same_model(self.model_fingerprint, model_fingerprint):
            diffs.append(f"model fingerprint: policy {fingerprint_id(self.model_fingerprint)}, "
                         f"got {fingerprint_id(model_fingerprint)} (another checkpoint)")
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
        if not is_int(version) or version not in READABLE_SCHEMAS:
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
        from .hub import resolve

        return cls.load(resolve(source, revision))

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
        header: dict[str, Any] = {"format": policy_file.FORMAT_NAME, "schema_version": self.written_schema,
                                  "nfe": self.nfe}
        for f in fields(self):
            s = spec_of(f)
            if s.where == "header" and not (s.omit_default and at_default(self, f)):
                header[f.name] = s.to_json(getattr(self, f.name))
        return header

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], tensors: dict[str, Tensor]) -> Policy:
        """A policy from a file's header and tensors: each header field read as declared, then checked."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            s = spec_of(f)
            if s.where != "header" or (s.optional and f.name not in doc):
                continue
            values[f.name] = s.from_json(doc[f.name])  # a missing field: KeyError, reported by load
            if s.schema > int(doc.get("schema_version") or 0) and not is_default(f, values[f.name]):
                raise ErtaCacheError(f"{f.name} needs schema version {s.schema}; the file is hand-edited or corrupted")
        branches = values["branches"]
        if not all(isinstance(b, str) for b in branches):
            raise ErtaCacheError(f"branches must be a list of names, got {list(branches)!r}")
        unknown = set(tensors) - ({f"rect_{k}.{b}" for k in "ab" for b in branches} | {"rect_enabled"})
        if unknown:
            raise ErtaCacheError(f"the policy file holds unknown tensors {sorted(unknown)}")
        enabled = tensors.get("rect_enabled")
        if enabled is not None and (enabled.dtype != torch.uint8 or bool((enabled > 1).any())):
            raise ErtaCacheError(f"rect_enabled must be a 0/1 uint8 tensor, got {enabled.dtype}")
        for k in "ab":
            values[f"rect_{k}"] = {b: tensors[f"rect_{k}.{b}"] for b in branches if f"rect_{k}.{b}" in tensors}
        return cls(**values, rect_enabled=None if enabled is None else enabled.bool())

    def summary(self) -> str:
        """A human-readable description (``ertacache inspect``)."""
        lines = [f"ertacache policy (schema {self.written_schema})",
                 f"  steps T={self.num_inference_steps}, NFE={self.nfe} per branch "
                 f"({self.nfe_speedup:.2f}x fewer forwards)"]
        for f in fields(self):
            show = spec_of(f).show
            line = None if show is None else show(getattr(self, f.name), self)
            if line is not None:
                lines.append(f"  {line}")
        lines += provenance_lines(self.provenance)
        return "\n".join(lines)
