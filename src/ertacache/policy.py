"""The policy: everything calibration decides, as a versioned file (JSON + safetensors).

A policy ``P.json`` names its tensors file ``P.safetensors`` beside it, with the
tensors' SHA-256 so that a mismatched or damaged pair is refused. Both are written
atomically. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .config import CalibrationConfig, ReuseMode
from .core.engine import FollowPolicy
from .core.grids import check_grid, time_grid
from .core.rectify import CHANNELS_FIRST, ChannelLayout
from .core.reuse import get_reuse
from .errors import ErtaCacheError, PolicyMismatchError
from .io import atomic_write, atomic_write_text

SCHEMA_VERSION = 1
FORMAT_NAME = "ertacache.policy"


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
        reuse: what the cache keeps (:data:`~ertacache.config.ReuseMode`).
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
        provenance: calibration set size, seeds, threshold, candidates, library
            version, date, ...
    """

    num_inference_steps: int
    cached_steps: tuple[int, ...]
    grid: tuple[float, ...]
    adjusted_grid: tuple[float, ...] | None = None
    reuse: ReuseMode = "velocity"
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
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        T = self.num_inference_steps
        if not isinstance(T, int) or T < 1:
            raise ErtaCacheError(f"num_inference_steps must be an int >= 1, got {T!r}")
        object.__setattr__(self, "grid", tuple(check_grid(self.grid, T)))
        if self.adjusted_grid is not None:
            object.__setattr__(self, "adjusted_grid", tuple(check_grid(self.adjusted_grid, T)))
        cached = tuple(sorted(int(i) for i in self.cached_steps))
        if len(set(cached)) != len(cached) or any(not 0 < i < T - 1 for i in cached):
            raise ErtaCacheError(
                f"cached_steps must be distinct steps in 1..T-2 = 1..{T - 2} (the first and last steps are "
                f"always computed), got {list(self.cached_steps)}"
            )
        object.__setattr__(self, "cached_steps", cached)
        get_reuse(self.reuse)
        object.__setattr__(self, "branches", tuple(self.branches))
        if self.latent_shape is not None:
            object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        if self.rect_form not in ("linear", "sigmoid", "off"):
            raise ErtaCacheError(f"rect_form must be linear, sigmoid or off, got {self.rect_form!r}")
        if self.rect_form != "off":
            for name in self.branches:
                for coeffs in (self.rect_a, self.rect_b):
                    if name not in coeffs or coeffs[name].ndim != 2 or coeffs[name].shape[0] != T:
                        raise ErtaCacheError(f"rectification for branch {name!r} must be a (T={T}, C) tensor")
            if self.rect_enabled is None or tuple(self.rect_enabled.shape) != (len(self.branches), T):
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

    def follower(self, layout: ChannelLayout = CHANNELS_FIRST) -> FollowPolicy:
        """The inference pass that follows this policy (Algorithm 1), for any driver.

        Args:
            layout: where the model output's channels are (per-channel coefficients).
        """
        index = {name: k for k, name in enumerate(self.branches)}

        def coeffs(branch: str, step: int) -> tuple[Tensor, Tensor] | None:
            return self.rectification(index[branch], step) if branch in index else None

        return FollowPolicy(self.compute_mask, coeffs, self.rect_form, layout)  # type: ignore[arg-type]

    # ----- constructors ---------------------------------------------------------
    @classmethod
    def all_compute(cls, num_inference_steps: int, shift: float = 1.0, **kwargs: Any) -> Policy:
        """The policy that caches nothing: reproduces the uncached sampler exactly."""
        return cls(num_inference_steps, (), tuple(time_grid(num_inference_steps, shift)), shift=shift, **kwargs)

    @classmethod
    def uniform(cls, num_inference_steps: int, nfe: int, shift: float = 1.0, **kwargs: Any) -> Policy:
        """Evenly spaced computed steps (first and last included): uniform caching at ``nfe``."""
        return cls(num_inference_steps, uniform_cached_steps(num_inference_steps, nfe),
                   tuple(time_grid(num_inference_steps, shift)), shift=shift, **kwargs)

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
        if guidance_scale is not None and not math.isclose(guidance_scale, self.guidance_scale, rel_tol=1e-6):
            diffs.append(f"guidance_scale: policy {self.guidance_scale}, got {guidance_scale}")
        if branches is not None and tuple(branches) != self.branches:
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
        """Write ``path`` (JSON, conventionally ``*.json``) and its tensors beside it, atomically.

        Returns:
            The JSON path.
        """
        path = Path(path)
        tensors_path = _tensors_path(path)
        tensors = self._tensors()
        from safetensors.torch import save as st_save

        blob = st_save(tensors) if tensors else b""
        atomic_write(tensors_path, lambda tmp: tmp.write_bytes(blob))
        doc = self._header(tensors_path.name, hashlib.sha256(blob).hexdigest())
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy written by :meth:`save`.

        Raises:
            ErtaCacheError: missing, truncated or corrupted files, another format, a
                schema newer than this library, or tensors that do not match the JSON.
        """
        path = Path(path)
        if not path.is_file():
            raise ErtaCacheError(f"no policy file at {path}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ErtaCacheError(f"policy file {path} is not valid JSON (truncated or corrupted?): {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ErtaCacheError(f"{path} is not an ertacache policy (format {FORMAT_NAME!r} missing)")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ErtaCacheError(
                f"policy {path} has schema version {version!r}; this ertacache {__version__} reads version "
                f"{SCHEMA_VERSION}. Recalibrate, or install the ertacache version that wrote it "
                f"({doc.get('provenance', {}).get('library_version', 'unknown')})."
            )
        tensors_path = path.with_name(doc.get("tensors", ""))
        tensors = _read_tensors(tensors_path, doc.get("tensors_sha256"))
        try:
            return cls._from_doc(doc, tensors)
        except (KeyError, TypeError) as exc:
            raise ErtaCacheError(f"policy {path} is missing or has a malformed field: {exc!r}") from exc

    def _tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in self.rect_a:
            out[f"rect_a.{name}"] = self.rect_a[name].float().contiguous()
            out[f"rect_b.{name}"] = self.rect_b[name].float().contiguous()
        if self.rect_enabled is not None:
            out["rect_enabled"] = self.rect_enabled.to(torch.uint8).contiguous()
        return out

    def _header(self, tensors_name: str, sha: str) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "num_inference_steps": self.num_inference_steps,
            "nfe": self.nfe,
            "cached_steps": list(self.cached_steps),
            "grid": list(self.grid),
            "adjusted_grid": None if self.adjusted_grid is None else list(self.adjusted_grid),
            "reuse": self.reuse,
            "branches": list(self.branches),
            "rect_form": self.rect_form,
            "shift": self.shift,
            "guidance_scale": self.guidance_scale,
            "latent_shape": None if self.latent_shape is None else list(self.latent_shape),
            "model_fingerprint": self.model_fingerprint,
            "config": self.config.to_dict(),
            "provenance": self.provenance,
            "tensors": tensors_name,
            "tensors_sha256": sha,
        }

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], tensors: dict[str, Tensor]) -> Policy:
        branches = tuple(doc["branches"])
        enabled = tensors.get("rect_enabled")
        return cls(
            num_inference_steps=int(doc["num_inference_steps"]),
            cached_steps=tuple(doc["cached_steps"]),
            grid=tuple(doc["grid"]),
            adjusted_grid=None if doc["adjusted_grid"] is None else tuple(doc["adjusted_grid"]),
            reuse=doc["reuse"],
            branches=branches,
            rect_a={b: tensors[f"rect_a.{b}"] for b in branches if f"rect_a.{b}" in tensors},
            rect_b={b: tensors[f"rect_b.{b}"] for b in branches if f"rect_b.{b}" in tensors},
            rect_enabled=None if enabled is None else enabled.bool(),
            rect_form=doc["rect_form"],
            shift=float(doc["shift"]),
            guidance_scale=float(doc["guidance_scale"]),
            latent_shape=None if doc["latent_shape"] is None else tuple(doc["latent_shape"]),
            model_fingerprint=doc["model_fingerprint"],
            config=CalibrationConfig.from_dict(doc["config"]),
            provenance=dict(doc["provenance"]),
            schema_version=int(doc["schema_version"]),
        )

    def summary(self) -> str:
        """A human-readable description (``ertacache inspect``)."""
        lines = [
            f"ertacache policy (schema {self.schema_version})",
            f"  steps T={self.num_inference_steps}, NFE={self.nfe} per branch "
            f"({self.nfe_speedup:.2f}x fewer forwards), reuse={self.reuse}",
            f"  cached steps: {list(self.cached_steps)}",
            f"  shift={self.shift}, guidance_scale={self.guidance_scale}, branches={list(self.branches)}, "
            f"latent_shape={self.latent_shape}",
            f"  timestep adjustment: {'on' if self.adjusted_grid is not None else 'off'}",
            f"  rectification: {self.rect_form}"
            + (f", on at {int(self.rect_enabled.sum())} of {len(self.cached_steps) * len(self.branches)} "
               "(cached step, branch) pairs" if self.rect_enabled is not None else ""),
            f"  model fingerprint: {self.model_fingerprint}",
        ]
        for key in ("selected", "variant", "threshold", "calibration_size", "seeds", "library_version", "date"):
            if key in self.provenance:
                lines.append(f"  {key}: {self.provenance[key]}")
        cost = self.provenance.get("cost")
        if isinstance(cost, dict) and "model_calls" in cost:
            lines.append(f"  calibration cost: {cost['model_calls']} model calls ({cost.get('uncached_generations')} "
                         f"uncached generations of the set), {cost.get('seconds')} s")
        return "\n".join(lines)


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


def _tensors_path(path: Path) -> Path:
    return path.with_name(path.stem + ".safetensors")


def _read_tensors(path: Path, sha: str | None) -> dict[str, Tensor]:
    if not path.is_file():
        raise ErtaCacheError(f"the policy's tensors file {path} is missing; copy it beside the JSON file")
    blob = path.read_bytes()
    if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
        raise ErtaCacheError(
            f"{path} does not match its policy JSON (SHA-256 differs): the file is truncated, corrupted, "
            "or from another policy. Recalibrate or restore both files together."
        )
    if not blob:
        return {}
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise ErtaCacheError(f"{path} is not a readable safetensors file: {exc}") from exc
